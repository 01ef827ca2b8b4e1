//! A whole gateway node: the proxy workers and the admin API, started from
//! a config and stopped gracefully. `manifold serve` and the tests both use
//! this, so what the tests run is what ships.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::server::hygiene::Limits;
use crate::server::{ProxyServer, ServerOptions, Shared};

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub server: ServerOptions,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            server: ServerOptions::default(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            admin_token: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
        }
    }
}

pub struct Gateway {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    proxy: ProxyServer,
    admin_stop: watch::Sender<bool>,
    admin_thread: JoinHandle<()>,
}

impl Gateway {
    pub fn start(opts: GatewayOptions, config: Config) -> anyhow::Result<Gateway> {
        if !opts.admin_listen.ip().is_loopback() && opts.admin_token.as_deref().unwrap_or("").is_empty() {
            bail!(
                "refusing to serve the admin API on {} without a token: set MANIFOLD_ADMIN_TOKEN, or listen on a loopback address",
                opts.admin_listen
            );
        }
        let shared = Shared::new(config, opts.trusted_proxies.clone(), opts.limits.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;

        let admin_listener = std::net::TcpListener::bind(opts.admin_listen)
            .with_context(|| format!("cannot listen on {} for the admin API", opts.admin_listen))?;
        admin_listener.set_nonblocking(true)?;
        let admin_addr = admin_listener.local_addr()?;
        let proxy = ProxyServer::start(&opts.server, shared.clone())
            .with_context(|| format!("cannot listen on {} for the proxy", opts.server.proxy_listen))?;

        let (admin_stop, mut stop_rx) = watch::channel(false);
        let state = AdminState {
            shared: shared.clone(),
            token: opts.admin_token.filter(|t| !t.is_empty()).map(Arc::from),
            client: crate::proxy::new_client(),
        };
        let admin_thread = std::thread::Builder::new().name("manifold-admin".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
            rt.block_on(async move {
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
        })?;
        Ok(Gateway { proxy_addr: proxy.addr, admin_addr, shared, proxy, admin_stop, admin_thread })
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the drain
    /// time), and returns when every thread has ended.
    pub fn shutdown(self) {
        self.proxy.shutdown();
        let _ = self.admin_stop.send(true);
        self.proxy.join();
        let _ = self.admin_thread.join();
    }
}
