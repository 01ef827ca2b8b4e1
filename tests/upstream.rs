//! The upstream layer (issue 12) over plain HTTP: backend connections are
//! pooled, an idle connection the backend closed is never an error, a
//! backend's broken framing is a 502 that relays nothing half-true, a
//! client's own faults (a malformed or stalled upload) are the client's and
//! never count against the backend, a stalled response body is cut.
//!
//! The backends here are hand-written HTTP/1.1 over raw sockets, so a test
//! controls every byte and sees every TCP connection.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{backend, client, gateway, metric, metric_until, within};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}";
const FAILURES: &str = "manifold_upstream_failures_total";

// ---------------------------------------------------------------------------
// helpers

/// One accepted backend connection, read as HTTP/1.1 requests.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    requests: Arc<AtomicUsize>,
}

impl Conn {
    /// Reads one request (its head, and a `content-length` body if any).
    /// False when the peer closed or broke the connection first.
    async fn request(&mut self) -> bool {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize =
                    head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    self.requests.fetch_add(1, Ordering::SeqCst);
                    return true;
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// Keeps the connection open, sending nothing, until the peer closes it
    /// (or `max` passes).
    async fn hold(mut self, max: Duration) {
        let _ = tokio::time::timeout(max, async {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = self.stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// A backend on a raw socket: `handler` gets each accepted connection.
struct RawBackend {
    addr: SocketAddr,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    /// Requests read (by `Conn::request`).
    requests: Arc<AtomicUsize>,
}

impl RawBackend {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn raw_backend<F, Fut>(handler: F) -> RawBackend
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (conns.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(Conn { stream, buf: Vec::new(), requests: r.clone() }));
        }
    });
    RawBackend { addr, conns, requests }
}

/// Answers every request on a connection with `{}`, keeping it open.
async fn keep_alive_backend() -> RawBackend {
    raw_backend(|mut c| async move {
        while c.request().await {
            c.send(OK).await;
        }
    })
    .await
}

/// Answers one request with `bytes`, then keeps the connection open,
/// sending nothing more, until the gateway closes it.
async fn answering(bytes: impl Into<Bytes>) -> RawBackend {
    let bytes: Bytes = bytes.into();
    raw_backend(move |mut c| {
        let bytes = bytes.clone();
        async move {
            if c.request().await {
                c.send(&bytes).await;
                c.hold(Duration::from_secs(30)).await;
            }
        }
    })
    .await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a raw client read back.
struct RawResponse {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    /// The body as far as it arrived (chunked framing removed).
    body: Vec<u8>,
    /// The body's framing was satisfied; false when the connection ended
    /// (EOF or error) before the body was whole.
    complete: bool,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("complete", &self.complete)
            .finish()
    }
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("a JSON body, got {:?} ({self:?})", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `bytes` on a new connection (keeping its write side open: a
/// client that stops sending is not a client that closed) and reads one
/// response. Panics if none has ended within 10 s.
async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    within(10, "raw request", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut eof = false;
        // The head.
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!("the connection ended before a response head: {:?}", String::from_utf8_lossy(&buf)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 =
            status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("a status line, got {status_line:?}"));
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
        let mut rest = buf[end + 4..].to_vec();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.to_ascii_lowercase());
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length: Option<usize> = get("content-length").and_then(|v| v.parse().ok());
        // The body, until its framing is satisfied or the connection ends.
        let done = |rest: &[u8]| {
            if chunked {
                rest.starts_with(b"0\r\n\r\n") || find(rest, b"\r\n0\r\n\r\n").is_some()
            } else if let Some(len) = length {
                rest.len() >= len
            } else {
                false
            }
        };
        while !done(&rest) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
        let complete = done(&rest) || (!chunked && length.is_none() && eof);
        let body = if chunked { dechunk(&rest) } else { rest };
        let body = match length {
            Some(len) if body.len() > len => body[..len].to_vec(),
            _ => body,
        };
        RawResponse { status, headers, body, complete }
    })
    .await
}

/// The data of a chunked body, as far as it is well formed.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(raw, b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol]).ok().and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else { break };
        if size == 0 || raw.len() < eol + 2 + size {
            out.extend_from_slice(&raw[(eol + 2).min(raw.len())..(eol + 2 + size).min(raw.len())]);
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// A port on 127.0.0.1 that nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The JSON error code of a gateway answer.
fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("a SPEC error body, got {body}"))
}

/// `n` sequential GETs of `url` with one client, pausing `pause(i)` before
/// each; every one must be a 200 (and return its body when it is JSON).
async fn sequential_gets(url: &str, n: usize, pause: impl Fn(usize) -> Duration) -> Vec<Value> {
    let c = client();
    let mut bodies = Vec::new();
    for i in 0..n {
        tokio::time::sleep(pause(i)).await;
        let resp = within(10, &format!("GET {url} #{i}"), c.get(url).send()).await;
        let resp = resp.unwrap_or_else(|e| panic!("GET {url} #{i}: {e}"));
        let status = resp.status();
        let text = within(10, &format!("GET {url} #{i} body"), resp.text()).await.unwrap();
        assert_eq!(status, 200, "GET {url} #{i} of {n}: {text}");
        bodies.push(serde_json::from_str(&text).unwrap_or(Value::Null));
    }
    bodies
}

// ---------------------------------------------------------------------------
// 1. pooling

#[tokio::test(flavor = "multi_thread")]
async fn a_route_reuses_backend_connections() {
    let b = keep_alive_backend().await;
    let g = gateway(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()));
    let bodies = sequential_gets(&format!("http://{}/r", g.proxy_addr), 200, |_| Duration::ZERO).await;
    assert!(bodies.iter().all(|b| *b == serde_json::json!({})));
    assert_eq!(b.requests(), 200, "each request reached the backend once");
    assert!(b.conns() <= 4, "200 sequential requests over at most 4 backend connections, the backend accepted {}", b.conns());
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_composition_call_reuses_backend_connections() {
    let b = keep_alive_backend().await;
    let g = gateway(&format!("compositions: [{{ name: c, path: /c, calls: {{ a: {{ url: \"{}/a\" }} }} }}]", b.url()));
    let bodies = sequential_gets(&format!("http://{}/c", g.proxy_addr), 200, |_| Duration::ZERO).await;
    assert_eq!(bodies[0], serde_json::json!({"a": {}}));
    assert_eq!(b.requests(), 200, "each request reached the backend once");
    assert!(b.conns() <= 4, "200 sequential calls over at most 4 backend connections, the backend accepted {}", b.conns());
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 2. idle connections the backend closes

/// A backend that answers keep-alive style (no `Connection: close`), then
/// closes the connection `after` the answer (zero: at once).
async fn closing_backend(after: Duration) -> RawBackend {
    raw_backend(move |mut c| async move {
        if c.request().await {
            c.send(OK).await;
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            let _ = c.stream.shutdown().await;
        }
    })
    .await
}

/// 50 sequential GETs, 30–50 ms apart: each finds its pooled connection
/// closed by the backend (or closing), and each must still be a 200.
async fn idle_closed(entity: &str, after: Duration) {
    let b = closing_backend(after).await;
    let yaml = match entity {
        "route" => format!("routes: [{{ name: r, path: /x, upstream: \"{}\" }}]", b.url()),
        _ => format!("compositions: [{{ name: c, path: /x, calls: {{ a: {{ url: \"{}/a\" }} }} }}]", b.url()),
    };
    let g = gateway(&yaml);
    sequential_gets(&format!("http://{}/x", g.proxy_addr), 50, |i| Duration::from_millis(30 + (i as u64 * 7) % 21)).await;
    assert_eq!(b.requests(), 50, "each request reached the backend exactly once");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_survives_backends_closing_idle_connections_shortly_after_answering() {
    idle_closed("route", Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_survives_backends_closing_connections_right_after_answering() {
    idle_closed("route", Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_composition_survives_backends_closing_idle_connections_shortly_after_answering() {
    idle_closed("composition", Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_composition_survives_backends_closing_connections_right_after_answering() {
    idle_closed("composition", Duration::ZERO).await;
}

// ---------------------------------------------------------------------------
// 3. backend framing errors

/// Broken answers; each body is valid JSON holding "hello", so a gateway
/// that took any reading of them would relay it (or compose it).
const BROKEN: &[(&str, &[u8])] = &[
    (
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nb\r\n{\"hello\":1}\r\n0\r\n\r\n",
    ),
    ("two-lengths", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\ncontent-length: 12\r\n\r\n{\"hello\":1}"),
    ("bad-status", b"HTTP/1.1 abc\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"hello\":1}"),
    ("no-http", b"HELLO\r\n\r\n"),
];

#[tokio::test(flavor = "multi_thread")]
async fn backend_framing_errors_through_a_route_are_502_and_relay_nothing() {
    let mut routes = String::from("routes:\n");
    let mut backends = Vec::new();
    for (name, bytes) in BROKEN {
        let b = answering(*bytes).await;
        routes.push_str(&format!("  - {{ name: {name}, path: /{name}, upstream: \"{}\" }}\n", b.url()));
        backends.push(b);
    }
    let g = gateway(&routes);
    let mut wrong = Vec::new();
    for (name, _) in BROKEN {
        let r = raw_request(g.proxy_addr, format!("GET /{name} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await;
        let text = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
        let ok = r.status == 502
            && !text.contains("hello")
            && serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| v["error"]["code"] == "upstream_error");
        if !ok {
            wrong.push(format!("{name}: {r:?}"));
        }
    }
    assert!(wrong.is_empty(), "a broken backend answer is 502 upstream_error and none of its bytes:\n{}", wrong.join("\n"));
    // Each failure is the backend's, counted against its route.
    for (name, _) in BROKEN {
        metric_until(g.admin_addr, FAILURES, &[("route", name), ("call", "")], |v| v >= 1.0, "a framing error counts against the backend")
            .await;
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_framing_errors_in_a_required_composition_call_are_502() {
    let mut comps = String::from("compositions:\n");
    let mut backends = Vec::new();
    for (name, bytes) in BROKEN {
        let b = answering(*bytes).await;
        comps.push_str(&format!("  - {{ name: {name}, path: /{name}, calls: {{ a: {{ url: \"{}/a\" }} }} }}\n", b.url()));
        backends.push(b);
    }
    let g = gateway(&comps);
    let mut wrong = Vec::new();
    for (name, _) in BROKEN {
        let (status, _, body) = within(10, name, common::send("GET", &format!("http://{}/{name}", g.proxy_addr), None, &[])).await;
        if status != 502 || body["error"]["code"] != "upstream_error" || body.to_string().to_ascii_lowercase().contains("hello") {
            wrong.push(format!("{name}: {status} {body}"));
        }
    }
    assert!(wrong.is_empty(), "a broken backend answer to a required call is 502 upstream_error:\n{}", wrong.join("\n"));
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 4. a client's malformed upload is the client's fault

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunked_upload_is_400_and_not_the_backends_fault() {
    let b = backend().run().await;
    let dead = closed_port().await;
    let g = gateway(&format!(
        "routes:\n  - {{ name: r, path: /r, upstream: \"{}\" }}\n  - {{ name: dead, path: /dead, upstream: \"http://127.0.0.1:{dead}\" }}\n",
        b.url()
    ));
    let before = metric(g.admin_addr, FAILURES, &[("route", "r")]).await;
    let r = raw_request(g.proxy_addr, b"POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").await;
    assert_eq!(r.status, 400, "a malformed chunk size is the client's error: {r:?}");
    assert_eq!(code(&r.json()), "bad_request");

    // A real backend failure moves the counter (so it exists and can move)...
    let (status, _, body) = within(10, "GET /dead", common::send("GET", &format!("http://{}/dead", g.proxy_addr), None, &[])).await;
    assert_eq!(status, 502);
    assert_eq!(code(&body), "upstream_error");
    metric_until(g.admin_addr, FAILURES, &[("route", "dead"), ("call", ""), ("cause", "connect")], |v| v == 1.0, "a refused connection")
        .await;
    // ...and by then the malformed upload's request is long over: it did
    // not count against route r's backend.
    let after = metric(g.admin_addr, FAILURES, &[("route", "r")]).await;
    assert_eq!(after, before, "the client's malformed body is not an upstream failure of route r");
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 5. a stalled upload

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_is_408_and_not_the_backends_fault() {
    let b = backend().run().await;
    let dead = closed_port().await;
    let g = gateway(&format!(
        "routes:\n  - {{ name: r, path: /r, upstream: \"{}\", timeout: 1s }}\n  - {{ name: dead, path: /dead, upstream: \"http://127.0.0.1:{dead}\" }}\n",
        b.url()
    ));
    let before = metric(g.admin_addr, FAILURES, &[("route", "r")]).await;
    // 10 of 100 promised bytes, then silence on an open connection.
    let r = raw_request(g.proxy_addr, b"POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789").await;
    assert_eq!(r.status, 408, "a client that stops sending its body is a request timeout: {r:?}");
    assert_eq!(code(&r.json()), "request_timeout");
    // Once a later backend failure has been counted, route r's counter
    // has had every chance to move: it must not have.
    assert_eq!(within(10, "GET /dead", common::send("GET", &format!("http://{}/dead", g.proxy_addr), None, &[])).await.0, 502);
    metric_until(g.admin_addr, FAILURES, &[("route", "dead"), ("cause", "connect")], |v| v == 1.0, "a refused connection").await;
    let after = metric(g.admin_addr, FAILURES, &[("route", "r")]).await;
    assert_eq!(after, before, "a stalled upload is not an upstream failure of route r");
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 6. a stalled response body

#[tokio::test(flavor = "multi_thread")]
async fn a_response_body_that_stalls_is_cut_after_the_body_timeout() {
    let mut head_and_some = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n".to_vec();
    head_and_some.extend_from_slice(&[b'x'; 100]);
    let b = answering(head_and_some).await;
    let g = gateway(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\", timeout: 30s, body_timeout: 1s }}]", b.url()));

    // A raw client: the head, 100 bytes, then the end of the connection.
    let r = raw_request(g.proxy_addr, b"GET /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(r.status, 200, "the head was relayed: {r:?}");
    assert!(!r.complete, "the connection ended before the promised body: {r:?}");
    assert!(r.body.len() < 1000, "fewer than 1000 body bytes arrived: {}", r.body.len());

    // reqwest sees it as a body error, not as a short success.
    let resp = within(10, "GET /r", client().get(format!("http://{}/r", g.proxy_addr)).send()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = within(10, "the stalled body", resp.bytes()).await;
    assert!(body.is_err(), "a cut body is an error, got {} bytes", body.map(|b| b.len()).unwrap_or(0));

    metric_until(g.admin_addr, FAILURES, &[("route", "r"), ("call", ""), ("cause", "body_timeout")], |v| v == 2.0, "two stalled bodies")
        .await;
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 7. a slow response head

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_slower_than_the_route_timeout_is_504() {
    let slow = backend().delay(Duration::from_secs(3)).run().await;
    let g = gateway(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\", timeout: 1s }}]", slow.url()));
    let (status, _, body) = within(10, "GET /r", common::send("GET", &format!("http://{}/r", g.proxy_addr), None, &[])).await;
    assert_eq!(status, 504);
    assert_eq!(code(&body), "upstream_timeout");
    g.shutdown();
}
