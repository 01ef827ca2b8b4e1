//! Plain proxy routes end to end: a real gateway, real backends, real sockets.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{backend, client, gateway};
use serde_json::Value;

async fn get_json(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers, body) = common::send("GET", url, None, &[]).await;
    (status.as_u16(), headers, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_host_method_and_path_and_rewrites() {
    let users = backend().run().await;
    let files = backend().run().await;
    let admin = backend().run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: users, methods: [GET, POST], path: "/api/users/{{id}}", upstream: "{users}/base/", path_rewrite: "/v2/users/{{id}}" }}
  - {{ name: files, path: "/files/{{*rest}}", upstream: "{files}" }}
  - {{ name: admin-host, hosts: [admin.example.com], path: "/api/users/{{id}}", upstream: "{admin}" }}
  - {{ name: wild, hosts: ["*.example.org"], path: /hello, upstream: "{admin}", path_rewrite: /wild }}
  - {{ name: static, path: /api/users/me, upstream: "{admin}" }}
"#,
        users = users.url(),
        files = files.url(),
        admin = admin.url(),
    ));
    let base = format!("http://{}", g.proxy_addr);
    // (method, host, path and query, expected status, expected backend, expected upstream path, expected query)
    type Case<'a> = (&'a str, Option<&'a str>, &'a str, u16, Option<&'a str>, &'a str, Option<&'a str>);
    let cases: &[Case] = &[
        ("GET", None, "/api/users/42?x=1&y=%20", 200, Some("users"), "/base/v2/users/42", Some("x=1&y=%20")),
        ("POST", None, "/api/users/42", 200, Some("users"), "/base/v2/users/42", None),
        ("DELETE", None, "/api/users/42", 405, None, "", None),
        ("GET", None, "/api/users/me", 200, Some("admin"), "/api/users/me", None),
        ("GET", Some("admin.example.com"), "/api/users/42", 200, Some("admin"), "/api/users/42", None),
        ("GET", Some("ADMIN.example.com:8000"), "/api/users/42", 200, Some("admin"), "/api/users/42", None),
        ("GET", Some("other.example.com"), "/api/users/42", 200, Some("users"), "/base/v2/users/42", None),
        ("GET", Some("a.b.example.org"), "/hello", 200, Some("admin"), "/wild", None),
        ("GET", Some("example.org"), "/hello", 404, None, "", None),
        ("GET", None, "/files/a/b/c.txt", 200, Some("files"), "/files/a/b/c.txt", None),
        ("GET", None, "/files", 200, Some("files"), "/files", None),
        ("GET", None, "/nope", 404, None, "", None),
    ];
    for &(method, host, path, status, which, upstream_path, query) in cases {
        let mut req = client().request(method.parse().unwrap(), format!("{base}{path}"));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {host:?} {path}");
        let is_backend = resp.headers().contains_key("x-backend");
        let body: Value = resp.json().await.unwrap();
        match which {
            Some(_) => {
                assert!(is_backend, "{method} {path}: answered by a backend");
                assert_eq!(body["path"], upstream_path, "{method} {host:?} {path}");
                assert_eq!(body["query"].as_str(), query, "{method} {path}");
                assert_eq!(body["method"], method);
            }
            None => {
                assert!(!is_backend);
                let code = if status == 404 { "not_found" } else { "method_not_allowed" };
                assert_eq!(body["error"]["code"], code, "{method} {path}");
            }
        }
    }
    // Each request reached exactly the backend the table says.
    assert_eq!(users.hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(files.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(admin.hits.load(std::sync::atomic::Ordering::SeqCst), 4);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn percent_encoded_params_pass_exactly_as_sent() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: items, path: "/items/{{id}}/{{*rest}}", upstream: "{}", path_rewrite: "/x/{{id}}/{{rest}}" }}
"#,
        b.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    let cases = [
        ("/items/a%2Fb/c%20d/e", "/x/a%2Fb/c%20d/e"),
        ("/items/%C3%A9t%C3%A9/x", "/x/%C3%A9t%C3%A9/x"),
        ("/items/a/b/../c", "/x/a/c"),
        ("/items/a//b///c", "/x/a/b/c"),
        ("/items/a/%2e%2e/b/c", "/x/b/c"),
    ];
    for (path, want) in cases {
        let (status, _, body) = get_json(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body["path"], want, "{path}");
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: plain, path: /plain, upstream: "{u}" }}
  - {{ name: keep-host, path: /keep, upstream: "{u}", preserve_host: true }}
