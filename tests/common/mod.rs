//! Test fixtures: small real HTTP backends on port 0 with delay, status and
//! fault knobs, and gateways started in-process or as a real process.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use manifold::config::load::config_from_text;
use manifold::config::Format;
use manifold::gateway::{Gateway, GatewayOptions};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Decides a backend's answer from the request it saw (the echo document).
pub type Responder = Arc<dyn Fn(&Value) -> (u16, Value) + Send + Sync>;

/// What a backend does with each request.
#[derive(Clone, Default)]
pub struct BackendBuilder {
    status: Option<u16>,
    delay: Duration,
    fault: bool,
    body: Option<Value>,
    raw: Option<(&'static str, Bytes)>,
    respond: Option<Responder>,
    barrier: Option<Arc<tokio::sync::Barrier>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    headers: Vec<(&'static str, &'static str)>,
}

pub fn backend() -> BackendBuilder {
    BackendBuilder::default()
}

/// A running backend. By default it answers 200 with a JSON echo of the
/// request: method, path (raw), query, headers (every value of each), and
/// the number of body bytes, counted as they stream in.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Notified each time a request's head arrives.
    pub arrived: Arc<Notify>,
    /// Requests whose answer was dropped before it was ready: the client
    /// went away (a cancelled call).
    pub cancelled: Arc<AtomicUsize>,
    /// The echo document of every request, in arrival order.
    pub seen: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Backend {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl BackendBuilder {
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
    /// Close the connection without answering.
    pub fn fault(mut self) -> Self {
        self.fault = true;
        self
    }
    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    /// Answer these bytes with this content type.
    pub fn raw(mut self, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        self.raw = Some((content_type, body.into()));
        self
    }
    /// Answer what `f` makes of the request's echo document.
    pub fn respond(mut self, f: impl Fn(&Value) -> (u16, Value) + Send + Sync + 'static) -> Self {
        self.respond = Some(Arc::new(f));
        self
    }
    /// Hold every answer until the barrier's count of requests (across all
    /// backends sharing it) have arrived: proof that they ran at once.
    pub fn barrier(mut self, barrier: Arc<tokio::sync::Barrier>) -> Self {
        self.barrier = Some(barrier);
        self
    }

    /// Hold every answer until the test gives the gate a permit (one
    /// permit lets one answer go).
    pub fn gate(mut self, gate: Arc<tokio::sync::Semaphore>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Add this header to every answer.
    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    pub async fn run(self) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.serve(listener)
    }

    /// Serves on a listener the test bound (another address than
    /// 127.0.0.1, a port chosen by the test).
    pub fn serve(self, listener: tokio::net::TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(Notify::new());
        let cancelled = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, a, c, sn) = (hits.clone(), arrived.clone(), cancelled.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (cfg, hits, arrived, cancelled, seen) = (self.clone(), h.clone(), a.clone(), c.clone(), sn.clone());
                tokio::spawn(async move {
                    if cfg.fault {
                        // Read the request head, then hang up.
                        let mut buf = [0u8; 1024];
                        let _ = tokio::io::AsyncReadExt::read(&mut { stream }, &mut buf).await;
                        hits.fetch_add(1, Ordering::SeqCst);
                        arrived.notify_waiters();
                        return;
                    }
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (cfg, hits, arrived, cancelled, seen) =
                            (cfg.clone(), hits.clone(), arrived.clone(), cancelled.clone(), seen.clone());
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            arrived.notify_waiters();
                            let guard = CancelGuard(Some(cancelled));
                            let resp = cfg.answer(req, &seen).await;
                            std::mem::forget(guard.disarm());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, hits, arrived, cancelled, seen }
    }

    async fn answer(&self, req: Request<Incoming>, seen: &std::sync::Mutex<Vec<Value>>) -> Response<Full<Bytes>> {
        const KEEP: usize = 64 << 10;
        let (parts, mut body) = req.into_parts();
        let mut body_bytes = 0u64;
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        body_bytes += d.len() as u64;
                        if kept.len() < KEEP {
                            kept.extend_from_slice(&d[..d.len().min(KEEP - kept.len())]);
                        }
                    }
                }
                Err(_) => break,
            }
        }
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in &parts.headers {
            headers.entry(k.to_string()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        let echo = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body_bytes": body_bytes,
            "json": serde_json::from_slice::<Value>(&kept).ok(),
        });
        seen.lock().unwrap().push(echo.clone());
        if let Some(barrier) = &self.barrier {
            barrier.wait().await;
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("the gate stays open").forget();
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let (status, content_type, bytes) = if let Some((ct, raw)) = &self.raw {
            (self.status.unwrap_or(200), *ct, raw.clone())
        } else if let Some(f) = &self.respond {
            let (status, v) = f(&echo);
            (status, "application/json", Bytes::from(v.to_string()))
        } else {
            let v = self.body.clone().unwrap_or(echo);
            (self.status.unwrap_or(200), "application/json", Bytes::from(v.to_string()))
        };
        let mut resp = Response::new(Full::new(bytes));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        resp.headers_mut().insert("content-type", content_type.parse().unwrap());
        resp.headers_mut().insert("x-backend", "yes".parse().unwrap());
        for (k, v) in &self.headers {
            resp.headers_mut().insert(*k, v.parse().unwrap());
        }
        resp
    }
}

