//! Running a composition: every call starts the moment the calls it reads
//! are settled (not in waves), all on the request's own task; a required
//! call's failure cancels the calls still running, by dropping them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::answer::{Copies, EntryFields, Projection};
use super::cache::{storable, CachePlan, CallStore, Entry, Flight, Mark};
use super::plan::{BatchPlan, CallPlan, CompositionPlan, ResponseBody};
use super::query::{truthy, Rendered};
use super::template::value_text;
use crate::body::Body;
use crate::errors::{error_response, ErrorCode};
use crate::ids::TraceContext;
use crate::metrics::Metrics;
use crate::upstream::{Cause, Client, Outbound, UpstreamError};

/// What a composition needs from the request it serves.
pub struct Exchange<'a> {
    pub client: &'a Client,
    pub request_id: &'a HeaderValue,
    pub trace: &'a TraceContext,
    /// The client's headers, for `forward_headers`.
    pub client_headers: &'a HeaderMap,
    /// Report every call in [`Outcome::calls`] (costs a little).
    pub record: bool,
    /// A correlation-id policy's header, sent on every call.
    pub correlation: Option<HeaderName>,
    /// Where per-call durations and failures are counted (not for `try`).
    pub metrics: Option<&'a std::sync::Arc<Metrics>>,
    /// What an upstream's balancer may read of the client's request (its
    /// consistent-hash key).
    pub pick: crate::upstream::PickInput<'a>,
}

/// One call (or `for_each` item) as the `try` endpoint reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CallRecord {
    pub name: String,
    pub url: Option<String>,
    pub started_ms: Option<f64>,
    pub duration_ms: Option<f64>,
    pub status: Option<u16>,
    pub error: Option<Value>,
    /// Requests sent again after a retryable failure.
    pub retries: u32,
    /// A cached call's request: `hit`, `stale`, `miss` or `revalidated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
}

pub struct Outcome {
    pub response: Response<Body>,
    pub calls: Vec<CallRecord>,
}

#[derive(Clone, Debug)]
pub struct Failure {
    kind: &'static str,
    message: String,
    status: Option<u16>,
    /// A backend's own 4xx, passed on when the call was required.
    passthrough: Option<Box<(StatusCode, Option<HeaderValue>, Bytes)>>,
}

impl Failure {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into(), status: None, passthrough: None }
    }

    fn json(&self) -> Value {
        json!({"kind": self.kind, "message": self.message})
    }
}

#[derive(Clone)]
pub struct Success {
    status: u16,
    headers: HeaderMap,
    body: Value,
    /// The parts of the body the response copies as they are (`answer.rs`).
    copies: Option<std::sync::Arc<Copies>>,
    bytes: usize,
    /// The body as it came, kept only for a cached call (to store it).
    raw: Bytes,
}

/// A request shared across client requests, as its waiters get it.
#[derive(Clone)]
pub struct Fetched {
    result: Result<Success, Failure>,
    retries: u32,
    sent: Option<Uri>,
    /// A stale entry the backend confirmed (304) answered it.
    revalidated: bool,
}

/// The node's store of shared calls (held by `policy::Services`).
pub type NodeCallStore = CallStore<Fetched>;

struct Finished {
    index: usize,
    /// The call's cache mark: the least fresh of its requests'.
    mark: Option<Mark>,
    /// Batches sent (a `batch` call).
    batches: Option<usize>,
    result: Result<Success, Failure>,
    duration: Duration,
    records: Vec<CallRecord>,
    /// Backend requests sent again (the call's own retries and its
    /// upstream's), over all its items.
    retries: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
    Skipped,
    /// `when` was false, or a call it reads did not run: not a failure.
    NotRun,
}

#[derive(Clone)]
struct Prepared {
    /// The rendered path and query; the target is picked per try.
    pq: PathAndQuery,
    /// The request's consistent-hash key (read from the client's request
    /// when the call was prepared).
    key: Option<u64>,
    headers: HeaderMap,
    body: Option<Bytes>,
    /// Under which key identical requests share (a call with `cache` or
    /// `collapse`).
    share_key: Option<std::sync::Arc<str>>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn headers_json(headers: &HeaderMap) -> Value {
    Value::Object(super::context::headers_map(headers))
}

/// A call's entry in the context document, with `body` and the `fields`
/// something reads (`headers` made only then). Built by hand: `json!`
/// would serialize (deep-copy) the body it is given.
fn call_entry(
    fields: EntryFields,
    status: Option<u16>,
    headers: impl FnOnce() -> Value,
    body: Value,
    error: Option<&Failure>,
    duration: Duration,
) -> Value {
    let mut m = Map::with_capacity(5);
    if fields.has(EntryFields::STATUS) {
        m.insert("status".into(), status.map_or(Value::Null, Value::from));
    }
    if fields.has(EntryFields::HEADERS) {
        m.insert("headers".into(), headers());
    }
    m.insert("body".into(), body);
    if fields.has(EntryFields::ERROR) {
        m.insert("error".into(), error.map_or(Value::Null, Failure::json));
    }
    if fields.has(EntryFields::DURATION) {
        m.insert("duration_ms".into(), Value::from(ms(duration)));
    }
    Value::Object(m)
}

/// Renders one backend request of `call` against the context document.
fn prepare(call: &CallPlan, doc: &Value, ex: &Exchange) -> Result<Prepared, Failure> {
    // A value that cannot be sent is the client's fault when it came from
    // the request alone, and a bad backend answer's when a call produced it.
    let kind = if call.deps.is_empty() { "bad_request" } else { "bad_value" };
    let bad = |m: String| Failure::new(kind, m);
    let path = call.path.render(doc).map_err(bad)?;
    // Values are percent-encoded, but a value that is empty, `.` or `..`
    // still changes the path's shape: refuse it rather than send it.
    let inner = path.strip_prefix('/').unwrap_or(&path);
    let inner = if call.path_trailing_slash { inner.strip_suffix('/').unwrap_or(inner) } else { inner };
    if !inner.is_empty() && inner.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err(bad("a request value would change the backend path (empty, . or ..)".into()));
    }
    let mut pq = path;
    if let Some(q) = &call.query {
        pq.push('?');
        pq.push_str(&q.render(doc).map_err(bad)?);
    }
    let pq = PathAndQuery::try_from(pq).map_err(|e| bad(format!("the rendered url is invalid: {e}")))?;
    let key = call.upstream.key(&ex.pick);
    let mut headers = HeaderMap::new();
    for name in &call.forward_headers {
        for v in ex.client_headers.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    for (name, t) in &call.headers {
        let v = t.render(doc).map_err(bad)?;
        let v = HeaderValue::from_str(&v).map_err(|_| bad(format!("header {name} would not be a valid value")))?;
        headers.insert(name.clone(), v);
    }
    // The authenticated consumer reaches every backend (SPEC §2 policies).
    for name in [crate::policy::X_CONSUMER_NAME, crate::policy::X_CONSUMER_GROUPS].iter().chain(ex.correlation.iter()) {
        if let Some(v) = ex.client_headers.get(name) {
            headers.insert(name.clone(), v.clone());
        }
    }
    headers.entry(header::ACCEPT).or_insert(HeaderValue::from_static("application/json"));
    let body = match &call.body {
        Some(t) => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Some(Bytes::from(serde_json::to_vec(&Rendered { template: t, doc }).unwrap_or_default()))
        }
        None => None,
    };
    let share_key = call.store.as_ref().map(|_| share_key(call, &pq, &headers, body.as_deref(), ex));
    Ok(Prepared { pq, key, headers, body, share_key })
}

