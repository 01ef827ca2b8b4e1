//! The host side of the ABI: what a module imports from `env` (proxy-wasm
//! 0.2.1) and from `wasi_snapshot_preview1` (the handful of WASI calls that
//! SDK-built modules import for their runtime: clocks, randomness, stdout).
//!
//! A host function sees only what the call in progress lent the store
//! ([`Stream`]): the request's or response's headers and body are moved in
//! before the callback and back out after it, so nothing here borrows from
//! the request and nothing is copied for the callbacks that do not look.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use wasmi::{Caller, Error, Linker, Memory, StoreLimits, TypedFunc};

use super::abi::{self, Status};
use super::{LocalResponse, RequestInfo};

/// The store's data: the instance's handles and the call in progress.
pub(super) struct HostState {
    pub limits: StoreLimits,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub plugin: Arc<str>,
    pub config: Arc<[u8]>,
    pub root_id: i32,
    pub stream: Stream,
    /// Bytes on their way into the guest (reused between calls).
    scratch: Vec<u8>,
}

impl HostState {
    pub fn new(plugin: Arc<str>, config: Arc<[u8]>, limits: StoreLimits, root_id: i32) -> Self {
        HostState { limits, memory: None, alloc: None, plugin, config, root_id, stream: Stream::default(), scratch: Vec::new() }
    }
}

/// What the callback in progress may read and change.
#[derive(Default)]
pub(super) struct Stream {
    /// The context the callback runs for (0 while none does).
    pub context_id: i32,
    pub info: RequestInfo,
    pub request_headers: Option<HeaderMap>,
    pub request_body: Option<Bytes>,
    pub response_headers: Option<HeaderMap>,
    pub status: Option<StatusCode>,
    pub response_body: Option<Bytes>,
    pub local_response: Option<LocalResponse>,
}

type Ret = Result<i32, Error>;

fn ok(s: Status) -> Ret {
    Ok(s as i32)
}

fn range(ptr: i32, len: i32) -> std::ops::Range<usize> {
    let start = ptr as u32 as usize;
    start..start.saturating_add(len as u32 as usize)
}

fn put_u32(mem: &mut [u8], at: i32, value: u32) -> bool {
    match mem.get_mut(range(at, 4)) {
        Some(dst) => {
            dst.copy_from_slice(&value.to_le_bytes());
            true
        }
        None => false,
    }
}

fn memory(caller: &Caller<'_, HostState>) -> Result<Memory, Error> {
    caller.data().memory.ok_or_else(|| Error::new("the module exports no memory"))
}

/// Copies the state's scratch bytes into memory the guest allocates, and
/// stores the address and size at `ret_ptr` and `ret_size`.
fn give_scratch(caller: &mut Caller<'_, HostState>, ret_ptr: i32, ret_size: i32) -> Ret {
    let len = caller.data().scratch.len();
    let Some(alloc) = caller.data().alloc else {
        return Err(Error::new("the module exports no allocator"));
    };
    let ptr = alloc.call(&mut *caller, len as i32)?;
    let memory = memory(caller)?;
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    if ptr == 0 && len > 0 {
        return ok(Status::InvalidMemoryAccess);
    }
    let Some(dst) = mem.get_mut(range(ptr, len as i32)) else {
        return ok(Status::InvalidMemoryAccess);
    };
    dst.copy_from_slice(&state.scratch);
    if !put_u32(mem, ret_ptr, ptr as u32) || !put_u32(mem, ret_size, len as u32) {
        return ok(Status::InvalidMemoryAccess);
    }
    ok(Status::Ok)
}

/// Runs `f` with the guest's bytes at `ptr, len` and the state.
fn with_bytes<R>(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut HostState) -> R,
) -> Result<Option<R>, Error> {
    let memory = memory(caller)?;
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    Ok(mem.get(range(ptr, len)).map(|bytes| f(bytes, state)))
}

/// Two guest byte ranges and the state.
fn with_two<R>(
    caller: &mut Caller<'_, HostState>,
    (p1, l1): (i32, i32),
    (p2, l2): (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut HostState) -> R,
) -> Result<Option<R>, Error> {
    let memory = memory(caller)?;
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    match (mem.get(range(p1, l1)), mem.get(range(p2, l2))) {
        (Some(a), Some(b)) => Ok(Some(f(a, b, state))),
        _ => Ok(None),
    }
}

