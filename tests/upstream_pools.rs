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
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{backend, client, gateway};
use manifold::gateway::Gateway;
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{json, Value};
use tls::{ca, leaf, self_signed, tls_backend};

async fn get(g: &Gateway, path: &str) -> (u16, Value) {
    let fut = async {
        let resp = client().get(format!("http://{}{path}", g.proxy_addr)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    };
    tokio::time::timeout(Duration::from_secs(15), fut).await.unwrap_or_else(|_| panic!("{path}: no answer within 15 s"))
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