/// The key identical requests share under (SPEC §8): the method, where
/// it goes, the path and query, the body, the `vary_headers` values and
/// every header the call sends but the correlation id (its forwarded
/// ones among them), these as a digest: the key is in memory.
fn share_key(call: &CallPlan, pq: &PathAndQuery, headers: &HeaderMap, body: Option<&[u8]>, ex: &Exchange) -> std::sync::Arc<str> {
    use sha2::Digest;
    let mut key = String::with_capacity(128);
    let part = super::cache::key_part;
    part(&mut key, call.method.as_str().as_bytes());
    part(&mut key, call.origin.as_bytes());
    part(&mut key, pq.as_str().as_bytes());
    let mut who = sha2::Sha256::new();
    let mut add = |name: &HeaderName, v: &HeaderValue| {
        who.update((name.as_str().len() as u64).to_le_bytes());
        who.update(name.as_str().as_bytes());
        who.update((v.len() as u64).to_le_bytes());
        who.update(v.as_bytes());
    };
    for (name, v) in headers {
        if ex.correlation.as_ref() != Some(name) {
            add(name, v);
        }
    }
    if let Some(c) = &call.cache {
        for name in &c.vary_headers {
            for v in ex.client_headers.get_all(name) {
                add(name, v);
            }
        }
    }
    if let Some(b) = body {
        who.update(b"body");
        who.update(b);
    }
    key.push_str(&hex::encode(&who.finalize()[..16]));
    key.into()
}

/// The kind a composition reports for a failed backend request.
fn failure_of(e: &UpstreamError) -> Failure {
    let (kind, message) = match e.cause {
        Cause::Connect => ("connect", "the backend could not be reached"),
        Cause::Tls => ("tls", "the backend's TLS handshake failed"),
        Cause::Timeout | Cause::BodyTimeout => ("timeout", "no answer in time"),
        Cause::Protocol => ("protocol", "the backend's answer is not valid HTTP"),
        _ => ("upstream", "the backend connection failed"),
    };
    Failure::new(kind, message)
}

/// What every backend request of one call shares: the labels and ids the
/// upstream layer stamps and counts with.
#[derive(Clone)]
struct CallIds {
    composition: std::sync::Arc<str>,
    call: std::sync::Arc<str>,
    request_id: HeaderValue,
    trace: TraceContext,
    upstream: std::sync::Arc<crate::upstream::UpstreamPlan>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

/// One try of a call's request, its answer read whole; with the
/// upstream's `retries`, the backend requests sent again on other targets
/// are counted into `retried`. `sent` is the URL of the last request sent.
async fn attempt(
    client: &Client,
    ids: &CallIds,
    limits: &CallLimits,
    p: &Prepared,
    retried: &mut u32,
    sent: &mut Option<Uri>,
) -> Result<Success, Failure> {
    let max_body = limits.max_body;
    let plan = &ids.upstream;
    let labels = crate::upstream::Labels { route: &ids.composition, call: &ids.call, metrics: ids.metrics.as_ref() };
    // The call's body is always held whole: only the method decides. The
    // guard (circuit breaker, least-requests' count) is held until the
    // answer is read whole (the end of this function).
    let retryable = crate::upstream::idempotent(&limits.method);
    let mut tries = match crate::upstream::Tries::start(plan, p.key, retryable, limits.end, labels) {
        Ok(t) => t,
        Err(refused) => return Err(Failure::new("unavailable", refused.message())),
    };
    let resp = loop {
        let target = tries.target();
        let uri = Uri::from_parts({
            let mut u = http::uri::Parts::default();
            u.scheme = Some(target.scheme.clone());
            u.authority = Some(target.authority.clone());
            u.path_and_query = Some(p.pq.clone());
            u
        })
        .map_err(|e| Failure::new("bad_value", format!("the rendered url is invalid: {e}")))?;
        *sent = Some(uri.clone());
        let mut req = Request::new(p.body.clone().map_or(Body::Empty, Body::full));
        *req.method_mut() = limits.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = p.headers.clone();
        let out = Outbound {
            route: &ids.composition,
            call: Some(&ids.call),
            request_id: &ids.request_id,
            trace: &ids.trace,
            correlation: None,
            host: &target.host,
            connector: target.connector.as_ref().or(plan.connector.as_ref()),
            connect_timeout: plan.connect_timeout,
            http2: plan.http2,
            deadline: limits.end,
            body_timeout: crate::upstream::DEFAULT_BODY_TIMEOUT,
            keep_headers: limits.keep_headers,
            metrics: ids.metrics.as_ref(),
        };
        let result = client.send(out, req).await;
        if tries.again(&result) {
            // A status retried: its answer (and body) is discarded.
            drop(result);
            *retried += 1;
            continue;
        }
        break result.map_err(|e| failure_of(&e))?;
    };
    let _held = tries.finish();
    let (parts, body) = resp.into_parts();
    let too_large = || Failure {
        status: Some(parts.status.as_u16()),
        ..Failure::new("body_too_large", format!("the backend body is over {max_body} bytes"))
    };
    if http_body::Body::size_hint(&body).lower() > max_body as u64 {
        return Err(too_large());
    }
    let bytes = match body {
        // Most answers arrive whole with their head.
        Body::Full(b) => b.unwrap_or_default(),
        Body::Empty => Bytes::new(),
        body => match Limited::new(body, max_body).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => {
                return Err(match e.downcast_ref::<UpstreamError>() {
                    Some(u) => failure_of(u),
                    None => Failure::new("upstream", "the backend connection failed while sending the body"),
                })
            }
        },
    };
    let status = parts.status;
    if !status.is_success() {
        let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
        let passthrough = status.is_client_error().then(|| Box::new((status, content_type, bytes)));
        return Err(Failure {
            kind: "status",
            message: format!("the backend answered {}", status.as_u16()),
            status: Some(status.as_u16()),
            passthrough,
        });
    }
    let (body, copies) = parse_body(&bytes, &limits.answer)
        .map_err(|_| Failure { status: Some(status.as_u16()), ..Failure::new("invalid_json", "the backend body is not JSON") })?;
    let size = bytes.len();
    let raw = if limits.keep_raw { bytes } else { Bytes::new() };
    Ok(Success { status: status.as_u16(), headers: parts.headers, body, copies, bytes: size, raw })
}

