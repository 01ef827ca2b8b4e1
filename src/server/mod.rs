//! The proxy listener: one current-thread runtime per worker thread, each
//! with its own `SO_REUSEPORT` listener and its own backend client, so a
//! connection and the backend calls it makes never leave their thread
//! (PERFORMANCE.md). State shared between workers is behind `ArcSwap`.

pub mod conn_io;
pub mod handler;
pub mod head;
pub mod hygiene;
pub mod tls;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use socket2::{Domain, Socket, Type};
use tokio::sync::watch;

use crate::config::{Config, ConfigErrors};
use crate::snapshot::{self, Snapshot};
use conn_io::{ConnActivity, ConnTimeouts, TimedIo};
use hygiene::Limits;

/// State every worker and the admin API share.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Serializes config changes (never taken on the request path).
    pub reload_lock: tokio::sync::Mutex<()>,
    pub reloads: AtomicU64,
    pub started: Instant,
    pub node_id: String,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    /// Database mode: the store the admin API writes, and whether the
    /// node's last contact with it worked.
    pub store: Option<crate::store::Store>,
    pub db_reachable: std::sync::atomic::AtomicBool,
    /// The database the running config came from (`config_state.instance`).
    pub db_instance: std::sync::Mutex<Option<String>>,
    /// What policies keep beyond one config (Redis, JWK Sets).
    pub services: Arc<crate::policy::Services>,
    /// How backend connections are opened (TLS roots, client certificate).
    pub connector: Arc<crate::upstream::Connector>,
    /// The TLS listener's certificate for names no `certificates` entity
    /// serves (`--tls-cert`), set once at start.
    pub tls_default: std::sync::OnceLock<Arc<crate::certs::Served>>,
}

impl Shared {
    pub fn new(
        config: impl Into<crate::config::Validated>,
        version: u64,
        store: Option<crate::store::Store>,
        trusted_proxies: Vec<IpNet>,
        limits: Limits,
        services: Arc<crate::policy::Services>,
        connector: Arc<crate::upstream::Connector>,
    ) -> Result<Arc<Self>, ConfigErrors> {
        let snap = snapshot::compile(config, version, &services)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        services.metrics.last_reload.set(now);
        Ok(Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snap),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
            started: Instant::now(),
            node_id: crate::ids::new_uuid(),
            trusted_proxies,
            limits,
            store,
            db_reachable: std::sync::atomic::AtomicBool::new(false),
            db_instance: std::sync::Mutex::new(None),
            services,
            connector,
            tls_default: std::sync::OnceLock::new(),
        }))
    }

    /// Like [`Shared::replace_config`], at the version the database gave.
    pub fn replace_config_at(&self, config: Config, version: u64) -> Result<(), ConfigErrors> {
        self.install(snapshot::compile(config, version, &self.services)?);
        Ok(())
    }

    /// Compiles `config` and swaps it in whole. In-flight requests finish on
    /// the snapshot they started with.
    pub fn replace_config(&self, config: impl Into<crate::config::Validated>) -> Result<u64, ConfigErrors> {
        let version = self.snapshot.load().version + 1;
        self.install(snapshot::compile(config, version, &self.services)?);
        Ok(version)
    }

    fn install(&self, snap: Snapshot) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.services.metrics.last_reload.set(now);
        self.snapshot.store(Arc::new(snap));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.start_health_checks();
    }

    /// Starts the active checkers of the running config's targets that
    /// have none yet (a target kept from the last config keeps its own),
    /// and the resolvers of its upstreams with `resolve_every`.
    pub fn start_health_checks(&self) {
        let snap = self.snapshot.load();
        for plan in snap.upstreams.values() {
            self.services.health.start_background(plan);
        }
    }
}

/// Counts a client connection as open until dropped.
struct OpenConnection(Arc<crate::metrics::Metrics>);

