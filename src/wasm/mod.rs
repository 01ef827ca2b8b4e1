//! A proxy-wasm host (cargo feature `wasm`): runs filters written for the
//! ABI Envoy, Kong and APISIX implement (version 0.2.1, the HTTP subset) on
//! the wasmi interpreter.
//!
//! - [`WasmPlugin::compile`] checks a module once per config: it validates
//!   it, checks its exports and starts one instance to run
//!   `proxy_on_vm_start` and `proxy_on_configure`, so a module that cannot
//!   run is a config error, not a request error.
//! - Each worker thread has its own instance of each plugin (and its own
//!   engine and compiled module: nothing of the interpreter is shared
//!   between workers), started on the thread's first request and kept in a
//!   thread-local cache keyed by the plugin; a trap drops it, and the next
//!   request starts a fresh one.
//! - A request is an [`HttpContext`]: its callbacks run in this thread's
//!   instance with the request's headers and (whole, buffered) bodies lent
//!   to the host functions for the call. Every callback of one request
//!   shares the plugin's fuel, so a filter that loops fails its request with
//!   [`WasmError::OutOfFuel`] instead of holding the worker; linear memory
//!   is capped by [`Limits::memory_bytes`].
//!
//! The host functions are in `host.rs`, the ABI's numbers and map format in
//! `abi.rs`, the per-thread instance in `instance.rs`.

mod abi;
mod host;
mod instance;

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use instance::{Compiled, Exports, StreamFn, ThreadPlugin, ROOT_ID};

/// What one plugin may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (about one unit per WebAssembly instruction) for one request's
    /// callbacks together, and for each start-up callback on its own.
    pub fuel: u64,
    /// The most linear memory an instance may have, in bytes.
    pub memory_bytes: usize,
}

impl Limits {
    pub const DEFAULT_FUEL: u64 = 10_000_000;
    pub const DEFAULT_MEMORY_BYTES: usize = 16 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits { fuel: Self::DEFAULT_FUEL, memory_bytes: Self::DEFAULT_MEMORY_BYTES }
    }
}

/// Why a plugin could not be compiled or a callback failed. Start-up errors
/// ([`Module`](Self::Module), [`Configure`](Self::Configure)) belong to the
/// config; the others fail one request (500, the gateway's fault).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WasmError {
    /// The bytes are not a proxy-wasm module this host can run.
    Module(String),
    /// The module would not start: a start-up callback refused or failed.
    Configure(String),
    /// A callback used up the request's fuel.
    OutOfFuel { callback: Callback, fuel: u64 },
    /// A callback trapped (an `unreachable`, an access out of bounds, a
    /// failed allocation, …).
    Trap { callback: Callback, message: String },
}

impl fmt::Display for WasmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WasmError::Module(m) => write!(f, "module: {m}"),
            WasmError::Configure(m) => write!(f, "start-up: {m}"),
            WasmError::OutOfFuel { callback, fuel } => {
                write!(f, "{} ran out of fuel (limit {fuel} per request)", callback.export())
            }
            WasmError::Trap { callback, message } => write!(f, "{} trapped: {message}", callback.export()),
        }
    }
}

impl std::error::Error for WasmError {}

/// The module callback an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callback {
    Initialize,
    ContextCreate,
    VmStart,
    Configure,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Log,
    Done,
}

impl Callback {
    /// The export's name.
    pub fn export(self) -> &'static str {
        match self {
            Callback::Initialize => "_initialize",
            Callback::ContextCreate => "proxy_on_context_create",
            Callback::VmStart => "proxy_on_vm_start",
            Callback::Configure => "proxy_on_configure",
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::RequestBody => "proxy_on_request_body",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::Log => "proxy_on_log",
            Callback::Done => "proxy_on_done",
        }
    }
}

/// Which stream callbacks the module exports: a filter buffers a body only
/// for a module that reads it, and skips the calls it does not export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    pub request_headers: bool,
    pub request_body: bool,
    pub response_headers: bool,
    pub response_body: bool,
    pub log: bool,
}

/// What a callback decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Go on (a pause is read as this: bodies come whole, nothing resumes).
    Continue,
    /// Answer with this instead (`proxy_send_local_response`).
    LocalResponse(LocalResponse),
}

/// The answer a module made with `proxy_send_local_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The module's `status_code_details` (for the log, never the client).
    pub details: String,
}

/// The request's pseudo-headers: `:method`, `:path` (path and query),
/// `:scheme`, and `:authority` when there is no `Host` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    pub method: Method,
    pub path: String,
    pub scheme: &'static str,
    pub authority: Option<String>,
}

impl Default for RequestInfo {
    fn default() -> Self {
        RequestInfo { method: Method::GET, path: "/".into(), scheme: "http", authority: None }
    }
}