/// A backend body as the composition reads it: null when empty (or only
/// whitespace), else parsed as far as `answer` says.
fn parse_body(bytes: &[u8], answer: &Projection) -> serde_json::Result<(Value, Option<std::sync::Arc<Copies>>)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((Value::Null, None));
    }
    let (body, copies) = super::answer::parse(bytes, answer)?;
    Ok((body, copies.map(std::sync::Arc::new)))
}

/// How one call's requests are made.
#[derive(Clone)]
struct CallLimits {
    method: http::Method,
    max_body: usize,
    retries: u32,
    /// Whether anything reads the answer's headers (else only its
    /// `Content-Type` is kept).
    keep_headers: bool,
    /// Keep the answer's bytes (a cached call stores them).
    keep_raw: bool,
    /// How far the answer is parsed.
    answer: std::sync::Arc<Projection>,
    /// The call's timeout or the composition's deadline, whichever is first.
    end: Instant,
}

/// One backend request with its retries, ending at `limits.end` at the
/// latest; also how many retries were sent.
async fn request_with_retries(
    client: &Client,
    ids: &CallIds,
    p: &Prepared,
    limits: &CallLimits,
) -> (Result<Success, Failure>, u32, Option<Uri>) {
    let mut retried = 0;
    let mut sent = None;
    let work = async {
        let mut left = limits.retries;
        loop {
            let result = attempt(client, ids, limits, p, &mut retried, &mut sent).await;
            let retryable = match &result {
                Err(f) => matches!(f.kind, "connect" | "upstream" | "protocol") || matches!(f.status, Some(502..=504)),
                Ok(_) => false,
            };
            if !retryable || left == 0 {
                return result;
            }
            left -= 1;
            retried += 1;
        }
    };
    let result = match tokio::time::timeout_at(limits.end, work).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new("timeout", "no answer in time")),
    };
    (result, retried, sent)
}

/// What a call with `cache` or `collapse` shares across client requests.
#[derive(Clone)]
struct Share {
    store: std::sync::Arc<NodeCallStore>,
    cache: Option<std::sync::Arc<CachePlan>>,
    counts: Option<[prometheus::IntCounter; 4]>,
    collapsed: Option<prometheus::IntCounter>,
    /// `scope: cluster`: entries also kept in Redis.
    redis: Option<std::sync::Arc<crate::policy::cluster::RedisLimiter>>,
}

impl Share {
    fn count(&self, mark: Mark) {
        if let Some(c) = &self.counts {
            c[Mark::ALL.iter().position(|m| *m == mark).unwrap_or(0)].inc();
        }
    }
}

/// A stored answer as a call's answer. (A cached call's answer is parsed
/// whole: a body shared across compositions is read the same by all.)
fn success_of(e: &Entry) -> Success {
    let body =
        if e.body.iter().all(u8::is_ascii_whitespace) { Value::Null } else { serde_json::from_slice(&e.body).unwrap_or(Value::Null) };
    Success { status: e.status, headers: e.headers.clone(), body, copies: None, bytes: e.body.len(), raw: e.body.clone() }
}

/// Gives the key back when the shared request ends, however it ends.
struct Landing(std::sync::Arc<NodeCallStore>, std::sync::Arc<str>);

impl Drop for Landing {
    fn drop(&mut self) {
        self.0.landed(&self.1);
    }
}

/// The shared request under `p`'s key: the one in flight, or a new one
/// spawned on this worker's runtime (it outlives the client request that
/// started it). With `stale`, the request is conditional on its
/// validators and a 304 refreshes it. A cached call stores a successful,
/// storable answer before the key is given back.
fn fly(
    share: &Share,
    client: &Client,
    ids: &CallIds,
    p: &Prepared,
    limits: &CallLimits,
    stale: Option<std::sync::Arc<Entry>>,
) -> (Flight<Fetched>, bool) {
    let key = p.share_key.clone().unwrap_or_else(|| "".into());
    share.store.flight(&key, || {
        let (store, cache, client, ids, limits) = (share.store.clone(), share.cache.clone(), client.clone(), ids.clone(), limits.clone());
        let redis = share.redis.clone();
        let mut p = p.clone();
        let key = key.clone();
        let task = tokio::spawn(async move {
            let _landing = Landing(store.clone(), key.clone());
            if let Some(e) = &stale {
                if let Some(etag) = e.headers.get(header::ETAG) {
                    p.headers.insert(header::IF_NONE_MATCH, etag.clone());
                } else if let Some(at) = e.headers.get(header::LAST_MODIFIED) {
                    p.headers.insert(header::IF_MODIFIED_SINCE, at.clone());
                }
            }
            let (mut result, retries, sent) = request_with_retries(&client, &ids, &p, &limits).await;
            let mut revalidated = false;
            if let Some(c) = &cache {
                let keep = c.stale_while_revalidate.max(c.stale_if_error);
                let entry = |status, headers, body| Entry { stored: std::time::Instant::now(), ttl: c.ttl, keep, status, headers, body };
                match (&result, &stale) {
                    (Err(f), Some(e)) if f.status == Some(304) => {
                        let fresh = entry(e.status, e.headers.clone(), e.body.clone());
                        result = Ok(success_of(&fresh));
                        store.put(key.clone(), fresh);
                        revalidated = true;
                    }
                    (Ok(s), _) if storable(&s.headers) => {
                        let fresh = entry(s.status, s.headers.clone(), s.raw.clone());
                        if let (Some(r), Some(wire)) = (&redis, super::cache::to_wire(&fresh)) {
                            r.store_call(&key, wire, fresh.ttl + fresh.keep).await;
                        }
                        store.put(key.clone(), fresh);
                    }
                    _ => {}
                }
            }
            Fetched { result, retries, sent, revalidated }
        });
        async move {
            task.await.unwrap_or_else(|_| Fetched {
                result: Err(Failure::new("upstream", "the shared request was stopped")),
                retries: 0,
                sent: None,
                revalidated: false,
            })
        }
        .boxed()
    })
}

