//! The `manifold` command line (SPEC §1). Thin: parse, set up logging, call
//! the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::config::units::Dur;
use crate::config::validate::parse_cidr;
use crate::config::{load_paths, Config, Validated};
use crate::gateway::{DatabaseOptions, Gateway, GatewayOptions};
use crate::server::ServerOptions;

#[derive(Parser, Debug)]
#[command(name = "manifold", version, about = "An API gateway that proxies routes and composes backend calls into one response", long_about = None)]
pub struct Cli {
    /// Log filter, e.g. `info` or `manifold=debug,info`
    #[arg(long, env = "MANIFOLD_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log format; json when stdout is not a terminal
    #[arg(long, env = "MANIFOLD_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway: the proxy on MANIFOLD_PROXY_LISTEN, the admin API on
    /// MANIFOLD_ADMIN_LISTEN. Without a database URL the config is every
    /// *.yaml, *.yml and *.json file under --config-dir (DB-less mode).
    Serve(Box<ServeArgs>),
    /// Check config files (or directories of them) and print every error as
    /// `file: path.to.field: message`. Exit 0 when valid, 1 otherwise.
    Validate {
        /// Files or directories; default: MANIFOLD_CONFIG_DIR or ./compositions
        paths: Vec<PathBuf>,
        /// A directory to check as `serve --config-dir` reads it (the same
        /// as giving it as a path)
        #[arg(long)]
        config_dir: Option<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the config files, for editors
    ///
    /// Save it (docs/manifold.schema.json ships it) and put
    /// `# yaml-language-server: $schema=<path or URL>` on a config file's first
    /// line: editors then complete and check it as you type. `validate` still
    /// checks what a schema cannot (references, cycles, templates).
    Schema,
    /// Apply the Postgres migrations in migrations/ (compiled in) to the
    /// database of MANIFOLD_DATABASE_URL
    Migrate {
        /// Postgres URL, e.g. postgres://user@host/db
        #[arg(long, env = "MANIFOLD_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Print the whole live config as YAML: from a node's admin API
    /// (--admin), or from the database (MANIFOLD_DATABASE_URL)
    Export {
        /// Admin API base URL, e.g. http://127.0.0.1:8001
        #[arg(long, env = "MANIFOLD_ADMIN")]
        admin: Option<String>,
        /// Bearer token of that admin API
        #[arg(long, env = "MANIFOLD_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Postgres URL, read when --admin is not given
        #[arg(long, env = "MANIFOLD_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Print the secrets themselves (JWT secrets, password hashes, key
        /// digests, certificates' private keys; read with the admin token
        /// through --admin) instead of their redactions: a backup from
        /// which a region can be rebuilt
        #[arg(long, env = "MANIFOLD_INCLUDE_SECRETS")]
        include_secrets: bool,
    },
    /// Make one or more gateways' config equal to the files: print each
    /// one's diff (+ create, ~ update, - delete), then apply it
    Sync {
        /// A config file or a directory of them
        path: PathBuf,
        /// Admin API base URL; repeat for several gateways (regions), or
        /// list them comma-separated in the variable
        #[arg(long, env = "MANIFOLD_ADMIN", value_delimiter = ',', required = true)]
        admin: Vec<String>,
        /// Bearer token of the admin APIs (the same for each --admin)
        #[arg(long, env = "MANIFOLD_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Print the diffs (entities and the fields that change) only
        #[arg(long, env = "MANIFOLD_DRY_RUN")]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory of config files for DB-less mode
    #[arg(long, env = "MANIFOLD_CONFIG_DIR", default_value = "./compositions")]
    pub config_dir: PathBuf,
    /// Also start the demo backend services of fixtures/demo/ on 127.0.0.1:9101-9104
    #[arg(long, env = "MANIFOLD_DEMO")]
    pub demo: bool,
    /// Proxy listen address (HTTP/1.1 and h2c)
    #[arg(long, env = "MANIFOLD_PROXY_LISTEN", default_value = "0.0.0.0:8000")]
    pub proxy_listen: SocketAddr,
    /// Admin API listen address; a non-loopback address needs --admin-token
    #[arg(long, env = "MANIFOLD_ADMIN_LISTEN", default_value = "127.0.0.1:8001")]
    pub admin_listen: SocketAddr,
    /// Bearer token required by the admin API
    #[arg(long, env = "MANIFOLD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Postgres URL: database mode (the config lives in Postgres, edited through the admin API)
    #[arg(long, env = "MANIFOLD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis URL (redis://host:port/db), for rate limits with scope: cluster
    #[arg(long, env = "MANIFOLD_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several gateway clusters can share a server
    #[arg(long, env = "MANIFOLD_REDIS_PREFIX", default_value = "manifold")]
    pub redis_prefix: String,
    /// Where database mode keeps its last good config
    #[arg(long, env = "MANIFOLD_SNAPSHOT_PATH", default_value = "manifold-snapshot.json")]
    pub snapshot_path: PathBuf,
    /// Comma-separated CIDRs whose X-Forwarded-* headers are believed
    #[arg(long, env = "MANIFOLD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// Worker threads (one runtime and listener each); default: one per core
    #[arg(long, env = "MANIFOLD_WORKERS")]
    pub workers: Option<usize>,
    /// Write the access log (one JSON line per request) to this file,
    /// appended, instead of stdout; operational logs stay on stdout
    #[arg(long, env = "MANIFOLD_ACCESS_LOG_FILE")]
    pub access_log_file: Option<PathBuf>,
    /// Share of requests that get an access log line, 0 to 1 (0.1: one in ten)
    #[arg(long, env = "MANIFOLD_ACCESS_LOG_SAMPLE", default_value = "1", value_parser = parse_share)]
    pub access_log_sample: f64,
    /// PEM CA certificates trusted for https backends, beside the system's
    /// roots (which SSL_CERT_FILE and SSL_CERT_DIR can also point at); an
    /// upstream with its own `tls` block uses that instead
    #[arg(long, env = "MANIFOLD_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain shown to https backends that ask for a client
    /// certificate (mTLS); needs --upstream-client-key; not for upstreams
    /// with their own `tls` block
    #[arg(long, env = "MANIFOLD_UPSTREAM_CLIENT_CERT", requires = "upstream_client_key")]
    pub upstream_client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --upstream-client-cert
    #[arg(long, env = "MANIFOLD_UPSTREAM_CLIENT_KEY", requires = "upstream_client_cert")]
    pub upstream_client_key: Option<std::path::PathBuf>,
    /// A hosts(5) file (`ADDRESS NAME...` lines) in which the names of
    /// upstream targets with `resolve_every` are looked up first, before
    /// the system's resolver; read again at every resolution
    #[arg(long, env = "MANIFOLD_HOSTS_FILE")]
    pub hosts_file: Option<std::path::PathBuf>,
    /// Label request counts by consumer too (manifold_consumer_requests_total):
    /// one series per consumer, route and status class, so off by default
    #[arg(long, env = "MANIFOLD_METRICS_CONSUMER_LABELS")]
    pub metrics_consumer_labels: bool,
    /// How long in-flight requests may take to finish after SIGTERM or SIGINT
    #[arg(long, env = "MANIFOLD_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_dur)]
    pub drain_timeout: Dur,
    /// Memory for composition calls' cached answers (`cache` on a call),
    /// all calls together; the least used go first when it is full
    #[arg(long, env = "MANIFOLD_CALL_CACHE_MAX_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub call_cache_max_bytes: crate::config::units::ByteSize,
    /// TLS listen address (HTTP/1.1 and HTTP/2 by ALPN). Default
    /// 0.0.0.0:8443, only when a certificate is configured at start; set,
    /// it listens from the start even without one, so that the first
    /// `certificates` entity written later is served without a restart
    #[arg(long, env = "MANIFOLD_PROXY_TLS_LISTEN")]
    pub proxy_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain served to TLS clients whose server name (SNI)
    /// no `certificates` entity lists, or that send none; needs --tls-key
    #[arg(long, env = "MANIFOLD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "MANIFOLD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// HTTP/2 from clients: streams open at once on one connection
    #[arg(long, env = "MANIFOLD_HTTP2_MAX_CONCURRENT_STREAMS", default_value = "100")]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 from clients: the largest header list (decoded), e.g. 96KiB
    #[arg(long, env = "MANIFOLD_HTTP2_MAX_HEADER_LIST_SIZE", default_value = "96KiB", value_parser = parse_size_u32)]
    pub http2_max_header_list_size: u32,
    /// HTTP/2 from clients: send a PING this often to find dead peers (0s: never)
    #[arg(long, env = "MANIFOLD_HTTP2_KEEP_ALIVE_INTERVAL", default_value = "0s", value_parser = parse_dur_or_zero)]
    pub http2_keep_alive_interval: Dur,
    /// HTTP/2 from clients: close a connection whose PING is not answered within this
    #[arg(long, env = "MANIFOLD_HTTP2_KEEP_ALIVE_TIMEOUT", default_value = "20s", value_parser = parse_dur)]
    pub http2_keep_alive_timeout: Dur,
    /// HTTP/2 from clients: streams a client may open and reset before the
    /// gateway took them; past it the connection is closed with GOAWAY
    /// (the rapid-reset flood, CVE-2023-44487)
    #[arg(long, env = "MANIFOLD_HTTP2_MAX_PENDING_RESET_STREAMS", default_value = "20")]
    pub http2_max_pending_reset_streams: usize,
}

fn parse_size(s: &str) -> Result<crate::config::units::ByteSize, String> {
    crate::config::units::ByteSize::parse(s)
}

fn parse_size_u32(s: &str) -> Result<u32, String> {
    let size = crate::config::units::ByteSize::parse(s)?;
    u32::try_from(size.0).ok().filter(|n| *n > 0).ok_or_else(|| format!("expected 1 byte to 4GiB, got {s:?}"))
}

fn parse_dur_or_zero(s: &str) -> Result<Dur, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Dur(Duration::ZERO));
    }
    Dur::parse(s)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    parse_cidr(s.trim())
}

