//! The seam every policy type implements: a [`Filter`] compiled once per
//! config from its typed config, bound to the node's [`Services`], then run
//! by each [`PolicyChain`](super::PolicyChain) that lists it.
//!
//! The phases follow pingora's `ProxyHttp` (`request_filter`,
//! `upstream_request_filter`, `response_filter`) and Envoy's filter chain:
//!
//! 1. [`Filter::request`]: admission, in SPEC's phase order (may refuse,
//!    may await: Redis, argon2). Authentication is the chain's: a filter
//!    in [`Phase::Authentication`] only offers a consumer.
//! 2. [`Filter::upstream_request`]: what goes on changes (headers, query),
//!    or the filter answers itself (a cached answer).
//! 3. [`Filter::request_body`]: the whole request body, read only for a
//!    chain holding a filter whose [`Filter::reads_request_body`] says so.
//! 4. [`Filter::response`]: the target's answer, in phase order
//!    (response-transform, then response-cache).
//!
//! Every phase has a default that does nothing, and the chain skips phases
//! no filter of it has: a filter pays only for what it does. Adding a
//! policy type: see `policy/filters/mod.rs`.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Response};
use serde_json::Value;

use super::chain::{Admission, Refusal, RequestFacts};
use super::identity::{ConsumerInfo, Identities};
use super::Services;
use crate::body::Body;
use crate::config::load::Origins;
use crate::config::ConfigError;
use crate::errors::GatewayError;

/// Where a policy runs: SPEC §2's fixed order, whatever order policies are
/// listed in. The chain is sorted by it when it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    IpRestriction,
    HttpsRedirect,
    Cors,
    CorrelationId,
    /// key-auth, basic-auth, jwt, mtls-auth: the first that accepts wins.
    Authentication,
    Acl,
    RateLimit,
    RequestSizeLimit,
    RequestTransform,
    /// After the route or composition itself.
    ResponseTransform,
    ResponseCache,
}

impl Phase {
    /// A phase by its SPEC name (`request-transform`), for policy types
    /// whose place is configurable.
    pub fn from_name(name: &str) -> Option<Phase> {
        Some(match name {
            "ip-restriction" => Phase::IpRestriction,
            "https-redirect" => Phase::HttpsRedirect,
            "cors" => Phase::Cors,
            "correlation-id" => Phase::CorrelationId,
            "authentication" => Phase::Authentication,
            "acl" => Phase::Acl,
            "rate-limit" => Phase::RateLimit,
            "request-size-limit" => Phase::RequestSizeLimit,
            "request-transform" => Phase::RequestTransform,
            "response-transform" => Phase::ResponseTransform,
            "response-cache" => Phase::ResponseCache,
            _ => return None,
        })
    }
}

/// A policy type at run time. Implemented once per file in
/// `policy/filters/`, dispatched without boxing through
/// [`AnyFilter`](super::filters::AnyFilter).
pub trait Filter: std::fmt::Debug + Send + Sync + Sized {
    /// Its typed `config` (in `config::model`), parsed once per compile.
    type Config: serde::de::DeserializeOwned;