/// One request of a call: straight to the backend, or, for a call with
/// `cache` or `collapse`, through the node's store and the identical
/// request in flight. Also its retries, the URL sent and its cache mark.
async fn request_once(
    client: &Client,
    ids: &CallIds,
    p: &Prepared,
    limits: &CallLimits,
    share: Option<&Share>,
) -> (Result<Success, Failure>, u32, Option<Uri>, Option<Mark>) {
    let Some(share) = share.filter(|_| p.share_key.is_some()) else {
        let (r, retries, sent) = request_with_retries(client, ids, p, limits).await;
        return (r, retries, sent, None);
    };
    let key = p.share_key.as_deref().unwrap_or("");
    let mut stored = share.cache.as_ref().and_then(|_| share.store.get(key));
    // `scope: cluster`: what another node kept, when this one has nothing.
    if let (None, Some(r), Some(k)) = (&stored, &share.redis, &p.share_key) {
        if let Some(e) = r.cached_call(k).await.as_deref().and_then(super::cache::from_wire) {
            let e = std::sync::Arc::new(e);
            share.store.put_shared(k.clone(), e.clone());
            stored = Some(e);
        }
    }
    let mut usable_stale = None;
    if let (Some(c), Some(e)) = (&share.cache, &stored) {
        let age = e.age();
        if age < e.ttl {
            share.count(Mark::Hit);
            return (Ok(success_of(e)), 0, None, Some(Mark::Hit));
        }
        if age < e.ttl + c.stale_while_revalidate {
            // Answered at once; one refresh per key, in the background.
            if !share.store.in_flight(key) {
                drop(fly(share, client, ids, p, limits, Some(e.clone())));
            }
            share.count(Mark::Stale);
            return (Ok(success_of(e)), 0, None, Some(Mark::Stale));
        }
        if age < e.ttl + c.stale_if_error {
            usable_stale = Some(e.clone());
        }
    }
    let (flight, leader) = fly(share, client, ids, p, limits, stored);
    if let (false, Some(c)) = (leader, &share.collapsed) {
        c.inc();
    }
    let fetched = match tokio::time::timeout_at(limits.end, flight).await {
        Ok(f) => f,
        Err(_) => Fetched { result: Err(Failure::new("timeout", "no answer in time")), retries: 0, sent: None, revalidated: false },
    };
    // The leader's retries are its own: a waiter sent nothing.
    let retries = if leader { fetched.retries } else { 0 };
    let mark = match (&fetched.result, usable_stale) {
        (Err(_), Some(e)) => {
            share.count(Mark::Stale);
            return (Ok(success_of(&e)), retries, fetched.sent, Some(Mark::Stale));
        }
        _ if share.cache.is_none() => None,
        _ if fetched.revalidated => Some(Mark::Revalidated),
        _ => Some(Mark::Miss),
    };
    if let Some(m) = mark {
        share.count(m);
    }
    (fetched.result, retries, fetched.sent, mark)
}

type CallFuture = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// When and how a call runs, besides its requests.
struct Launch {
    index: usize,
    ids: CallIds,
    for_each: bool,
    started: Instant,
    composition_start: Instant,
    limits: CallLimits,
    concurrency: usize,
    /// Keep a report of each backend request (the `try` endpoint).
    record: bool,
    /// A call with `cache` or `collapse`.
    share: Option<Share>,
    /// A `batch` call's items.
    batch: Option<BatchItems>,
}

fn record_of(
    name: String,
    url: String,
    started: Option<f64>,
    r: &Result<Success, Failure>,
    d: Duration,
    retries: u32,
    mark: Option<Mark>,
) -> CallRecord {
    CallRecord {
        cache: mark.map(Mark::as_str),
        name,
        url: Some(url),
        started_ms: started,
        duration_ms: Some(ms(d)),
        status: match r {
            Ok(s) => Some(s.status),
            Err(f) => f.status,
        },
        error: r.as_ref().err().map(Failure::json),
        retries,
    }
}

