//! OpenTelemetry traces (feature `otel`): a real `manifold serve` exporting
//! over OTLP/HTTP to a tiny receiver on a loopback port, which decodes what
//! it gets with the OTLP protobuf types.
#![cfg(feature = "otel")]

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{backend, GatewayProcess};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::Value;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

/// One received span, ids in lower-case hex.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    kind: i32,
    status: i32,
    attributes: BTreeMap<String, String>,
}

/// An OTLP/HTTP traces receiver: every span of every export it is sent.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let store = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let store = store.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let store = store.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if path == "/v1/traces" {
                                let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                                store.lock().unwrap().extend(received(export));
                                200
                            } else {
                                404
                            };
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            resp.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { url, spans }
    }

    /// The spans of one trace, once `n` of them have arrived (or 10 s).
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<Received> = self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn received(export: ExportTraceServiceRequest) -> Vec<Received> {
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            out.push(Received {
                service: service.clone(),
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_id: hex::encode(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                status: span.status.map_or(0, |s| s.code),
                attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
            });
        }
    }
    out
}

fn one<'a>(spans: &'a [Received], what: &str, f: impl Fn(&Received) -> bool) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} span in {spans:#?}");
    found[0]
}

/// The parent-id of a `traceparent` a backend saw, with its trace ID.
fn traceparent_of(echo: &Value) -> (String, String) {
    let tp = echo["headers"]["traceparent"][0].as_str().unwrap_or_else(|| panic!("no traceparent in {echo}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    (parts[1].to_string(), parts[2].to_string())
}

fn config(backend: &str, broken: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!(
            r#"
routes:
  - {{ name: users-api, path: "/api/users/{{id}}", upstream: "{backend}" }}
  - {{ name: broken, path: /broken, upstream: "{broken}" }}
compositions:
  - name: dashboard
    path: "/v1/users/{{id}}/dashboard"
    calls:
      user: {{ url: "{backend}/users/{{{{request.path.id}}}}" }}
      orders: {{ url: "{backend}/orders/{{{{request.path.id}}}}" }}
"#
        ),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_and_backend_calls_are_spans_in_the_clients_trace() {
    let collector = Collector::start().await;
    let b = backend().run().await;
    let broken = backend().status(503).run().await;
    let dir = config(&b.url(), &broken.url());
    let gw = GatewayProcess::start_with_env(
        dir.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let base = format!("http://{}", gw.proxy);

    // A plain route, in the client's trace.
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let tp = format!("00-{trace}-{client_span}-01");
    let (status, _, echo) =
        common::send("GET", &format!("{base}/api/users/42"), None, &[("traceparent", &tp), ("x-request-id", "req-proxy")]).await;
    assert_eq!(status, 200);
    let spans = collector.trace(trace, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = one(&spans, "server", |s| s.kind == SERVER);
    assert_eq!(server.name, "GET /api/users/{id}", "named by the route's pattern, never the raw path");
    assert_eq!(server.parent_id, client_span, "the client's span is the parent");
    assert_eq!(server.service, "manifold");
    assert_eq!(server.attributes["manifold.request_id"], "req-proxy");
    assert_eq!(server.attributes["manifold.route"], "users-api");
    assert_eq!(server.attributes["http.route"], "/api/users/{id}");
    assert_eq!(server.attributes["http.request.method"], "GET");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert!(!server.attributes.values().any(|v| v.contains("/api/users/42")), "no raw path: {server:#?}");
    let call = one(&spans, "client", |s| s.kind == CLIENT);
    assert_eq!(call.name, "users-api");
    assert_eq!(call.parent_id, server.span_id, "the backend call is the request's child");
    assert_eq!(call.attributes["server.address"], "127.0.0.1");
    assert_eq!(call.attributes["server.port"], b.addr.port().to_string());
    assert_eq!(call.attributes["http.response.status_code"], "200");
    assert_eq!(traceparent_of(&echo), (trace.to_string(), call.span_id.clone()), "the backend's parent is the call's span");

    // A composition: one client span per call, each the parent the backend saw.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{trace}-b7ad6b7169203331-01");
    let (status, _, body) =
        common::send("GET", &format!("{base}/v1/users/7/dashboard"), None, &[("traceparent", &tp), ("x-request-id", "req-comp")]).await;
    assert_eq!(status, 200);
    let spans = collector.trace(trace, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server = one(&spans, "server", |s| s.kind == SERVER);
    assert_eq!(server.name, "GET /v1/users/{id}/dashboard");
    assert_eq!(server.parent_id, "b7ad6b7169203331");
    assert_eq!(server.attributes["manifold.request_id"], "req-comp");
    assert_eq!(server.attributes["manifold.composition"], "dashboard");
    for call in ["user", "orders"] {
        let span = one(&spans, call, |s| s.kind == CLIENT && s.name == call);
        assert_eq!(span.parent_id, server.span_id, "{call} is the request's child");
        assert_eq!(traceparent_of(&body[call]), (trace.to_string(), span.span_id.clone()), "{call}'s backend saw its span");
    }

    // A backend's 5xx fails both spans; a request without traceparent
    // starts a trace of its own.
    let (status, headers, _) = common::send("GET", &format!("{base}/broken"), None, &[("x-request-id", "req-broken")]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-request-id"], "req-broken");
    let seen = broken.seen.lock().unwrap()[0].clone();
    let (new_trace, call_id) = traceparent_of(&seen);
    let spans = collector.trace(&new_trace, 2).await;
    let server = one(&spans, "server", |s| s.kind == SERVER);
    assert_eq!(server.parent_id, "", "a root span");
    assert_eq!((server.attributes["manifold.request_id"].as_str(), server.status), ("req-broken", STATUS_ERROR));
    let call = one(&spans, "client", |s| s.kind == CLIENT);
    assert_eq!((call.span_id.as_str(), call.parent_id.as_str(), call.status), (call_id.as_str(), server.span_id.as_str(), STATUS_ERROR));
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_still_queued_are_sent_on_sigterm() {
    let collector = Collector::start().await;
    let b = backend().run().await;
    let dir = config(&b.url(), &b.url());
    // Batches go out once a minute: only the shutdown flush can send these.
    let mut gw = GatewayProcess::start_with_env(
        dir.path(),
        &[],
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &format!("{}/v1/traces", collector.url)), ("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    );
    let trace = "11111111111111111111111111111111";
    let tp = format!("00-{trace}-2222222222222222-01");
    let (status, _, _) = common::send("GET", &format!("http://{}/api/users/1", gw.proxy), None, &[("traceparent", &tp)]).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans.lock().unwrap().is_empty(), "nothing exported before the batch is due");
    gw.signal("TERM");
    assert_eq!(gw.exit_code(Duration::from_secs(10)).await, Some(0));
    let spans = collector.trace(trace, 2).await;
    assert_eq!(spans.iter().map(|s| s.kind).collect::<std::collections::BTreeSet<_>>(), [SERVER, CLIENT].into(), "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_endpoint_nothing_changes() {
    let b = backend().run().await;
    let dir = config(&b.url(), &b.url());
    let unset = [("OTEL_EXPORTER_OTLP_ENDPOINT", ""), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")];
    let gw = GatewayProcess::start_with_env(dir.path(), &[], &unset);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _, echo) = common::send("GET", &format!("http://{}/api/users/1", gw.proxy), None, &[("traceparent", tp)]).await;
    assert_eq!(status, 200);
    let (trace, parent) = traceparent_of(&echo);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7", "a new span ID per backend call, as always");
    assert!(!gw.log.lock().unwrap().iter().any(|l| l.contains("traces")), "no word of traces");
}
