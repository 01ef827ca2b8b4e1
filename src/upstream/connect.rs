//! Opening a connection to a backend: TCP (no delay, keep-alive probes),
//! then TLS for `https://` with rustls, with SNI and a client certificate
//! when set. The node's connector verifies against the system's roots plus
//! the node-wide CA file; an upstream with a `tls` block has its own
//! connector (its CA file instead of the system's roots, its server name,
//! its client certificate, or no verification).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http::uri::Authority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::error::{Cause, UpstreamError};

/// Node-wide TLS to backends (flags `--upstream-ca-file`,
/// `--upstream-client-cert`, `--upstream-client-key`). The per-upstream
/// `tls` block of SPEC §6 comes with the `upstreams` entity.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM certificates trusted beside the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain presented to backends that ask for one.
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// How connections are opened: the node's one, shared by every worker's
/// pool, and one per upstream with a `tls` block (built with its config).
pub struct Connector {
    /// Unique in the process: pooled connections are kept per connector,
    /// so two connectors (other client certificates, other trust) never
    /// share one to the same host and port.
    id: u64,
    tls: Arc<rustls::ClientConfig>,
    /// The same, offering only `h2` (ALPN): upstreams with `http2: true`.
    tls_h2: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and verified, instead of the target's host.
    server_name: Option<ServerName<'static>>,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("id", &self.id).field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Default wait for a TCP connection and for a TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An upstream's `tls` block, its files' paths as written; errors name the
/// field under `base` (`upstreams.NAME.tls`).
pub struct UpstreamTlsOptions<'a> {
    pub base: &'a str,
    pub verify: bool,
    pub ca_file: Option<&'a str>,
    pub server_name: Option<&'a str>,
    pub client_cert_file: Option<&'a str>,
    pub client_key_file: Option<&'a str>,
}

impl Connector {
    /// Reads the roots and the client certificate once; an unreadable or
    /// invalid file is an error naming its flag.
    pub fn new(opts: &TlsOptions) -> anyhow::Result<Connector> {
        let mut roots = rustls::RootCertStore::empty();
        // The system's store (and SSL_CERT_FILE / SSL_CERT_DIR). Certificates
        // it cannot parse are skipped, as curl and Go skip them.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &opts.ca_file {
            let certs = read_certs(path).with_context(|| format!("--upstream-ca-file {}", path.display()))?;
            for cert in certs {
                roots.add(cert).with_context(|| format!("--upstream-ca-file {}: not a usable CA certificate", path.display()))?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS to backends")?
            .with_root_certificates(roots);
        let config = match (&opts.client_cert_file, &opts.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert).with_context(|| format!("--upstream-client-cert {}", cert.display()))?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("--upstream-client-key {}: no PEM private key", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .context("--upstream-client-cert and --upstream-client-key do not make a usable pair")?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => anyhow::bail!("--upstream-client-cert and --upstream-client-key must be given together"),
        };
        let (tls, tls_h2) = with_alpn(config);
        Ok(Connector { id: next_id(), tls, tls_h2, server_name: None, connect_timeout: DEFAULT_CONNECT_TIMEOUT })
    }

    /// An upstream's own connector: its CA file trusted instead of the
    /// system's roots, its server name, its client certificate, or (with
    /// `verify: false`) any certificate, the handshake's signatures still
    /// checked. Files are read now; an error is `(field path, message)`.
    pub fn for_upstream(opts: &UpstreamTlsOptions<'_>, connect_timeout: Duration) -> Result<Connector, (String, String)> {
        let field = |name: &str| format!("{}.{name}", opts.base);
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| (opts.base.to_string(), format!("TLS to backends: {e}")))?;
        let builder = if !opts.verify {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match opts.ca_file {
                Some(path) => {
                    let certs = read_certs(std::path::Path::new(path)).map_err(|e| (field("ca_file"), format!("{path}: {e:#}")))?;
                    for cert in certs {
                        roots.add(cert).map_err(|e| (field("ca_file"), format!("{path}: not a usable CA certificate: {e}")))?;
                    }
                }
                None => {
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                }
            }
            builder.with_root_certificates(roots)
        };
        let config = match (opts.client_cert_file, opts.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(std::path::Path::new(cert)).map_err(|e| (field("client_cert_file"), format!("{cert}: {e:#}")))?;
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| (field("client_key_file"), format!("{key}: no PEM private key: {e}")))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    (field("client_key_file"), format!("client_cert_file and client_key_file do not make a usable pair: {e}"))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        let (tls, tls_h2) = with_alpn(config);
        let server_name = match opts.server_name {
            Some(name) => Some(
                ServerName::try_from(name.to_string())
                    .map_err(|_| (field("server_name"), format!("{name:?} is not a name TLS can verify")))?,
            ),
            None => None,
        };
        Ok(Connector { id: next_id(), tls, tls_h2, server_name, connect_timeout })
    }