/// Starts a call with its rendered requests; the future owns all it needs.
fn launch(call: &CallPlan, requests: Vec<Prepared>, client: &Client, l: Launch) -> CallFuture {
    let client = client.clone();
    let name = call.name.clone();
    Box::pin(async move {
        let offset = |t: Instant| ms(t - l.composition_start);
        let mut records = Vec::new();
        let mut sent_again = 0;
        let mut mark = None;
        let mut batches = None;
        let result = if !l.for_each {
            match requests.into_iter().next() {
                Some(p) => {
                    let (r, retries, sent, m) = request_once(&client, &l.ids, &p, &l.limits, l.share.as_ref()).await;
                    sent_again = retries;
                    mark = m;
                    if l.record {
                        let at = Some(offset(l.started));
                        let url = sent.map_or_else(|| p.pq.to_string(), |u| u.to_string());
                        records.push(record_of(name.to_string(), url, at, &r, l.started.elapsed(), retries, m));
                    }
                    r
                }
                None => Err(Failure::new("upstream", "no request was made")),
            }
        } else {
            // Items whose requests are the same (a repeated value) are sent
            // once: `of[k]` is item k's request among the distinct ones. A
            // batch's items were grouped by value when it was prepared.
            let (requests, of) = match &l.batch {
                Some(b) => (requests, b.of.clone()),
                None => distinct(requests),
            };
            batches = l.batch.as_ref().map(|_| requests.len());
            // How many items each request answers (a batch's answer is
            // matched to its items afterwards: once).
            let mut uses = vec![usize::from(l.batch.is_some()); requests.len()];
            if l.batch.is_none() {
                for &d in &of {
                    uses[d] += 1;
                }
            }
            // Requests run `concurrency` at a time and settle in order; the
            // first failure stops the call and drops the ones still running.
            // Their bodies together stay within the call's body limit.
            let mut items = futures_util::stream::iter(requests.into_iter().enumerate())
                .map(|(i, p)| {
                    let (client, limits, ids, share) = (&client, &l.limits, &l.ids, l.share.as_ref());
                    async move {
                        let t = Instant::now();
                        let (r, retries, sent, m) = request_once(client, ids, &p, limits, share).await;
                        let url = sent.map_or_else(|| p.pq.to_string(), |u| u.to_string());
                        (i, url, t, r, retries, m)
                    }
                })
                .buffered(l.concurrency);
            let mut bodies = Vec::new();
            let mut total = 0usize;
            let mut failure = None;
            while let Some((i, url, t, r, retries, m)) = items.next().await {
                sent_again += retries;
                mark = mark.max(m);
                if l.record {
                    records.push(record_of(format!("{name}[{i}]"), url, Some(offset(t)), &r, t.elapsed(), retries, m));
                }
                match r {
                    Ok(s) => {
                        // Each item holds its copy: counted once per item (a
                        // batch's answer once).
                        total += s.bytes * uses[i];
                        if total > l.limits.max_body {
                            failure =
                                Some(Failure::new("body_too_large", format!("the items' bodies are over {} bytes", l.limits.max_body)));
                            break;
                        }
                        bodies.push(s.body);
                    }
                    Err(f) => {
                        failure = Some(f);
                        break;
                    }
                }
            }
            match (failure, &l.batch) {
                (Some(f), _) => Err(f),
                (None, Some(b)) => match_batches(&b.plan, bodies, &b.texts, &of).map(|items| Success {
                    status: 200,
                    headers: HeaderMap::new(),
                    body: Value::Array(items),
                    copies: None,
                    bytes: total,
                    raw: Bytes::new(),
                }),
                (None, None) => {
                    // Every item gets its request's body, in item order (a
                    // repeated one a copy).
                    let mut bodies: Vec<Option<Value>> = bodies.into_iter().map(Some).collect();
                    Ok(Success {
                        status: 200,
                        headers: HeaderMap::new(),
                        body: Value::Array(hand_out(&mut bodies, &of, uses)),
                        copies: None,
                        bytes: total,
                        raw: Bytes::new(),
                    })
                }
            }
        };
        Finished { index: l.index, mark, batches, result, duration: l.started.elapsed(), records, retries: sent_again }
    })
}

/// Item k gets `bodies[of[k]]`: moved out at its last use, copied before.
fn hand_out(bodies: &mut [Option<Value>], of: &[usize], mut left: Vec<usize>) -> Vec<Value> {
    of.iter()
        .map(|&d| {
            left[d] -= 1;
            if left[d] == 0 {
                bodies[d].take().unwrap_or(Value::Null)
            } else {
                bodies[d].clone().unwrap_or(Value::Null)
            }
        })
        .collect()
}

/// A batch call's items: its distinct values (as sent, in text) grouped
/// into requests, and for each item the index of its value.
#[derive(Clone)]
struct BatchItems {
    plan: std::sync::Arc<BatchPlan>,
    /// The text of each distinct value, in first-seen order.
    texts: Vec<String>,
    of: Vec<usize>,
}

/// Each distinct value's element among the batches' answers, found by
/// `key` (compared as text, as the value was sent), then handed to the
/// items in item order; a value no element matched is null.
fn match_batches(shape: &BatchPlan, answers: Vec<Value>, texts: &[String], of: &[usize]) -> Result<Vec<Value>, Failure> {
    let index: std::collections::HashMap<&str, usize> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut found: Vec<Option<Value>> = vec![None; texts.len()];
    for answer in answers {
        let array = match &shape.path {
            Some(q) => q.eval(&answer),
            None => answer,
        };
        let Value::Array(elements) = array else {
            return Err(Failure::new("invalid_batch", "the batch answer is not a JSON array"));
        };
        for element in elements {
            let k = shape.key.eval(&element);
            if let Some(&d) = index.get(&*value_text(&k)) {
                if found[d].is_none() && !k.is_null() {
                    found[d] = Some(element);
                }
            }
        }
    }
    let mut uses = vec![0usize; texts.len()];
    for &d in of {
        uses[d] += 1;
    }
    Ok(hand_out(&mut found, of, uses))
}

/// The distinct requests of a `for_each` call, in first-seen order, and for
/// each item the index of its request among them: two items whose values
/// render the same request (path and query, headers, body) share one.
fn distinct(requests: Vec<Prepared>) -> (Vec<Prepared>, Vec<usize>) {
    let mut out: Vec<Prepared> = Vec::with_capacity(requests.len());
    let mut of = Vec::with_capacity(requests.len());
    for p in requests {
        match out.iter().position(|q| q.pq == p.pq && q.body == p.body && q.headers == p.headers) {
            Some(d) => of.push(d),
            None => {
                of.push(out.len());
                out.push(p);
            }
        }
    }
    (out, of)
}

