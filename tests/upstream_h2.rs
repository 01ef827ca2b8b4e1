//! HTTP/2 to backends (SPEC §6 `http2: true`, issue 12): prior knowledge
//! over http, for a plain route and a composition call; requests of one
//! worker share one multiplexed connection; the request ID, `:authority`
//! and the streamed answer arrive as over HTTP/1.1; a backend that speaks
//! only HTTP/1.1 is a 502, not a hang. The backends are hyper's HTTP/2
//! server on raw loopback sockets.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{client, gateway, send};
use http_body_util::{Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

const FAILURES: &str = "manifold_upstream_failures_total";

/// An HTTP/2-only backend (prior knowledge): answers with what it saw,
/// counts the TCP connections it accepted. `/stream` answers in three
/// pieces, 50 ms apart.
struct H2Backend {
    addr: std::net::SocketAddr,
    accepts: Arc<AtomicUsize>,
}

async fn h2_backend() -> H2Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    H2Backend { addr, accepts }
}

type AnswerBody = http_body_util::Either<Full<Bytes>, StreamBody<tokio_stream_shim::Chunks>>;

async fn answer(req: Request<Incoming>) -> Result<Response<AnswerBody>, Infallible> {
    if req.uri().path() == "/stream" {
        let body = StreamBody::new(tokio_stream_shim::Chunks::new(vec!["one,", "two,", "three"], Duration::from_millis(50)));
        return Ok(Response::new(http_body_util::Either::Right(body)));
    }
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let seen = json!({
        "version": format!("{:?}", req.version()),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "authority": req.uri().authority().map(|a| a.as_str().to_string()),
        "host_header": header("host"),
        "request_id": header("x-request-id"),
        "traceparent": header("traceparent").is_some(),
    });
    let mut resp = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(seen.to_string()))));
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}

/// A tiny timed stream of body chunks (no extra dependency).
mod tokio_stream_shim {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks {
        parts: std::collections::VecDeque<&'static str>,
        every: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Chunks {
        pub fn new(parts: Vec<&'static str>, every: Duration) -> Chunks {
            Chunks { parts: parts.into(), every, sleep: None }
        }
    }

    impl futures_util::Stream for Chunks {
        type Item = Result<Frame<Bytes>, Infallible>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let every = self.every;
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            Poll::Ready(self.parts.pop_front().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))))
        }
    }

    use std::future::Future as _;
}

fn config(b: &H2Backend) -> String {
    format!(
        r#"
upstreams:
  - name: h2svc
    targets: [{{ url: "http://{addr}" }}]
    http2: true
routes:
  - {{ name: plain, path: "/h2/{{*rest}}", upstream: h2svc, path_rewrite: "/{{rest}}" }}
compositions:
  - name: dash
    path: /dash
    calls:
      a: {{ upstream: h2svc, path: "/a?x={{{{request.query.x}}}}" }}
"#,
        addr = b.addr
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_and_a_composition_call_speak_http2_to_the_backend() {
    let b = h2_backend().await;
    let g = gateway(&config(&b));
    let (status, headers, body) =
        send("GET", &format!("http://{}/h2/items?id=7", g.proxy_addr), None, &[("x-request-id", "h2-req-1")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["path"], "/items?id=7");
    assert_eq!(body["authority"], b.addr.to_string(), ":authority is the target's host");
    assert_eq!(body["host_header"], Value::Null, "no Host header over HTTP/2");
    assert_eq!(body["request_id"], "h2-req-1");
    assert_eq!(body["traceparent"], true);

    let (status, _, body) = send("GET", &format!("http://{}/dash?x=a%20b", g.proxy_addr), None, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["a"]["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["a"]["path"], "/a?x=a%20b");

    // A streamed answer streams: its pieces arrive as the backend sends them.
    let resp = client().get(format!("http://{}/h2/stream", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut pieces = Vec::new();
    use futures_util::StreamExt;
    while let Some(chunk) = body.next().await {
        pieces.push(chunk.unwrap());
    }
    assert_eq!(pieces.concat(), b"one,two,three");
    assert!(pieces.len() >= 2, "streamed, not buffered whole: {pieces:?}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_one_connection_per_worker() {
    let b = h2_backend().await;
    let g = gateway(&config(&b));
    let url = format!("http://{}/h2/x", g.proxy_addr);
    // 100 requests, 25 at a time, from 25 client connections.
    let mut tasks = Vec::new();
    for _ in 0..25 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = common::client();
            for _ in 0..4 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = b.accepts.load(Ordering::SeqCst);
    // The test gateway runs 2 workers: one connection each at most (the
    // requests racing on a worker's first connect wait for that one).
    assert!((1..=2).contains(&accepted), "100 requests over HTTP/2 opened {accepted} connections");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_without_http2_is_a_502_not_a_hang() {
    // An HTTP/1.1-only backend behind an upstream that says http2: true:
    // it answers the HTTP/2 preface as the bad HTTP/1.1 request it is.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
            });
        }
    });
    let g = gateway(&format!(
        r#"
upstreams:
  - {{ name: old, targets: [{{ url: "http://{addr}" }}], http2: true }}
routes:
  - {{ name: r, path: /old, upstream: old, timeout: 60s }}
"#
    ));
    // A hang would end at the route's timeout as 504 upstream_timeout.
    let (status, _, body) = send("GET", &format!("http://{}/old", g.proxy_addr), None, &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    // Counted as what it is: the target does not speak the protocol.
    let labels = [("route", "r"), ("cause", "protocol")];
    common::metric_until(g.admin_addr, FAILURES, &labels, |v| v == 1.0, "an HTTP/1.1 target behind http2: true").await;
    g.shutdown();
}

/// An HTTP/2 backend over TLS that offers only `h2` (ALPN).
async fn h2_tls_backend(server: &tls::Leaf) -> u16 {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![server.cert_der.clone()], server.key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let svc = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_http2_is_chosen_by_alpn_and_a_target_without_h2_is_refused() {
    let ca = tls::ca("Manifold H2 Test CA 7c31");
    let server = tls::leaf(&ca, "h2 backend", &["127.0.0.1"], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let h2_port = h2_tls_backend(&server).await;
    // The shared https fixture speaks HTTP/1.1 and offers no ALPN.
    let h1 = tls::tls_backend(&server, None, vec![]).await;
    let g = gateway(&format!(
        r#"
upstreams:
  - {{ name: h2tls, targets: [{{ url: "https://127.0.0.1:{h2_port}" }}], http2: true, tls: {{ ca_file: "{ca}" }} }}
  - {{ name: h1tls, targets: [{{ url: "https://127.0.0.1:{h1_port}" }}], http2: true, tls: {{ ca_file: "{ca}" }} }}
routes:
  - {{ name: a, path: /a, upstream: h2tls }}
  - {{ name: b, path: /b, upstream: h1tls, timeout: 60s }}
"#,
        ca = ca_file.display(),
        h1_port = h1.port
    ));
    let (status, _, body) = send("GET", &format!("http://{}/a", g.proxy_addr), None, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    let (status, _, body) = send("GET", &format!("http://{}/b", g.proxy_addr), None, &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    assert_eq!(h1.answered.load(Ordering::SeqCst), 0, "nothing was sent over HTTP/1.1 instead");
    let labels = [("route", "b"), ("cause", "protocol")];
    common::metric_until(g.admin_addr, FAILURES, &labels, |v| v == 1.0, "a TLS target without h2").await;
    g.shutdown();
}
