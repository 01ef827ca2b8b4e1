//! The TLS listener (SPEC §7): certificates by SNI and the default one,
//! hot swaps, TLS versions, ALPN and HTTP/2, X-Forwarded-Proto, validation,
//! keys kept out of reads, export --include-secrets, and mtls-auth. Real
//! handshakes with certificates made here (rcgen), through tokio-rustls
//! and hyper's clients.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use manifold::gateway::{Gateway, GatewayOptions};
use manifold::server::DefaultCertificate;
use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

/// Options for a gateway with a TLS listener on a free port, and the
/// default certificate when given.
fn tls_options(default: Option<&tls::Leaf>) -> GatewayOptions {
    let mut opts = GatewayOptions::default();
    opts.server.tls_listen = Some(([127, 0, 0, 1], 0).into());
    opts.server.default_certificate = default.map(|l| DefaultCertificate { cert_pem: l.cert_pem.clone(), key_pem: l.key_pem.clone() });
    opts
}

/// A client certificate to show in the handshake.
struct Identity<'a>(&'a tls::Leaf);

/// A TLS connection to `addr` asking for `sni`, trusting `ca` only,
/// offering `alpn`, with TLS 1.2 only when `tls12_only`.
async fn connect(
    addr: SocketAddr,
    sni: &str,
    ca: &tls::Ca,
    alpn: &[&[u8]],
    identity: Option<Identity<'_>>,
    tls12_only: bool,
) -> std::io::Result<TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    let builder =
        rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(versions).unwrap().with_root_certificates(roots);
    let mut config = match identity {
        Some(Identity(leaf)) => builder.with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await
}

