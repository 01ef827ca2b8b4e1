//! `wasm`: a proxy-wasm filter (docs/plugins.md), run by the host in
//! `crate::wasm`. The module is compiled (and started once) in
//! [`Filter::compile`]; each request gets an `HttpContext`, kept in the
//! [`Admission`] from its request headers to its log:
//!
//! - `upstream_request`: `proxy_on_request_headers` (headers, `:path`,
//!   `:method`), or the module's local response as the answer;
//! - `request_body`: `proxy_on_request_body`, only for a module that
//!   exports it (the chain reads the body whole for it);
//! - `response`: `proxy_on_response_headers`, then the whole body (read
//!   within the body limit) for a module that exports
//!   `proxy_on_response_body`, then `proxy_on_log`.
//!
//! A trap or the fuel running out fails the request: 500 `internal`
//! (SPEC §4), and an error line naming the policy and the callback.
//!
//! Without the cargo feature `wasm` the type still parses, and a policy of
//! it is a config error.

use crate::config::WasmConfig;
use crate::policy::filter::{Compile, Phase};
#[cfg(not(feature = "wasm"))]
use crate::policy::filter::{Filter, Invalid};

/// The wasm filters' per-request contexts, by filter: what a request's
/// [`Admission`](crate::policy::Admission) carries between the phases.
/// Empty (no allocation) unless a wasm filter ran.
#[derive(Default)]
pub struct Contexts {
    #[cfg(feature = "wasm")]
    list: Vec<(usize, crate::wasm::HttpContext)>,
    /// A `:path` a module set, normalized: the path the target gets.
    path: Option<String>,
}

impl Contexts {
    /// The path a module set, if one did (the handler forwards it).
    pub fn take_path(&mut self) -> Option<String> {
        self.path.take()
    }
}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "wasm")]
        return f.debug_struct("Contexts").field("len", &self.list.len()).finish();
        #[cfg(not(feature = "wasm"))]
        f.debug_struct("Contexts").finish()
    }
}

/// The phase a `phase` field names (default `request-transform`).
fn phase_of(c: &WasmConfig, cx: &mut Compile<'_>) -> Phase {
    match c.phase.as_deref() {
        None => Phase::RequestTransform,
        // Its callbacks run once the request was admitted (they change the
        // request or answer it): an admission phase would not place it
        // before authentication or rate limits, so it is refused.
        Some(name @ ("request-transform" | "response-transform" | "response-cache")) => {
            Phase::from_name(name).unwrap_or(Phase::RequestTransform)
        }
        Some(name) => {
            let what = if Phase::from_name(name).is_some() { format!("{name} is an admission phase") } else { format!("unknown phase {name:?}") };
            cx.error(
                "phase",
                format!("{what}: a wasm policy runs after admission, in request-transform (the default), response-transform or response-cache"),
            );
            Phase::RequestTransform
        }
    }
}

/// The module's bytes from `module` (a path; a relative one was made
/// relative to the policy's file when it was loaded) or `module_base64`:
/// exactly one; they must be the bytes `module_sha256` names, if it does.
/// With their SHA-256, which validation writes into the config as
/// `module_sha256` for a `module` file ([`Wasm::module_sha256`]): the
/// digest of the bytes compiled, read once.
fn module_bytes(c: &WasmConfig, cx: &mut Compile<'_>) -> Option<(Vec<u8>, String)> {
    let want = match c.module_sha256.as_deref() {
        Some(d) if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) => Some(d.to_ascii_lowercase()),
        Some(d) => {
            cx.error("module_sha256", format!("{d:?} is not a SHA-256 digest: 64 hexadecimal digits"));
            None
        }
        None => None,
    };
    let bytes = module_source(c, cx)?;
    let have = crate::config::secrets::sha256_hex(&bytes);
    match want {
        Some(want) if want != have => {
            let what = c.module.as_deref().map_or_else(|| "module_base64".to_string(), |p| format!("the module {p}"));
            cx.error(
                "module_sha256",
                format!(
                    "{what} has SHA-256 {have}, not the {want} this config names: it changed since the config was written (load the config again from its files, or leave module_sha256 out, null in a PATCH, to take the module as it is now)"
                ),
            );
            None
        }
        _ => Some((bytes, have)),
    }
}

