//! One call's backend requests: rendering them from the context document
//! (`prepare`), sending each with its retries, straight or shared through
//! the node's store (`cache`, `collapse`), and the future that runs a
//! call's requests (`launch`) and reports how they went.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::answer::{Copies, Projection};
use super::batch::{distinct, hand_out, match_batches, BatchItems};
use super::cache::{storable, CachePlan, CallStore, Entry, Flight, Mark};
use super::exec::{ms, Exchange};
use super::plan::{CallPlan, CompositionPlan};
use super::query::Rendered;
use crate::body::Body;
use crate::ids::TraceContext;
use crate::metrics::Metrics;
use crate::upstream::{Cause, Client, Outbound, UpstreamError};

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

#[derive(Clone, Debug)]
pub struct Failure {
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) status: Option<u16>,
    /// A backend's own 4xx, passed on when the call was required.
    pub(super) passthrough: Option<Box<(StatusCode, Option<HeaderValue>, Bytes)>>,
}

impl Failure {
    pub(super) fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into(), status: None, passthrough: None }
    }

    pub(super) fn json(&self) -> Value {
        json!({"kind": self.kind, "message": self.message})
    }
}

#[derive(Clone)]
pub struct Success {
    pub(super) status: u16,
    pub(super) headers: HeaderMap,
    pub(super) body: Value,
    /// The parts of the body the response copies as they are (`answer.rs`).
    pub(super) copies: Option<std::sync::Arc<Copies>>,
    pub(super) bytes: usize,
    /// The body as it came, kept only for a cached call (to store it).
    pub(super) raw: Bytes,
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

/// A call's requests settled, as its future ends.
pub(super) struct Finished {
    pub(super) index: usize,
    /// The call's cache mark: the least fresh of its requests'.
    pub(super) mark: Option<Mark>,
    /// Batches sent (a `batch` call).
    pub(super) batches: Option<usize>,
    pub(super) result: Result<Success, Failure>,
    pub(super) duration: Duration,
    pub(super) records: Vec<CallRecord>,
    /// Backend requests sent again (the call's own retries and its
    /// upstream's), over all its items.
    pub(super) retries: u32,
}

/// One backend request of a call, rendered.
#[derive(Clone)]
pub(super) struct Prepared {
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

impl Prepared {
    /// Whether `other` sends the same path and query, body and headers.
    pub(super) fn same_request(&self, other: &Prepared) -> bool {
        self.pq == other.pq && self.body == other.body && self.headers == other.headers
    }
}

/// Renders one backend request of `call` against the context document.
pub(super) fn prepare(call: &CallPlan, doc: &Value, ex: &Exchange) -> Result<Prepared, Failure> {
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

pub(super) type CallFuture = Pin<Box<dyn Future<Output = Finished> + Send>>;

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

pub(super) fn record_of(
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

/// Starts call `i` of `plan` with its rendered requests (`batch`: a batch
/// call's items), at `now`, within the composition's `deadline`; `start`
/// is when the composition started. The future owns all it needs.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    plan: &CompositionPlan,
    i: usize,
    requests: Vec<Prepared>,
    batch: Option<BatchItems>,
    ex: &Exchange,
    now: Instant,
    start: Instant,
    deadline: Instant,
) -> CallFuture {
    let call = &plan.calls[i];
    let end = call.timeout.map_or(deadline, |t| (now + t).min(deadline));
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
    let client = ex.client.clone();
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
                (None, Some(b)) => match_batches(b, bodies, &of).map(|items| Success {
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
