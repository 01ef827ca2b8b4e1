//! Named upstreams on the request path (SPEC §6): a route or a composition
//! call naming an upstream spreads over its targets in smooth weighted
//! round-robin, and an upstream's `tls` block (its CA file, server name,
//! client certificate, `verify: false`) applies to its targets only, its
//! pooled connections never shared with another connector's. Real
//! backends on real sockets; certificates made in the test with rcgen.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, client, gateway};
use manifold::gateway::Gateway;
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{json, Value};
use tls::{ca, leaf, self_signed, tls_backend};

async fn get(g: &Gateway, path: &str) -> (u16, Value) {
    common::proxy_get(g, path, &[]).await
}

/// Writes `text` as `name` in `dir` and gives its path as YAML text.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path: PathBuf = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    format!("{:?}", path.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_spreads_over_its_targets_by_weight() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    connect_timeout: 2s\n    targets:\n      - {{ url: \"{}\", weight: 1 }}\n      - {{ url: \"{}\", weight: 2 }}\n      - {{ url: \"{}\", weight: 3 }}\nroutes:\n  - {{ name: r, path: \"/r/{{*rest}}\", upstream: pool }}\n",
        a.url(),
        b.url(),
        c.url()
    ));
    // One pick per request from a counter the workers share: exact counts
    // over whole periods, whichever worker served each request, and even
    // with requests in flight together.
    let reqs = (0..60).map(|i| {
        let g = &g;
        async move {
            let (status, body) = get(g, &format!("/r/x/{i}")).await;
            assert_eq!(status, 200, "{body}");
        }
    });
    futures_util::future::join_all(reqs).await;
    let hits = [&a, &b, &c].map(|x| x.hits.load(Ordering::SeqCst));
    assert_eq!(hits, [10, 20, 30]);
    // Each target is sent its own host as Host.
    for x in [&a, &b, &c] {
        let seen = x.seen.lock().unwrap();
        assert!(seen.iter().all(|e| e["headers"]["host"] == json!([format!("127.0.0.1:{}", x.addr.port())])), "{:?}", seen[0]);
        assert!(seen.iter().all(|e| e["path"].as_str().unwrap().starts_with("/r/x/")), "{:?}", seen[0]);
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_composition_call_names_an_upstream_and_a_path_template() {
    let (a, b) = (backend().run().await, backend().run().await);
    let g = gateway(&format!(
        r#"
upstreams:
  - name: items
    targets: [{{ url: "{}" }}, {{ url: "{}" }}]
compositions:
  - name: c
    path: /c
    calls:
      echo:
        upstream: items
        path: "/items/{{{{request.query.id}}}}/detail?tag={{{{request.query.tag}}}}&fixed=1"
"#,
        a.url(),
        b.url()
    ));
    for (id, want_path) in
        [("a%2Fb", "/items/a%2Fb/detail"), ("..%2Fadmin", "/items/..%2Fadmin/detail"), ("%40x y", "/items/%40x%20y/detail")]
    {
        let (status, body) = get(&g, &format!("/c?id={id}&tag=a%26admin%3Dtrue")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["echo"]["path"], want_path, "{id}");
        assert_eq!(body["echo"]["query"], "tag=a%26admin%3Dtrue&fixed=1", "{id}");
    }
    let (status, body) = get(&g, "/c?id=1&tag=t").await;
    assert_eq!(status, 200, "{body}");
    // Four calls over two targets of equal weight: two each, each sent its
    // own host.
    assert_eq!((a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst)), (2, 2));
    for x in [&a, &b] {
        let seen = x.seen.lock().unwrap();
        assert!(seen.iter().all(|e| e["headers"]["host"] == json!([format!("127.0.0.1:{}", x.addr.port())])), "{:?}", seen[0]);
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstreams_ca_file_is_trusted_for_its_targets_only() {
    let root = ca("Pools Test Root CA 31c8");
    let server = leaf(&root, "localhost", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let b = tls_backend(&server, None, Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(&dir, "ca.pem", &root.pem);
    // The node has no CA flag: only the upstream trusts the CA.
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: secure, targets: [{{ url: \"{0}\" }}], tls: {{ ca_file: {ca_file} }} }}\nroutes:\n  - {{ name: pooled, path: /pooled, upstream: secure }}\n  - {{ name: direct, path: /direct, upstream: \"{0}\" }}\ncompositions:\n  - {{ name: c, path: /c, calls: {{ x: {{ upstream: secure, path: /x }} }} }}\n",
        b.url()
    ));
    let (status, body) = get(&g, "/pooled").await;
    assert_eq!((status, &body), (200, &json!({"tls": true})));
    let (status, body) = get(&g, "/c").await;
    assert_eq!((status, &body), (200, &json!({"x": {"tls": true}})));
    let (status, body) = get(&g, "/direct").await;
    assert_eq!(status, 502, "a URL route is verified against the node's roots, which lack the test CA: {body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(b.answered.load(Ordering::SeqCst), 2);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn server_name_is_the_sni_and_the_name_verified() {
    let root = ca("Pools Test Root CA 8a02");
    // Issued for a name only; the target is its IP address.
    let server = leaf(&root, "api.internal", &["api.internal"], ExtendedKeyUsagePurpose::ServerAuth);
    let b = tls_backend(&server, None, Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(&dir, "ca.pem", &root.pem);
    let target = format!("https://127.0.0.1:{}", b.port);
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: named, targets: [{{ url: \"{target}\" }}], tls: {{ ca_file: {ca_file}, server_name: api.internal }} }}\n  - {{ name: by-ip, targets: [{{ url: \"{target}\" }}], tls: {{ ca_file: {ca_file} }} }}\nroutes:\n  - {{ name: named, path: /named, upstream: named }}\n  - {{ name: by-ip, path: /by-ip, upstream: by-ip }}\n"
    ));
    let (status, body) = get(&g, "/named").await;
    assert_eq!((status, &body), (200, &json!({"tls": true})));
    let (status, body) = get(&g, "/by-ip").await;
    assert_eq!(status, 502, "the certificate is not for 127.0.0.1: {body}");
    assert_eq!(b.answered.load(Ordering::SeqCst), 1);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_false_accepts_a_self_signed_certificate() {
    let server = self_signed(&["self.invalid"]);
    let b = tls_backend(&server, None, Vec::new()).await;
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: lax, targets: [{{ url: \"{0}\" }}], tls: {{ verify: false }} }}\n  - {{ name: strict, targets: [{{ url: \"{0}\" }}], tls: {{ verify: true }} }}\nroutes:\n  - {{ name: lax, path: /lax, upstream: lax }}\n  - {{ name: strict, path: /strict, upstream: strict }}\n",
        b.url()
    ));
    let (status, body) = get(&g, "/lax").await;
    assert_eq!((status, &body), (200, &json!({"tls": true})));
    let (status, body) = get(&g, "/strict").await;
    assert_eq!(status, 502, "verified, a self-signed certificate is refused: {body}");
    assert_eq!(b.answered.load(Ordering::SeqCst), 1);
    g.shutdown();
}

/// The upstream's client certificate is presented, and two upstreams to
/// the same backend with different certificates never share a pooled
/// connection (the backend says which certificate each connection has).
#[tokio::test(flavor = "multi_thread")]
async fn each_upstream_presents_its_client_certificate_on_its_own_connections() {
    let root = ca("Pools Test Root CA 5e71");
    let client_ca = ca("Pools Test Client CA 0b94");
    let server = leaf(&root, "localhost", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let one = leaf(&client_ca, "gateway-one", &["gateway-one"], ExtendedKeyUsagePurpose::ClientAuth);
    let two = leaf(&client_ca, "gateway-two", &["gateway-two"], ExtendedKeyUsagePurpose::ClientAuth);
    let known = vec![("one".to_string(), one.cert_der.clone()), ("two".to_string(), two.cert_der.clone())];
    let b = tls_backend(&server, Some(&client_ca), known).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(&dir, "ca.pem", &root.pem);
    let (c1, k1) = (file(&dir, "one.pem", &one.cert_pem), file(&dir, "one-key.pem", &one.key_pem));
    let (c2, k2) = (file(&dir, "two.pem", &two.cert_pem), file(&dir, "two-key.pem", &two.key_pem));
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: one, targets: [{{ url: \"{0}\" }}], tls: {{ ca_file: {ca_file}, client_cert_file: {c1}, client_key_file: {k1} }} }}\n  - {{ name: two, targets: [{{ url: \"{0}\" }}], tls: {{ ca_file: {ca_file}, client_cert_file: {c2}, client_key_file: {k2} }} }}\n  - {{ name: none, targets: [{{ url: \"{0}\" }}], tls: {{ ca_file: {ca_file} }} }}\nroutes:\n  - {{ name: one, path: /one, upstream: one }}\n  - {{ name: two, path: /two, upstream: two }}\n  - {{ name: none, path: /none, upstream: none }}\ncompositions:\n  - {{ name: c, path: /c, calls: {{ a: {{ upstream: one, path: /a }}, b: {{ upstream: two, path: /b }} }} }}\n",
        b.url()
    ));
    // Sequential requests alternating between the two: each reuses a
    // pooled connection when there is one of its own.
    for i in 0..20 {
        for name in ["one", "two"] {
            let (status, body) = get(&g, &format!("/{name}")).await;
            assert_eq!((status, &body), (200, &json!({"tls": true, "client": name})), "#{i}");
        }
        let (status, body) = get(&g, "/c").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"a": {"tls": true, "client": "one"}, "b": {"tls": true, "client": "two"}}), "#{i}");
    }
    assert_eq!(b.answered.load(Ordering::SeqCst), 80);
    let conns = b.conns.load(Ordering::SeqCst);
    assert!(conns <= 12, "pooled per upstream and worker: 80 requests over {conns} connections");
    let (status, body) = get(&g, "/none").await;
    assert_eq!(status, 502, "without a client certificate the backend refuses: {body}");
    assert_eq!(b.answered.load(Ordering::SeqCst), 80);
    g.shutdown();
}

/// A backend on a raw socket, for what the echo backend cannot do: hold
/// each answer until the test releases it, or stream an answer that never
/// ends (a chunk every 20 ms until the gateway hangs up).
struct RawBackend {
    addr: std::net::SocketAddr,
    /// Requests whose head arrived.
    arrived: Arc<AtomicUsize>,
    /// Permits to answer (held answers).
    release: Arc<tokio::sync::Semaphore>,
    /// Streams the gateway closed.
    closed: Arc<AtomicUsize>,
}

impl RawBackend {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }
}

async fn raw_backend(name: &'static str, stream: bool) -> RawBackend {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = RawBackend {
        addr: listener.local_addr().unwrap(),
        arrived: Arc::default(),
        release: Arc::new(tokio::sync::Semaphore::new(0)),
        closed: Arc::default(),
    };
    let (arrived, release, closed) = (b.arrived.clone(), b.release.clone(), b.closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let (arrived, release, closed) = (arrived.clone(), release.clone(), closed.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                if !stream {
                    release.acquire().await.unwrap().forget();
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}", name.len());
                    let _ = sock.write_all(answer.as_bytes()).await;
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-stream: yes\r\nconnection: close\r\n\r\n5\r\nstart\r\n";
                if sock.write_all(head.as_bytes()).await.is_ok() {
                    while sock.write_all(b"1\r\nx\r\n").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    b
}

/// Waits (up to 15 s) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn least_requests_sends_new_requests_away_from_a_target_whose_answers_are_slow() {
    let (s, f) = (raw_backend("s", false).await, raw_backend("f", false).await);
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: lr, balance: least-requests, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: r, path: \"/r/{{*rest}}\", upstream: lr }}\n",
        s.url(),
        f.url()
    ));
    let url = format!("http://{}/r/x", g.proxy_addr);
    // Both hold their answers; sent one after the other, each request sees
    // the ones before it in flight and goes to the other target.
    let n = 4;
    let mut held = Vec::new();
    for i in 0..2 * n {
        let url = url.clone();
        held.push(tokio::spawn(async move { client().get(url).send().await.unwrap().text().await.unwrap() }));
        until("the request to arrive", || s.arrived() + f.arrived() == i + 1).await;
    }
    assert_eq!((s.arrived(), f.arrived()), (n, n));
    // f answers its n; s still holds n in flight.
    f.release.add_permits(1000);
    until("f's answers", || held.iter().filter(|h| h.is_finished()).count() == n).await;
    // Every new request goes to f, even sent at once (fewer than s holds).
    for _ in 0..5 {
        let reqs = (0..n).map(|_| async { client().get(&url).send().await.unwrap().text().await.unwrap() });
        for body in futures_util::future::join_all(reqs).await {
            assert_eq!(body, "f");
        }
    }
    assert_eq!(s.arrived(), n);
    s.release.add_permits(1000);
    let mut bodies: Vec<String> = Vec::new();
    for h in held {
        bodies.push(h.await.unwrap());
    }
    bodies.sort();
    assert_eq!(bodies, ["f", "f", "f", "f", "s", "s", "s", "s"]);
    // Nothing in flight any more: one request after the other alternates.
    let mut on_s = 0;
    for _ in 0..10 {
        if client().get(&url).send().await.unwrap().text().await.unwrap() == "s" {
            on_s += 1;
        }
    }
    assert_eq!(on_s, 5);
    g.shutdown();
}

/// A count is never leaked: a streamed answer the client drops half-way, a
/// request that fails and one the client gives up on all release theirs,
/// so one request after the other still alternates between two targets
/// (a leaked count would send everything to the other one).
#[tokio::test(flavor = "multi_thread")]
async fn least_requests_releases_the_count_of_dropped_failed_and_cancelled_requests() {
    let st = raw_backend("st", true).await;
    let (f1, f2, f3) = (backend().run().await, backend().run().await, backend().run().await);
    let x = backend().fault().run().await;
    let d = backend().delay(Duration::from_secs(60)).run().await;
    let g = gateway(&format!(
        "upstreams:\n  - {{ name: streams, balance: least-requests, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\n  - {{ name: fails, balance: least-requests, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\n  - {{ name: slow, balance: least-requests, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: s, path: /s, upstream: streams }}\n  - {{ name: f, path: /f, upstream: fails }}\n  - {{ name: d, path: /d, upstream: slow }}\n",
        st.url(),
        f1.url(),
        x.url(),
        f2.url(),
        d.url(),
        f3.url()
    ));
    let base = format!("http://{}", g.proxy_addr);

    // A streamed body dropped by the client after its first chunk.
    let mut streamed = 0;
    for _ in 0..6 {
        let mut resp = client().get(format!("{base}/s")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        if resp.headers().contains_key("x-stream") {
            assert_eq!(&resp.chunk().await.unwrap().unwrap()[..], b"start");
            drop(resp);
            streamed += 1;
            until("the gateway to drop the stream", || st.closed.load(Ordering::SeqCst) == streamed).await;
        } else {
            resp.text().await.unwrap();
        }
    }
    assert_eq!((streamed, f1.hits.load(Ordering::SeqCst)), (3, 3));

    // A target that hangs up without answering: 502, and its count goes.
    let mut failed = 0;
    for _ in 0..10 {
        let (status, _) = get(&g, "/f").await;
        if status == 502 {
            failed += 1;
        } else {
            assert_eq!(status, 200);
        }
    }
    assert_eq!((failed, f2.hits.load(Ordering::SeqCst)), (5, 5));

    // A client that gives up while the target has not answered.
    for i in 0..6 {
        let url = format!("{base}/d");
        let before = d.hits.load(Ordering::SeqCst);
        let req = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
        until("the request to arrive", || d.hits.load(Ordering::SeqCst) + f3.hits.load(Ordering::SeqCst) == i + 1).await;
        if d.hits.load(Ordering::SeqCst) > before {
            req.abort();
            until("the gateway to cancel the backend request", || d.cancelled.load(Ordering::SeqCst) == before + 1).await;
        } else {
            assert_eq!(req.await.unwrap().unwrap(), 200);
        }
    }
    assert_eq!((d.hits.load(Ordering::SeqCst), f3.hits.load(Ordering::SeqCst)), (3, 3));
    g.shutdown();
}

/// The target that answered a request, by the `Host` it was sent.
fn host_of(body: &Value) -> String {
    body["headers"]["host"][0].as_str().unwrap_or_else(|| panic!("no host in {body}")).to_string()
}

use common::proxy_get as get_with;

fn hashed_config(targets: &[&common::Backend]) -> String {
    let list = targets.iter().map(|b| format!("{{ url: \"{}\" }}", b.url())).collect::<Vec<_>>().join(", ");
    format!(
        "upstreams:\n  - {{ name: by-header, balance: consistent-hash, hash_on: \"header:x-user\", targets: [{list}] }}\n  - {{ name: by-path, balance: consistent-hash, hash_on: path, targets: [{list}] }}\nroutes:\n  - {{ name: h, path: \"/h/{{*rest}}\", upstream: by-header }}\n  - {{ name: p, path: \"/p/{{*rest}}\", upstream: by-path }}\ncompositions:\n  - {{ name: c, path: /c, calls: {{ one: {{ upstream: by-header, path: /c }} }} }}\n"
    )
}

/// The target each key's request reached, sent all at once.
async fn place(g: &Gateway, keys: &[String]) -> Vec<String> {
    let reqs = keys.iter().map(|k| async move {
        let (status, body) = get_with(g, "/h/x", &[("x-user", k)]).await;
        assert_eq!(status, 200, "{body}");
        host_of(&body)
    });
    futures_util::future::join_all(reqs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_header_is_sticky_spread_and_stable_when_a_target_leaves() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let g = gateway(&hashed_config(&[&a, &b, &c]));
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let first = place(&g, &keys).await;
    assert_eq!(place(&g, &keys).await, first, "the same key reaches the same target");
    let host = |b: &common::Backend| format!("127.0.0.1:{}", b.addr.port());
    for t in [&a, &b, &c] {
        let share = first.iter().filter(|h| **h == host(t)).count();
        assert!(share >= 40, "{share} of 200 keys on {}: {first:?}", host(t));
    }
    // A composition call takes the key from the client's request.
    for (k, want) in keys.iter().zip(&first).take(20) {
        let (status, body) = get_with(&g, "/c", &[("x-user", k)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&host_of(&body["one"]), want, "{k}");
    }
    // Without the header: round-robin.
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(host_of(&get_with(&g, "/h/x", &[]).await.1));
    }
    for t in [&a, &b, &c] {
        assert_eq!(seen.iter().filter(|h| **h == host(t)).count(), 2, "{seen:?}");
    }
    g.shutdown();

    // c leaves: every key that was on a or b stays there.
    let g = gateway(&hashed_config(&[&a, &b]));
    let after = place(&g, &keys).await;
    let mut stayed = 0;
    for (k, (before, now)) in keys.iter().zip(first.iter().zip(&after)) {
        if *before != host(&c) {
            assert_eq!(before, now, "{k} moved off a target that stayed");
            stayed += 1;
        } else {
            assert!(*now == host(&a) || *now == host(&b));
        }
    }
    assert!(stayed >= 80, "{stayed}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_path() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let g = gateway(&hashed_config(&[&a, &b, &c]));
    let mut first = Vec::new();
    for i in 0..60 {
        let (status, body) = get_with(&g, &format!("/p/item/{i}"), &[]).await;
        assert_eq!(status, 200, "{body}");
        first.push(host_of(&body));
    }
    for (i, want) in first.iter().enumerate() {
        // The query is not part of the key.
        let (_, body) = get_with(&g, &format!("/p/item/{i}?v={i}"), &[]).await;
        assert_eq!(&host_of(&body), want, "/p/item/{i}");
    }
    let used: std::collections::HashSet<&String> = first.iter().collect();
    assert_eq!(used.len(), 3, "{first:?}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_consumer_follows_the_authenticated_consumer() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let consumers: String = (0..20).map(|i| format!("  - {{ name: c{i}, credentials: [{{ type: key-auth, key: key-{i} }}] }}\n")).collect();
    let g = gateway(&format!(
        "consumers:\n{consumers}policies:\n  - {{ name: keys, type: key-auth }}\nupstreams:\n  - {{ name: users, balance: consistent-hash, hash_on: consumer, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: k, path: /k, upstream: users, policies: [keys] }}\n  - {{ name: open, path: /open, upstream: users }}\n",
        a.url(),
        b.url(),
        c.url()
    ));
    let mut hosts = std::collections::HashSet::new();
    for i in 0..20 {
        let key = format!("key-{i}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let (status, body) = get_with(&g, "/k", &[("apikey", &key)]).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["headers"]["x-consumer-name"], json!([format!("c{i}")]));
            seen.insert(host_of(&body));
        }
        assert_eq!(seen.len(), 1, "consumer c{i} on {seen:?}");
        hosts.extend(seen);
    }
    assert!(hosts.len() >= 2, "20 consumers all on {hosts:?}");
    // No consumer (a client's own X-Consumer-Name is never the key): round-robin.
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(host_of(&get_with(&g, "/open", &[("x-consumer-name", "c1")]).await.1));
    }
    let distinct: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 3, "{seen:?}");
    g.shutdown();
}

/// By ip: the client address as the policies see it, here given by a
/// trusted proxy in `X-Forwarded-For`; without trust the peer (one address)
/// is the key, and every request goes to one target.
#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_client_ip() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let yaml = format!(
        "upstreams:\n  - {{ name: by-ip, balance: consistent-hash, hash_on: ip, targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}, {{ url: \"{}\" }}] }}\nroutes:\n  - {{ name: r, path: /r, upstream: by-ip }}\n",
        a.url(),
        b.url(),
        c.url()
    );
    let opts = manifold::gateway::GatewayOptions { trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()], ..Default::default() };
    let g = common::gateway_with(&yaml, opts);
    let mut first = Vec::new();
    for i in 0..60 {
        let ip = format!("198.51.100.{i}");
        let (status, body) = get_with(&g, "/r", &[("x-forwarded-for", &ip)]).await;
        assert_eq!(status, 200, "{body}");
        first.push(host_of(&body));
    }
    for (i, want) in first.iter().enumerate() {
        let ip = format!("198.51.100.{i}");
        assert_eq!(&host_of(&get_with(&g, "/r", &[("x-forwarded-for", &ip)]).await.1), want, "{ip}");
    }
    let used: std::collections::HashSet<&String> = first.iter().collect();
    assert_eq!(used.len(), 3, "{first:?}");
    g.shutdown();

    // Not trusted: the peer is the client, whatever X-Forwarded-For says.
    let g = gateway(&yaml);
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        seen.insert(host_of(&get_with(&g, "/r", &[("x-forwarded-for", &format!("198.51.100.{i}"))]).await.1));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    g.shutdown();
}