/// One request of `call` per value, each rendered with the value under
/// `name` in the document (`item`, or a batch's `items`); the name is
/// taken out again whatever happens.
fn prepare_each(
    call: &CallPlan,
    doc: &mut Value,
    ex: &Exchange,
    name: &str,
    values: impl Iterator<Item = Value>,
) -> Result<Vec<Prepared>, Failure> {
    let mut out = Vec::with_capacity(values.size_hint().0);
    let mut result = Ok(());
    for value in values {
        if let Value::Object(m) = doc {
            m.insert(name.into(), value);
        }
        match prepare(call, doc, ex) {
            Ok(p) => out.push(p),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Value::Object(m) = doc {
        m.remove(name);
    }
    result.map(|()| out)
}

fn failure_response(f: &Failure, call: &str, request_id: &HeaderValue) -> Response<Body> {
    let id = request_id.to_str().unwrap_or("");
    if let Some((status, content_type, bytes)) = f.passthrough.as_deref() {
        let mut resp = Response::new(Body::full(bytes.clone()));
        *resp.status_mut() = *status;
        if let Some(ct) = content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        return resp;
    }
    match f.kind {
        "timeout" => error_response(ErrorCode::UpstreamTimeout, &format!("call {call:?} did not answer in time"), id),
        "unavailable" => error_response(ErrorCode::UpstreamUnavailable, &format!("call {call:?}: {}", f.message), id),
        "bad_request" => error_response(ErrorCode::BadRequest, &format!("call {call:?}: {}", f.message), id),
        _ => error_response(ErrorCode::UpstreamError, &format!("call {call:?} failed"), id),
    }
}

/// The state of one composition run.
struct Run<'p> {
    plan: &'p CompositionPlan,
    start: Instant,
    deadline: Instant,
    states: Vec<State>,
    started: Vec<Option<Instant>>,
    durations: Vec<Duration>,
    /// Requests each call sent again, for `Server-Timing`.
    retries: Vec<u32>,
    failures: Vec<Option<Failure>>,
    call_headers: Vec<Option<HeaderMap>>,
    /// Each settled call's copied values (`answer.rs`), for the response.
    copies: Vec<Option<std::sync::Arc<Copies>>>,
    /// Each call's answer status, once it answered.
    statuses: Vec<u16>,
    records: Vec<CallRecord>,
    record: bool,
    doc: Value,
    metrics: Option<&'p std::sync::Arc<Metrics>>,
    /// GET and HEAD calls of one request sent so far, with their request:
    /// a later call whose request is the same is not sent again
    /// (in-request de-duplication).
    sent: Vec<(usize, Prepared)>,
    /// Calls waiting on another call's identical request: (that call, the
    /// waiting one).
    followers: Vec<(usize, usize)>,
    /// A call's cache mark and batches sent, for `Server-Timing`.
    notes: Vec<Option<(Option<Mark>, Option<usize>)>>,
}

impl Run<'_> {
    /// The call already sending (or that sent) the same request as call
    /// `i` would: same upstream, method, path and query, headers and body.
    fn same_as(&self, i: usize, p: &Prepared) -> Option<usize> {
        let call = &self.plan.calls[i];
        self.sent
            .iter()
            .find(|(j, q)| {
                let other = &self.plan.calls[*j];
                other.origin == call.origin && other.method == call.method && q.pq == p.pq && q.body == p.body && q.headers == p.headers
            })
            .map(|(j, _)| *j)
    }

    fn set(&mut self, i: usize, entry: Value) {
        if let Value::Object(m) = &mut self.doc {
            m.insert(self.plan.calls[i].name.to_string(), entry);
        }
    }

    /// Settles call `i` with the answer to its request (`from`: the call
    /// whose identical request it was). `Err`: a required call failed, and
    /// the composition fails with it.
    fn settle_sent(&mut self, i: usize, result: Result<Success, Failure>, duration: Duration, from: Option<usize>) -> Result<(), Failure> {
        if let Some(j) = from {
            self.durations[i] = duration;
            if self.record {
                let url = format!("the request of {:?}", &*self.plan.calls[j].name);
                let at = self.started[i].map(|t| ms(t - self.start));
                self.records.push(record_of(self.plan.calls[i].name.to_string(), url, at, &result, duration, 0, None));
            }
        }
        match result {
            Ok(s) => {
                // Backend headers go into the document only when something reads them.
                let reads_headers = self.plan.reads_headers;
                let headers = || if reads_headers { headers_json(&s.headers) } else { Value::Object(Map::new()) };
                let entry = call_entry(self.plan.calls[i].entry, Some(s.status), headers, s.body, None, duration);
                self.statuses[i] = s.status;
                self.set(i, entry);
                self.call_headers[i] = Some(s.headers);
                self.copies[i] = s.copies;
                self.states[i] = State::Done;
                Ok(())
            }
            Err(f) if self.plan.calls[i].required => Err(f),
            Err(f) => {
                let body = self.failed_body(i);
                self.set(i, call_entry(self.plan.calls[i].entry, f.status, || json!({}), body, Some(&f), duration));
                self.failures[i] = Some(f);
                self.states[i] = State::Failed;
                Ok(())
            }
        }
    }

    /// The answer call `j` (settled) had, for a call whose request was the
    /// same.
    fn result_of(&self, j: usize) -> Result<Success, Failure> {
        match (&self.failures[j], self.states[j]) {
            (Some(f), State::Failed) => Err(f.clone()),
            _ => {
                let entry = self.doc.get(&*self.plan.calls[j].name);
                Ok(Success {
                    status: self.statuses[j],
                    headers: self.call_headers[j].clone().unwrap_or_default(),
                    body: entry.map_or(Value::Null, |e| e["body"].clone()),
                    copies: self.copies[j].clone(),
                    bytes: 0,
                    raw: Bytes::new(),
                })
            }
        }
    }

    /// The body of an optional call that failed or was skipped: its
    /// `fallback`, else null.
    fn failed_body(&self, i: usize) -> Value {
        self.plan.calls[i].fallback.clone().unwrap_or(Value::Null)
    }

    /// Whether call `d`'s outcome keeps the calls reading it from running:
    /// it failed or was skipped, and has no fallback to run on.
    fn blocks(&self, d: usize) -> bool {
        matches!(self.states[d], State::Failed | State::Skipped) && self.plan.calls[d].fallback.is_none()
    }

    /// A call settled without sending anything (skipped, not run, refused).
    fn settle_unsent(&mut self, i: usize, state: State, failure: Option<Failure>) {
        let body = if failure.is_some() { self.failed_body(i) } else { Value::Null };
        self.set(i, call_entry(self.plan.calls[i].entry, None, || json!({}), body, failure.as_ref(), Duration::ZERO));
        if self.record {
            self.records.push(CallRecord {
                name: self.plan.calls[i].name.to_string(),
                url: None,
                started_ms: None,
                duration_ms: None,
                status: None,
                error: Some(failure.as_ref().map_or_else(|| json!({"kind": "not_run", "message": "when was false"}), Failure::json)),
                retries: 0,
                cache: None,
            });
        }
        self.failures[i] = failure;
        self.states[i] = state;
    }

    /// Each call's duration and failure, once the composition answers.
    fn count_calls(&self) {
        let Some(m) = self.metrics else { return };
        for (i, call) in self.plan.calls.iter().enumerate() {
            let (took, failure) = match self.states[i] {
                State::Done => (self.durations[i], None),
                State::Failed => (self.durations[i], Some(self.failures[i].as_ref().map_or("failed", |f| f.kind))),
                State::Running => (self.started[i].map_or(Duration::ZERO, |t| t.elapsed()), Some("cancelled")),
                State::Skipped | State::NotRun | State::Waiting => continue,
            };
            if let Some(h) = &call.duration {
                h.observe(took.as_secs_f64());
            }
            if let Some(kind) = failure {
                m.call_failed(&self.plan.name, &call.name, kind);
            }
        }
    }

    fn server_timing(&self) -> HeaderValue {
        use std::fmt::Write as _;
        self.count_calls();
        let mut out = String::with_capacity(32 * (self.plan.calls.len() + 1));
        for (i, call) in self.plan.calls.iter().enumerate() {
            let name = &*call.name;
            // `retries=N` (a Server-Timing extension parameter) when the
            // call sent requests again.
            let retries = self.retries[i];
            let _ = match self.states[i] {
                State::Done if retries > 0 => write!(out, "{name};dur={};retries={retries}, ", ms(self.durations[i])),
                State::Done => write!(out, "{name};dur={}, ", ms(self.durations[i])),
                State::Failed => {
                    let kind = self.failures[i].as_ref().map_or("failed", |f| f.kind);
                    if retries > 0 {
                        write!(out, "{name};dur={};desc=\"{kind}\";retries={retries}, ", ms(self.durations[i]))
                    } else {
                        write!(out, "{name};dur={};desc=\"{kind}\", ", ms(self.durations[i]))
                    }
                }
                State::Running => {
                    let d = self.started[i].map_or(Duration::ZERO, |t| t.elapsed());
                    write!(out, "{name};dur={};desc=\"cancelled\", ", ms(d))
                }
                State::Skipped => write!(out, "{name};dur=0;desc=\"skipped\", "),
                State::NotRun => write!(out, "{name};dur=0;desc=\"not run\", "),
                State::Waiting => write!(out, "{name};dur=0;desc=\"cancelled\", "),
            };
            // `cache=hit` and `batches=N` (extension parameters) on a
            // call that has them, before its entry's separator.
            if let Some(&Some((mark, batches))) = self.notes.get(i) {
                if matches!(self.states[i], State::Done | State::Failed) {
                    out.truncate(out.len() - 2);
                    if let Some(m) = mark {
                        let _ = write!(out, ";cache={}", m.as_str());
                    }
                    if let Some(b) = batches {
                        let _ = write!(out, ";batches={b}");
                    }
                    out.push_str(", ");
                }
            }
        }
        let _ = write!(out, "total;dur={}", ms(self.start.elapsed()));
        HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("total"))
    }

    fn fail(mut self, i: usize, f: Failure, request_id: &HeaderValue) -> Outcome {
        let mut response = failure_response(&f, &self.plan.calls[i].name, request_id);
        self.failures[i] = Some(f);
        self.states[i] = State::Failed;
        response.headers_mut().insert(HeaderName::from_static("server-timing"), self.server_timing());
        Outcome { response, calls: self.records }
    }

    /// Renders the requests of call `i` (one, or one per `for_each` item,
    /// or one per batch of distinct values).
    fn prepare_all(&mut self, i: usize, ex: &Exchange) -> Result<(Vec<Prepared>, Option<BatchItems>), Failure> {
        let call = &self.plan.calls[i];
        let Some(q) = &call.for_each else { return prepare(call, &self.doc, ex).map(|p| (vec![p], None)) };
        let items = q.items(&self.doc);
        if items.len() > call.max_items {
            return Err(Failure::new("too_many_items", format!("for_each gave {} items, more than {}", items.len(), call.max_items)));
        }
        if let Some(b) = &call.batch {
            // Values that are sent the same (as text) are one value.
            let mut texts: Vec<String> = Vec::new();
            let mut index = std::collections::HashMap::with_capacity(items.len());
            let mut values = Vec::new();
            let mut of = Vec::with_capacity(items.len());
            for item in items {
                let text = value_text(&item).into_owned();
                let d = *index.entry(text.clone()).or_insert_with(|| {
                    texts.push(text);
                    values.push(item);
                    values.len() - 1
                });
                of.push(d);
            }
            let batch = BatchItems { plan: b.clone(), texts, of };
            let chunks = values.chunks(b.size).map(|chunk| Value::Array(chunk.to_vec()));
            // `of` indexes values; a batch's answers are matched to values.
            return prepare_each(call, &mut self.doc, ex, "items", chunks).map(|out| (out, Some(batch)));
        }
        prepare_each(call, &mut self.doc, ex, "item", items.into_iter()).map(|out| (out, None))
    }
}

