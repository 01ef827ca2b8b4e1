//! Running a composition: every call starts the moment the calls it reads
//! are done (not in waves), all on the request's own task; a required
//! call's failure cancels the calls still running, by dropping them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::plan::{CallPlan, CompositionPlan, ResponseBody};
use super::query::truthy;
use crate::body::Body;
use crate::errors::{error_response, ErrorCode};
use crate::ids::{TraceContext, REQUEST_ID_HEADER, TRACEPARENT};
use crate::proxy::HttpClient;

/// What a composition needs from the request it serves.
pub struct Exchange<'a> {
    pub client: &'a HttpClient,
    pub request_id: &'a HeaderValue,
    pub trace: &'a TraceContext,
    /// The client's headers, for `forward_headers`.
    pub client_headers: &'a HeaderMap,
    /// Report every backend request in [`Outcome::calls`] (costs a little).
    pub record: bool,
}

/// One backend request as the `try` endpoint reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CallRecord {
    pub name: String,
    pub url: String,
    pub started_ms: f64,
    pub duration_ms: f64,
    pub status: Option<u16>,
    pub error: Option<Value>,
}

pub struct Outcome {
    pub response: Response<Body>,
    pub calls: Vec<CallRecord>,
}

#[derive(Clone, Debug)]
struct Failure {
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
}

struct Success {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

struct Finished {
    index: usize,
    result: Result<Success, Failure>,
    duration: Duration,
    records: Vec<CallRecord>,
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

struct Prepared {
    uri: Uri,
    headers: HeaderMap,
    body: Option<Bytes>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut map = Map::new();
    for name in headers.keys() {
        let joined =
            headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect::<Vec<_>>().join(", ");
        map.insert(name.as_str().to_string(), Value::String(joined));
    }
    Value::Object(map)
}

/// A call's entry in the context document. Built by hand: `json!` would
/// serialize (deep-copy) the body it is given.
fn call_entry(status: Option<u16>, headers: Value, body: Value, error: Option<&Failure>, duration: Duration) -> Value {
    let mut m = Map::with_capacity(5);
    m.insert("status".into(), status.map_or(Value::Null, Value::from));
    m.insert("headers".into(), headers);
    m.insert("body".into(), body);
    m.insert("error".into(), error.map_or(Value::Null, |f| json!({"kind": f.kind, "message": f.message})));
    m.insert("duration_ms".into(), Value::from(ms(duration)));
    Value::Object(m)
}

/// Renders one backend request of `call` against the context document.
fn prepare(call: &CallPlan, doc: &Value, ex: &Exchange) -> Result<Prepared, Failure> {
    let bad = |m: String| Failure::new("bad_request", m);
    let path = call.path.render(doc).map_err(bad)?;
    // Values are percent-encoded, but a value that *is* `.` or `..` would
    // still be a dot segment: refuse rather than let it climb the path.
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(bad("a request value would change the backend path".into()));
    }
    let mut pq = path;
    if let Some(q) = &call.query {
        pq.push('?');
        pq.push_str(&q.render(doc).map_err(bad)?);
    }
    let uri = Uri::builder()
        .scheme(call.scheme.clone())
        .authority(call.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| bad(format!("the rendered url is invalid: {e}")))?;
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
    headers.insert(header::HOST, call.host_header.clone());
    headers.insert(REQUEST_ID_HEADER, ex.request_id.clone());
    headers.insert(TRACEPARENT, ex.trace.child());
    headers.entry(header::ACCEPT).or_insert(HeaderValue::from_static("application/json"));
    let body = match &call.body {
        Some(t) => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Some(Bytes::from(serde_json::to_vec(&t.render(doc)).unwrap_or_default()))
        }
        None => None,
    };
    Ok(Prepared { uri, headers, body })
}

async fn attempt(client: &HttpClient, method: &http::Method, p: &Prepared, max_body: usize) -> Result<Success, Failure> {
    let mut req = Request::new(p.body.clone().map_or(Body::Empty, Body::full));
    *req.method_mut() = method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.headers_mut() = p.headers.clone();
    let resp = client.request(req).await.map_err(|e| {
        let kind = if e.is_connect() { "connect" } else { "upstream" };
        Failure::new(kind, if e.is_connect() { "the backend could not be reached" } else { "the backend connection failed" })
    })?;
    let (parts, body) = resp.into_parts();
    if http_body::Body::size_hint(&body).lower() > max_body as u64 {
        return Err(Failure {
            status: Some(parts.status.as_u16()),
            ..Failure::new("body_too_large", format!("the backend body is over {max_body} bytes"))
        });
    }
    let bytes = match Limited::new(body, max_body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Failure {
                status: Some(parts.status.as_u16()),
                ..Failure::new("body_too_large", format!("the backend body is over {max_body} bytes"))
            })
        }
        Err(_) => return Err(Failure::new("upstream", "the backend connection failed while sending the body")),
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
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|_| Failure { status: Some(status.as_u16()), ..Failure::new("invalid_json", "the backend body is not JSON") })?
    };
    Ok(Success { status: status.as_u16(), headers: parts.headers, body })
}