fn parse_dur(s: &str) -> Result<Dur, String> {
    Dur::parse(s)
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a number from 0 to 1, got {s:?}")),
    }
}

/// Logs on stdout (`serve`; stderr for the other commands), JSON unless
/// that is a terminal; the access log (target `manifold::access`) with
/// them, or only in `--access-log-file`, always as JSON lines.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::layer::{Layered, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{filter, fmt, Layer, Registry};

    type Boxed = Box<dyn Layer<Layered<tracing_subscriber::EnvFilter, Registry>> + Send + Sync>;
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Pretty on a terminal, JSON otherwise: the terminal being the one the
    // logs go to (stdout for `serve`, stderr for the other commands).
    let serving = matches!(cli.command, Command::Serve(_));
    let json = match cli.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Pretty) => false,
        None if serving => !std::io::stdout().is_terminal(),
        None => !std::io::stderr().is_terminal(),
    };
    let access_file = match &cli.command {
        Command::Serve(args) => args.access_log_file.as_deref(),
        _ => None,
    };
    let file = match access_file {
        Some(path) => Some(std::sync::Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the access log file {}", path.display()))?,
        )),
        None => None,
    };
    let to_file = file.is_some();
    // The other commands print their answer on stdout (YAML, JSON, a
    // plan): their logs (a config's warnings, a plugin's own lines) go to
    // stderr, so the answer stays whole.
    let writer = || match &cli.command {
        Command::Serve(_) => fmt::writer::BoxMakeWriter::new(std::io::stdout),
        _ => fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let stdout: Boxed = if json {
        fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(writer()).boxed()
    } else {
        fmt::layer().with_writer(writer()).boxed()
    };
    let mut layers =
        vec![stdout.with_filter(filter::filter_fn(move |meta| !(to_file && meta.target() == crate::access_log::TARGET))).boxed()];
    if let Some(file) = file {
        let access = fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(file);
        layers.push(access.with_filter(filter::filter_fn(|meta| meta.target() == crate::access_log::TARGET)).boxed());
    }
    // The level filter wraps the whole subscriber (not one layer group), so
    // `tracing::enabled!` (access_log::wanted) sees exactly what it lets through.
    tracing_subscriber::registry().with(filter).with(layers).init();
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("manifold: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Validate { mut paths, config_dir } => {
            paths.extend(config_dir);
            return validate(paths);
        }
        Command::Schema => schema(),
        Command::Migrate { database_url } => migrate(&database_url),
        Command::Export { admin, admin_token, database_url, include_secrets } => export(admin, admin_token, database_url, include_secrets),
        Command::Sync { path, admin, admin_token, dry_run } => return sync(path, admin, admin_token, dry_run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Once, on stderr (a log line too would print it twice on a terminal).
        Err(e) => {
            eprintln!("manifold: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(mut paths: Vec<PathBuf>) -> ExitCode {
    if paths.is_empty() {
        paths.push(std::env::var_os("MANIFOLD_CONFIG_DIR").map_or_else(|| PathBuf::from("./compositions"), PathBuf::from));
    }
    let result = load_paths(&paths).and_then(|config| {
        let summary =
            (config.routes.len(), config.compositions.len(), config.consumers.len(), config.policies.len(), config.upstreams.len());
        // Checked as a node with this environment would take it.
        let redis = std::env::var("MANIFOLD_REDIS_URL").ok().filter(|u| !u.is_empty());
        let services = crate::policy::Services::new(redis.map(|url| crate::gateway::RedisOptions { url, prefix: String::new() }));
        crate::snapshot::compile(config, 1, &services).map(|_| summary).map_err(|mut errors| {
            crate::config::name_files(&paths, &mut errors);
            errors
        })
    });
    match result {
        Ok((r, c, u, p, s)) => {
            println!("ok: {r} routes, {c} compositions, {u} consumers, {p} policies, {s} upstreams");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// The DB-less config, validated (with its policies compiled once: the
/// gateway's snapshot binds them). What only the node can check (routing
/// conflicts, `scope: cluster` without Redis) is checked as it starts, and
/// its errors named with their files by [`invalid_config`].
fn load_config(dir: &PathBuf) -> anyhow::Result<Validated> {
    if !dir.is_dir() {
        bail!("config directory {} does not exist (set --config-dir or MANIFOLD_CONFIG_DIR)", dir.display());
    }
    load_paths(std::slice::from_ref(dir)).map_err(|errors| anyhow::anyhow!("the config in {} is invalid:\n{errors}", dir.display()))
}

/// A start that failed on the config's errors says so, each error with its
/// file (`dir`: the DB-less config directory).
fn invalid_config(mut e: anyhow::Error, dir: Option<&PathBuf>) -> anyhow::Error {
    match (e.downcast_mut::<crate::config::ConfigErrors>(), dir) {
        (Some(errors), Some(dir)) => {
            crate::config::name_files(std::slice::from_ref(dir), errors);
            anyhow::anyhow!("the config in {} is invalid:\n{errors}", dir.display())
        }
        _ => e,
    }
}

fn export(admin: Option<String>, token: Option<String>, database_url: Option<String>, include_secrets: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let yaml = rt.block_on(crate::remote::export(admin.as_deref(), token.as_deref(), database_url.as_deref(), include_secrets))?;
    to_stdout(&yaml)
}

fn sync(path: PathBuf, admins: Vec<String>, token: Option<String>, dry_run: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("manifold: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::remote::sync(&path, &admins, token.as_deref(), dry_run)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("manifold: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn schema() -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&crate::config::config_schema())?;
    to_stdout(&format!("{text}\n"))
}

/// Writes a command's output; a reader that stops early (`| head`) ends it
/// quietly rather than with a panic.
fn to_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn migrate(url: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let store = crate::store::Store::connect(url).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let applied = store.migrate().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if applied.is_empty() {
            println!("the database schema is up to date");
        } else {
            println!("applied migrations: {applied:?}");
        }
        Ok(())
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::access_log::set_sample_rate(args.access_log_sample);
    if args.demo {
        let addrs = crate::demo::start()?;
        tracing::info!(?addrs, "demo backends started");
    }
    let database = args.database_url.clone().map(|url| DatabaseOptions { url, snapshot_path: args.snapshot_path.clone() });
    let redis = args.redis_url.filter(|u| !u.is_empty()).map(|url| crate::gateway::RedisOptions { url, prefix: args.redis_prefix });
    // Database mode takes its config from the database; DB-less from files.
    let config: Validated = if database.is_some() { Config::default().into() } else { load_config(&args.config_dir)? };
    let config_dir = database.is_none().then_some(&args.config_dir);
    let mut server = ServerOptions { proxy_listen: args.proxy_listen, drain_timeout: args.drain_timeout.0, ..ServerOptions::default() };
    if let Some(w) = args.workers {
        server.workers = w.max(1);
    }
    server.tls_listen = args.proxy_tls_listen;
    server.http2 = crate::server::Http2Limits {
        max_concurrent_streams: args.http2_max_concurrent_streams,
        max_header_list_size: args.http2_max_header_list_size,
        keep_alive_interval: Some(args.http2_keep_alive_interval.0).filter(|d| !d.is_zero()),
        keep_alive_timeout: args.http2_keep_alive_timeout.0,
        max_pending_accept_reset_streams: args.http2_max_pending_reset_streams,
        ..Default::default()
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        server.default_certificate = Some(crate::server::DefaultCertificate {
            cert_pem: std::fs::read_to_string(cert).with_context(|| format!("cannot read --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key).with_context(|| format!("cannot read --tls-key {}", key.display()))?,
        });
    }
    let mode = if database.is_some() { "database" } else { "DB-less" };
    // Exporting starts before serving and stops after the drain, so the
    // last requests' spans are sent too.
    let traces = crate::otel::init();
    let opts = GatewayOptions {
        server,
        admin_listen: args.admin_listen,
        admin_token: args.admin_token,
        trusted_proxies: args.trusted_proxies,
        database,
        redis,
        metrics: crate::metrics::MetricsOptions { consumer_labels: args.metrics_consumer_labels },
        upstream_tls: crate::upstream::TlsOptions {
            ca_file: args.upstream_ca_file,
            client_cert_file: args.upstream_client_cert,
            client_key_file: args.upstream_client_key,
        },
        hosts_file: args.hosts_file,
        call_cache_max_bytes: args.call_cache_max_bytes.0,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(opts, config).map_err(|e| invalid_config(e, config_dir))?;
    // Read and let go: a snapshot held here would keep the first config's
    // plans (and its targets' health checkers) alive after every change.
    let (routes, compositions, version) = {
        let snap = gateway.shared.snapshot.load();
        (snap.config.routes.len(), snap.config.compositions.len(), snap.version)
    };
    let tls = gateway.tls_addr.map(|a| a.to_string());
    tracing::info!(proxy = %gateway.proxy_addr, tls, admin = %gateway.admin_addr, routes, compositions, version, mode, "manifold is serving");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("a tokio runtime")?;
    let signal = rt.block_on(wait_for_signal())?;
    tracing::info!(signal, "shutting down: no new connections, draining in-flight requests");
    let started = std::time::Instant::now();
    gateway.shutdown();
    if let Some(traces) = traces {
        traces.shutdown();
    }
    tracing::info!(drained_in_ms = started.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Parses a drain timeout for tests and tools that set it in code.
pub fn duration(s: &str) -> Option<Duration> {
    Dur::parse(s).ok().map(|d| d.0)
}
