//! The proxy's TLS listener (SPEC §7): rustls, TLS 1.2 and 1.3 only, in
//! front of the same connection serving as plain connections (same worker
//! runtimes, `conn_io` timers and handler). The certificate is chosen by SNI
//! from the snapshot the handshake starts on, so a config change swaps
//! certificates for new connections while open ones keep theirs. What the
//! handshake learnt (that it happened, the client's certificate) reaches the
//! handler as a [`TlsConn`] in every request's extensions.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::handler::ConnService;
use super::Shared;

/// What a request's connection did in its TLS handshake.
#[derive(Debug, Default)]
pub struct TlsConn {
    /// The client's certificate chain (its own first), when it sent one.
    /// Only checked to belong to the client (it signed the handshake):
    /// each `mtls-auth` policy verifies it against its own CAs.
    pub client_chain: Option<Vec<CertificateDer<'static>>>,
}

/// The two server configs a handshake may use: one that asks clients for
/// a certificate (some policy of the running config reads it) and one
/// that does not (browsers may prompt their user when asked).
pub struct TlsAcceptors {
    plain: TlsAcceptor,
    asking: TlsAcceptor,
}

impl TlsAcceptors {
    pub fn new(shared: Arc<Shared>) -> Result<Arc<TlsAcceptors>, rustls::Error> {
        let resolver = Arc::new(SniResolver { shared });
        let build = |ask: bool| -> Result<TlsAcceptor, rustls::Error> {
            let provider = crate::certs::provider();
            let algorithms = provider.signature_verification_algorithms;
            let builder = ServerConfig::builder_with_provider(provider).with_protocol_versions(PROTOCOL_VERSIONS)?;
            let mut config = if ask {
                builder.with_client_cert_verifier(Arc::new(AskForClientCert { algorithms })).with_cert_resolver(resolver.clone())
            } else {
                builder.with_no_client_auth().with_cert_resolver(resolver.clone())
            };
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Arc::new(TlsAcceptors { plain: build(false)?, asking: build(true)? }))
    }

    /// The handshake of one accepted connection, within `timeout`; counted
    /// in the node's metrics either way.
    pub async fn handshake(
        &self,
        shared: &Shared,
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<(TlsStream<TcpStream>, Arc<TlsConn>)> {
        let acceptor = if shared.snapshot.load().wants_client_cert { &self.asking } else { &self.plain };
        let metrics = &shared.services.metrics;
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                metrics.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                let client_chain = stream.get_ref().1.peer_certificates().map(|c| c.to_vec());
                Some((stream, Arc::new(TlsConn { client_chain })))
            }
            Ok(Err(e)) => {
                metrics.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                None
            }
            Err(_) => {
                metrics.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "TLS handshake not finished in time");
                None
            }
        }
    }
}

/// TLS 1.2 and 1.3 only (SPEC §7).
pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Accepts from the worker's TLS listener, or never when it has none.
pub async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Picks the certificate by SNI from the running snapshot: an exact name,
/// then a wildcard, then the default certificate (`--tls-cert`); none
/// fails the handshake.
struct SniResolver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.shared.snapshot.load();
        let found = hello.server_name().and_then(|name| snap.certificates.find(name));
        found.or(self.shared.tls_default.get()).map(|served| served.key.clone())
    }
}

/// Asks for a client certificate without requiring one, and accepts any
/// whose holder proves it has its key (the handshake signature is checked
/// as usual). Which CAs to trust is each `mtls-auth` policy's choice, so
/// the chain itself is verified there, per request.
#[derive(Debug)]
struct AskForClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AskForClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The connection's service with its [`TlsConn`] put in every request.
#[derive(Clone)]
pub struct WithTls {
    inner: ConnService,
    conn: Arc<TlsConn>,
}

impl WithTls {
    pub fn new(inner: ConnService, conn: Arc<TlsConn>) -> Self {
        WithTls { inner, conn }
    }
}

impl hyper::service::Service<Request<Incoming>> for WithTls {
    type Response = <ConnService as hyper::service::Service<Request<Incoming>>>::Response;
    type Error = <ConnService as hyper::service::Service<Request<Incoming>>>::Error;
    type Future = <ConnService as hyper::service::Service<Request<Incoming>>>::Future;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.conn.clone());
        self.inner.call(req)
    }
}

/// The served certificates' days to expiry, for `/metrics`.
pub fn record_expiry(shared: &Shared) {
    let m = &shared.services.metrics.certificate_expiry_days;
    m.reset();
    let now = crate::certs::now_unix();
    let snap = shared.snapshot.load();
    for served in shared.tls_default.get().into_iter().chain(snap.certificates.all.iter()) {
        m.with_label_values(&[served.name.as_str()]).set((served.not_after - now) as f64 / 86_400.0);
    }
}