/// What the store holds between calls, and a context while it lends its
/// own to one (no allocation, unlike `Default`).
fn placeholder() -> RequestInfo {
    RequestInfo { method: Method::GET, path: String::new(), scheme: "", authority: None }
}

/// A compiled proxy-wasm plugin: its module (compiled once, instantiated
/// once per worker), its configuration and limits. Built once per config.
pub struct WasmPlugin {
    id: u64,
    name: Arc<str>,
    compiled: Compiled,
    config: Arc<[u8]>,
    limits: Limits,
    phases: Phases,
    /// Instances started (on any thread) since compile.
    instances: AtomicU64,
}

static PLUGIN_IDS: AtomicU64 = AtomicU64::new(1);

impl fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmPlugin").field("name", &self.name).field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl WasmPlugin {
    /// Checks `module` (WebAssembly binary) and starts it once with
    /// `plugin_config` (what `proxy_get_buffer_bytes` gives for the plugin
    /// configuration), so every error a worker could meet when starting it
    /// is met here.
    pub fn compile(name: &str, module: &[u8], plugin_config: Vec<u8>, limits: Limits) -> Result<Arc<WasmPlugin>, WasmError> {
        if limits.fuel == 0 {
            return Err(WasmError::Configure("fuel must be above zero".into()));
        }
        let mut plugin = WasmPlugin {
            id: PLUGIN_IDS.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            compiled: Compiled::new(module)?,
            config: plugin_config.into(),
            limits,
            phases: Phases::default(),
            instances: AtomicU64::new(0),
        };
        let mut trial = ThreadPlugin::new();
        let exports = trial.worker(&plugin)?.exports;
        plugin.phases = Phases {
            request_headers: exports.request_headers.is_some(),
            request_body: exports.request_body.is_some(),
            response_headers: exports.response_headers.is_some(),
            response_body: exports.response_body.is_some(),
            log: exports.log.is_some(),
        };
        plugin.instances = AtomicU64::new(0);
        Ok(Arc::new(plugin))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn phases(&self) -> Phases {
        self.phases
    }

    /// Instances started since compile, on every thread (the trial one not
    /// counted): one per worker, plus one after each trap.
    pub fn instances_started(&self) -> u64 {
        self.instances.load(Ordering::Relaxed)
    }

    /// A request's context. Nothing runs until its first callback, which
    /// creates it in this thread's instance.
    pub fn http_context(self: &Arc<Self>, info: RequestInfo) -> HttpContext {
        HttpContext { plugin: self.clone(), info, status: None, id: 0, generation: 0, fuel: self.limits.fuel, logged: false }
    }
}

struct Entry {
    id: u64,
    plugin: Weak<WasmPlugin>,
    thread: ThreadPlugin,
}

thread_local! {
    /// This thread's instances, by plugin. A plugin of
    /// an old config is swept out when another plugin is first used here.
    static PLUGINS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

fn thread_plugin<'a>(entries: &'a mut Vec<Entry>, plugin: &Arc<WasmPlugin>) -> &'a mut ThreadPlugin {
    let at = match entries.iter().position(|e| e.id == plugin.id) {
        Some(at) => at,
        None => {
            entries.retain(|e| e.plugin.strong_count() > 0);
            let thread = ThreadPlugin::new();
            entries.push(Entry { id: plugin.id, plugin: Arc::downgrade(plugin), thread });
            entries.len() - 1
        }
    };
    &mut entries[at].thread
}

/// What a callback is lent for its call.
#[derive(Default)]
struct Lent<'a> {
    request_headers: Option<&'a mut HeaderMap>,
    request_body: Option<&'a mut Bytes>,
    response_headers: Option<&'a mut HeaderMap>,
    status: Option<&'a mut StatusCode>,
    response_body: Option<&'a mut Bytes>,
}

/// One request's context in the plugin. Dropping it runs `proxy_on_done`
/// and `proxy_on_delete` (when its instance still runs on this thread).
pub struct HttpContext {
    plugin: Arc<WasmPlugin>,
    info: RequestInfo,
    /// The answer's status once seen (for `response.code` in `proxy_on_log`).
    status: Option<StatusCode>,
    id: i32,
    /// The instance the context was created in (0: none yet).
    generation: u64,
    fuel: u64,
    /// `proxy_on_log` was called (else dropping the context calls it).
    logged: bool,
}

impl HttpContext {
    /// `proxy_on_request_headers`. `headers` may come back changed; the
    /// `:path` and `:method` a module set are [`path`](Self::path) and
    /// [`method`](Self::method).
    pub fn on_request_headers(&mut self, headers: &mut HeaderMap, end_of_stream: bool) -> Result<Action, WasmError> {
        let size = headers.len() as i32;
        let lent = Lent { request_headers: Some(headers), ..Lent::default() };
        self.call(Callback::RequestHeaders, lent, size, end_of_stream)
    }

