//! Connection timeouts: a request head must arrive within the header-read
//! time, an idle keep-alive connection lives for the idle time, and neither
//! cuts a request that is being answered. Short timeouts keep this fast.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{backend, gateway_with};
use manifold::gateway::GatewayOptions;

fn options() -> GatewayOptions {
    let mut opts = GatewayOptions::default();
    opts.server.header_read_timeout = Duration::from_millis(300);
    opts.server.idle_timeout = Duration::from_millis(2000);
    opts
}

/// Reads one response (head and Content-Length body) from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if out.len() >= end + 4 + len {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

/// True when the server closes the connection within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_outlives_the_header_timeout_then_closes() {
    let b = backend().run().await;
    let g = gateway_with(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()), options());
    let addr = g.proxy_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
        // Idle for twice the header-read time: still open.
        std::thread::sleep(Duration::from_millis(600));
        s.write_all(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(read_response(&mut s).starts_with("HTTP/1.1 200"), "the idle connection was kept");
        // Then idle past the idle time: closed by the gateway.
        assert!(closed_within(&mut s, Duration::from_secs(10)), "an idle connection is closed");
    })
    .await
    .unwrap();
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_head_that_never_ends_is_cut() {
    let g = gateway_with("routes: []", options());
    let addr = g.proxy_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /r HTTP/1.1\r\nHost: x\r\n").unwrap();
        // Well before the idle time would have closed it.
        assert!(closed_within(&mut s, Duration::from_millis(1700)), "a slow head is cut at the header-read time");
    })
    .await
    .unwrap();
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_answer_is_not_cut_by_connection_timeouts() {
    let slow = backend().delay(Duration::from_millis(3000)).run().await;
    let g = gateway_with(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", slow.url()), options());
    let addr = g.proxy_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(read_response(&mut s).starts_with("HTTP/1.1 200"), "answered after more than the idle time");
    })
    .await
    .unwrap();
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_that_pauses_longer_than_the_idle_time_is_not_cut() {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    // A backend that sends its head and a first chunk, pauses longer
    // than the gateway's idle time, then sends the rest.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(|_req| async {
            let chunks = futures_util::stream::unfold(0u8, |n| async move {
                match n {
                    0 => Some((Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"first,"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(3500)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second"))), 2))
                    }
                    _ => None,
                }
            });
            Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(chunks)))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
    });
    let g = gateway_with(&format!("routes: [{{ name: r, path: /r, upstream: \"http://{backend_addr}\" }}]"), options());
    let body = common::client().get(format!("http://{}/r", g.proxy_addr)).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "first,second");
    g.shutdown();
}