fn module_source(c: &WasmConfig, cx: &mut Compile<'_>) -> Option<Vec<u8>> {
    match (&c.module, &c.module_base64) {
        (Some(_), Some(_)) => {
            cx.error("", "give one of module and module_base64, not both");
            None
        }
        (None, None) => {
            cx.error("", "a module is required: module (a file) or module_base64");
            None
        }
        (Some(path), None) => {
            // Loading made a relative path its file's (config::load).
            match std::fs::read(path) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    // Only a config sent to the admin API can still hold a
                    // relative path: say which file that was.
                    let whose = match std::path::absolute(path) {
                        Ok(p) if std::path::Path::new(path).is_relative() => {
                            format!(" ({}: a relative path is the gateway's working directory's)", p.display())
                        }
                        _ => String::new(),
                    };
                    cx.error("module", format!("cannot read {path}{whose}: {e}"));
                    None
                }
            }
        }
        (None, Some(b64)) => {
            use base64::Engine as _;
            let clean: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(clean) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    cx.error("module_base64", format!("not base64: {e}"));
                    None
                }
            }
        }
    }
}

#[cfg(not(feature = "wasm"))]
#[derive(Debug)]
pub struct Wasm(Phase);

#[cfg(not(feature = "wasm"))]
impl Filter for Wasm {
    type Config = WasmConfig;

    fn compile(c: &WasmConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let _ = (phase_of(c, cx), module_bytes);
        Err(cx.fail("", "this build has no wasm support (it was built without the cargo feature `wasm`)"))
    }

    fn phase(&self) -> Phase {
        self.0
    }
}

#[cfg(not(feature = "wasm"))]
impl Wasm {
    pub fn module_sha256(&self) -> Option<&str> {
        None
    }
}

#[cfg(feature = "wasm")]
pub use with_wasm::Wasm;

#[cfg(feature = "wasm")]
mod with_wasm {
    use std::sync::Arc;

    use http::{header, HeaderValue, Response, StatusCode};
    use http_body_util::{BodyExt, Limited};

    use super::{module_bytes, phase_of};
    use crate::body::Body;
    use crate::config::WasmConfig;
    use crate::errors::{ErrorCode, GatewayError};
    use crate::policy::filter::{Bind, BodyStop, Compile, Filter, Invalid, Outgoing, Phase, ResponseCx, WholeBody};
    use crate::policy::{Admission, Services};
    use crate::wasm::{Action, HttpContext, Limits, LocalResponse, RequestInfo, WasmError, WasmPlugin};

    #[derive(Debug)]
    pub struct Wasm {
        plugin: Arc<WasmPlugin>,
        phase: Phase,
        /// The policy's name, for the log.
        name: Arc<str>,
        /// The node's metrics (for `manifold_wasm_failures_total`), once bound.
        metrics: Option<Arc<crate::metrics::Metrics>>,
        /// The SHA-256 of the module compiled, when it came from a file.
        module_sha256: Option<Arc<str>>,
    }

    impl Filter for Wasm {
        type Config = WasmConfig;

        fn compile(c: &WasmConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
            let phase = phase_of(c, cx);
            let mut limits = Limits::default();
            if let Some(fuel) = c.fuel {
                if fuel == 0 {
                    cx.error("fuel", "must be above zero");
                }
                limits.fuel = fuel;
            }
            if let Some(m) = c.max_memory {
                if m.0 < 65536 || m.0 > 4 << 30 {
                    cx.error("max_memory", "must be between 64KiB (one WebAssembly page) and 4GiB");
                }
                limits.memory_bytes = m.0.min(4 << 30) as usize;
            }
            let plugin_config = match &c.config {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::String(s) => s.clone().into_bytes(),
                v => serde_json::to_vec(v).unwrap_or_default(),
            };
            let module = module_bytes(c, cx);
            let (Some((module, digest)), false) = (module, cx.has_errors()) else {
                return Err(cx.invalid());
            };
            let module_sha256 = c.module.is_some().then(|| Arc::from(digest));
            let field = if c.module.is_some() { "module" } else { "module_base64" };
            let shown = c.module.as_deref().map(|p| format!("{p}: ")).unwrap_or_default();
            // The text format: not the binary's magic, and a `.wat` name or
            // what text starts with (a form, or a `;;` comment).
            let text = !module.starts_with(b"\0asm")
                && (c.module.as_deref().is_some_and(|p| p.ends_with(".wat"))
                    || matches!(module.trim_ascii_start().first(), Some(b'(' | b';')));
            if text {
                return Err(cx.fail(
                    field,
                    format!("{shown}this is the WebAssembly text format (.wat); give the binary module, e.g. `wat2wasm filter.wat -o filter.wasm`"),
                ));
            }
            match WasmPlugin::compile(cx.name, &module, plugin_config, limits) {
                Ok(plugin) => Ok(Wasm { plugin, phase, name: cx.name.into(), metrics: None, module_sha256 }),
                Err(WasmError::Configure(m)) => Err(cx.fail("config", format!("the module would not start: {m}"))),
                Err(e) => Err(cx.fail(field, format!("{shown}{e}"))),
            }
        }