/// The certificate the server showed.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// An HTTP/1.1 connection over `stream`, for several requests.
async fn h1(stream: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn h1_get(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, host: &str, path: &str) -> (u16, Value) {
    let req = http::Request::get(path).header("host", host).body(Empty::new()).unwrap();
    let resp = within(10, path, send.send_request(req)).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn echo_route(backend: &Backend) -> String {
    format!("routes:\n  - name: echo\n    path: /{{*rest}}\n    upstream: {}\n", backend.url())
}

fn certificate_yaml(name: &str, snis: &[&str], leaf: &tls::Leaf) -> String {
    let indent = |pem: &str| pem.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n");
    format!(
        "  - name: {name}\n    snis: [{}]\n    cert: |\n{}\n    key: |\n{}\n",
        snis.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "),
        indent(&leaf.cert_pem),
        indent(&leaf.key_pem)
    )
}

fn tls_addr(g: &Gateway) -> SocketAddr {
    g.tls_addr.expect("the TLS listener listens")
}

#[tokio::test]
async fn sni_picks_the_certificate_exact_before_wildcard_and_the_default_otherwise() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let wild = tls::leaf(&ca, "wild", &["*.example.test"], ServerAuth);
    let exact = tls::leaf(&ca, "api", &["api.example.test"], ServerAuth);
    let yaml = format!(
        "{}certificates:\n{}{}",
        echo_route(&backend),
        certificate_yaml("wild", &["*.example.test"], &wild),
        certificate_yaml("api", &["api.example.test"], &exact)
    );
    let g = gateway_with(&yaml, tls_options(Some(&default)));
    let addr = tls_addr(&g);

    let s = connect(addr, "www.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&s), wild.cert_der, "a wildcard name gets the wildcard certificate");
    let s = connect(addr, "api.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&s), exact.cert_der, "an exact name beats the wildcard");
    let s = connect(addr, "default.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&s), default.cert_der, "a name no entity lists gets the default certificate");
    // A wildcard covers one label only, as the certificate itself does.
    let refused = connect(addr, "a.b.example.test", &ca, &[], None, false).await;
    assert!(refused.is_err(), "two labels under a wildcard get the default certificate, which does not name them");

    // The handshake goes on to the same serving as plain connections.
    let mut send = h1(connect(addr, "api.example.test", &ca, &[b"http/1.1"], None, false).await.unwrap()).await;
    let (status, echo) = h1_get(&mut send, "api.example.test", "/hello").await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["headers"]["x-forwarded-proto"], json!(["https"]), "the backend is told the client used TLS");

    assert!(metric(g.admin_addr, "manifold_tls_handshakes_total", &[]).await >= 4.0);
    assert!(metric(g.admin_addr, "manifold_tls_handshake_failures_total", &[]).await >= 1.0);
    for name in ["wild", "api", "--tls-cert"] {
        let days = metric(g.admin_addr, "manifold_tls_certificate_expiry_days", &[("certificate", name)]).await;
        assert!(days > 300.0, "{name}: rcgen's certificates last years, got {days} days");
    }
    g.shutdown();
}

#[tokio::test]
async fn an_unknown_name_without_a_default_certificate_fails_the_handshake() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let leaf = tls::leaf(&ca, "api", &["api.example.test"], ServerAuth);
    let yaml = format!("{}certificates:\n{}", echo_route(&backend), certificate_yaml("api", &["api.example.test"], &leaf));
    // No tls_listen: a configured certificate opens the listener by itself
    // (on 8443 by default; this test names a free port to stay parallel).
    let g = gateway_with(&yaml, tls_options(None));
    let addr = tls_addr(&g);
    assert!(connect(addr, "other.test", &ca, &[], None, false).await.is_err());
    assert!(connect(addr, "api.example.test", &ca, &[], None, false).await.is_ok(), "the listed name still works");
    assert_eq!(metric(g.admin_addr, "manifold_tls_handshake_failures_total", &[]).await, 1.0);
    // A node with no certificate and no TLS address has no TLS listener.
    let plain = gateway(&echo_route(&backend));
    assert!(plain.tls_addr.is_none());
    plain.shutdown();
    g.shutdown();
}

#[tokio::test]
async fn a_new_certificate_is_served_after_post_config_while_open_connections_keep_working() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let first = tls::leaf(&ca, "api", &["api.example.test"], ServerAuth);
    let second = tls::leaf(&ca, "api", &["api.example.test"], ServerAuth);
    let config =
        |leaf: &tls::Leaf| format!("{}certificates:\n{}", echo_route(&backend), certificate_yaml("api", &["api.example.test"], leaf));
    let g = gateway_with(&config(&first), tls_options(None));
    let addr = tls_addr(&g);

    let old = connect(addr, "api.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&old), first.cert_der);
    let mut old = h1(old).await;
    assert_eq!(h1_get(&mut old, "api.example.test", "/before").await.0, 200);

    let resp = client()
        .post(format!("http://{}/config", g.admin_addr))
        .header("content-type", "application/yaml")
        .body(config(&second))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    let new = connect(addr, "api.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&new), second.cert_der, "a new connection gets the new certificate, without a restart");
    let (status, echo) = h1_get(&mut old, "api.example.test", "/after").await;
    assert_eq!((status, echo["path"].as_str()), (200, Some("/after")), "the connection opened before the swap still serves");
    g.shutdown();
}

/// rustls clients cannot offer TLS 1.1, so the ClientHello is written by
/// hand: legacy version 1.1 (0x0302), no supported_versions extension.
/// It does list signature algorithms, which rustls asks for before it
/// looks at the version, so that the version is what gets refused.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, RSA-AES128-SHA
    body.extend([0x01, 0x00]); // null compression
                               // extensions: signature_algorithms (13) with ecdsa_secp256r1_sha256,
                               // rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    body.extend([0x00, 0x0c, 0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    let mut handshake = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, (handshake.len() >> 8) as u8, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_and_tls_1_1_is_refused() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let g = gateway_with(&echo_route(&backend), tls_options(Some(&default)));
    let addr = tls_addr(&g);
    let v13 = connect(addr, "default.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(v13.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let v12 = connect(addr, "default.test", &ca, &[], None, true).await.unwrap();
    assert_eq!(v12.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));

    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&tls11_client_hello()).await.unwrap();
    let mut answer = [0u8; 7];
    within(10, "the answer to a TLS 1.1 hello", raw.read_exact(&mut answer)).await.unwrap();
    assert_eq!(answer[0], 0x15, "an alert record, not a ServerHello: {answer:?}");
    assert_eq!(&answer[5..], &[2, 70], "a fatal protocol_version alert");
    assert_eq!(
        manifold::server::tls::PROTOCOL_VERSIONS.iter().map(|v| v.version).collect::<Vec<_>>(),
        [rustls::ProtocolVersion::TLSv1_3, rustls::ProtocolVersion::TLSv1_2]
    );
    g.shutdown();
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http2_requests_are_served_over_tls() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let mut opts = tls_options(Some(&default));
    // An open client HTTP/2 connection holds the drain to its end: not
    // this test's subject (see the rapid-reset test).
    opts.server.drain_timeout = std::time::Duration::from_secs(1);
    let g = gateway_with(&echo_route(&backend), opts);
    let addr = tls_addr(&g);

    let h1_only = connect(addr, "default.test", &ca, &[b"http/1.1"], None, false).await.unwrap();
    assert_eq!(h1_only.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    let stream = connect(addr, "default.test", &ca, &[b"h2", b"http/1.1"], None, false).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 is preferred when offered");
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("https://default.test/h2/{i}")).body(Empty::<Bytes>::new()).unwrap();
        let resp = within(10, "an HTTP/2 request", send.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let echo: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(echo["path"], format!("/h2/{i}"));
        assert_eq!(echo["headers"]["x-forwarded-proto"], json!(["https"]));
    }
    g.shutdown();
}

#[tokio::test]
async fn https_redirect_sends_plain_requests_to_https_and_serves_tls_ones() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let yaml = format!(
        "{}    policies: [to-https]\npolicies:\n  - name: to-https\n    type: https-redirect\n    config: {{ status: 308 }}\n",
        echo_route(&backend)
    );
    let g = gateway_with(&yaml, tls_options(Some(&default)));
    let (status, _) = proxy_get(&g, "/x", &[]).await;
    assert_eq!(status, 308, "plain HTTP is redirected");
    // A client's own X-Forwarded-Proto over plain HTTP is not believed.
    assert_eq!(proxy_get(&g, "/x", &[("x-forwarded-proto", "https")]).await.0, 308);
    let mut send = h1(connect(tls_addr(&g), "default.test", &ca, &[], None, false).await.unwrap()).await;
    let (status, echo) = h1_get(&mut send, "default.test", "/x").await;
    assert_eq!(status, 200, "over TLS there is nothing to redirect, with no trusted proxy");
    assert_eq!(echo["headers"]["x-forwarded-proto"], json!(["https"]));
    g.shutdown();
}

