//! A whole gateway node: the proxy workers and the admin API, started from
//! a config (DB-less) or from the database, and stopped gracefully.
//! `manifold serve` and the tests both use this, so what the tests run is
//! what ships.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::IpNet;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::Config;
pub use crate::policy::cluster::RedisOptions;
use crate::server::hygiene::Limits;
use crate::server::{ProxyServer, ServerOptions, Shared};
use crate::store::{self, Store, StoreError};

#[derive(Clone, Debug)]
pub struct DatabaseOptions {
    pub url: String,
    /// The local copy of the last good config.
    pub snapshot_path: PathBuf,
}

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub server: ServerOptions,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    /// Database mode when set; the `config` given to `start` is then unused.
    pub database: Option<DatabaseOptions>,
    /// Redis, for `rate-limit` with `scope: cluster`.
    pub redis: Option<RedisOptions>,
    pub metrics: crate::metrics::MetricsOptions,
    /// TLS to https backends: extra CA roots, a client certificate.
    pub upstream_tls: crate::upstream::TlsOptions,
    /// Where upstream target names are looked up before the system's
    /// resolver (`--hosts-file`).
    pub hosts_file: Option<PathBuf>,
    /// Bound of the store of composition calls' cached answers (bytes).
    pub call_cache_max_bytes: u64,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            server: ServerOptions::default(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            admin_token: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
            database: None,
            redis: None,
            metrics: Default::default(),
            upstream_tls: Default::default(),
            hosts_file: None,
            call_cache_max_bytes: crate::compose::cache::DEFAULT_MAX_BYTES,
        }
    }
}

pub struct Gateway {
    pub proxy_addr: SocketAddr,
    /// The TLS listener's address, when it listens (a certificate is
    /// configured, or `server.tls_listen` is set).
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    proxy: ProxyServer,
    admin_stop: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    /// Runs the admin API and, in database mode, the sync with the database
    /// (off the request path; the proxy workers have runtimes of their own).
    control: ControlRuntime,
}

/// A runtime that may be dropped anywhere, async code included (tests
/// start and stop gateways from async tests; a plain drop would panic).
struct ControlRuntime(Option<Runtime>);

