//! TLS fixtures shared by the https tests: CAs and certificates made with
//! rcgen, and an https backend (rustls with ring, hyper) on a real socket.
//! Included with `#[path]` by the test files that need it, so the others
//! do not compile it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
}

pub fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key) }
}

/// An end-entity certificate, with its private key.
pub struct Leaf {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn leaf_params(common_name: &str, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params
}

/// A certificate for `names` signed by `ca`.
pub fn leaf(ca: &Ca, common_name: &str, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> Leaf {
    let mut params = leaf_params(common_name, names, purpose);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf { cert_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem(), key_der: key.serialize_der() }
}

/// A self-signed server certificate for `names`, trusted by nobody.
pub fn self_signed(names: &[&str]) -> Leaf {
    let params = leaf_params(names[0], names, ExtendedKeyUsagePurpose::ServerAuth);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Leaf { cert_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem(), key_der: key.serialize_der() }
}

pub struct TlsBackend {
    pub port: u16,
    /// TCP connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Requests answered (over completed handshakes).
    pub answered: Arc<AtomicUsize>,
}

impl TlsBackend {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

/// An https backend with the certificate `server` answering `{"tls":
/// true}`. With `client_ca` it requires a client certificate signed by it;
/// a client certificate found in `clients` adds `"client": its name` to the
/// answer (which connection's certificate served the request).
pub async fn tls_backend(server: &Leaf, client_ca: Option<&Ca>, clients: Vec<(String, CertificateDer<'static>)>) -> TlsBackend {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = if let Some(client_ca) = client_ca {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.der.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(vec![server.cert_der.clone()], server.key()).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let clients = Arc::new(clients);

    let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = v4.local_addr().unwrap().port();
    // `localhost` may resolve to ::1 first elsewhere: listen there too when
    // the same port is free.
    let v6 = tokio::net::TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await.ok();
    let conns = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    for listener in std::iter::once(v4).chain(v6) {
        let (acceptor, conns, answered, clients) = (acceptor.clone(), conns.clone(), answered.clone(), clients.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                let (acceptor, answered, clients) = (acceptor.clone(), answered.clone(), clients.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                    let client = peer.and_then(|p| clients.iter().find(|(_, der)| *der == p).map(|(n, _)| n.clone()));
                    let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                        answered.fetch_add(1, Ordering::SeqCst);
                        let body = match &client {
                            Some(name) => json!({"tls": true, "client": name}),
                            None => json!({"tls": true}),
                        };
                        async move {
                            let mut resp = http::Response::new(Full::new(Bytes::from(body.to_string())));
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
                });
            }
        });
    }
    TlsBackend { port, conns, answered }
}