impl OpenConnection {
    fn new(metrics: &Arc<crate::metrics::Metrics>) -> Self {
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub proxy_listen: SocketAddr,
    /// Worker threads, each with its own runtime and listener.
    pub workers: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Time to send a request head once it started (SPEC §2: 10 s).
    pub header_read_timeout: Duration,
    /// Time a connection may sit idle between requests (SPEC §2: 60 s).
    pub idle_timeout: Duration,
    /// The TLS listener's address when set (`--tls-listen`): it then
    /// listens even while no certificate is configured, so that the first
    /// one written later is served. Unset, it listens on
    /// [`DEFAULT_TLS_LISTEN`] when a certificate is configured at start.
    pub tls_listen: Option<SocketAddr>,
    /// The default certificate (`--tls-cert`, `--tls-key`), PEM.
    pub default_certificate: Option<DefaultCertificate>,
    /// HTTP/2 from clients (ALPN `h2` and h2c).
    pub http2: Http2Limits,
}

/// Limits of client HTTP/2 connections (SPEC §7).
#[derive(Clone, Copy, Debug)]
pub struct Http2Limits {
    /// Streams a client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Largest header list (decoded) a client may send.
    pub max_header_list_size: u32,
    /// Send a PING this often to find dead peers; `None`: never.
    pub keep_alive_interval: Option<Duration>,
    /// Close a connection whose PING is not answered within this.
    pub keep_alive_timeout: Duration,
    /// Streams a client may open and reset before the gateway took them;
    /// past it the connection is closed with GOAWAY (ENHANCE_YOUR_CALM):
    /// the rapid-reset flood, CVE-2023-44487.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the gateway may reset for a client's protocol errors before
    /// it closes the connection with GOAWAY.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            max_header_list_size: 96 << 10,
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(20),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

pub const DEFAULT_TLS_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8443);

/// The TLS listener's certificate for names no `certificates` entity
/// serves, and for clients that send no name.
#[derive(Clone)]
pub struct DefaultCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Never prints the key.
impl std::fmt::Debug for DefaultCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DefaultCertificate")
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            proxy_listen: ([127, 0, 0, 1], 0).into(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_listen: None,
            default_certificate: None,
            http2: Http2Limits::default(),
        }
    }
}

/// A running set of proxy workers.
pub struct ProxyServer {
    pub addr: SocketAddr,
    /// The TLS listener's address, when it listens.
    pub tls_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

/// What a bind that found the address taken says, so the error names the
/// likely cause instead of `Address in use (os error 98)`.
pub fn address_in_use(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        std::io::Error::new(e.kind(), "the address is in use by another process (is another gateway running?)")
    } else {
        e
    }
}