/// Runs `plan` for one request. `request` is the context's `request` entry.
pub async fn run(ex: Exchange<'_>, plan: &CompositionPlan, request: Value) -> Outcome {
    let start = Instant::now();
    let n = plan.calls.len();
    let mut doc = Map::with_capacity(n + 1);
    doc.insert("request".into(), request);
    let mut run = Run {
        plan,
        start,
        deadline: start + plan.deadline,
        states: vec![State::Waiting; n],
        started: vec![None; n],
        durations: vec![Duration::ZERO; n],
        retries: vec![0; n],
        failures: vec![None; n],
        call_headers: (0..n).map(|_| None).collect(),
        copies: vec![None; n],
        statuses: vec![200; n],
        records: Vec::new(),
        record: ex.record,
        doc: Value::Object(doc),
        metrics: ex.metrics,
        sent: Vec::new(),
        followers: Vec::new(),
        notes: Vec::new(),
    };
    let mut running: FuturesUnordered<CallFuture> = FuturesUnordered::new();

    loop {
        // Start (or settle) every waiting call whose inputs are all settled.
        let mut progress = true;
        while progress {
            progress = false;
            for i in 0..n {
                if run.states[i] != State::Waiting {
                    continue;
                }
                let call = &plan.calls[i];
                if call.deps.iter().any(|&d| matches!(run.states[d], State::Waiting | State::Running)) {
                    continue;
                }
                progress = true;
                if let Some(&d) = call.deps.iter().find(|&&d| run.blocks(d)) {
                    let f = Failure::new("skipped", format!("skipped because {:?} failed", plan.calls[d].name));
                    run.settle_unsent(i, State::Skipped, Some(f));
                    continue;
                }
                let inputs_ran = !call.deps.iter().any(|&d| run.states[d] == State::NotRun);
                if !(inputs_ran && call.when.as_ref().is_none_or(|w| truthy(&w.eval(&run.doc)))) {
                    run.settle_unsent(i, State::NotRun, None);
                    continue;
                }
                match run.prepare_all(i, &ex) {
                    Ok((requests, batch)) => {
                        // A GET or HEAD the same as one sent before is not
                        // sent again: this call takes that one's answer.
                        if call.may_share {
                            if let Some(j) = requests.first().and_then(|p| run.same_as(i, p)) {
                                run.started[i] = Some(Instant::now());
                                if run.states[j] == State::Running {
                                    run.followers.push((j, i));
                                    run.states[i] = State::Running;
                                } else {
                                    let result = run.result_of(j);
                                    if let Err(f) = run.settle_sent(i, result, Duration::ZERO, Some(j)) {
                                        return run.fail(i, f, ex.request_id);
                                    }
                                }
                                continue;
                            }
                            if let Some(p) = requests.first() {
                                run.sent.push((i, p.clone()));
                            }
                        }
                        let now = Instant::now();
                        let end = call.timeout.map_or(run.deadline, |t| (now + t).min(run.deadline));
                        let limits = CallLimits {
                            method: call.method.clone(),
                            max_body: call.max_body,
                            retries: call.retries,
                            keep_headers: call.keep_headers || call.cache.is_some(),
                            keep_raw: call.cache.is_some(),
                            answer: call.answer.clone(),
                            end,
                        };
                        // Owned by the call's future.
                        let ids = CallIds {
                            composition: plan.name.clone(),
                            call: call.name.clone(),
                            request_id: ex.request_id.clone(),
                            trace: *ex.trace,
                            upstream: call.upstream.clone(),
                            metrics: ex.metrics.cloned(),
                        };
                        let l = Launch {
                            index: i,
                            ids,
                            for_each: call.for_each.is_some(),
                            started: now,
                            composition_start: start,
                            limits,
                            concurrency: call.max_concurrency,
                            record: ex.record,
                            share: call.store.as_ref().map(|store| Share {
                                store: store.clone(),
                                cache: call.cache.clone(),
                                counts: call.cache_counts.clone(),
                                collapsed: call.collapsed.clone(),
                                redis: call.redis.clone(),
                            }),
                            batch,
                        };
                        running.push(launch(call, requests, ex.client, l));
                        run.started[i] = Some(now);
                        run.states[i] = State::Running;
                    }
                    Err(f) if call.required => return run.fail(i, f, ex.request_id),
                    Err(f) => run.settle_unsent(i, State::Failed, Some(f)),
                }
            }
        }
        let Some(done) = running.next().await else { break };
        let i = done.index;
        run.durations[i] = done.duration;
        run.retries[i] = done.retries;
        if done.mark.is_some() || done.batches.is_some() {
            // Allocated only by a composition whose calls have notes.
            run.notes.resize(n, None);
            run.notes[i] = Some((done.mark, done.batches));
        }
        run.records.extend(done.records);
        let followers: Vec<usize> = run.followers.iter().filter(|(l, _)| *l == i).map(|(_, f)| *f).collect();
        let shared = (!followers.is_empty()).then(|| done.result.clone());
        // Dropping `running` on return cancels the calls still in flight.
        if let Err(f) = run.settle_sent(i, done.result, done.duration, None) {
            return run.fail(i, f, ex.request_id);
        }
        // The calls that wait on this one's request get its answer.
        if let Some(result) = shared {
            for j in followers {
                let d = run.started[j].map_or(Duration::ZERO, |t| t.elapsed());
                if let Err(f) = run.settle_sent(j, result.clone(), d, Some(i)) {
                    return run.fail(j, f, ex.request_id);
                }
            }
        }
    }

    let response = shape(&run, ex.request_id);
    Outcome { response, calls: run.records }
}