/// One backend request with its retries, within `budget`.
async fn request_with_retries(
    client: HttpClient,
    method: http::Method,
    p: Prepared,
    max_body: usize,
    retries: u32,
    budget: Duration,
) -> Result<Success, Failure> {
    let work = async {
        let mut left = retries;
        loop {
            let result = attempt(&client, &method, &p, max_body).await;
            let retryable = match &result {
                Err(f) => f.kind == "connect" || f.kind == "upstream" || matches!(f.status, Some(502..=504)),
                Ok(_) => false,
            };
            if !retryable || left == 0 {
                return result;
            }
            left -= 1;
        }
    };
    match tokio::time::timeout(budget, work).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new("timeout", format!("no answer within {} ms", budget.as_millis()))),
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Finished> + Send>>;

fn report_url(uri: &Uri) -> String {
    uri.to_string()
}

/// When and how a call runs, besides its requests.
struct Launch {
    index: usize,
    for_each: bool,
    started: Instant,
    composition_start: Instant,
    budget: Duration,
    /// Keep a report of each backend request (the `try` endpoint).
    record: bool,
}

/// Starts a call with its rendered requests; the future owns all it needs.
fn launch(call: &CallPlan, requests: Vec<Prepared>, client: &HttpClient, l: Launch) -> CallFuture {
    let client = client.clone();
    let method = call.method.clone();
    let (max_body, retries, concurrency) = (call.max_body, call.retries, call.max_concurrency);
    let name = call.name.clone();
    Box::pin(async move {
        let urls: Vec<String> = if l.record { requests.iter().map(|p| report_url(&p.uri)).collect() } else { Vec::new() };
        let results: Vec<(Result<Success, Failure>, Duration)> = if l.for_each {
            futures_util::stream::iter(requests)
                .map(|p| {
                    let (client, method) = (client.clone(), method.clone());
                    async move {
                        let t = Instant::now();
                        let r = request_with_retries(client, method, p, max_body, retries, l.budget).await;
                        (r, t.elapsed())
                    }
                })
                .buffered(concurrency)
                .collect()
                .await
        } else {
            let mut out = Vec::with_capacity(1);
            for p in requests {
                let r = request_with_retries(client.clone(), method.clone(), p, max_body, retries, l.budget).await;
                out.push((r, l.started.elapsed()));
            }
            out
        };
        let records = if l.record {
            let offset = ms(l.started - l.composition_start);
            results
                .iter()
                .zip(urls)
                .enumerate()
                .map(|(i, ((r, d), url))| CallRecord {
                    name: if l.for_each { format!("{name}[{i}]") } else { name.to_string() },
                    url,
                    started_ms: offset,
                    duration_ms: ms(*d),
                    status: match r {
                        Ok(s) => Some(s.status),
                        Err(f) => f.status,
                    },
                    error: r.as_ref().err().map(|f| json!({"kind": f.kind, "message": f.message})),
                })
                .collect()
        } else {
            Vec::new()
        };
        let duration = l.started.elapsed();
        let result = if l.for_each {
            let mut bodies = Vec::with_capacity(results.len());
            let mut failure = None;
            for (r, _) in results {
                match r {
                    Ok(s) => bodies.push(s.body),
                    Err(f) => {
                        failure.get_or_insert(f);
                    }
                }
            }
            match failure {
                Some(f) => Err(f),
                None => Ok(Success { status: 200, headers: HeaderMap::new(), body: Value::Array(bodies) }),
            }
        } else {
            results.into_iter().next().map(|(r, _)| r).unwrap_or_else(|| Err(Failure::new("upstream", "no request was made")))
        };
        Finished { index: l.index, result, duration, records }
    })
}