    /// The config to the filter, checking every field: each problem is
    /// recorded in `cx` with its path under `policies.NAME.config`. Pure:
    /// no I/O, nothing of the node. An `Err` can only come from
    /// [`Compile::fail`], so a policy is never skipped silently.
    fn compile(config: &Self::Config, cx: &mut Compile<'_>) -> Result<Self, Invalid>;

    /// Where it runs in the chain.
    fn phase(&self) -> Phase;

    /// Takes what the node provides (JWK Sets, Redis, the password cache),
    /// after the whole config compiled. An error here is about this node
    /// (`scope: cluster` without Redis), reported like a config error.
    fn bind(&mut self, _node: &Arc<Services>, _cx: &mut Bind<'_>) {}

    /// The request phase: refuse, or let the request on.
    fn request(&self, _cx: &mut RequestCx<'_>) -> impl Future<Output = Result<(), Refusal>> + Send {
        async { Ok(()) }
    }

    /// Whether [`Filter::upstream_request`] does anything.
    fn rewrites_request(&self) -> bool {
        false
    }

    /// After every request phase passed (the consumer is stamped): changes
    /// what goes on, or answers instead of the target (`Some`). The answer
    /// still gets the chain's headers, not the response phase.
    fn upstream_request(&self, _ex: &mut Admission, _req: &mut Outgoing<'_>) -> Option<Response<Body>> {
        None
    }

    /// Whether the chain must read the request body whole for this filter.
    fn reads_request_body(&self) -> bool {
        false
    }

    /// The whole request body (within the body limits).
    fn request_body(&self, _ex: &mut Admission, _req: &Outgoing<'_>, _body: &mut WholeBody) -> Result<(), BodyStop> {
        Ok(())
    }

    /// Whether [`Filter::response`] does anything.
    fn has_response_phase(&self) -> bool {
        false
    }

    /// The target's answer on its way back.
    fn response(&self, _ex: &mut Admission, _cx: &ResponseCx<'_>, resp: Response<Body>) -> impl Future<Output = Response<Body>> + Send {
        async { resp }
    }
}

/// How the request-body phase ends a request instead of letting it on.
#[derive(Debug)]
pub enum BodyStop {
    /// An error the gateway answers (SPEC §4 JSON).
    Error(GatewayError),
    /// A filter's own answer (a wasm module's local response), sent
    /// instead of the target's; it still gets the chain's headers.
    Answer(Box<Response<Body>>),
}

impl From<GatewayError> for BodyStop {
    fn from(e: GatewayError) -> BodyStop {
        BodyStop::Error(e)
    }
}

/// Proof that an error was recorded: the only way a filter's compile fails.
#[derive(Debug)]
pub struct Invalid(());

/// One policy's compile: its name, its file, and the errors so far.
pub struct Compile<'a> {
    pub name: &'a str,
    /// The file the policy came from (relative paths in its config are
    /// relative to it); `None` for a request body.
    pub file: Option<Arc<str>>,
    base: String,
    origins: &'a Origins,
    /// The consumers by name (no credentials: see `Identities::names`).
    ids: &'a Arc<Identities>,
    /// Consumers that exist (also those that did not parse).
    consumers: &'a HashSet<&'a str>,
    pub(super) errors: Vec<ConfigError>,
    /// An error was found (recorded, or not shown: see [`Compile::error`]).
    failed: bool,
}

impl<'a> Compile<'a> {
    pub(super) fn new(
        name: &'a str,
        file: Option<Arc<str>>,
        origins: &'a Origins,
        ids: &'a Arc<Identities>,
        consumers: &'a HashSet<&'a str>,
    ) -> Compile<'a> {
        Compile { name, file, base: format!("policies.{name}.config"), origins, ids, consumers, errors: Vec::new(), failed: false }
    }

    /// `policies.NAME.config` and then `field` (`""`: the config itself).
    pub fn path(&self, field: &str) -> String {
        match field {
            "" => self.base.clone(),
            f if f.starts_with('[') => format!("{}{f}", self.base),
            f => format!("{}.{f}", self.base),
        }
    }

    /// Records an error at `field` and goes on checking.
    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        let path = self.path(field);
        self.failed = true;
        // An object that lost a wrong value while loading has its defaults
        // in place: errors they could cause are not the user's.
        if self.origins.is_partial(&path) {
            return;
        }
        // One error, one line: parser messages can span several.
        let message: String = message.into();
        let message = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        self.errors.push(ConfigError { file: self.file.clone(), path, message });
    }

    /// Records an error the filter cannot be built past.
    pub fn fail(&mut self, field: &str, message: impl Into<String>) -> Invalid {
        self.error(field, message);
        Invalid(())
    }

    /// Whether anything was recorded for this policy yet.
    pub fn has_errors(&self) -> bool {
        self.failed
    }

    /// The `Err` to return after errors were recorded with [`Compile::error`].
    pub fn invalid(&mut self) -> Invalid {
        if !self.failed {
            self.error("", "invalid");
        }
        Invalid(())
    }

    /// A header name at `field`, lower case.
    pub fn header_name(&mut self, field: &str, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(field, format!("invalid header name {name:?}"));
                None
            }
        }
    }

    /// An HTTP method at `field` (upper case, such as GET).
    pub fn method(&mut self, field: &str, method: &str) {
        let ok = !method.is_empty() && method.len() <= 32 && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        if !ok {
            self.error(field, format!("invalid method {method:?}: use upper case, such as GET"));
        }
    }

    /// The `anonymous` consumer of an authentication policy (its name and
    /// groups: no credential is needed).
    pub fn anonymous(&mut self, anonymous: &Option<String>) -> Option<Arc<ConsumerInfo>> {
        let name = anonymous.as_ref()?;
        if !self.consumers.contains(name.as_str()) {
            self.error("anonymous", format!("unknown consumer {name:?}"));
        }
        self.ids.by_name.get(name).cloned()
    }
}

/// One policy's binding to the node: errors about what the node lacks.
pub struct Bind<'a> {
    pub name: &'a str,
    pub(super) base: String,
    pub(super) identities: &'a Arc<Identities>,
    pub(super) errors: Vec<ConfigError>,
}

impl Bind<'_> {
    /// Who holds which credential, for filters that resolve consumers.
    pub fn identities(&self) -> &Arc<Identities> {
        self.identities
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        let path = if field.is_empty() { self.base.clone() } else { format!("{}.{field}", self.base) };
        self.errors.push(ConfigError { file: None, path, message: message.into() });
    }
}