/// The header map `map` of the call in progress, and whether it is the
/// request's; `None` when this callback has none.
fn map_of(stream: &mut Stream, map: i32) -> Option<(&mut HeaderMap, bool)> {
    match map {
        abi::MAP_HTTP_REQUEST_HEADERS => stream.request_headers.as_mut().map(|h| (h, true)),
        abi::MAP_HTTP_RESPONSE_HEADERS => stream.response_headers.as_mut().map(|h| (h, false)),
        _ => None,
    }
}

/// Appends a pseudo-header's value to `out`; false if `key` is not one this
/// map has.
fn pseudo_value(stream: &Stream, request: bool, key: &[u8], out: &mut Vec<u8>) -> bool {
    let headers = if request { stream.request_headers.as_ref() } else { stream.response_headers.as_ref() };
    match (request, key) {
        (true, b":path") => out.extend_from_slice(stream.info.path.as_bytes()),
        (true, b":method") => out.extend_from_slice(stream.info.method.as_str().as_bytes()),
        (true, b":scheme") => out.extend_from_slice(stream.info.scheme.as_bytes()),
        (true, b":authority") => match headers.and_then(|h| h.get(http::header::HOST)) {
            Some(host) => out.extend_from_slice(host.as_bytes()),
            None => match &stream.info.authority {
                Some(a) => out.extend_from_slice(a.as_bytes()),
                None => return false,
            },
        },
        (false, b":status") => match stream.status {
            Some(s) => out.extend_from_slice(s.as_str().as_bytes()),
            None => return false,
        },
        _ => return false,
    }
    true
}

const REQUEST_PSEUDO: [&[u8]; 4] = [b":authority", b":path", b":method", b":scheme"];

/// Sets a pseudo-header; `Err` for one that cannot be set (or a bad value).
fn set_pseudo(stream: &mut Stream, request: bool, key: &[u8], value: &[u8]) -> Result<(), Status> {
    match (request, key) {
        (true, b":path") => {
            let path = std::str::from_utf8(value).map_err(|_| Status::BadArgument)?;
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(Status::BadArgument);
            }
            stream.info.path = path.to_owned();
        }
        (true, b":method") => stream.info.method = Method::from_bytes(value).map_err(|_| Status::BadArgument)?,
        (true, b":authority") => {
            let mut now = Vec::new();
            if pseudo_value(stream, true, b":authority", &mut now) && now == value {
                return Ok(());
            }
            let host = HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)?;
            if let Some(h) = stream.request_headers.as_mut() {
                h.insert(http::header::HOST, host);
            }
        }
        (false, b":status") => {
            let code = std::str::from_utf8(value).ok().and_then(|s| s.parse::<u16>().ok());
            stream.status = Some(code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Status::BadArgument)?);
        }
        _ => return Err(Status::BadArgument),
    }
    Ok(())
}

fn header_name(key: &[u8]) -> Result<HeaderName, Status> {
    HeaderName::from_bytes(key).map_err(|_| Status::BadArgument)
}

fn header_value(value: &[u8]) -> Result<HeaderValue, Status> {
    HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)
}

/// Serializes map `map` (pseudo-headers first, as Envoy does) into scratch.
fn serialize_map(state: &mut HostState, map: i32) -> Status {
    let mut scratch = std::mem::take(&mut state.scratch);
    scratch.clear();
    let stream = &state.stream;
    let (headers, request) = match map {
        abi::MAP_HTTP_REQUEST_HEADERS => (stream.request_headers.as_ref(), true),
        abi::MAP_HTTP_RESPONSE_HEADERS => (stream.response_headers.as_ref(), false),
        _ => (None, false),
    };
    let Some(headers) = headers else {
        state.scratch = scratch;
        return Status::NotFound;
    };
    let mut pseudo: Vec<(&[u8], Vec<u8>)> = Vec::with_capacity(4);
    let keys: &[&[u8]] = if request { &REQUEST_PSEUDO } else { &[b":status"] };
    for key in keys {
        let mut v = Vec::new();
        if pseudo_value(stream, request, key, &mut v) {
            pseudo.push((key, v));
        }
    }
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::with_capacity(pseudo.len() + headers.len());
    pairs.extend(pseudo.iter().map(|(k, v)| (*k, v.as_slice())));
    pairs.extend(headers.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())));
    abi::write_map(&mut scratch, &pairs);
    state.scratch = scratch;
    Status::Ok
}