"#,
        u = b.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    let resp = client()
        .get(format!("{base}/plain"))
        .header("connection", "keep-alive, X-Forwarded-For, x-secret")
        .header("x-secret", "drop me")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic abc")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .header("host", "public.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let h = &body["headers"];
    for gone in ["connection", "x-secret", "keep-alive", "proxy-authorization", "te"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }
    assert_eq!(h["x-kept"][0], "yes");
    // `Connection: X-Forwarded-For` removed the client's value before the
    // gateway set its own, so only the real peer is listed.
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    // The peer is not a trusted proxy: its X-Forwarded-Proto is replaced.
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "public.example.com");
    assert_eq!(h["host"][0], b.addr.to_string());

    let resp = client()
        .get(format!("{base}/keep"))
        .header("host", "public.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["headers"]["host"][0], "public.example.com");
    assert_eq!(body["headers"]["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_and_traceparent_reach_the_backend_and_come_back() {
    let b = backend().run().await;
    let g = gateway(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()));
    let url = format!("http://{}/r", g.proxy_addr);

    let resp = client()
        .get(&url)
        .header("x-request-id", "client-id-1")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-id-1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"][0], "client-id-1");
    let tp = body["headers"]["traceparent"][0].as_str().unwrap();
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
    assert!(!tp.contains("00f067aa0ba902b7"), "a new span id per backend call: {tp}");

    // An unusable client ID (too long) is replaced by a UUID; a trace starts.
    let resp = client().get(&url).header("x-request-id", "x".repeat(200)).send().await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"][0], id);
    let tp = body["headers"]["traceparent"][0].as_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");

    // Gateway errors carry the ID too.
    let resp = client().get(format!("http://{}/missing", g.proxy_addr)).header("x-request-id", "err-7").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "err-7");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "err-7");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_are_json_errors_that_leak_nothing() {
    let slow = backend().delay(Duration::from_secs(5)).run().await;
    let faulty = backend().fault().run().await;
    // A port nobody listens on: bind, learn it, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let failing = backend().status(500).json(serde_json::json!({"trace": "secret internals"})).run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: slow, path: /slow, upstream: "{}", timeout: 200ms }}
  - {{ name: faulty, path: /faulty, upstream: "{}" }}
  - {{ name: closed, path: /closed, upstream: "http://{}" }}
  - {{ name: failing, path: /failing, upstream: "{}" }}
"#,
        slow.url(),
        faulty.url(),
        closed,
        failing.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    for (path, status, code) in [
        ("/slow", 504, "upstream_timeout"),
        ("/faulty", 502, "upstream_error"),
        ("/closed", 502, "upstream_error"),
        ("/nowhere", 404, "not_found"),
    ] {
        let resp = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["code"], code, "{path}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(body["error"]["request_id"].as_str().is_some_and(|m| !m.is_empty()));
        for leak in ["127.0.0.1", &closed.port().to_string(), &slow.addr.port().to_string(), "hyper", "Connection refused"] {
            assert!(!text.contains(leak), "{path} leaks {leak:?}: {text}");
        }
    }
    // A backend's own error answer is passed through as it is: a proxy does
    // not rewrite its upstream's statuses.
    let resp = client().get(format!("{base}/failing")).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().contains_key("x-backend"));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_survives_backend_faults() {
    let faulty = backend().fault().run().await;
    let good = backend().run().await;
    let g = gateway(&format!(
        "routes: [{{ name: f, path: /f, upstream: \"{}\" }}, {{ name: g, path: /g, upstream: \"{}\" }}]",
        faulty.url(),
        good.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    for _ in 0..50 {
        assert_eq!(client().get(format!("{base}/f")).send().await.unwrap().status(), 502);
    }
    assert_eq!(client().get(format!("{base}/g")).send().await.unwrap().status(), 200);
    g.shutdown();
}

/// Sends raw bytes and returns the raw answer, for what an HTTP client
/// library would refuse to send.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    // Read one response: the head, then Content-Length bytes (or to EOF).
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(head_end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| l.strip_prefix("content-length: ").and_then(|v| v.trim().parse::<usize>().ok()));
            if len.is_some_and(|len| out.len() >= head_end + 4 + len) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn request_hygiene() {
    let b = backend().run().await;
    let g = gateway(&format!("routes: [{{ name: all, path: \"/{{*rest}}\", upstream: \"{}\" }}]", b.url()));
    let addr = g.proxy_addr;
    let cases: &[(&str, &[u8], &str)] = &[
        ("differing CLs", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "400"),
        ("obs-fold", b"GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", "400"),
        ("no Host", b"GET /a HTTP/1.1\r\n\r\n", "400"),
        ("two Hosts", b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        ("NUL in path", b"GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        ("backslash", b"GET /a\\b HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        ("bad escape", b"GET /a%zzb HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        ("TE not chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "400"),
    ];
    for (what, request, status) in cases {
        let answer = raw(addr, request);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{what}: {answer}");
    }
    // Our own answers are JSON; framing errors also close the connection.
    let answer = raw(addr, b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");

    // Both Content-Length and Transfer-Encoding: refused before hyper
    // (which would drop the Content-Length and read the body as chunked).
    let answer = raw(addr, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let answer = raw(addr, long_uri.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 414") && answer.contains("uri_too_long"), "{answer}");

    let mut many = String::from("GET /a HTTP/1.1\r\nHost: x\r\n");
    for i in 0..120 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw(addr, many.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431") && answer.contains("headers_too_large"), "{answer}");

    let big = format!("GET /a HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "v".repeat(70_000));
    let answer = raw(addr, big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // None of the rejected requests reached the backend.
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_is_proxied() {
    let b = backend().run().await;
    let g = gateway(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()));
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let resp = h2.get(format!("http://{}/r?q=1", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["query"], "q=1");
    assert_eq!(body["headers"]["x-forwarded-host"][0], g.proxy_addr.to_string());
    g.shutdown();
}

/// Request targets that are not a path (RFC 9112 §3.2): an absolute-form
/// target is routed and forwarded by its own authority whatever `Host`
/// says; `CONNECT` is refused (405, the connection closed); `OPTIONS *` is
/// answered by the gateway; `*` with another method and user info in a
/// target are 400. Every refusal is SPEC §4 JSON.
#[tokio::test(flavor = "multi_thread")]
async fn request_targets_other_than_a_path() {
    let (a, b) = (backend().run().await, backend().run().await);
    let g = gateway(&format!(
        "routes:\n  - {{ name: a, hosts: [a.test], path: \"/{{*rest}}\", upstream: \"{}\" }}\n  - {{ name: b, hosts: [b.test], path: \"/{{*rest}}\", upstream: \"{}\" }}\n",
        a.url(),
        b.url()
    ));
    let addr = g.proxy_addr;
    let body = |answer: &str| -> Value { serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or(Value::Null) };

    // Absolute form: b.test's route, and b.test as the forwarded host.
    let answer =
        tokio::task::spawn_blocking(move || raw(addr, b"GET http://b.test/x?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"))
            .await
            .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = body(&answer);
    assert_eq!(seen["path"], "/x", "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-host"][0], "b.test", "{seen}");
    assert_eq!((a.hits.load(std::sync::atomic::Ordering::SeqCst), b.hits.load(std::sync::atomic::Ordering::SeqCst)), (0, 1));

    let answer = tokio::task::spawn_blocking(move || raw(addr, b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(body(&answer)["error"]["code"], "method_not_allowed", "{answer}");

    let answer =
        tokio::task::spawn_blocking(move || raw(addr, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("allow: get, head, post, put, patch, delete, options"), "{answer}");

    for (what, request) in [
        ("GET *", &b"GET * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"[..]),
        ("user info", &b"GET http://u:p@b.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n"[..]),
    ] {
        let answer = tokio::task::spawn_blocking(move || raw(addr, request)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert_eq!(body(&answer)["error"]["code"], "bad_request", "{what}: {answer}");
        assert!(body(&answer)["error"]["request_id"].is_string(), "{what}: {answer}");
    }
    assert_eq!(
        a.hits.load(std::sync::atomic::Ordering::SeqCst) + b.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "nothing else reached a backend"
    );
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_answer_is_in_the_gateways_http_version_not_the_backends() {
    // A backend that speaks HTTP/1.0 (one answer per connection).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok").await;
            });
        }
    });
    let g = gateway(&format!("routes:\n  - {{ name: old, path: /old, upstream: \"http://{addr}\" }}\n"));
    // A raw HTTP/1.1 request, to read the status line as sent.
    let mut s = std::net::TcpStream::connect(g.proxy_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /old HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    g.shutdown();
}