    /// `proxy_on_request_body` with the whole body (`end_of_stream` true);
    /// the headers are lent too, since nothing has been sent yet.
    pub fn on_request_body(&mut self, headers: &mut HeaderMap, body: &mut Bytes) -> Result<Action, WasmError> {
        let size = body.len() as i32;
        let lent = Lent { request_headers: Some(headers), request_body: Some(body), ..Lent::default() };
        self.call(Callback::RequestBody, lent, size, true)
    }

    /// `proxy_on_response_headers`; `:status` reads (and may set) `status`.
    pub fn on_response_headers(
        &mut self,
        status: &mut StatusCode,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, WasmError> {
        let size = headers.len() as i32;
        let lent = Lent { response_headers: Some(headers), status: Some(status), ..Lent::default() };
        self.call(Callback::ResponseHeaders, lent, size, end_of_stream)
    }

    /// `proxy_on_response_body` with the whole body.
    pub fn on_response_body(&mut self, status: &mut StatusCode, headers: &mut HeaderMap, body: &mut Bytes) -> Result<Action, WasmError> {
        let size = body.len() as i32;
        let lent = Lent { response_headers: Some(headers), status: Some(status), response_body: Some(body), ..Lent::default() };
        self.call(Callback::ResponseBody, lent, size, true)
    }

    /// `proxy_on_log`: the request is over; properties (path, method,
    /// response code) can still be read, headers cannot.
    pub fn on_log(&mut self) -> Result<(), WasmError> {
        self.logged = true;
        self.call(Callback::Log, Lent::default(), 0, true).map(|_| ())
    }

    /// The request's method, as the module may have set it.
    pub fn method(&self) -> &Method {
        &self.info.method
    }

    /// The request's path and query, as the module may have set it.
    pub fn path(&self) -> &str {
        &self.info.path
    }

    /// Fuel this request has left.
    pub fn fuel_left(&self) -> u64 {
        self.fuel
    }

    fn call(&mut self, callback: Callback, mut lent: Lent<'_>, size: i32, end: bool) -> Result<Action, WasmError> {
        if let Some(s) = lent.status.as_deref() {
            self.status = Some(*s);
        }
        let plugin = self.plugin.clone();
        let outcome = PLUGINS.with(|cell| {
            let mut entries = cell.borrow_mut();
            let thread = thread_plugin(&mut entries, &plugin);
            let worker = thread.worker(&plugin)?;
            let Some(run) = pick(&worker.exports, callback) else {
                return Ok(Action::Continue);
            };
            if self.fuel == 0 {
                return Err(WasmError::OutOfFuel { callback, fuel: plugin.limits.fuel });
            }
            let store = &mut worker.store;
            store.set_fuel(self.fuel).expect("fuel metering is on");
            self.lend(&mut store.data_mut().stream, &mut lent);
            // The context this request has in this instance: a new instance
            // (first request here, or after a trap) gets it created.
            let mut failed_in = callback;
            let mut result = Ok(0);
            if self.generation != worker.generation {
                let id = worker.next_context_id();
                failed_in = Callback::ContextCreate;
                result = worker.exports.context_create.call(&mut worker.store, (id, ROOT_ID)).map(|()| 0);
                if result.is_ok() {
                    (self.id, self.generation, failed_in) = (id, worker.generation, callback);
                }
            }
            if result.is_ok() {
                worker.store.data_mut().stream.context_id = self.id;
                result = match run {
                    Run::Stream(f) => f.call(&mut worker.store, self.id, size, end),
                    Run::Log(f) => f.call(&mut worker.store, self.id).map(|()| 0),
                };
            }
            self.fuel = worker.store.get_fuel().unwrap_or(0);
            let local = self.take_back(&mut worker.store.data_mut().stream, &mut lent);
            match result {
                Ok(_) => Ok(local.map_or(Action::Continue, Action::LocalResponse)),
                Err(e) => {
                    self.fuel = if instance::is_out_of_fuel(&e) { 0 } else { self.fuel };
                    // Whatever the module was doing is left half done: drop
                    // the instance; the next request starts a fresh one.
                    thread.worker = None;
                    Err(instance::classify(failed_in, plugin.limits.fuel, e))
                }
            }
        });
        if let Some(s) = lent.status.as_deref() {
            self.status = Some(*s);
        }
        outcome
    }

    fn lend(&mut self, stream: &mut host::Stream, lent: &mut Lent<'_>) {
        stream.info = std::mem::replace(&mut self.info, placeholder());
        stream.request_headers = lent.request_headers.as_deref_mut().map(std::mem::take);
        stream.request_body = lent.request_body.as_deref_mut().map(std::mem::take);
        stream.response_headers = lent.response_headers.as_deref_mut().map(std::mem::take);
        stream.response_body = lent.response_body.as_deref_mut().map(std::mem::take);
        stream.status = self.status;
    }

    fn take_back(&mut self, stream: &mut host::Stream, lent: &mut Lent<'_>) -> Option<LocalResponse> {
        self.info = std::mem::replace(&mut stream.info, placeholder());
        if let (Some(to), Some(from)) = (lent.request_headers.as_deref_mut(), stream.request_headers.take()) {
            *to = from;
        }
        if let (Some(to), Some(from)) = (lent.request_body.as_deref_mut(), stream.request_body.take()) {
            *to = from;
        }
        if let (Some(to), Some(from)) = (lent.response_headers.as_deref_mut(), stream.response_headers.take()) {
            *to = from;
        }
        if let (Some(to), Some(from)) = (lent.response_body.as_deref_mut(), stream.response_body.take()) {
            *to = from;
        }
        if let (Some(to), Some(from)) = (lent.status.as_deref_mut(), stream.status.take()) {
            *to = from;
        }
        stream.context_id = 0;
        stream.local_response.take()
    }
}

enum Run {
    Stream(StreamFn),
    Log(wasmi::TypedFunc<i32, ()>),
}

fn pick(exports: &Exports, callback: Callback) -> Option<Run> {
    match callback {
        Callback::RequestHeaders => exports.request_headers.map(Run::Stream),
        Callback::RequestBody => exports.request_body.map(Run::Stream),
        Callback::ResponseHeaders => exports.response_headers.map(Run::Stream),
        Callback::ResponseBody => exports.response_body.map(Run::Stream),
        Callback::Log => exports.log.map(Run::Log),
        _ => None,
    }
}

impl Drop for HttpContext {
    fn drop(&mut self) {
        if self.generation == 0 {
            // No callback of the request ran (a module with none before
            // the answer, and the answer never came): its context is made
            // now, for proxy_on_log.
            // (Not during thread teardown, nor inside another call: the
            // thread's cache must be there and free.)
            let usable = PLUGINS.try_with(|cell| cell.try_borrow_mut().is_ok()).unwrap_or(false);
            if self.logged || !self.plugin.phases.log || !usable {
                return;
            }
            let _ = self.on_log();
            if self.generation == 0 {
                return;
            }
        }
        // During thread teardown the cache may be gone: nothing to tell.
        let _ = PLUGINS.try_with(|cell| {
            let Ok(mut entries) = cell.try_borrow_mut() else {
                return;
            };
            let Some(entry) = entries.iter_mut().find(|e| e.id == self.plugin.id) else {
                return;
            };
            let Some(worker) = entry.thread.worker.as_mut().filter(|w| w.generation == self.generation) else {
                return;
            };
            // Clean-up gets its own fuel: the request may have used all of its.
            worker.store.set_fuel(self.plugin.limits.fuel).expect("fuel metering is on");
            let stream = &mut worker.store.data_mut().stream;
            stream.info = std::mem::replace(&mut self.info, placeholder());
            stream.status = self.status;
            stream.context_id = self.id;
            let exports = worker.exports;
            let mut result = Ok(());
            let mut callback = Callback::Done;
            if let Some(done) = exports.done {
                result = done.call(&mut worker.store, self.id).map(|_| ());
            }
            // A request that ended before the filter's response phase (the
            // backend unreachable, a gateway error, the client gone) still
            // ends with proxy_on_log, as in Envoy: done, log, delete.
            if let (Ok(()), Some(log), false) = (&result, exports.log, self.logged) {
                callback = Callback::Log;
                result = log.call(&mut worker.store, self.id);
            }
            if let (Ok(()), Some(delete)) = (&result, exports.delete) {
                callback = Callback::Done;
                result = delete.call(&mut worker.store, self.id);
            }
            // What the module left: an answer made here has no request to
            // go to (and must not reach the next one), a status no owner.
            let stream = &mut worker.store.data_mut().stream;
            stream.context_id = 0;
            stream.info = placeholder();
            stream.status = None;
            stream.local_response = None;
            if let Err(e) = result {
                let error = instance::classify(callback, self.plugin.limits.fuel, e);
                tracing::warn!(target: "manifold::wasm", plugin = &*self.plugin.name, %error, "request clean-up failed; the instance is restarted");
                entry.thread.worker = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_and_contexts_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<WasmPlugin>();
        send_sync::<HttpContext>();
    }
}