/// Replaces map `map` with the serialized pairs.
fn replace_map(stream: &mut Stream, map: i32, bytes: &[u8]) -> Status {
    let Some(pairs) = abi::read_map(bytes) else {
        return Status::BadArgument;
    };
    let request = match map {
        abi::MAP_HTTP_REQUEST_HEADERS if stream.request_headers.is_some() => true,
        abi::MAP_HTTP_RESPONSE_HEADERS if stream.response_headers.is_some() => false,
        _ => return Status::NotFound,
    };
    let mut fresh = HeaderMap::with_capacity(pairs.len());
    for (k, v) in &pairs {
        if k.starts_with(b":") {
            continue;
        }
        match (header_name(k), header_value(v)) {
            (Ok(k), Ok(v)) => {
                fresh.append(k, v);
            }
            _ => return Status::BadArgument,
        }
    }
    let slot = if request { &mut stream.request_headers } else { &mut stream.response_headers };
    *slot = Some(fresh);
    for (k, v) in &pairs {
        if k.starts_with(b":") && set_pseudo(stream, request, k, v).is_err() && *k != b":scheme" {
            return Status::BadArgument;
        }
    }
    Status::Ok
}

fn buffer_of(state: &HostState, buffer: i32) -> Option<&[u8]> {
    match buffer {
        abi::BUFFER_HTTP_REQUEST_BODY => state.stream.request_body.as_deref(),
        abi::BUFFER_HTTP_RESPONSE_BODY => state.stream.response_body.as_deref(),
        abi::BUFFER_PLUGIN_CONFIGURATION => Some(&state.config),
        abi::BUFFER_VM_CONFIGURATION => Some(&[]),
        _ => None,
    }
}

/// The value of a property (`path` is its segments joined by NUL), as Envoy
/// encodes it: strings as their bytes, integers as 8 little-endian bytes.
fn property(state: &HostState, path: &[u8], out: &mut Vec<u8>) -> bool {
    let info = &state.stream.info;
    let (url_path, query) = info.path.split_once('?').unwrap_or((&info.path, ""));
    match path {
        b"plugin_name" => out.extend_from_slice(state.plugin.as_bytes()),
        // Empty, as Envoy's when no root_id is configured: SDKs that pick
        // their root context by it register theirs under "".
        b"plugin_root_id" => {}
        b"request\0path" => out.extend_from_slice(info.path.as_bytes()),
        b"request\0url_path" => out.extend_from_slice(url_path.as_bytes()),
        b"request\0query" => out.extend_from_slice(query.as_bytes()),
        b"request\0method" => out.extend_from_slice(info.method.as_str().as_bytes()),
        b"request\0scheme" => out.extend_from_slice(info.scheme.as_bytes()),
        b"request\0host" => {
            if !pseudo_value(&state.stream, true, b":authority", out) {
                return false;
            }
        }
        b"response\0code" => match state.stream.status {
            Some(s) => out.extend_from_slice(&i64::from(s.as_u16()).to_le_bytes()),
            None => return false,
        },
        _ => return false,
    }
    true
}

fn log_level_now() -> i32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        LevelFilter::ERROR => 4,
        _ => 5,
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Defines every import this host offers.
pub(super) fn define(linker: &mut Linker<HostState>) -> Result<(), Error> {
    define_proxy(linker)?;
    define_stubs(linker)?;
    define_wasi(linker)?;
    // WASI's first snapshot, which older SDK builds (AssemblyScript's)
    // import: the calls offered here have the same signatures in both.
    linker.alias_module("wasi_snapshot_preview1", "wasi_unstable")
}

