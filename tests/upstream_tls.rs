//! The upstream layer (issue 12) over https: backends verified against a CA
//! the node trusts, a wrong CA is a 502 that tells nothing of the
//! certificates, client certificates for backends that require them, and
//! pooled TLS connections. Certificates are made in the test with rcgen;
//! the backends are rustls (ring) + hyper on raw sockets.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use common::{client, metric_until, within};
use manifold::gateway::{Gateway, GatewayOptions};
use manifold::upstream::TlsOptions;
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{json, Value};
use tls::{ca, leaf, Ca, Leaf, TlsBackend};

// ---------------------------------------------------------------------------
// certificates

/// Common names of the CAs, looked for in error bodies.
const CA_NAME: &str = "Manifold Test Root CA 4d1f";
const OTHER_CA_NAME: &str = "Unrelated Test Root CA 9b27";
const CLIENT_CA_NAME: &str = "Manifold Test Client CA 62ae";

/// Every certificate a test needs, and their PEM files in a temporary
/// directory.
struct Pki {
    dir: tempfile::TempDir,
    server: Leaf,
    client_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let root = ca(CA_NAME);
        let other = ca(OTHER_CA_NAME);
        let client_ca = ca(CLIENT_CA_NAME);
        let server = leaf(&root, "localhost", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let client = leaf(&client_ca, "manifold-gateway", &["manifold-gateway"], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &root.pem).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), &other.pem).unwrap();
        std::fs::write(dir.path().join("client.pem"), &client.cert_pem).unwrap();
        std::fs::write(dir.path().join("client-key.pem"), &client.key_pem).unwrap();
        Pki { dir, server, client_ca }
    }

    fn path(&self, file: &str) -> PathBuf {
        let p = self.dir.path().join(file);
        assert!(Path::new(&p).exists(), "{} was written", p.display());
        p
    }

    /// Gateway options trusting `ca_file`, with the client certificate
    /// when `mtls`.
    fn options(&self, ca_file: &str, mtls: bool) -> GatewayOptions {
        GatewayOptions {
            upstream_tls: TlsOptions {
                ca_file: Some(self.path(ca_file)),
                client_cert_file: mtls.then(|| self.path("client.pem")),
                client_key_file: mtls.then(|| self.path("client-key.pem")),
            },
            ..GatewayOptions::default()
        }
    }
}

// ---------------------------------------------------------------------------
// the TLS backend

/// An https backend answering `{"tls": true}` with the certificate of
/// `pki.server`; it requires a client certificate signed by the client CA
/// when `require_client_cert`.
async fn tls_backend(pki: &Pki, require_client_cert: bool) -> TlsBackend {
    tls::tls_backend(&pki.server, require_client_cert.then_some(&pki.client_ca), Vec::new()).await
}

// ---------------------------------------------------------------------------
// helpers

/// GET through the gateway: status, body as text, body as JSON (null when
/// it is not).
async fn get(g: &Gateway, path: &str) -> (u16, String, Value) {
    within(15, path, async {
        let resp = client().get(format!("http://{}{path}", g.proxy_addr)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, text, v)
    })
    .await
}

/// Waits (at most 5 s) for the metric to equal `want`.
async fn metric_becomes(admin: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    metric_until(admin, name, labels, |v| v == want, "metric").await;
}

fn route_and_composition(b: &TlsBackend) -> String {
    format!(
        "routes: [{{ name: r, path: /r, upstream: \"{0}\" }}]\ncompositions: [{{ name: c, path: /c, calls: {{ x: {{ url: \"{0}/x\" }} }} }}]\n",
        b.url()
    )
}

// ---------------------------------------------------------------------------
// tests

#[tokio::test(flavor = "multi_thread")]
async fn https_backends_verified_by_the_configured_ca() {
    let pki = Pki::new();
    let b = tls_backend(&pki, false).await;
    let g = common::gateway_with(&route_and_composition(&b), pki.options("ca.pem", false));
    let (status, text, body) = get(&g, "/r").await;
    assert_eq!(status, 200, "a route to an https backend: {text}");
    assert_eq!(body, json!({"tls": true}));
    let (status, text, body) = get(&g, "/c").await;
    assert_eq!(status, 200, "a composition call to an https backend: {text}");
    assert_eq!(body, json!({"x": {"tls": true}}));
    assert_eq!(b.answered.load(Ordering::SeqCst), 2);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_certificate_from_an_untrusted_ca_is_502_and_tells_nothing() {
    let pki = Pki::new();
    let b = tls_backend(&pki, false).await;
    let g = common::gateway_with(&route_and_composition(&b), pki.options("other-ca.pem", false));
    let (status, text, body) = get(&g, "/r").await;
    assert_eq!(status, 502, "the backend's certificate is not trusted: {text}");
    assert_eq!(body["error"]["code"], "upstream_error", "{text}");
    let host_port = format!("localhost:{}", b.port);
    for secret in ["-----BEGIN", CA_NAME, OTHER_CA_NAME, CLIENT_CA_NAME, &host_port] {
        assert!(!text.contains(secret), "the error body tells {secret:?}: {text}");
    }
    assert_eq!(b.answered.load(Ordering::SeqCst), 0, "no request was sent over an unverified connection");
    metric_becomes(g.admin_addr, "manifold_upstream_failures_total", &[("route", "r"), ("call", ""), ("cause", "tls")], 1.0).await;
    // A composition call to it fails the same way.
    let (status, text, body) = get(&g, "/c").await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(body["error"]["code"], "upstream_error", "{text}");
    metric_becomes(g.admin_addr, "manifold_upstream_failures_total", &[("route", "c"), ("call", "x"), ("cause", "tls")], 1.0).await;
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_requires_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let b = tls_backend(&pki, true).await;
    let yaml = route_and_composition(&b);

    let with_cert = common::gateway_with(&yaml, pki.options("ca.pem", true));
    let (status, text, body) = get(&with_cert, "/r").await;
    assert_eq!(status, 200, "mTLS with the configured client certificate: {text}");
    assert_eq!(body, json!({"tls": true}));
    let (status, text, body) = get(&with_cert, "/c").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(body, json!({"x": {"tls": true}}));
    with_cert.shutdown();

    let without = common::gateway_with(&yaml, pki.options("ca.pem", false));
    let (status, text, body) = get(&without, "/r").await;
    assert_eq!(status, 502, "no client certificate: refused by the backend: {text}");
    assert_eq!(body["error"]["code"], "upstream_error", "{text}");
    without.shutdown();
    assert_eq!(b.answered.load(Ordering::SeqCst), 2, "only the gateway with the certificate was answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_connections_to_a_backend_are_pooled() {
    let pki = Pki::new();
    let b = tls_backend(&pki, false).await;
    let g = common::gateway_with(&route_and_composition(&b), pki.options("ca.pem", false));
    let c = client();
    for i in 0..50 {
        let resp = within(10, &format!("GET /r #{i}"), c.get(format!("http://{}/r", g.proxy_addr)).send()).await.unwrap();
        assert_eq!(resp.status(), 200, "GET /r #{i}");
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"tls": true}));
    }
    assert_eq!(b.answered.load(Ordering::SeqCst), 50);
    let conns = b.conns.load(Ordering::SeqCst);
    assert!(conns <= 4, "50 sequential requests over at most 4 TLS connections, the backend accepted {conns}");
    g.shutdown();
}