impl std::ops::Deref for ControlRuntime {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for ControlRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` to completion on `rt` from any context, even inside another
/// runtime (tests call `Gateway::start` from async code).
fn block_on<F: std::future::Future + Send>(rt: &Runtime, fut: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().expect("the control runtime does not panic"))
}

/// Database mode's first config: from the database, or, when it cannot be
/// reached, from the snapshot saved last time.
async fn initial_config(db: &DatabaseOptions) -> anyhow::Result<(Store, Config, u64, Option<String>, bool)> {
    let store = Store::lazy(&db.url).context("invalid database URL")?;
    match store.check_schema().await {
        Ok(()) => {}
        Err(StoreError::Unavailable(e)) => {
            let saved = store::sync::read_snapshot(&db.snapshot_path)
                .map_err(|s| anyhow::anyhow!("the database is unreachable ({e}) and there is no saved snapshot to serve: {s}"))?;
            tracing::warn!(error = %e, path = %db.snapshot_path.display(), version = saved.version, "the database is unreachable: serving the snapshot saved last time");
            return Ok((store, saved.config, saved.version, saved.instance, false));
        }
        Err(e) => bail!("{e}"),
    }
    let (config, instance, version) = store.load_with_instance().await.map_err(|e| anyhow::anyhow!("cannot load the config: {e}"))?;
    if let Err(e) = store::sync::save_snapshot(&db.snapshot_path, &instance, version, &config) {
        tracing::warn!(error = %e, path = %db.snapshot_path.display(), "cannot save the local snapshot");
    }
    Ok((store, config, version, Some(instance), true))
}

impl Gateway {
    pub fn start(opts: GatewayOptions, config: impl Into<crate::config::Validated>) -> anyhow::Result<Gateway> {
        let config = config.into();
        if !opts.admin_listen.ip().is_loopback() && opts.admin_token.as_deref().unwrap_or("").is_empty() {
            bail!(
                "refusing to serve the admin API on {} without a token: set MANIFOLD_ADMIN_TOKEN, or listen on a loopback address",
                opts.admin_listen
            );
        }
        let control = ControlRuntime(Some(
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("manifold-control").enable_all().build()?,
        ));

        let services = crate::policy::Services::with_call_store(opts.redis.clone(), opts.metrics, opts.call_cache_max_bytes);
        if let Some(path) = &opts.hosts_file {
            // Read once now so that a wrong path is an error at start, not
            // names that silently never resolve.
            std::fs::read_to_string(path).with_context(|| format!("cannot read the hosts file {} (--hosts-file)", path.display()))?;
            services.health.set_hosts_file(path.clone());
        }
        let (store, config, version, instance, reachable) = match &opts.database {
            Some(db) => {
                let (store, config, version, instance, reachable) = block_on(&control, initial_config(db))?;
                (Some(store.with_services(services.clone())), config.into(), version, instance, reachable)
            }
            None => (None, config, 1, None, false),
        };
        let connector = Arc::new(crate::upstream::Connector::new(&opts.upstream_tls)?);
        // The config's errors stay `ConfigErrors`, for the caller to name
        // their files.
        let shared =
            Shared::new(config, version, store.clone(), opts.trusted_proxies.clone(), opts.limits.clone(), services.clone(), connector)
                .map_err(anyhow::Error::new)?;
        if let Some(d) = &opts.server.default_certificate {
            let served = crate::certs::Served::new("--tls-cert", &d.cert_pem, &d.key_pem).map_err(|(field, e)| match field {
                crate::certs::CertField::Cert => anyhow::anyhow!("the default certificate (--tls-cert): {e}"),
                crate::certs::CertField::Key => anyhow::anyhow!("the default certificate's key (--tls-key): {e}"),
            })?;
            let _ = shared.tls_default.set(Arc::new(served));
        }
        // Know whether Redis answers before serving (and say so in the log);
        // each worker opens its own connection on its first check.
        if let Some(redis) = services.redis.clone() {
            let _ = block_on(&control, async move { tokio::time::timeout(Duration::from_secs(2), redis.ping()).await });
        }
        services.spawn_background(control.handle());
        services.health.bind(control.handle().clone(), shared.connector.clone(), services.metrics.clone());
        shared.start_health_checks();
        shared.db_reachable.store(reachable, Ordering::Relaxed);
        if let Ok(mut i) = shared.db_instance.lock() {
            *i = instance;
        }

        // A plain bind (no SO_REUSEPORT): another process listening there refuses it.
        let admin_listener = std::net::TcpListener::bind(opts.admin_listen)
            .map_err(crate::server::address_in_use)
            .with_context(|| format!("cannot listen on {} for the admin API", opts.admin_listen))?;
        admin_listener.set_nonblocking(true)?;
        let admin_addr = admin_listener.local_addr()?;
        let tls = crate::server::TlsListeners::bind(&opts.server, &shared)
            .with_context(|| format!("cannot listen on {} for TLS", opts.server.tls_listen.unwrap_or(crate::server::DEFAULT_TLS_LISTEN)))?;
        let proxy = ProxyServer::start_with_tls(&opts.server, shared.clone(), tls)
            .with_context(|| format!("cannot listen on {} for the proxy", opts.server.proxy_listen))?;

        if let (Some(store), Some(db)) = (store, &opts.database) {
            control.spawn(store::sync::run(store, shared.clone(), db.snapshot_path.clone()));
        }
        let (admin_stop, mut stop_rx) = watch::channel(false);
        let state = AdminState {
            shared: shared.clone(),
            token: opts.admin_token.filter(|t| !t.is_empty()).map(Arc::from),
            client: crate::upstream::Client::new(shared.connector.clone()),
            snapshot_path: opts.database.as_ref().map(|d| d.snapshot_path.clone()),
        };
        let admin_task = control.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(admin_listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "cannot use the admin listener"),
            };
            let stop = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            if let Err(e) = admin::serve(listener, state, stop).await {
                tracing::error!(error = %e, "the admin API stopped");
            }
        });
        Ok(Gateway { proxy_addr: proxy.addr, tls_addr: proxy.tls_addr, admin_addr, shared, proxy, admin_stop, admin_task, control })
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the drain
    /// time), and returns when every worker has ended.
    pub fn shutdown(self) {
        self.proxy.shutdown();
        let _ = self.admin_stop.send(true);
        self.proxy.join();
        let _ = block_on(&self.control, self.admin_task);
    }
}