/// Counts a request whose answer was dropped before it was ready.
struct CancelGuard(Option<Arc<AtomicUsize>>);

impl CancelGuard {
    fn disarm(mut self) -> Self {
        self.0 = None;
        self
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A gateway in this process, from a YAML config.
pub fn gateway(yaml: &str) -> Gateway {
    gateway_with(yaml, GatewayOptions::default())
}

pub fn gateway_with(yaml: &str, mut opts: GatewayOptions) -> Gateway {
    let config = config_from_text(yaml, Format::Yaml).unwrap_or_else(|e| panic!("invalid test config:\n{e}"));
    opts.server.workers = 2;
    Gateway::start(opts, config).expect("gateway starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A `manifold serve` process, for what only a process shows: its memory,
/// its signals, its exit code.
pub struct GatewayProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    pub fn start(config_dir: &std::path::Path, extra: &[&str]) -> GatewayProcess {
        Self::start_with_env(config_dir, extra, &[])
    }

    pub fn start_with_env(config_dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_manifold"))
            .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config-dir"])
            .arg(config_dir)
            .args(extra)
            .env("MANIFOLD_LOG_FORMAT", "json")
            .env_remove("MANIFOLD_DATABASE_URL")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("manifold starts");
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"].as_str().is_some_and(|m| m.starts_with("manifold is serving")) {
                        let _ = tx.send((v["proxy"].as_str().unwrap().parse().unwrap(), v["admin"].as_str().unwrap().parse().unwrap()));
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let (proxy, admin) = rx.recv_timeout(Duration::from_secs(30)).expect("manifold reports its addresses");
        GatewayProcess { child, proxy, admin, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse().ok()).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The exit code, once the process has exited (within `within`).
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay a test can cut, to take a shared server (Postgres, Redis)
/// away from one node without stopping it for everyone else.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, l) = (cut.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused in effect
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(task);
            }
        });
        Relay { addr, cut, live }
    }

    /// Severs every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.live.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Clients sending GETs to one URL until stopped, counting what failed.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.to_string());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, tasks }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns (succeeded, failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// One request with optional JSON body and extra headers. The answer's
/// body is its JSON, else its text as a string, else null when empty.
pub async fn send(
    method: &str,
    url: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = client().request(method.parse().unwrap(), url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.unwrap();
    let body = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) if text.is_empty() => Value::Null,
        Err(_) => Value::String(text),
    };
    (status, headers, body)
}

/// A GET through `g`'s proxy with extra headers, answered within 15 s:
/// the status and the body as JSON (else as a JSON string).
pub async fn proxy_get(g: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let fut = async {
        let mut req = client().get(format!("http://{}{path}", g.proxy_addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    };
    within(15, path, fut).await
}

/// Fails with `what` instead of hanging when `fut` takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut).await.unwrap_or_else(|_| panic!("{what}: no answer within {secs} s"))
}

/// The admin listener's `/metrics`, parsed.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let resp = within(10, "/metrics", client().get(format!("http://{admin}/metrics")).send()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text format")
}

/// The sum of every sample of `name` whose labels include `labels`; 0 when
/// there is none (a counter never touched is absent).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value as PValue;
    scrape(admin)
        .await
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => *v,
            other => panic!("{name} is a counter, got {other:?}"),
        })
        .fold(0.0, |a, b| a + b)
}

/// Waits (at most 5 s) until the metric satisfies `ok`; returns its value.
pub async fn metric_until(admin: SocketAddr, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool, what: &str) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(admin, name, labels).await;
        if ok(v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {name}{labels:?} is {v} after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /upstreams/{name}/health` on the admin listener (200 expected).
pub async fn upstream_health(admin: SocketAddr, name: &str) -> Value {
    let resp = within(10, "upstream health", client().get(format!("http://{admin}/upstreams/{name}/health")).send()).await.unwrap();
    assert_eq!(resp.status(), 200, "GET /upstreams/{name}/health");
    resp.json().await.unwrap()
}

/// The health report's entry for `target` (its label).
pub fn target_report<'a>(report: &'a Value, target: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == target))
        .unwrap_or_else(|| panic!("no target {target} in {report}"))
}

/// Polls the health report of `name` (at most `secs`) until `ok` holds;
/// returns that report.
pub async fn health_until(admin: SocketAddr, name: &str, secs: u64, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let report = upstream_health(admin, name).await;
        if ok(&report) {
            return report;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not so after {secs} s: {report:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The test Postgres server: MANIFOLD_TEST_DATABASE_URL, else
/// postgres@127.0.0.1:5432.
pub fn server_url() -> String {
    std::env::var("MANIFOLD_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new, empty database of its own for one test; migrated unless told
/// otherwise.
pub async fn fresh_db(migrate: bool) -> String {
    use manifold::store::Store;
    let admin = Store::connect(&server_url()).await.expect("the test Postgres is reachable");
    let name = format!("manifold_t_{}", manifold::ids::new_uuid().replace('-', ""));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(admin.pool()).await.unwrap();
    let base = server_url();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    if migrate {
        Store::connect(&url).await.unwrap().migrate().await.unwrap();
    }
    url
}

/// Removes a test's database (connections included); a failed test leaves
/// its database behind to look at.
pub async fn drop_db(url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let admin = manifold::store::Store::connect(&server_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(admin.pool()).await.unwrap();
}