/// Fails with `AddrInUse` when another socket listens on `addr`.
///
/// The workers' listeners set `SO_REUSEPORT`, so a second gateway started
/// on the same port (as the same user) would silently share it, and
/// requests would alternate between two configs. The probe binds without
/// `SO_REUSEPORT`, which any listener on the port refuses. It does set
/// `SO_REUSEADDR`: on Linux that never lets a bind share a live listener,
/// and without it the TIME_WAIT connections of a gateway just restarted
/// would refuse the new one. The probe is closed before the workers bind
/// (its socket would refuse them): a process that takes the port in that
/// instant is not seen, a race accepted for a start-up check.
///
/// Port 0 is not probed: the kernel never picks, for a bind to port 0, a
/// port that a `SO_REUSEPORT` listener holds, and the first worker's bind
/// is what picks it.
fn probe_unused(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// Binds one listener per worker on the same address. Port 0 is resolved by
/// the first bind, so tests can ask for any free port.
fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<StdTcpListener>> {
    probe_unused(addr)?;
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: StdTcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The TLS listeners of the workers (one each, `SO_REUSEPORT`), with the
/// handshake configs they share.
pub struct TlsListeners {
    listeners: Vec<StdTcpListener>,
    acceptors: Arc<tls::TlsAcceptors>,
}

impl TlsListeners {
    /// Binds the TLS listener when it is asked for (`tls_listen`) or a
    /// certificate is configured; `None` otherwise.
    pub fn bind(opts: &ServerOptions, shared: &Arc<Shared>) -> std::io::Result<Option<TlsListeners>> {
        let configured = shared.tls_default.get().is_some() || !shared.snapshot.load().certificates.is_empty();
        let Some(addr) = opts.tls_listen.or(configured.then_some(DEFAULT_TLS_LISTEN)) else {
            return Ok(None);
        };
        let listeners = bind_reuseport(addr, opts.workers.max(1)).map_err(address_in_use)?;
        let acceptors = tls::TlsAcceptors::new(shared.clone()).map_err(std::io::Error::other)?;
        Ok(Some(TlsListeners { listeners, acceptors }))
    }

    /// Where it listens (port 0 resolved).
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners[0].local_addr()
    }
}

impl ProxyServer {
    pub fn start(opts: &ServerOptions, shared: Arc<Shared>) -> std::io::Result<ProxyServer> {
        Self::start_with_tls(opts, shared, None)
    }

    /// Like [`ProxyServer::start`]; each worker also serves its share of
    /// the TLS listener, when there is one.
    pub fn start_with_tls(opts: &ServerOptions, shared: Arc<Shared>, tls: Option<TlsListeners>) -> std::io::Result<ProxyServer> {
        let listeners = bind_reuseport(opts.proxy_listen, opts.workers.max(1)).map_err(address_in_use)?;
        let addr = listeners[0].local_addr()?;
        if conn_io::UNCHECKED_HEADS {
            tracing::error!(
                "built with MANIFOLD_BENCH_UNCHECKED_HEADS: request heads are NOT checked (a benchmark build, never to be deployed)"
            );
        }
        let tls_addr = tls.as_ref().map(TlsListeners::addr).transpose()?;
        let (acceptors, mut tls_listeners) = match tls {
            Some(t) => (Some(t.acceptors), t.listeners.into_iter().map(Some).collect()),
            None => (None, Vec::new()),
        };
        let (tx, rx) = watch::channel(false);
        let mut threads = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let rx = rx.clone();
            let opts = opts.clone();
            let tls = tls_listeners.get_mut(i).and_then(Option::take).zip(acceptors.clone());
            let thread = std::thread::Builder::new().name(format!("manifold-worker-{i}")).spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
                rt.block_on(worker(listener, tls, shared, opts, rx));
            })?;
            threads.push(thread);
        }
        Ok(ProxyServer { addr, tls_addr, shutdown: tx, threads })
    }

    /// Stops accepting and closes connections with no request in flight
    /// (idle, or part-way through a head); in-flight requests get the
    /// drain time to finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The allocator's "give freed pages back" call, set by the binary that
/// chose the allocator (main.rs: mimalloc's `mi_collect`).
static ALLOCATOR_COLLECT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Has every proxy worker call `collect` once a second on its own thread.
///
/// mimalloc hands freed pages back to the OS lazily, when the thread that
/// owns them next allocates: a worker that goes quiet after a burst (1,000
/// compositions at once open 3,000 backend connections) would hold its peak
/// memory for as long as it stays quiet. A periodic collect is cheaper than
/// `MIMALLOC_PURGE_DELAY=0` (a syscall per freed page on the request path).
pub fn set_allocator_collect(collect: fn()) {
    let _ = ALLOCATOR_COLLECT.set(collect);
}

/// Collects only while no request is in flight on the node: a busy worker
/// allocates, and mimalloc purges then on its own; a collect walks the
/// thread's heap, which a loaded event loop should not wait for.
async fn collect_allocator_pages(collect: fn(), metrics: Arc<crate::metrics::Metrics>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            collect();
        }
    }
}