/// The default answer, `{call: body, ...}` in call order, serialized from
/// the document without copying the bodies.
struct CallBodies<'a, 'p>(&'a Run<'p>);

impl serde::Serialize for CallBodies<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let calls = &self.0.plan.calls;
        let mut map = s.serialize_map(Some(calls.len()))?;
        for call in calls {
            let body = self.0.doc.get(&*call.name).and_then(|e| e.get("body")).unwrap_or(&Value::Null);
            map.serialize_entry(&*call.name, body)?;
        }
        map.end()
    }
}

fn shape(run: &Run, request_id: &HeaderValue) -> Response<Body> {
    let (plan, doc) = (run.plan, &run.doc);
    let r = &plan.response;
    let (bytes, content_type) = match &r.body {
        ResponseBody::Default => (serde_json::to_vec(&CallBodies(run)).unwrap_or_default(), HeaderValue::from_static("application/json")),
        ResponseBody::Json(template) => {
            let mut out = Vec::with_capacity(256);
            if template.write(doc, &run.copies, &mut out).is_err() {
                out.clear();
            }
            (out, HeaderValue::from_static("application/json"))
        }
        ResponseBody::Text { template, content_type } => match template.render(doc) {
            Ok(text) => (text.into_bytes(), content_type.clone()),
            Err(e) => {
                tracing::warn!(request_id = request_id.to_str().unwrap_or(""), composition = %plan.name, error = %e, "response template failed");
                return error_response(ErrorCode::Internal, "the response template failed", request_id.to_str().unwrap_or(""));
            }
        },
    };
    let mut resp = Response::new(Body::full(bytes));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    for (idx, names) in &r.forward_headers {
        if let Some(from) = &run.call_headers[*idx] {
            for name in names {
                let mut values = from.get_all(name).iter().peekable();
                // A forwarded content-type replaces the gateway's own.
                if values.peek().is_some() && name == header::CONTENT_TYPE {
                    h.remove(name);
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
        }
    }
    for (name, t) in &r.headers {
        match t.render(doc).ok().and_then(|v| HeaderValue::from_str(&v).ok()) {
            Some(v) => {
                h.insert(name.clone(), v);
            }
            None => {
                tracing::warn!(request_id = request_id.to_str().unwrap_or(""), composition = %plan.name, header = %name, "response header template gave no valid value")
            }
        }
    }
    let partial: Vec<&str> = plan
        .calls
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(run.states[*i], State::Failed | State::Skipped))
        .map(|(_, c)| &*c.name)
        .collect();
    if !partial.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&partial.join(", ")) {
            h.insert(HeaderName::from_static("manifold-partial"), v);
        }
    }
    h.insert(HeaderName::from_static("server-timing"), run.server_timing());
    resp
}
