//! Streaming answers pass through unbuffered (SPEC §7, issue 14 item 5),
//! proved by causality: the backend writes its next event only after the
//! client has received the previous one through the gateway, so a gateway
//! that waited for more (or for the end) would never deliver it.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{client, gateway, within};
use futures_util::StreamExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

type Events = Arc<Mutex<Option<mpsc::UnboundedReceiver<&'static str>>>>;

/// A backend whose one answer is `text/event-stream`, each event written
/// when the test sends it, the body ending when the test drops its sender.
/// `http2`: the backend speaks HTTP/2 only (prior knowledge).
async fn event_source(http2: bool) -> (SocketAddr, mpsc::UnboundedSender<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel::<&'static str>();
    let events: Events = Arc::new(Mutex::new(Some(rx)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let events = events.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    let rx = events.lock().unwrap().take().expect("one event stream");
                    let mut resp = http::Response::new(EventBody(rx));
                    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
                    async move { Ok::<_, Infallible>(resp) }
                });
                if http2 {
                    let _ =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                }
            });
        }
    });
    (addr, tx)
}

/// A body that writes each event as the test sends it.
struct EventBody(mpsc::UnboundedReceiver<&'static str>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|e| e.map(|e| Ok(Frame::data(Bytes::from_static(e.as_bytes())))))
    }
}

/// Reads the body until it holds `want`; returns what was read.
async fn read_until(body: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin), seen: &mut String, want: &str) {
    within(15, want, async {
        while !seen.contains(want) {
            let chunk = body.next().await.expect("the stream goes on").unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await;
}

async fn events_arrive_one_by_one(g: &manifold::gateway::Gateway, tx: mpsc::UnboundedSender<&'static str>, http2_client: bool) {
    tx.send("event: tick\ndata: one\n\n").unwrap();
    let c = if http2_client { reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap() } else { client() };
    let resp = within(15, "the head", c.get(format!("http://{}/events", g.proxy_addr)).send()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    read_until(&mut body, &mut seen, "data: one").await;
    // Only now does the backend write its second event.
    tx.send("event: tick\ndata: two\n\n").unwrap();
    read_until(&mut body, &mut seen, "data: two").await;
    tx.send("event: tick\ndata: three\n\n").unwrap();
    read_until(&mut body, &mut seen, "data: three").await;
    drop(tx);
    let rest = within(15, "the end", async {
        let mut rest = Vec::new();
        while let Some(chunk) = body.next().await {
            rest.push(chunk.map_err(|e| format!("{e:?}")));
        }
        rest
    })
    .await;
    assert!(rest.iter().all(|c| c.as_ref().is_ok_and(|b| b.is_empty())), "the stream ends when the backend's does: {rest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_reach_the_client_one_by_one() {
    let (addr, tx) = event_source(false).await;
    // Policies that read the answer (a response transform of headers, the
    // access log's byte count) do not hold it back either.
    let g = gateway(&format!(
        r#"
policies:
  - name: tag
    type: response-transform
    config: {{ add: {{ headers: {{ x-tagged: "yes" }} }} }}
routes:
  - {{ name: events, path: /events, upstream: "http://{addr}", policies: [tag] }}
"#
    ));
    events_arrive_one_by_one(&g, tx, false).await;
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_from_an_http2_backend_reaches_an_http2_client_one_by_one() {
    let (addr, tx) = event_source(true).await;
    let g = gateway(&format!(
        r#"
upstreams:
  - name: h2
    targets: [{{ url: "http://{addr}" }}]
    http2: true
routes:
  - {{ name: events, path: /events, upstream: h2 }}
"#
    ));
    events_arrive_one_by_one(&g, tx, true).await;
    g.shutdown();
}