async fn worker(
    listener: StdTcpListener,
    tls: Option<(StdTcpListener, Arc<tls::TlsAcceptors>)>,
    shared: Arc<Shared>,
    opts: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the proxy listener");
            return;
        }
    };
    let (tls_listener, acceptors) = match tls.map(|(l, a)| (tokio::net::TcpListener::from_std(l), a)) {
        Some((Ok(l), a)) => (Some(l), Some(a)),
        Some((Err(e), _)) => {
            tracing::error!(error = %e, "cannot use the TLS listener");
            (None, None)
        }
        None => (None, None),
    };
    let tls_shared = shared.clone();
    let shared_metrics = shared.services.metrics.clone();
    let client = handler::Worker::new(shared);
    if let Some(collect) = ALLOCATOR_COLLECT.get() {
        tokio::spawn(collect_allocator_pages(*collect, shared_metrics.clone()));
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // conn_io.rs times head reads and idle connections apart; hyper's
        // timer would cut idle keep-alive connections at the head timeout.
        .header_read_timeout(None)
        // Our own limits (hygiene.rs) answer with JSON below these; hyper's
        // are the backstop for what cannot even be parsed.
        .max_headers(256)
        .max_buf_size(128 << 10);
    let h2 = opts.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(h2.max_header_list_size)
        .max_concurrent_streams(h2.max_concurrent_streams)
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams);
    // WebSocket over HTTP/2 (RFC 8441), for routes with `websocket: true`.
    builder.http2().enable_connect_protocol();
    let timeouts = ConnTimeouts { header_read: opts.header_read_timeout, idle: opts.idle_timeout };
    let graceful = GracefulShutdown::new();
    let closing = Arc::new(AtomicBool::new(false));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let activity = Arc::new(ConnActivity::default());
                    let svc = client.service(peer, activity.clone());
                    let io = TimedIo::new(stream, activity, timeouts, closing.clone());
                    // With upgrades: a route with `websocket: true` tunnels one.
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned();
                    let conn = graceful.watch(conn);
                    let open = OpenConnection::new(&shared_metrics);
                    tokio::spawn(async move {
                        let _open = open;
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // The same serving as above, after a handshake on the
            // connection's own task.
            accepted = tls::accept(tls_listener.as_ref()) => match (accepted, acceptors.clone()) {
                (Ok((stream, peer)), Some(acceptors)) => {
                    let _ = stream.set_nodelay(true);
                    let activity = Arc::new(ConnActivity::default());
                    let svc = client.service(peer, activity.clone());
                    let (builder, watcher, closing, shared) = (builder.clone(), graceful.watcher(), closing.clone(), tls_shared.clone());
                    let open = OpenConnection::new(&shared_metrics);
                    tokio::spawn(async move {
                        let _open = open;
                        let Some((stream, conn)) = acceptors.handshake(&shared, stream, peer, timeouts.header_read).await else { return };
                        let io = TimedIo::new(stream, activity, timeouts, closing);
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), tls::WithTls::new(svc, conn)).into_owned();
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(error = %e, %peer, "TLS connection ended with an error");
                        }
                    });
                }
                (Ok(_), None) => {}
                (Err(e), _) => {
                    tracing::warn!(error = %e, "TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    drop(tls_listener);
    // Before hyper's graceful shutdown, which polls every connection once
    // more: a connection that never got a request reads the flag then and
    // ends (conn_io.rs); one between requests hyper closes itself.
    closing.store(true, Ordering::Release);
    tokio::select! {
        _ = client.drain(graceful.shutdown()) => {}
        _ = tokio::time::sleep(opts.drain_timeout) => {
            tracing::warn!("drain time over: closing the connections still open");
        }
    }
    // WebSocket tunnels last: requests first drained, then tunnels closed.
    client.close_tunnels(TUNNEL_CLOSE_WAIT).await;
}

/// How long a drain waits for its WebSocket tunnels to close.
const TUNNEL_CLOSE_WAIT: Duration = Duration::from_secs(5);