fn server_timing(
    plan: &CompositionPlan,
    states: &[State],
    durations: &[Duration],
    failures: &[Option<Failure>],
    total: Duration,
) -> HeaderValue {
    let mut parts = Vec::new();
    for (i, call) in plan.calls.iter().enumerate() {
        match states[i] {
            State::Done => parts.push(format!("{};dur={}", call.name, ms(durations[i]))),
            State::Failed | State::Running => {
                let kind = failures[i].as_ref().map_or("cancelled", |f| f.kind);
                parts.push(format!("{};dur={};desc=\"{kind}\"", call.name, ms(durations[i])))
            }
            State::Skipped => parts.push(format!("{};dur=0;desc=\"skipped\"", call.name)),
            State::Waiting | State::NotRun => {}
        }
    }
    parts.push(format!("total;dur={}", ms(total)));
    HeaderValue::from_str(&parts.join(", ")).unwrap_or(HeaderValue::from_static("total"))
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
        "bad_request" => error_response(ErrorCode::BadRequest, &format!("call {call:?}: {}", f.message), id),
        _ => error_response(ErrorCode::UpstreamError, &format!("call {call:?} failed"), id),
    }
}

/// Runs `plan` for one request. `request` is the context's `request` entry.
pub async fn run(ex: Exchange<'_>, plan: &CompositionPlan, request: Value) -> Outcome {
    let start = Instant::now();
    let deadline = start + plan.deadline;
    let n = plan.calls.len();
    let mut states = vec![State::Waiting; n];
    let mut durations = vec![Duration::ZERO; n];
    let mut failures: Vec<Option<Failure>> = vec![None; n];
    let mut call_headers: Vec<Option<HeaderMap>> = (0..n).map(|_| None).collect();
    let mut records = Vec::new();
    let mut doc = Map::with_capacity(n + 1);
    doc.insert("request".into(), request);
    let mut doc = Value::Object(doc);
    let mut running: FuturesUnordered<CallFuture> = FuturesUnordered::new();

    loop {
        // Start (or settle) every waiting call whose inputs are all settled.
        let mut progress = true;
        while progress {
            progress = false;
            for i in 0..n {
                if states[i] != State::Waiting {
                    continue;
                }
                let call = &plan.calls[i];
                let dep_states: Vec<State> = call.deps.iter().map(|&d| states[d]).collect();
                if dep_states.iter().any(|s| matches!(s, State::Waiting | State::Running)) {
                    continue;
                }
                progress = true;
                let set = |doc: &mut Value, v: Value| {
                    if let Value::Object(m) = doc {
                        m.insert(call.name.to_string(), v);
                    }
                };
                if let Some(d) = call.deps.iter().find(|&&d| matches!(states[d], State::Failed | State::Skipped)) {
                    let f = Failure::new("skipped", format!("skipped because {:?} failed", plan.calls[*d].name));
                    set(&mut doc, call_entry(None, json!({}), Value::Null, Some(&f), Duration::ZERO));
                    failures[i] = Some(f);
                    states[i] = State::Skipped;
                    continue;
                }
                let run_it = !dep_states.contains(&State::NotRun) && call.when.as_ref().is_none_or(|w| truthy(&w.eval(&doc)));
                if !run_it {
                    set(&mut doc, call_entry(None, json!({}), Value::Null, None, Duration::ZERO));
                    states[i] = State::NotRun;
                    continue;
                }
                let prepared: Result<Vec<Prepared>, Failure> = match &call.for_each {
                    None => prepare(call, &doc, &ex).map(|p| vec![p]),
                    Some(q) => {
                        let items = q.items(&doc);
                        if items.len() > call.max_items {
                            Err(Failure::new(
                                "too_many_items",
                                format!("for_each gave {} items, more than {}", items.len(), call.max_items),
                            ))
                        } else {
                            let mut out = Vec::with_capacity(items.len());
                            let mut err = None;
                            for item in items {
                                if let Value::Object(m) = &mut doc {
                                    m.insert("item".into(), item);
                                }
                                match prepare(call, &doc, &ex) {
                                    Ok(p) => out.push(p),
                                    Err(e) => {
                                        err = Some(e);
                                        break;
                                    }
                                }
                            }
                            if let Value::Object(m) = &mut doc {
                                m.remove("item");
                            }
                            err.map_or(Ok(out), Err)
                        }
                    }
                };
                match prepared {
                    Ok(requests) => {
                        let now = Instant::now();
                        let remaining = deadline.saturating_duration_since(now);
                        let budget = call.timeout.map_or(remaining, |t| t.min(remaining));
                        let l = Launch {
                            index: i,
                            for_each: call.for_each.is_some(),
                            started: now,
                            composition_start: start,
                            budget,
                            record: ex.record,
                        };
                        running.push(launch(call, requests, ex.client, l));
                        states[i] = State::Running;
                    }
                    Err(f) => {
                        if call.required {
                            return finish_failed(plan, i, f, &mut states, &durations, &mut failures, records, start, ex.request_id);
                        }
                        set(&mut doc, call_entry(None, json!({}), Value::Null, Some(&f), Duration::ZERO));
                        failures[i] = Some(f);
                        states[i] = State::Failed;
                    }
                }
            }
        }
        let Some(done) = running.next().await else {
            break;
        };
        let i = done.index;
        durations[i] = done.duration;
        records.extend(done.records);
        let name = plan.calls[i].name.to_string();
        match done.result {
            Ok(s) => {
                // Backend headers go into the document only when something reads them.
                let headers = if plan.reads_call_headers { headers_json(&s.headers) } else { Value::Object(Map::new()) };
                let entry = call_entry(Some(s.status), headers, s.body, None, done.duration);
                if let Value::Object(m) = &mut doc {
                    m.insert(name, entry);
                }
                call_headers[i] = Some(s.headers);
                states[i] = State::Done;
            }
            Err(f) => {
                if plan.calls[i].required {
                    // Dropping `running` cancels the calls still in flight.
                    drop(running);
                    return finish_failed(plan, i, f, &mut states, &durations, &mut failures, records, start, ex.request_id);
                }
                let entry = call_entry(f.status, json!({}), Value::Null, Some(&f), done.duration);
                if let Value::Object(m) = &mut doc {
                    m.insert(name, entry);
                }
                failures[i] = Some(f);
                states[i] = State::Failed;
            }
        }
    }

    let response = shape(plan, &doc, &states, &durations, &failures, &call_headers, start.elapsed(), ex.request_id);
    Outcome { response, calls: records }
}