fn define_proxy(l: &mut Linker<HostState>) -> Result<(), wasmi::errors::LinkerError> {
    const ENV: &str = "env";

    l.func_wrap(ENV, "proxy_log", |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| -> Ret {
        let logged = with_bytes(&mut c, ptr, len, |msg, state| {
            let msg = String::from_utf8_lossy(msg);
            let plugin = &*state.plugin;
            match level {
                0 => tracing::trace!(target: "manifold::wasm", plugin, "{msg}"),
                1 => tracing::debug!(target: "manifold::wasm", plugin, "{msg}"),
                2 => tracing::info!(target: "manifold::wasm", plugin, "{msg}"),
                3 => tracing::warn!(target: "manifold::wasm", plugin, "{msg}"),
                _ => tracing::error!(target: "manifold::wasm", plugin, "{msg}"),
            }
        })?;
        ok(if logged.is_some() { Status::Ok } else { Status::InvalidMemoryAccess })
    })?;

    l.func_wrap(ENV, "proxy_get_log_level", |mut c: Caller<'_, HostState>, ret: i32| -> Ret {
        let memory = memory(&c)?;
        let mem = memory.data_mut(&mut c);
        ok(if put_u32(mem, ret, log_level_now() as u32) { Status::Ok } else { Status::InvalidMemoryAccess })
    })?;

    l.func_wrap(ENV, "proxy_get_current_time_nanoseconds", |mut c: Caller<'_, HostState>, ret: i32| -> Ret {
        let memory = memory(&c)?;
        let mem = memory.data_mut(&mut c);
        match mem.get_mut(range(ret, 8)) {
            Some(dst) => {
                dst.copy_from_slice(&now_nanos().to_le_bytes());
                ok(Status::Ok)
            }
            None => ok(Status::InvalidMemoryAccess),
        }
    })?;

    // Accepted, never ticks: a filter's work is per request.
    l.func_wrap(ENV, "proxy_set_tick_period_milliseconds", |_: i32| -> i32 { Status::Ok as i32 })?;

    l.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>, buffer: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> Ret {
            let state = c.data_mut();
            let mut scratch = std::mem::take(&mut state.scratch);
            scratch.clear();
            let status = match buffer_of(state, buffer) {
                None => Status::NotFound,
                Some(bytes) if start as u32 as usize > bytes.len() => Status::BadArgument,
                Some(bytes) => {
                    let start = start as u32 as usize;
                    let end = start.saturating_add(max as u32 as usize).min(bytes.len());
                    scratch.extend_from_slice(&bytes[start..end]);
                    Status::Ok
                }
            };
            state.scratch = scratch;
            match status {
                Status::Ok => give_scratch(&mut c, ret_ptr, ret_size),
                other => ok(other),
            }
        },
    )?;

    l.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, buffer: i32, start: i32, size: i32, ptr: i32, len: i32| -> Ret {
            let done = with_bytes(&mut c, ptr, len, |data, state| {
                let slot = match buffer {
                    abi::BUFFER_HTTP_REQUEST_BODY => &mut state.stream.request_body,
                    abi::BUFFER_HTTP_RESPONSE_BODY => &mut state.stream.response_body,
                    _ => return Status::NotFound,
                };
                let Some(body) = slot.as_ref() else {
                    return Status::NotFound;
                };
                // Bytes [start, start + size) are replaced by `data`: (0, len)
                // replaces the whole body, (0, 0) prepends, (len, 0) appends.
                let start = start as u32 as usize;
                if start > body.len() {
                    return Status::BadArgument;
                }
                let end = start.saturating_add(size as u32 as usize).min(body.len());
                let mut fresh = BytesMut::with_capacity(body.len() - (end - start) + data.len());
                fresh.extend_from_slice(&body[..start]);
                fresh.extend_from_slice(data);
                fresh.extend_from_slice(&body[end..]);
                *slot = Some(fresh.freeze());
                Status::Ok
            })?;
            ok(done.unwrap_or(Status::InvalidMemoryAccess))
        },
    )?;

    l.func_wrap(ENV, "proxy_get_header_map_pairs", |mut c: Caller<'_, HostState>, map: i32, ret_ptr: i32, ret_size: i32| -> Ret {
        match serialize_map(c.data_mut(), map) {
            Status::Ok => give_scratch(&mut c, ret_ptr, ret_size),
            other => ok(other),
        }
    })?;

    l.func_wrap(ENV, "proxy_set_header_map_pairs", |mut c: Caller<'_, HostState>, map: i32, ptr: i32, len: i32| -> Ret {
        let done = with_bytes(&mut c, ptr, len, |bytes, state| replace_map(&mut state.stream, map, bytes))?;
        ok(done.unwrap_or(Status::InvalidMemoryAccess))
    })?;

    l.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>, map: i32, key_ptr: i32, key_len: i32, ret_ptr: i32, ret_size: i32| -> Ret {
            let found = with_bytes(&mut c, key_ptr, key_len, |key, state| {
                let mut scratch = std::mem::take(&mut state.scratch);
                scratch.clear();
                let status = match map_of(&mut state.stream, map) {
                    None => Status::NotFound,
                    Some((_, request)) if key.starts_with(b":") => {
                        if pseudo_value(&state.stream, request, key, &mut scratch) {
                            Status::Ok
                        } else {
                            Status::NotFound
                        }
                    }
                    Some((headers, _)) => {
                        // Several values are joined by commas, as HTTP reads them.
                        let Ok(key) = std::str::from_utf8(key) else {
                            state.scratch = scratch;
                            return Status::NotFound;
                        };
                        let mut values = headers.get_all(key).iter();
                        match values.next() {
                            None => Status::NotFound,
                            Some(first) => {
                                scratch.extend_from_slice(first.as_bytes());
                                for v in values {
                                    scratch.push(b',');
                                    scratch.extend_from_slice(v.as_bytes());
                                }
                                Status::Ok
                            }
                        }
                    }
                };
                state.scratch = scratch;
                status
            })?;
            match found {
                None => ok(Status::InvalidMemoryAccess),
                Some(Status::Ok) => give_scratch(&mut c, ret_ptr, ret_size),
                Some(other) => ok(other),
            }
        },
    )?;

    fn edit(c: &mut Caller<'_, HostState>, map: i32, key: (i32, i32), value: (i32, i32), append: bool) -> Ret {
        let done = with_two(c, key, value, |key, value, state| {
            let Some((headers, request)) = map_of(&mut state.stream, map) else {
                return Status::NotFound;
            };
            if key.starts_with(b":") {
                return match set_pseudo(&mut state.stream, request, key, value) {
                    Ok(()) => Status::Ok,
                    Err(s) => s,
                };
            }
            match (header_name(key), header_value(value)) {
                (Ok(k), Ok(v)) => {
                    if append {
                        headers.append(k, v);
                    } else {
                        headers.insert(k, v);
                    }
                    Status::Ok
                }
                _ => Status::BadArgument,
            }
        })?;
        ok(done.unwrap_or(Status::InvalidMemoryAccess))
    }

    l.func_wrap(ENV, "proxy_add_header_map_value", |mut c: Caller<'_, HostState>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Ret {
        edit(&mut c, map, (kp, kl), (vp, vl), true)
    })?;
    l.func_wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, HostState>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Ret {
            edit(&mut c, map, (kp, kl), (vp, vl), false)
        },
    )?;

    l.func_wrap(ENV, "proxy_remove_header_map_value", |mut c: Caller<'_, HostState>, map: i32, kp: i32, kl: i32| -> Ret {
        let done = with_bytes(&mut c, kp, kl, |key, state| {
            let Some((headers, _)) = map_of(&mut state.stream, map) else {
                return Status::NotFound;
            };
            if key.starts_with(b":") {
                return Status::BadArgument;
            }
            // Removing a header that is not there is not an error (Envoy).
            if let Ok(name) = HeaderName::from_bytes(key) {
                headers.remove(name);
            }
            Status::Ok
        })?;
        ok(done.unwrap_or(Status::InvalidMemoryAccess))
    })?;

    l.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Caller<'_, HostState>, path_ptr: i32, path_len: i32, ret_ptr: i32, ret_size: i32| -> Ret {
            let found = with_bytes(&mut c, path_ptr, path_len, |path, state| {
                let mut scratch = std::mem::take(&mut state.scratch);
                scratch.clear();
                // A trailing NUL (some SDKs send one) names the same property.
                let path = path.strip_suffix(b"\0").unwrap_or(path);
                let found = property(state, path, &mut scratch);
                state.scratch = scratch;
                found
            })?;
            match found {
                None => ok(Status::InvalidMemoryAccess),
                Some(true) => give_scratch(&mut c, ret_ptr, ret_size),
                Some(false) => ok(Status::NotFound),
            }
        },
    )?;

    l.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32|
         -> Ret {
            let memory = memory(&c)?;
            let (mem, state) = memory.data_and_store_mut(&mut c);
            let (Some(details), Some(body), Some(headers)) =
                (mem.get(range(details_ptr, details_len)), mem.get(range(body_ptr, body_len)), mem.get(range(headers_ptr, headers_len)))
            else {
                return ok(Status::InvalidMemoryAccess);
            };
            // A final answer: no 1xx (the client's connection would be left
            // waiting for the real one), nothing past 599.
            let status = u16::try_from(status).ok().filter(|s| (200..=599).contains(s));
            let Some(status) = status.and_then(|s| StatusCode::from_u16(s).ok()) else {
                return ok(Status::BadArgument);
            };
            let Some(pairs) = abi::read_map(headers) else {
                return ok(Status::BadArgument);
            };
            let mut map = HeaderMap::with_capacity(pairs.len());
            for (k, v) in pairs {
                match (header_name(k), header_value(v)) {
                    (Ok(k), Ok(v)) => {
                        map.append(k, v);
                    }
                    _ => return ok(Status::BadArgument),
                }
            }
            state.stream.local_response = Some(LocalResponse {
                status,
                headers: map,
                body: Bytes::copy_from_slice(body),
                details: String::from_utf8_lossy(details).into_owned(),
            });
            ok(Status::Ok)
        },
    )?;

    l.func_wrap(ENV, "proxy_set_effective_context", |c: Caller<'_, HostState>, id: i32| -> i32 {
        let state = c.data();
        // Only the root and the stream in progress can be reached: no other
        // stream's headers are lent to this call.
        if id == state.root_id || (id != 0 && id == state.stream.context_id) {
            Status::Ok as i32
        } else {
            Status::BadArgument as i32
        }
    })?;

    // Bodies are handed over whole, so there is never a paused stream to
    // resume: continuing is a no-op.
    l.func_wrap(ENV, "proxy_continue_stream", |stream: i32| -> i32 {
        match stream {
            abi::STREAM_HTTP_REQUEST | abi::STREAM_HTTP_RESPONSE => Status::Ok as i32,
            _ => Status::BadArgument as i32,
        }
    })?;
    l.func_wrap(ENV, "proxy_continue_request", || -> i32 { Status::Ok as i32 })?;
    l.func_wrap(ENV, "proxy_continue_response", || -> i32 { Status::Ok as i32 })?;
    l.func_wrap(ENV, "proxy_clear_route_cache", || -> i32 { Status::Ok as i32 })?;
    // Nothing waits for the module to say it is done.
    l.func_wrap(ENV, "proxy_done", || -> i32 { Status::NotFound as i32 })?;
    Ok(())
}