    /// The same trust and client certificate, sending and verifying `name`
    /// (a resolved address of an https target whose name it is); `None`
    /// when `name` is not one TLS can verify. A connector of its own, so
    /// its pooled connections are kept apart.
    pub fn with_server_name(&self, name: &str) -> Option<Connector> {
        let server_name = ServerName::try_from(name.trim_start_matches('[').trim_end_matches(']').to_string()).ok()?;
        Some(Connector {
            id: next_id(),
            tls: self.tls.clone(),
            tls_h2: self.tls_h2.clone(),
            server_name: Some(server_name),
            connect_timeout: self.connect_timeout,
        })
    }

    /// Whether this connector sends a server name of its own (`tls.server_name`).
    pub fn has_server_name(&self) -> bool {
        self.server_name.is_some()
    }

    /// Unique per connector in the process: what the pool keys on.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A new connection to `authority`, over TLS when `tls`.
    pub async fn connect(&self, tls: bool, authority: &Authority) -> Result<Stream, UpstreamError> {
        self.connect_within(tls, authority, self.connect_timeout).await
    }

    /// [`Connector::connect`] with another connect timeout (an upstream's
    /// `connect_timeout` on the node's connector).
    pub async fn connect_within(&self, tls: bool, authority: &Authority, connect_timeout: Duration) -> Result<Stream, UpstreamError> {
        self.open(tls, authority, connect_timeout, &self.tls).await
    }

    /// A new connection for HTTP/2: over TLS the backend must choose `h2`
    /// (ALPN); over plain TCP HTTP/2 is spoken with prior knowledge.
    pub async fn connect_h2(&self, tls: bool, authority: &Authority, connect_timeout: Duration) -> Result<Stream, UpstreamError> {
        let stream = self.open(tls, authority, connect_timeout, &self.tls_h2).await?;
        if let Stream::Tls(s) = &stream {
            if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(UpstreamError::new(Cause::Protocol, format!("{authority} does not offer HTTP/2 over TLS (ALPN h2)")).unsent());
            }
        }
        Ok(stream)
    }

    async fn open(
        &self,
        tls: bool,
        authority: &Authority,
        connect_timeout: Duration,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<Stream, UpstreamError> {
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect((bare, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::new(Cause::Connect, format!("connect to {authority}: {e}")).unsent()),
            Err(_) => {
                return Err(UpstreamError::new(Cause::Connect, format!("connect to {authority}: no answer in {connect_timeout:?}")).unsent())
            }
        };
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)));
        if !tls {
            return Ok(Stream::Plain(tcp));
        }
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(bare.to_string())
                .map_err(|_| UpstreamError::new(Cause::Tls, format!("{host} is not a name TLS can verify")).unsent())?,
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match tokio::time::timeout(connect_timeout, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            // The target offers none of our protocols (ALPN): it does not
            // speak what its upstream says (`http2: true` to an HTTP/1.1
            // server), a protocol mismatch rather than a TLS problem.
            Ok(Err(e)) if no_common_protocol(&e) => Err(UpstreamError::new(
                Cause::Protocol,
                format!("TLS with {authority}: the target offers none of {:?} (ALPN)", alpn_names(config)),
            )
            .unsent()),
            Ok(Err(e)) => Err(UpstreamError::new(Cause::Tls, format!("TLS with {authority}: {}", super::error::chain(&e))).unsent()),
            Err(_) => Err(UpstreamError::new(Cause::Tls, format!("TLS with {authority}: no handshake in {connect_timeout:?}")).unsent()),
        }
    }
}

/// `tls.verify: false`: any certificate chain is accepted, but the
/// handshake's signatures are still checked with the provider's
/// algorithms, so the peer must hold the key of the certificate it sent.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether a handshake failed because the server takes none of the ALPN
/// protocols offered (its `no_application_protocol` alert).
fn no_common_protocol(e: &io::Error) -> bool {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(|r| {
        matches!(r, rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) | rustls::Error::NoApplicationProtocol)
    })
}

fn alpn_names(config: &rustls::ClientConfig) -> Vec<String> {
    config.alpn_protocols.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
}

/// The config as HTTP/1.1 connections use it (ALPN `http/1.1`), and a copy
/// offering only `h2`.
fn with_alpn(mut config: rustls::ClientConfig) -> (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>) {
    let mut h2 = config.clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(config), Arc::new(h2))
}

fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate in the file");
    Ok(certs)
}

/// A backend connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether a pooled connection still looks usable: nothing to read and
    /// not closed. A non-blocking read, no task per idle connection
    /// (pingora's test before reuse). A byte waiting is as bad as a close:
    /// an idle backend has nothing to say.
    pub fn is_reusable(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self {
            Stream::Plain(s) => matches!(s.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            Stream::Tls(s) => {
                // A TLS 1.3 session ticket may wait unread; rustls takes it
                // in this poll and reports no data.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut byte);
                matches!(Pin::new(s.as_mut()).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
