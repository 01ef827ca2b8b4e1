//! An upstream's `retries` and `circuit_breaker` (SPEC §6) on real
//! sockets: a dead target's requests go again to a live one, a 503 is
//! retried only when `on` names it, a POST is never sent twice, the budget
//! lets exactly 3 retries be in flight when its share allows none, and the
//! circuit breaker answers 503 at once over `max_in_flight` and lets
//! requests through again once the held ones ended (also when a client
//! dropped a streamed answer). No timing assertions: requests are held at
//! backends that answer when the test says so.

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{backend, client, gateway, metric, metric_until, within};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use manifold::gateway::Gateway;
use serde_json::Value;
use tokio::sync::watch;

const RETRIES: &str = "manifold_upstream_retries_total";
const REFUSED: &str = "manifold_upstream_retries_refused_total";
const OPEN: &str = "manifold_upstream_circuit_open_total";

async fn send(g: &Gateway, method: &str, path: &str) -> (u16, Value) {
    let fut = async {
        let resp = client().request(method.parse().unwrap(), format!("http://{}{path}", g.proxy_addr)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    };
    within(15, path, fut).await
}

/// A port nothing listens on (bound, then closed).
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A backend the test drives: `/hold` answers 200 once `release` is sent
/// (counting the requests held in `held`); `/first-503` answers 503 the
/// first time it sees a request ID and holds the request the second time;
/// `/stream` answers a chunk every 20 ms forever; anything else 200 at once.
struct Held {
    addr: SocketAddr,
    held: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

impl Held {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn held_becomes(&self, n: usize) {
        within(10, "requests held at the backend", async {
            while self.held.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn held_backend() -> Held {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let (release, rx) = watch::channel(false);
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (h, c) = (held.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (held, hits, rx, seen) = (h.clone(), c.clone(), rx.clone(), seen.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (held, hits, mut rx, seen) = (held.clone(), hits.clone(), rx.clone(), seen.clone());
                    async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let path = req.uri().path().to_string();
                        let id = req.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                        let _ = req.into_body().collect().await;
                        let hold = match path.as_str() {
                            "/hold" => true,
                            "/first-503" => !seen.lock().unwrap().insert(id),
                            "/stream" => {
                                let chunks = futures_util::stream::unfold((), |()| async {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"chunk\n"))), ()))
                                });
                                let mut resp = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
                                resp.headers_mut().insert("content-type", "text/plain".parse().unwrap());
                                return Ok::<_, Infallible>(resp);
                            }
                            _ => false,
                        };
                        if path == "/first-503" && !hold {
                            let mut resp: Response<AnyBody> =
                                Response::new(BodyExt::boxed(Full::new(Bytes::from_static(b"{\"busy\":true}"))));
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok(resp);
                        }
                        if hold {
                            held.fetch_add(1, Ordering::SeqCst);
                            let _ = rx.wait_for(|r| *r).await;
                        }
                        Ok(Response::new(BodyExt::boxed(Full::new(Bytes::from_static(b"{\"ok\":true}")))))
                    }
                });
                let _ =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Held { addr, held, hits, release }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_targets_requests_are_retried_on_the_live_one() {
    let live = backend().run().await;
    let dead = dead_url().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{dead}\" }}, {{ url: \"{}\" }}]\n    retries: {{ max: 1, on: [connect] }}\nroutes:\n  - {{ name: r, path: \"/r/{{*rest}}\", upstream: pool }}\n",
        live.url()
    ));
    for i in 0..20 {
        let (status, body) = send(&g, "GET", &format!("/r/x/{i}")).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    // Every request reached the live target exactly once, and each one
    // that tried the dead target first was retried: as many retries as
    // connect failures.
    assert_eq!(live.hits.load(Ordering::SeqCst), 20);
    let retried = metric(g.admin_addr, RETRIES, &[("upstream", "pool"), ("route", "r"), ("reason", "connect")]).await;
    let failed = metric(g.admin_addr, "manifold_upstream_failures_total", &[("route", "r"), ("cause", "connect")]).await;
    assert!(retried >= 1.0, "the dead target was never picked");
    assert_eq!(retried, failed);
    assert_eq!(metric(g.admin_addr, REFUSED, &[("upstream", "pool")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_is_retried_on_another_target_only_when_on_names_it() {
    let (busy, good) = (backend().status(503).run().await, backend().run().await);
    let yaml = |on: &str| {
        format!(
            "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    retries: {{ max: 1, on: [{on}] }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
            busy.url(),
            good.url()
        )
    };
    let g = gateway(&yaml("\"503\""));
    for _ in 0..10 {
        let (status, body) = send(&g, "GET", "/r").await;
        assert_eq!(status, 200, "{body}");
    }
    let busy_hits = busy.hits.load(Ordering::SeqCst);
    assert!(busy_hits >= 1);
    assert_eq!(good.hits.load(Ordering::SeqCst), 10);
    assert_eq!(metric(g.admin_addr, RETRIES, &[("upstream", "pool"), ("reason", "503")]).await, busy_hits as f64);
    drop(g);

    // Not named in `on`: the 503 is the answer.
    let g = gateway(&yaml("connect"));
    let before = busy.hits.load(Ordering::SeqCst);
    let mut answered_503 = 0;
    for _ in 0..10 {
        let (status, _) = send(&g, "GET", "/r").await;
        assert!(status == 200 || status == 503, "{status}");
        answered_503 += usize::from(status == 503);
    }
    assert!(answered_503 >= 1);
    assert_eq!(busy.hits.load(Ordering::SeqCst) - before, answered_503);
    assert_eq!(metric(g.admin_addr, RETRIES, &[("upstream", "pool")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_is_never_retried() {
    let busy = backend().status(503).run().await;
    let dead = dead_url().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: busy\n    targets: [{{ url: \"{}\" }}]\n    retries: {{ max: 2, on: [connect, \"503\"] }}\n  - name: dead\n    targets: [{{ url: \"{dead}\" }}]\n    retries: {{ max: 2, on: [connect] }}\nroutes:\n  - {{ name: busy, path: /busy, upstream: busy }}\n  - {{ name: dead, path: /dead, upstream: dead }}\n",
        busy.url()
    ));
    let (status, _, _) = common::send("POST", &format!("http://{}/busy", g.proxy_addr), Some(serde_json::json!({"a": 1})), &[]).await;
    assert_eq!(status.as_u16(), 503);
    assert_eq!(busy.hits.load(Ordering::SeqCst), 1, "a POST reaches the backend once");
    let (status, _) = send(&g, "POST", "/busy").await;
    assert_eq!(status, 503);
    assert_eq!(busy.hits.load(Ordering::SeqCst), 2);
    let (status, body) = send(&g, "POST", "/dead").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(metric(g.admin_addr, RETRIES, &[]).await, 0.0);
    // The same GET is retried (on the one target there is): 1 + 2 tries.
    let (status, _) = send(&g, "GET", "/busy").await;
    assert_eq!(status, 503);
    assert_eq!(busy.hits.load(Ordering::SeqCst), 5);
    assert_eq!(metric(g.admin_addr, RETRIES, &[("upstream", "busy"), ("reason", "503")]).await, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_of_0_percent_still_allows_3_retries_in_flight() {
    let b = held_backend().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}]\n    retries: {{ max: 1, on: [\"503\"], budget: \"0%\" }}\nroutes:\n  - {{ name: r, path: /first-503, upstream: pool, timeout: 60s }}\n",
        b.url()
    ));
    let g = Arc::new(g);
    // Six requests: each is answered 503 first, then its retry is held at
    // the backend until released. The budget allows max(3, 0% of 6) = 3.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move { send(&g, "GET", "/first-503").await.0 })
        })
        .collect();
    metric_until(g.admin_addr, REFUSED, &[("upstream", "pool"), ("route", "r")], |v| v >= 3.0, "three retries refused").await;
    b.held_becomes(3).await;
    assert_eq!(metric(g.admin_addr, REFUSED, &[("upstream", "pool")]).await, 3.0);
    assert_eq!(metric(g.admin_addr, RETRIES, &[("upstream", "pool"), ("reason", "503")]).await, 3.0);
    assert_eq!(b.held.load(Ordering::SeqCst), 3);
    b.release.send(true).unwrap();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(within(15, "the held requests", t).await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503, 503, 503]);
    assert_eq!(b.hits.load(Ordering::SeqCst), 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_answers_503_at_once_over_max_in_flight_and_never_leaks() {
    let b = held_backend().await;
    let g = Arc::new(gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}]\n    circuit_breaker: {{ max_in_flight: 2 }}\nroutes:\n  - {{ name: r, path: \"/{{*rest}}\", upstream: pool, timeout: 60s }}\n",
        b.url()
    )));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move { send(&g, "GET", "/hold").await.0 })
        })
        .collect();
    b.held_becomes(2).await;
    // The third gets 503 at once (the backend is holding, so an answer
    // at all proves it was not queued), with the SPEC §4 body.
    let (status, body) = send(&g, "GET", "/fast").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert!(body["error"]["request_id"].is_string(), "{body}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 2, "the refused request never reached the backend");
    assert_eq!(metric(g.admin_addr, OPEN, &[("upstream", "pool"), ("route", "r")]).await, 1.0);
    b.release.send(true).unwrap();
    for t in held {
        assert_eq!(within(15, "the held requests", t).await.unwrap(), 200);
    }
    for _ in 0..5 {
        assert_eq!(send(&g, "GET", "/fast").await.0, 200);
    }

    // Two streamed answers dropped by their clients mid-body: their counts
    // are released when the gateway sees the client gone.
    for _ in 0..2 {
        let mut resp = within(10, "/stream", client().get(format!("http://{}/stream", g.proxy_addr)).send()).await.unwrap();
        assert_eq!(resp.status(), 200);
        within(10, "a chunk", resp.chunk()).await.unwrap();
        drop(resp);
    }
    // Two clients that drop their streamed request bodies mid-way, once
    // the backend has the request: their counts go with the failed
    // requests (a downstream fault).
    for _ in 0..2 {
        let before = b.hits.load(Ordering::SeqCst);
        let mut conn = tokio::net::TcpStream::connect(g.proxy_addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut conn,
            b"PUT /fast HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
        within(10, "the upload reaching the backend", async {
            while b.hits.load(Ordering::SeqCst) == before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(conn);
    }
    within(15, "the dropped streams' counts released", async {
        loop {
            let (a, b) = tokio::join!(send(&g, "GET", "/fast"), send(&g, "GET", "/fast"));
            if a.0 == 200 && b.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_composition_call_retries_through_its_upstream() {
    let live = backend().run().await;
    let dead = dead_url().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{dead}\" }}, {{ url: \"{}\" }}]\n    retries: {{ max: 1, on: [connect] }}\ncompositions:\n  - {{ name: c, path: /c, calls: {{ me: {{ upstream: pool, path: /me }} }} }}\n",
        live.url()
    ));
    let mut timed_retries = 0;
    for _ in 0..10 {
        let (status, headers, body) = within(15, "/c", common::send("GET", &format!("http://{}/c", g.proxy_addr), None, &[])).await;
        assert_eq!(status.as_u16(), 200, "{body}");
        // Server-Timing tells a call that sent requests again.
        let timing = headers["server-timing"].to_str().unwrap().to_string();
        assert!(timing.starts_with("me;dur="), "{timing}");
        if timing.contains(";retries=1,") {
            timed_retries += 1;
        }
    }
    assert_eq!(live.hits.load(Ordering::SeqCst), 10);
    let retried = metric(g.admin_addr, RETRIES, &[("upstream", "pool"), ("route", "c"), ("call", "me")]).await;
    assert!(retried >= 1.0);
    assert_eq!(timed_retries as f64, retried);
    // `try` counts the retries of each call.
    let mut seen = 0;
    for _ in 0..4 {
        let resp = client()
            .post(format!("http://{}/compositions/c/try", g.admin_addr))
            .json(&serde_json::json!({"path": "/c"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let report: Value = resp.json().await.unwrap();
        assert_eq!(report["response"]["status"], 200, "{report}");
        let r = report["calls"][0]["retries"].as_u64().unwrap();
        assert!(r <= 1, "{report}");
        seen += r;
    }
    assert!(seen >= 1, "no try went to the dead target first");
}