/// Calls a module may import but this host does not offer yet (HTTP and
/// gRPC calls out, shared data and queues, metrics, properties set, foreign
/// functions): each answers `Unimplemented`, so a module that imports them
/// still loads and can fall back.
fn define_stubs(l: &mut Linker<HostState>) -> Result<(), wasmi::errors::LinkerError> {
    const ENV: &str = "env";
    const U: i32 = Status::Unimplemented as i32;
    type I = i32;
    l.func_wrap(ENV, "proxy_http_call", |_: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_grpc_call", |_: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_grpc_stream", |_: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_grpc_send", |_: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_grpc_cancel", |_: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_grpc_close", |_: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_get_status", |_: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_get_shared_data", |_: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_set_shared_data", |_: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_register_shared_queue", |_: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_resolve_shared_queue", |_: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_dequeue_shared_queue", |_: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_enqueue_shared_queue", |_: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_define_metric", |_: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_increment_metric", |_: I, _: i64| -> I { U })?;
    l.func_wrap(ENV, "proxy_record_metric", |_: I, _: i64| -> I { U })?;
    l.func_wrap(ENV, "proxy_get_metric", |_: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_set_property", |_: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_call_foreign_function", |_: I, _: I, _: I, _: I, _: I, _: I| -> I { U })?;
    l.func_wrap(ENV, "proxy_close_stream", |_: I| -> I { U })?;
    Ok(())
}