        fn phase(&self) -> Phase {
            self.phase
        }

        fn bind(&mut self, node: &Arc<Services>, _cx: &mut Bind<'_>) {
            self.metrics = Some(node.metrics.clone());
        }

        fn rewrites_request(&self) -> bool {
            true
        }

        fn upstream_request(&self, ex: &mut Admission, req: &mut Outgoing<'_>) -> Option<Response<Body>> {
            let parts = &mut *req.parts;
            let https = parts.extensions.get::<Arc<crate::server::tls::TlsConn>>().is_some();
            let info = RequestInfo {
                method: parts.method.clone(),
                path: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string(),
                scheme: if https { "https" } else { "http" },
                authority: (!parts.headers.contains_key(header::HOST)).then(|| req.host.to_string()),
            };
            let mut ctx = self.plugin.http_context(info);
            if self.plugin.phases().request_headers {
                let end = !parts.headers.contains_key(header::CONTENT_LENGTH) && !parts.headers.contains_key(header::TRANSFER_ENCODING)
                    || parts.headers.get(header::CONTENT_LENGTH).is_some_and(|v| v == "0");
                match ctx.on_request_headers(&mut parts.headers, end) {
                    Ok(Action::Continue) => {}
                    Ok(Action::LocalResponse(local)) => return Some(self.local(ctx, local, req.request_id)),
                    Err(e) => return Some(self.failed(ctx, &e, req.request_id)),
                }
                if ctx.method() != parts.method {
                    parts.method = ctx.method().clone();
                }
                let path = ctx.path();
                if parts.uri.path_and_query().map_or("/", |pq| pq.as_str()) != path {
                    let mut up = parts.uri.clone().into_parts();
                    let only_path = path.split_once('?').map_or(path, |(p, _)| p);
                    let normalized = crate::server::hygiene::normalize_path(only_path).map(|p| p.into_owned());
                    match (path.parse(), normalized) {
                        (Ok(pq), Ok(normalized)) => {
                            ex.wasm.path = Some(normalized);
                            up.path_and_query = Some(pq);
                            if let Ok(uri) = http::Uri::from_parts(up) {
                                parts.uri = uri;
                            }
                        }
                        _ => {
                            let e = WasmError::Trap { callback: crate::wasm::Callback::RequestHeaders, message: format!("set an invalid :path {path:?}") };
                            return Some(self.failed(ctx, &e, req.request_id));
                        }
                    }
                }
            }
            ex.wasm.list.push((self.key(), ctx));
            None
        }

        fn reads_request_body(&self) -> bool {
            self.plugin.phases().request_body
        }

        fn request_body(&self, ex: &mut Admission, req: &Outgoing<'_>, body: &mut WholeBody) -> Result<(), BodyStop> {
            let key = self.key();
            let Some(at) = ex.wasm.list.iter().position(|(k, _)| *k == key) else { return Ok(()) };
            let ctx = &mut ex.wasm.list[at].1;
            // The headers have gone on as they are: the module sees a copy.
            let mut headers = req.parts.headers.clone();
            let mut bytes = body.bytes().clone();
            match ctx.on_request_body(&mut headers, &mut bytes) {
                Ok(Action::Continue) => {
                    if bytes != *body.bytes() {
                        body.set_bytes(bytes);
                    }
                    Ok(())
                }
                // The module's own answer, as from its request headers.
                Ok(Action::LocalResponse(local)) => {
                    let (_, ctx) = ex.wasm.list.swap_remove(at);
                    Err(BodyStop::Answer(Box::new(self.local(ctx, local, req.request_id))))
                }
                Err(e) => {
                    self.log_failure(&e, req.request_id);
                    Err(GatewayError::new(ErrorCode::Internal, format!("the {} policy failed", self.name)).into())
                }
            }
        }