/// The request phase's view: the request, and what the chain learnt so far.
pub struct RequestCx<'a> {
    pub facts: RequestFacts<'a>,
    pub client_ip: IpAddr,
    pub headers: &'a mut HeaderMap,
    /// The query, which may lose a credential.
    pub query: &'a mut Option<String>,
    /// The route or composition the chain guards.
    pub entity: &'a str,
    /// What the policies decided so far (answer headers, rate, body limit).
    pub out: &'a mut Admission,
    /// The authentication phase's state.
    pub auth: &'a mut AuthState,
    /// The policy being run (for logs).
    pub policy: &'a str,
}

/// What the authentication filters found so far.
#[derive(Debug, Default)]
pub struct AuthState {
    /// The consumer an earlier method accepted: later methods step aside.
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// The first `anonymous` consumer of a method that found nobody.
    pub anonymous: Option<Arc<ConsumerInfo>>,
    /// A basic-auth policy ran: a 401 asks for Basic credentials.
    pub basic_offered: bool,
    /// The first policy that was shown a credential and refused it: a 401
    /// is counted against it rather than against the chain's last method.
    pub(super) blame: Option<usize>,
    /// The step being run.
    pub(super) current: usize,
}

impl AuthState {
    /// This method was shown a credential and refused it.
    pub fn blame(&mut self) {
        self.blame = self.blame.or(Some(self.current));
    }

    /// Nobody accepted yet: remember this method's anonymous consumer.
    pub fn offer_anonymous(&mut self, anonymous: &Option<Arc<ConsumerInfo>>) {
        if self.consumer.is_none() && self.anonymous.is_none() {
            self.anonymous = anonymous.clone();
        }
    }
}

/// The request as it goes on to the target: its head, and the route's
/// path parameters (for templates).
pub struct Outgoing<'a> {
    pub parts: &'a mut http::request::Parts,
    pub params: &'a [(Arc<str>, String)],
    /// The host, lower case, without port.
    pub host: &'a str,
    /// The normalized path.
    pub path: &'a str,
    /// The route or composition.
    pub entity: &'a str,
    /// A protocol upgrade (websocket): the answer is the backend's.
    pub upgrading: bool,
    /// The request's id, for an error a filter answers with.
    pub request_id: &'a http::HeaderValue,
}

impl Outgoing<'_> {
    /// Sets the query the target gets.
    pub fn set_query(&mut self, query: Option<&str>) {
        set_query(&mut self.parts.uri, query);
    }
}

/// Replaces a URI's query.
pub fn set_query(uri: &mut http::Uri, query: Option<&str>) {
    let pq = match query {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    };
    let mut up = uri.clone().into_parts();
    up.path_and_query = pq.parse().ok();
    if let Ok(u) = http::Uri::from_parts(up) {
        *uri = u;
    }
}

/// What the response phase knows besides the answer.
pub struct ResponseCx<'a> {
    /// The request was a HEAD.
    pub head: bool,
    pub request_id: &'a http::HeaderValue,
}

/// A whole request body for the filters that read it: its bytes, parsed
/// as JSON once when a filter asks (and written back once, at the end).
#[derive(Debug)]
pub struct WholeBody {
    bytes: Bytes,
    json: Option<Value>,
    /// `json` was changed since the bytes were parsed.
    changed: bool,
    parsed: bool,
}

impl WholeBody {
    pub fn from_bytes(bytes: Bytes) -> WholeBody {
        WholeBody { bytes, json: None, changed: false, parsed: false }
    }

    /// An already parsed JSON body (a composition's).
    pub fn from_json(json: Value) -> WholeBody {
        WholeBody { bytes: Bytes::new(), json: Some(json), changed: true, parsed: true }
    }

    /// The raw bytes as they stand.
    pub fn bytes(&mut self) -> &Bytes {
        if self.changed {
            if let Some(json) = &self.json {
                self.bytes = Bytes::from(serde_json::to_vec(json).unwrap_or_default());
            }
            self.changed = false;
        }
        &self.bytes
    }

    /// Replaces the body.
    pub fn set_bytes(&mut self, bytes: Bytes) {
        self.bytes = bytes;
        self.json = None;
        self.changed = false;
        self.parsed = false;
    }

    /// The body as JSON; `None` when it is not JSON.
    pub fn json(&mut self) -> Option<&Value> {
        if !self.parsed {
            self.parsed = true;
            self.json = serde_json::from_slice(&self.bytes).ok();
        }
        self.json.as_ref()
    }

    /// The body as JSON, to change in place (the bytes are written again).
    pub fn json_mut(&mut self) -> Option<&mut Value> {
        self.json();
        self.changed |= self.json.is_some();
        self.json.as_mut()
    }

    /// The body's bytes, for the target.
    pub fn into_bytes(mut self) -> Bytes {
        self.bytes();
        self.bytes
    }

    /// The body as JSON (null when it is not), for a composition.
    pub fn into_json(mut self) -> Value {
        if !self.parsed {
            self.parsed = true;
            self.json = if self.bytes.is_empty() { Some(Value::Null) } else { serde_json::from_slice(&self.bytes).ok() };
        }
        self.json.unwrap_or(Value::Null)
    }
}