fn config_errors(yaml: &str) -> Vec<(String, String)> {
    match manifold::config::load::config_from_text(yaml, manifold::config::Format::Yaml) {
        Ok(_) => vec![],
        Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

#[test]
fn a_mismatched_key_overlapping_names_and_bad_pem_are_errors_at_their_fields() {
    let ca = tls::ca("edge test ca");
    let a = tls::leaf(&ca, "a", &["a.test"], ServerAuth);
    let b = tls::leaf(&ca, "b", &["b.test"], ServerAuth);
    let mut mismatched = tls::leaf(&ca, "c", &["c.test"], ServerAuth);
    mismatched.key_pem = a.key_pem.clone();
    let mut garbled = tls::leaf(&ca, "d", &["d.test"], ServerAuth);
    garbled.cert_pem = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into();
    let yaml = format!(
        "certificates:\n{}{}{}{}",
        certificate_yaml("a", &["a.test", "*.shared.test"], &a),
        certificate_yaml("b", &["B.test", "*.shared.test"], &b),
        certificate_yaml("c", &["c.test"], &mismatched),
        certificate_yaml("d", &["d.test"], &garbled),
    );
    let errors = config_errors(&yaml);
    let at = |path: &str| errors.iter().find(|(p, _)| p == path).map(|(_, m)| m.clone());
    assert!(at("certificates.b.snis[1]").is_some_and(|m| m.contains("already served by certificate \"a\"")), "{errors:?}");
    assert!(at("certificates.c.key").is_some_and(|m| m.contains("does not belong")), "{errors:?}");
    assert!(at("certificates.d.cert").is_some(), "{errors:?}");
    assert_eq!(errors.len(), 3, "b.test and B.test are one name only across certificates, not within b: {errors:?}");
    // Exact names overlapping across certificates too, and a missing key.
    let yaml = format!(
        "certificates:\n{}{}  - name: nokey\n    snis: [n.test]\n    cert: |\n{}\n",
        certificate_yaml("a", &["a.test"], &a),
        certificate_yaml("b", &["A.TEST"], &b),
        a.cert_pem.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
    );
    let errors = config_errors(&yaml);
    assert!(errors.iter().any(|(p, _)| p == "certificates.b.snis[0]"), "{errors:?}");
    assert!(errors.iter().any(|(p, m)| p == "certificates.nokey.key" && m.contains("missing")), "{errors:?}");
}

#[test]
fn an_expired_certificate_is_a_warning() {
    let ca = tls::ca("edge test ca");
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let old = tls::Leaf { cert_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem(), key_der: key.serialize_der() };
    let yaml = format!("certificates:\n{}", certificate_yaml("old", &["old.test"], &old));
    let config = manifold::config::load::config_from_text(&yaml, manifold::config::Format::Yaml).expect("expired is not an error");
    let warnings = manifold::config::validate::warnings(&config);
    assert!(warnings.iter().any(|w| w.path == "certificates.old.cert" && w.message.contains("expired")), "{warnings:?}");
}

#[tokio::test]
async fn admin_reads_show_the_key_digest_never_the_key_and_export_with_secrets_round_trips_it() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let leaf = tls::leaf(&ca, "api.example.test", &["api.example.test"], ServerAuth);
    let yaml = format!("{}certificates:\n{}", echo_route(&backend), certificate_yaml("api", &["api.example.test"], &leaf));
    let g = gateway_with(&yaml, tls_options(None));
    let admin = format!("http://{}", g.admin_addr);
    let key_body = leaf.key_pem.lines().nth(1).unwrap().to_string();

    let (status, _, one) = send("GET", &format!("{admin}/certificates/api"), None, &[]).await;
    assert_eq!(status, 200);
    assert!(one.get("key").is_none(), "{one}");
    assert_eq!(one["key_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(one["details"]["subject"], "CN=api.example.test");
    assert_eq!(one["details"]["sans"], json!(["api.example.test"]));
    assert!(one["details"]["not_after"].as_str().is_some_and(|t| t.ends_with('Z')));
    for url in [format!("{admin}/certificates"), format!("{admin}/config")] {
        let text = client().get(&url).send().await.unwrap().text().await.unwrap();
        assert!(!text.contains(&key_body) && !text.contains("PRIVATE KEY"), "{url} shows the key");
    }
    let yaml_read = client().get(format!("{admin}/config")).header("accept", "application/yaml").send().await.unwrap();
    assert!(!yaml_read.text().await.unwrap().contains("PRIVATE KEY"));

    // export --include-secrets reads GET /config?include_secrets=true.
    let full = manifold::remote::export(Some(&admin), None, None, true).await.unwrap();
    let parsed = manifold::config::load::config_from_text(&full, manifold::config::Format::Yaml).unwrap();
    assert_eq!(parsed.certificates[0].key.as_deref(), Some(leaf.key_pem.as_str()), "the export holds the key");
    let plain = manifold::remote::export(Some(&admin), None, None, false).await.unwrap();
    assert!(!plain.contains("PRIVATE KEY"));

    // An export without keys, posted back, keeps the keys the node holds
    // (its key_sha256 names them); a digest it does not hold is an error.
    let resp =
        client().post(format!("{admin}/config")).header("content-type", "application/yaml").body(plain.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let s = connect(tls_addr(&g), "api.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&s), leaf.cert_der);
    let wrong = plain.replace(one["key_sha256"].as_str().unwrap(), &"0".repeat(64));
    let resp = client().post(format!("{admin}/config")).header("content-type", "application/yaml").body(wrong).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["fields"]["certificates.api.key"].as_str().is_some_and(|m| m.contains("key_sha256")), "{body}");

    // The full export rebuilds a node elsewhere.
    let other = gateway_with(&full, tls_options(None));
    let s = connect(tls_addr(&other), "api.example.test", &ca, &[], None, false).await.unwrap();
    assert_eq!(served(&s), leaf.cert_der);
    other.shutdown();
    g.shutdown();
}

fn mtls_config(backend: &Backend, client_ca: &tls::Ca, anonymous: bool) -> String {
    let ca = client_ca.pem.lines().map(|l| format!("        {l}")).collect::<Vec<_>>().join("\n");
    let anon = if anonymous { "      anonymous: guest\n" } else { "" };
    format!(
        "{}    policies: [clients]\npolicies:\n  - name: clients\n    type: mtls-auth\n    config:\n{anon}      ca: |\n{ca}\n\
         consumers:\n  - name: mobile-app\n    credentials:\n      - {{ type: mtls, subject: \"CN=mobile-app\" }}\n\
         \x20 - name: billing\n    credentials:\n      - {{ type: mtls, san: \"spiffe://example.test/billing\" }}\n  - name: guest\n",
        echo_route(backend)
    )
}

#[tokio::test]
async fn mtls_auth_maps_a_verified_client_certificate_to_its_consumer_and_refuses_others() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let clients = tls::ca("client ca");
    let stranger_ca = tls::ca("another ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let g = gateway_with(&mtls_config(&backend, &clients, false), tls_options(Some(&default)));
    let addr = tls_addr(&g);
    let get = |identity: Option<tls::Leaf>| {
        let ca = &ca;
        async move {
            let stream = connect(addr, "default.test", ca, &[], identity.as_ref().map(Identity), false).await.unwrap();
            h1_get(&mut h1(stream).await, "default.test", "/who").await
        }
    };

    let mobile = tls::leaf(&clients, "mobile-app", &[], ClientAuth);
    let (status, echo) = get(Some(mobile)).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], json!(["mobile-app"]));

    // A SAN credential: a SPIFFE ID as a URI name.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "billing-7f9c");
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://example.test/billing".try_into().unwrap())];
    params.extended_key_usages = vec![ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &clients.issuer).unwrap();
    let billing =
        tls::Leaf { cert_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem(), key_der: key.serialize_der() };
    let (status, echo) = get(Some(billing)).await;
    assert_eq!((status, &echo["headers"]["x-consumer-name"]), (200, &json!(["billing"])));

    let (status, body) = get(None).await;
    assert_eq!(status, 401, "no certificate");
    assert_eq!(body["error"]["code"], "unauthorized");
    // Another CA's certificate with the same subject: the handshake passes
    // (the listener only asks), the policy refuses it like a wrong key.
    let impostor = tls::leaf(&stranger_ca, "mobile-app", &[], ClientAuth);
    let (status, body) = get(Some(impostor)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    // A trusted certificate nobody holds.
    let unknown = tls::leaf(&clients, "someone-else", &[], ClientAuth);
    assert_eq!(get(Some(unknown)).await.0, 401);
    // Plain HTTP has no client certificate at all.
    assert_eq!(proxy_get(&g, "/who", &[]).await.0, 401);
    let before = backend.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, 2, "refused requests never reach the backend");
    g.shutdown();

    // anonymous: a request without a certificate is the guest's.
    let g = gateway_with(&mtls_config(&backend, &clients, true), tls_options(Some(&default)));
    let addr = tls_addr(&g);
    let stream = connect(addr, "default.test", &ca, &[], None, false).await.unwrap();
    let (status, echo) = h1_get(&mut h1(stream).await, "default.test", "/who").await;
    assert_eq!((status, &echo["headers"]["x-consumer-name"]), (200, &json!(["guest"])));
    g.shutdown();
}

/// A raw HTTP/2 client opens streams and resets each at once (HEADERS then
/// RST_STREAM), the rapid-reset flood of CVE-2023-44487.
async fn rapid_reset(addr: SocketAddr, streams: usize) -> (usize, Result<(), h2::Error>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    let mut client = Some(client);
    while let Some(ready) = client.take().filter(|_| sent < streams && !conn.is_finished()) {
        let Ok(mut ready) = ready.ready().await else { break };
        let req = http::Request::get(format!("http://flood.test/flood/{sent}")).body(()).unwrap();
        match ready.send_request(req, false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
        client = Some(ready);
        sent += 1;
        if sent % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    drop(client);
    (sent, within(10, "the flooding connection to end", conn).await.unwrap())
}

#[tokio::test]
async fn a_rapid_reset_flood_is_closed_with_goaway_and_the_node_keeps_serving() {
    let backend = backend().run().await;
    let ca = tls::ca("edge test ca");
    let default = tls::leaf(&ca, "default.test", &["default.test"], ServerAuth);
    let mut opts = tls_options(Some(&default));
    // An open client HTTP/2 connection holds the drain to its end (hyper
    // waits for the client to close after its GOAWAY): not this test's
    // subject.
    opts.server.drain_timeout = std::time::Duration::from_secs(1);
    let g = gateway_with(&echo_route(&backend), opts);

    // h2c (prior knowledge) on the plain listener.
    let (sent, ended) = rapid_reset(g.proxy_addr, 100_000).await;
    let err = ended.expect_err("the gateway ends the flooding connection");
    // The GOAWAY, or, when the client was still writing as the gateway
    // closed, the broken pipe it met before reading the GOAWAY.
    assert!(err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(), "{err}");
    assert!(sent < 100_000, "closed before the client was done ({sent} streams)");

    // Other clients, over both listeners, are served all along.
    assert_eq!(proxy_get(&g, "/after", &[]).await.0, 200);
    let stream = connect(tls_addr(&g), "default.test", &ca, &[b"h2"], None, false).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://default.test/after-h2").body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(within(10, "h2 after the flood", send.send_request(req)).await.unwrap().status(), 200);
    g.shutdown();
}

#[tokio::test]
async fn http2_limits_are_the_configured_ones() {
    let backend = backend().run().await;
    let mut opts = GatewayOptions::default();
    opts.server.http2.max_concurrent_streams = 3;
    let g = gateway_with(&echo_route(&backend), opts);
    let tcp = TcpStream::connect(g.proxy_addr).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let req = http::Request::get("http://limits.test/one").body(()).unwrap();
    let (resp, _) = client.ready().await.unwrap().send_request(req, true).unwrap();
    // The server's SETTINGS have arrived once its first answer has.
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        c = &mut conn => panic!("the connection ended first: {c:?}"),
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(conn.max_concurrent_send_streams(), 3, "the server's SETTINGS_MAX_CONCURRENT_STREAMS");
    // Closed before the drain, which would wait for it.
    drop(conn);
    g.shutdown();
}

#[tokio::test]
async fn a_tls_address_another_process_listens_on_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut opts = GatewayOptions::default();
    opts.server.tls_listen = Some(taken.local_addr().unwrap());
    let config = manifold::config::Config::default();
    let err = Gateway::start(opts, config).err().expect("the start fails");
    let text = format!("{err:#}");
    assert!(text.contains(&format!("cannot listen on {} for TLS", taken.local_addr().unwrap())), "{text}");
    assert!(text.contains("in use by another process"), "{text}");
}
