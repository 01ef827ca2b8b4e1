//! Running a composition: every call starts the moment the calls it reads
//! are settled (not in waves), all on the request's own task; a required
//! call's failure cancels the calls still running, by dropping them.
//! One call's requests are [`super::call`]'s; a `for_each` call's items
//! and batches are [`super::batch`]'s.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::answer::{Copies, EntryFields};
use super::batch::{prepare_for_each, BatchItems};
use super::cache::Mark;
use super::call::{launch, prepare, record_of, CallFuture, CallRecord, Failure, Prepared, Success};
use super::plan::{CompositionPlan, ResponseBody};
use super::query::truthy;
use crate::body::Body;
use crate::errors::{error_response, ErrorCode};
use crate::ids::TraceContext;
use crate::metrics::Metrics;
use crate::upstream::Client;

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

pub struct Outcome {
    pub response: Response<Body>,
    pub calls: Vec<CallRecord>,
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

/// A duration in milliseconds, to a tenth.
pub(super) fn ms(d: Duration) -> f64 {
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
                other.origin == call.origin && other.method == call.method && q.same_request(p)
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
        prepare_for_each(call, q, &mut self.doc, ex)
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
                        running.push(launch(plan, i, requests, batch, &ex, now, start, run.deadline));
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