/// The WASI calls a module built by a language's WASI target makes while it
/// starts (arguments, environment, clocks, randomness, stdout): no files, no
/// sockets, an empty environment.
fn define_wasi(l: &mut Linker<HostState>) -> Result<(), wasmi::errors::LinkerError> {
    const WASI: &str = "wasi_snapshot_preview1";
    const SUCCESS: i32 = 0;
    const BADF: i32 = 8;
    const INVAL: i32 = 28;
    const NOSYS: i32 = 52;
    type I = i32;

    fn zeros(c: &mut Caller<'_, HostState>, a: i32, b: i32) -> Ret {
        let memory = memory(c)?;
        let mem = memory.data_mut(&mut *c);
        Ok(if put_u32(mem, a, 0) && put_u32(mem, b, 0) { SUCCESS } else { INVAL })
    }
    l.func_wrap(WASI, "args_sizes_get", |mut c: Caller<'_, HostState>, a: I, b: I| -> Ret { zeros(&mut c, a, b) })?;
    l.func_wrap(WASI, "environ_sizes_get", |mut c: Caller<'_, HostState>, a: I, b: I| -> Ret { zeros(&mut c, a, b) })?;
    l.func_wrap(WASI, "args_get", |_: I, _: I| -> I { SUCCESS })?;
    l.func_wrap(WASI, "environ_get", |_: I, _: I| -> I { SUCCESS })?;

    l.func_wrap(WASI, "clock_time_get", |mut c: Caller<'_, HostState>, _id: I, _precision: i64, ret: I| -> Ret {
        let memory = memory(&c)?;
        let mem = memory.data_mut(&mut c);
        match mem.get_mut(range(ret, 8)) {
            Some(dst) => {
                dst.copy_from_slice(&now_nanos().to_le_bytes());
                Ok(SUCCESS)
            }
            None => Ok(INVAL),
        }
    })?;
    l.func_wrap(WASI, "random_get", |mut c: Caller<'_, HostState>, ptr: I, len: I| -> Ret {
        let memory = memory(&c)?;
        let mem = memory.data_mut(&mut c);
        match mem.get_mut(range(ptr, len)) {
            Some(dst) => Ok(if getrandom::fill(dst).is_ok() { SUCCESS } else { NOSYS }),
            None => Ok(INVAL),
        }
    })?;

    // stdout and stderr go to the log at debug level; other descriptors do not exist.
    l.func_wrap(WASI, "fd_write", |mut c: Caller<'_, HostState>, fd: I, iovs: I, count: I, written: I| -> Ret {
        if fd != 1 && fd != 2 {
            return Ok(BADF);
        }
        let memory = memory(&c)?;
        let (mem, state) = memory.data_and_store_mut(&mut c);
        let mut total: u32 = 0;
        for i in 0..count.max(0) {
            let Some(iov) = mem.get(range(iovs.wrapping_add(i * 8), 8)) else {
                return Ok(INVAL);
            };
            let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
            let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            let Some(text) = mem.get(range(ptr, len)) else {
                return Ok(INVAL);
            };
            let plugin = &*state.plugin;
            tracing::debug!(target: "manifold::wasm", plugin, fd, "{}", String::from_utf8_lossy(text).trim_end());
            total = total.wrapping_add(len as u32);
        }
        Ok(if put_u32(mem, written, total) { SUCCESS } else { INVAL })
    })?;
    l.func_wrap(WASI, "fd_read", |_: I, _: I, _: I, _: I| -> I { BADF })?;
    l.func_wrap(WASI, "fd_close", |_: I| -> I { BADF })?;
    l.func_wrap(WASI, "fd_seek", |_: I, _: i64, _: I, _: I| -> I { BADF })?;
    l.func_wrap(WASI, "fd_fdstat_get", |_: I, _: I| -> I { BADF })?;
    l.func_wrap(WASI, "fd_prestat_get", |_: I, _: I| -> I { BADF })?;
    l.func_wrap(WASI, "fd_prestat_dir_name", |_: I, _: I, _: I| -> I { BADF })?;
    l.func_wrap(WASI, "poll_oneoff", |_: I, _: I, _: I, _: I| -> I { NOSYS })?;
    l.func_wrap(WASI, "sched_yield", || -> I { SUCCESS })?;
    l.func_wrap(WASI, "proc_exit", |code: I| -> Result<(), Error> { Err(Error::i32_exit(code)) })?;
    Ok(())
}