        fn has_response_phase(&self) -> bool {
            let p = self.plugin.phases();
            p.response_headers || p.response_body || p.log
        }

        async fn response(&self, ex: &mut Admission, cx: &ResponseCx<'_>, resp: Response<Body>) -> Response<Body> {
            let at = ex.wasm.list.iter().position(|(k, _)| *k == self.key());
            let Some((_, mut ctx)) = at.map(|at| ex.wasm.list.swap_remove(at)) else { return resp };
            let phases = self.plugin.phases();
            let (mut parts, body) = resp.into_parts();
            let bodiless = cx.head || matches!(parts.status.as_u16(), 204 | 304);
            if phases.response_headers {
                let end = bodiless || parts.headers.get(header::CONTENT_LENGTH).is_some_and(|v| v == "0");
                match ctx.on_response_headers(&mut parts.status, &mut parts.headers, end) {
                    Ok(Action::Continue) => {}
                    Ok(Action::LocalResponse(local)) => return self.local(ctx, local, cx.request_id),
                    Err(e) => return self.failed(ctx, &e, cx.request_id),
                }
            }
            let mut resp = Response::from_parts(parts, body);
            if phases.response_body && !bodiless {
                let (mut parts, body) = resp.into_parts();
                let mut bytes = match Limited::new(body, crate::compose::plan::DEFAULT_MAX_BODY).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(_) => {
                        let e = GatewayError::new(ErrorCode::UpstreamError, "the upstream answer could not be read for the wasm policy");
                        return e.into_response(cx.request_id.to_str().unwrap_or(""));
                    }
                };
                match ctx.on_response_body(&mut parts.status, &mut parts.headers, &mut bytes) {
                    Ok(Action::Continue) => {}
                    Ok(Action::LocalResponse(local)) => return self.local(ctx, local, cx.request_id),
                    Err(e) => return self.failed(ctx, &e, cx.request_id),
                }
                parts.headers.remove(header::TRANSFER_ENCODING);
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                resp = Response::from_parts(parts, Body::full(bytes));
            }
            self.log(&mut ctx, cx.request_id);
            resp
        }
    }

    impl Wasm {
        /// The SHA-256 of the module file compiled (`None` for
        /// `module_base64`, whose bytes the config holds).
        pub fn module_sha256(&self) -> Option<&str> {
            self.module_sha256.as_deref()
        }

        /// This filter's key among a request's contexts (it lives in an
        /// `Arc` for as long as any request uses it).
        fn key(&self) -> usize {
            self as *const Wasm as usize
        }

        /// `proxy_on_log`; a failure there is logged, the answer stands.
        fn log(&self, ctx: &mut HttpContext, request_id: &HeaderValue) {
            if self.plugin.phases().log {
                if let Err(e) = ctx.on_log() {
                    self.log_failure(&e, request_id);
                }
            }
        }

        fn log_failure(&self, e: &WasmError, request_id: &HeaderValue) {
            let callback = match e {
                WasmError::OutOfFuel { callback, .. } | WasmError::Trap { callback, .. } => callback.export(),
                _ => "start-up",
            };
            tracing::error!(
                target: "manifold::wasm",
                request_id = request_id.to_str().unwrap_or(""),
                policy = &*self.name,
                callback,
                error = %e,
                "wasm policy failed"
            );
            if let Some(m) = &self.metrics {
                m.wasm_failed(&self.name, callback);
            }
        }

        /// A trap or the fuel running out: 500, the gateway's fault.
        fn failed(&self, ctx: HttpContext, e: &WasmError, request_id: &HeaderValue) -> Response<Body> {
            self.log_failure(e, request_id);
            drop(ctx);
            GatewayError::new(ErrorCode::Internal, format!("the {} policy failed", self.name)).into_response(request_id.to_str().unwrap_or(""))
        }

        /// The module's own answer.
        fn local(&self, mut ctx: HttpContext, local: LocalResponse, request_id: &HeaderValue) -> Response<Body> {
            self.log(&mut ctx, request_id);
            let LocalResponse { status, headers, body, .. } = local;
            let mut resp = Response::new(Body::full(body.clone()));
            *resp.status_mut() = if status.as_u16() < 200 { StatusCode::INTERNAL_SERVER_ERROR } else { status };
            *resp.headers_mut() = headers;
            resp.headers_mut().remove(header::TRANSFER_ENCODING);
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            resp
        }
    }
}