#[allow(clippy::too_many_arguments)]
fn finish_failed(
    plan: &CompositionPlan,
    i: usize,
    f: Failure,
    states: &mut [State],
    durations: &[Duration],
    failures: &mut [Option<Failure>],
    records: Vec<CallRecord>,
    start: Instant,
    request_id: &HeaderValue,
) -> Outcome {
    let mut response = failure_response(&f, &plan.calls[i].name, request_id);
    failures[i] = Some(f);
    states[i] = State::Failed;
    let timing = server_timing(plan, states, durations, failures, start.elapsed());
    response.headers_mut().insert(HeaderName::from_static("server-timing"), timing);
    Outcome { response, calls: records }
}

#[allow(clippy::too_many_arguments)]
fn shape(
    plan: &CompositionPlan,
    doc: &Value,
    states: &[State],
    durations: &[Duration],
    failures: &[Option<Failure>],
    call_headers: &[Option<HeaderMap>],
    total: Duration,
    request_id: &HeaderValue,
) -> Response<Body> {
    let r = &plan.response;
    let (bytes, content_type) = match &r.body {
        ResponseBody::Default => {
            let mut map = Map::with_capacity(plan.calls.len());
            for call in &plan.calls {
                let body = doc.get(&*call.name).and_then(|e| e.get("body")).cloned().unwrap_or(Value::Null);
                map.insert(call.name.to_string(), body);
            }
            (serde_json::to_vec(&Value::Object(map)).unwrap_or_default(), HeaderValue::from_static("application/json"))
        }
        ResponseBody::Json(t) => (serde_json::to_vec(&t.render(doc)).unwrap_or_default(), HeaderValue::from_static("application/json")),
        ResponseBody::Text { template, content_type } => match template.render(doc) {
            Ok(text) => (text.into_bytes(), content_type.clone()),
            Err(e) => {
                tracing::warn!(request_id = ?request_id, composition = %plan.name, error = %e, "response template failed");
                return error_response(ErrorCode::Internal, "the response template failed", request_id.to_str().unwrap_or(""));
            }
        },
    };
    let mut resp = Response::new(Body::full(bytes));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    for (idx, names) in &r.forward_headers {
        if let Some(from) = &call_headers[*idx] {
            for name in names {
                for v in from.get_all(name) {
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
                tracing::warn!(request_id = ?request_id, composition = %plan.name, header = %name, "response header template gave no valid value")
            }
        }
    }
    let partial: Vec<&str> = plan
        .calls
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(states[*i], State::Failed | State::Skipped))
        .map(|(_, c)| &*c.name)
        .collect();
    if !partial.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&partial.join(", ")) {
            h.insert(HeaderName::from_static("manifold-partial"), v);
        }
    }
    h.insert(HeaderName::from_static("server-timing"), server_timing(plan, states, durations, failures, total));
    resp
}
