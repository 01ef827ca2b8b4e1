//! Prometheus metrics, served by the admin API at `/metrics`.
//!
//! Labels are bounded by the config: route, composition and policy names,
//! status classes, error codes; never raw paths. Consumer names only when
//! switched on ([`MetricsOptions::consumer_labels`]): one series per consumer
//! and route is the operator's choice to make, and the series of a consumer
//! that is deleted stay until the node restarts. The request path touches
//! only counters resolved when a config is compiled ([`RouteMetrics`]),
//! plus, with consumer labels on, one label lookup per request; gauges that
//! describe the node (config version, reachability, memory) are read when
//! `/metrics` is scraped.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// What the metrics of a node include.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsOptions {
    /// Also count requests by consumer (`manifold_consumer_requests_total`).
    pub consumer_labels: bool,
}

/// Every metric of one node.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    refusals: IntCounterVec,
    /// By consumer, route and status class; only when switched on.
    consumers: Option<IntCounterVec>,
    calls: HistogramVec,
    call_failures: IntCounterVec,
    upstream_failures: IntCounterVec,
    retries: IntCounterVec,
    retries_refused: IntCounterVec,
    wasm_failures: IntCounterVec,
    overloaded: IntCounterVec,
    no_target: IntCounterVec,
    ejections: IntCounterVec,
    health_checks: IntCounterVec,
    /// Rewritten at each scrape from the running config's targets.
    pub target_healthy: prometheus::IntGaugeVec,
    pub config_version: IntGauge,
    pub config_reloads: TotalCounter,
    pub last_reload: IntGauge,
    pub database_reachable: IntGauge,
    pub redis_reachable: IntGauge,
    pub rate_limit_fallbacks: TotalCounter,
    in_flight_gauge: IntGauge,
    connections_gauge: IntGauge,
    call_cache: IntCounterVec,
    call_collapsed: IntCounterVec,
    call_cache_bytes: IntGauge,
    call_cache_entries: IntGauge,
    /// Reads the call store's (bytes, entries) at scrape.
    call_cache_size: std::sync::OnceLock<Box<dyn Fn() -> (u64, u64) + Send + Sync>>,
    resident_memory: IntGauge,
    /// Updated on the request path; copied into the gauges on scrape.
    pub in_flight: AtomicI64,
    pub connections: AtomicI64,
    /// The TLS listener's handshakes (completed, failed); copied on scrape.
    pub tls_handshakes: AtomicI64,
    pub tls_handshake_failures: AtomicI64,
    tls_handshakes_total: TotalCounter,
    tls_handshake_failures_total: TotalCounter,
    /// Rewritten at each scrape from the served certificates.
    pub certificate_expiry_days: prometheus::GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// One route's or composition's counters, resolved once per config.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Answers by status class, 1xx to 5xx.
    by_class: [IntCounter; 5],
    duration: Histogram,
    metrics: Arc<Metrics>,
    route: Arc<str>,
    kind: &'static str,
}

impl RouteMetrics {
    /// The route's or composition's name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// "route" or "composition".
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// An answered request; `consumer` counts only when consumer labels are on.
    pub fn record(&self, status: u16, elapsed: Duration, consumer: Option<&str>) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let (Some(consumers), Some(consumer)) = (&self.metrics.consumers, consumer) {
            consumers.with_label_values(&[consumer, &*self.route, self.kind, CLASSES[class]]).inc();
        }
    }

    /// A request a policy refused, by the policy and the error code it got.
    pub fn refused(&self, policy: Option<&str>, code: &str) {
        self.metrics.refusals.with_label_values(&[&*self.route, self.kind, policy.unwrap_or(""), code]).inc();
    }
}

/// Latency buckets of every histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A Prometheus counter that mirrors a running total kept elsewhere (an
/// atomic the node bumps), brought up to date at each scrape: exposed as a
/// `counter`, as its `_total` name promises.
pub struct TotalCounter(IntCounter, std::sync::Mutex<()>);

impl TotalCounter {
    fn new(registry: &Registry, name: &str, help: &str) -> TotalCounter {
        let c = IntCounter::new(name, help).expect("a valid metric");
        registry.register(Box::new(c.clone())).expect("registered once");
        TotalCounter(c, std::sync::Mutex::new(()))
    }

    /// Takes the total; a total never goes down, so a smaller one is ignored.
    pub fn set(&self, total: i64) {
        // Two scrapes at once must not both add the same difference.
        let _one_at_a_time = self.1.lock().unwrap_or_else(|e| e.into_inner());
        let (total, now) = (total.max(0) as u64, self.0.get());
        if total > now {
            self.0.inc_by(total - now);
        }
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    registry.register(Box::new(g.clone())).expect("registered once");
    g
}

impl Metrics {
    pub fn new(opts: MetricsOptions) -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("manifold_requests_total", "Requests answered, by route or composition and status class"),
            &["route", "kind", "status"],
        )
        .expect("a valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("manifold_request_duration_seconds", "Time from the request head to the answer's head")
                .buckets(SECONDS_BUCKETS.to_vec()),
            &["route", "kind"],
        )
        .expect("a valid metric");
        let refusals = IntCounterVec::new(
            Opts::new("manifold_policy_refusals_total", "Requests refused by a policy (401, 403, 413, 429...), by policy and error code"),
            &["route", "kind", "policy", "code"],
        )
        .expect("a valid metric");
        let consumers = opts.consumer_labels.then(|| {
            let c = IntCounterVec::new(
                Opts::new("manifold_consumer_requests_total", "Requests answered, by consumer, route or composition and status class"),
                &["consumer", "route", "kind", "status"],
            )
            .expect("a valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        });
        let calls = HistogramVec::new(
            HistogramOpts::new("manifold_backend_call_duration_seconds", "Backend calls of compositions, by composition and call")
                .buckets(SECONDS_BUCKETS.to_vec()),
            &["composition", "call"],
        )
        .expect("a valid metric");
        let call_failures = IntCounterVec::new(
            Opts::new(
                "manifold_backend_call_failures_total",
                "Failed backend calls of compositions, by kind (timeout, status, connect...)",
            ),
            &["composition", "call", "kind"],
        )
        .expect("a valid metric");
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "manifold_upstream_failures_total",
                "Backend requests that failed by the backend's fault, by route or composition, call (empty for a route) and cause",
            ),
            &["route", "call", "cause"],
        )
        .expect("a valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "manifold_upstream_retries_total",
                "Backend requests sent again by an upstream's retries, by upstream, route or composition, call (empty for a route) and reason",
            ),
            &["upstream", "route", "call", "reason"],
        )
        .expect("a valid metric");
        let retries_refused = IntCounterVec::new(
            Opts::new(
                "manifold_upstream_retries_refused_total",
                "Retries an upstream's retry budget refused (the failure was answered instead), by upstream, route or composition and call",
            ),
            &["upstream", "route", "call"],
        )
        .expect("a valid metric");
        let wasm_failures = IntCounterVec::new(
            Opts::new(
                "manifold_wasm_failures_total",
                "wasm policy callbacks that failed (a trap, fuel run out, an instance that would not start; before the answer, the request's 500), by policy and callback",
            ),
            &["policy", "callback"],
        )
        .expect("a valid metric");
        let overloaded = IntCounterVec::new(
            Opts::new(
                "manifold_upstream_circuit_open_total",
                "Requests answered 503 at once because an upstream's circuit_breaker.max_in_flight were in flight, by upstream, route or composition and call",
            ),
            &["upstream", "route", "call"],
        )
        .expect("a valid metric");
        let no_target = IntCounterVec::new(
            Opts::new(
                "manifold_upstream_unavailable_total",
                "Requests answered 503 at once because no target of the upstream was healthy, by upstream, route or composition and call",
            ),
            &["upstream", "route", "call"],
        )
        .expect("a valid metric");
        let ejections = IntCounterVec::new(
            Opts::new("manifold_upstream_ejections_total", "Targets ejected by passive health checks, by upstream and target"),
            &["upstream", "target"],
        )
        .expect("a valid metric");
        let health_checks = IntCounterVec::new(
            Opts::new("manifold_upstream_health_checks_total", "Active health checks, by upstream, target and result (passed, failed)"),
            &["upstream", "target", "result"],
        )
        .expect("a valid metric");
        let call_cache = IntCounterVec::new(
            Opts::new(
                "manifold_call_cache_total",
                "Requests of composition calls with cache, by composition, call and result (hit, stale, miss, revalidated)",
            ),
            &["composition", "call", "result"],
        )
        .expect("a valid metric");
        let call_collapsed = IntCounterVec::new(
            Opts::new(
                "manifold_call_collapsed_total",
                "Requests of composition calls (cache or collapse) that took an identical request's answer already in flight, by composition and call",
            ),
            &["composition", "call"],
        )
        .expect("a valid metric");
        let target_healthy = prometheus::IntGaugeVec::new(
            Opts::new(
                "manifold_upstream_target_healthy",
                "1 when a target of an upstream with health checks takes traffic, 0 when it is unhealthy or ejected, by upstream, target and state",
            ),
            &["upstream", "target", "state"],
        )
        .expect("a valid metric");
        let certificate_expiry_days = prometheus::GaugeVec::new(
            Opts::new(
                "manifold_tls_certificate_expiry_days",
                "Days until each certificate the TLS listener serves expires (negative once expired), by certificate (default: --tls-cert's)",
            ),
            &["certificate"],
        )
        .expect("a valid metric");
        let tls_handshakes_total =
            TotalCounter::new(&registry, "manifold_tls_handshakes_total", "TLS handshakes completed on the TLS listener");
        let tls_handshake_failures_total = TotalCounter::new(
            &registry,
            "manifold_tls_handshake_failures_total",
            "TLS handshakes that failed on the TLS listener (no certificate for the name, no common version or cipher, timeout, reset)",
        );
        for m in [
            Box::new(certificate_expiry_days.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(no_target.clone()),
            Box::new(ejections.clone()),
            Box::new(health_checks.clone()),
            Box::new(target_healthy.clone()),
            Box::new(retries.clone()),
            Box::new(retries_refused.clone()),
            Box::new(wasm_failures.clone()),
            Box::new(overloaded.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(duration.clone()),
            Box::new(refusals.clone()),
            Box::new(calls.clone()),
            Box::new(call_failures.clone()),
            Box::new(call_cache.clone()),
            Box::new(call_collapsed.clone()),
        ] {
            registry.register(m).expect("registered once");
        }
        Arc::new(Metrics {
            config_version: gauge(&registry, "manifold_config_version", "Version of the config this node serves"),
            config_reloads: TotalCounter::new(&registry, "manifold_config_reloads_total", "Configs this node has taken since it started"),
            last_reload: gauge(&registry, "manifold_config_last_reload_timestamp_seconds", "When this node last took a config (Unix time)"),
            database_reachable: gauge(
                &registry,
                "manifold_database_reachable",
                "1 when the last contact with the database worked (database mode)",
            ),
            redis_reachable: gauge(&registry, "manifold_redis_reachable", "1 when the last cluster rate-limit check reached Redis"),
            rate_limit_fallbacks: TotalCounter::new(
                &registry,
                "manifold_rate_limit_fallbacks_total",
                "Cluster rate-limit checks counted locally because Redis failed",
            ),
            in_flight_gauge: gauge(&registry, "manifold_requests_in_flight", "Requests being served"),
            connections_gauge: gauge(&registry, "manifold_open_connections", "Client connections open on the proxy listener"),
            call_cache_bytes: gauge(
                &registry,
                "manifold_call_cache_bytes",
                "Bytes held by the store of composition calls' cached answers (bounded by --call-cache-max-bytes)",
            ),
            call_cache_entries: gauge(
                &registry,
                "manifold_call_cache_entries",
                "Answers in the store of composition calls' cached answers",
            ),
            call_cache_size: std::sync::OnceLock::new(),
            call_cache,
            call_collapsed,
            resident_memory: gauge(&registry, "manifold_resident_memory_bytes", "Resident memory of the process"),
            registry,
            requests,
            duration,
            refusals,
            consumers,
            calls,
            call_failures,
            upstream_failures,
            retries,
            retries_refused,
            wasm_failures,
            overloaded,
            no_target,
            ejections,
            health_checks,
            target_healthy,
            in_flight: AtomicI64::new(0),
            connections: AtomicI64::new(0),
            tls_handshakes: AtomicI64::new(0),
            tls_handshake_failures: AtomicI64::new(0),
            tls_handshakes_total,
            tls_handshake_failures_total,
            certificate_expiry_days,
        })
    }

    /// The counters of one route (`kind` "route") or composition.
    pub fn route(self: &Arc<Self>, name: &str, kind: &'static str) -> RouteMetrics {
        RouteMetrics {
            by_class: CLASSES.map(|c| self.requests.with_label_values(&[name, kind, c])),
            duration: self.duration.with_label_values(&[name, kind]),
            metrics: self.clone(),
            route: Arc::from(name),
            kind,
        }
    }

    /// One backend call's duration histogram, resolved once per config.
    pub fn call_histogram(&self, composition: &str, call: &str) -> Histogram {
        self.calls.with_label_values(&[composition, call])
    }

    /// A cached call's counters, one per result (hit, stale, miss,
    /// revalidated: `compose::cache::Mark::ALL`'s order), resolved once per config.
    pub fn call_cache_counters(&self, composition: &str, call: &str) -> [IntCounter; 4] {
        crate::compose::cache::Mark::ALL.map(|m| self.call_cache.with_label_values(&[composition, call, m.as_str()]))
    }

    /// A shared call's count of requests that joined one in flight.
    pub fn call_collapsed_counter(&self, composition: &str, call: &str) -> IntCounter {
        self.call_collapsed.with_label_values(&[composition, call])
    }

    /// How the call store's size is read at scrape (set once, by the node's services).
    pub fn call_cache_size(&self, read: impl Fn() -> (u64, u64) + Send + Sync + 'static) {
        let _ = self.call_cache_size.set(Box::new(read));
    }

    /// A failed backend call of a composition (rare: looked up when it happens).
    pub fn call_failed(&self, composition: &str, call: &str, kind: &str) {
        self.call_failures.with_label_values(&[composition, call, kind]).inc();
    }

    /// A backend request that failed by the backend's fault (rare: looked
    /// up when it happens).
    pub fn upstream_failed(&self, route: &str, call: &str, cause: &str) {
        self.upstream_failures.with_label_values(&[route, call, cause]).inc();
    }

    /// A backend request sent again by an upstream's retries; `reason` is
    /// the cause (`connect`, `timeout`) or the status retried on (rare:
    /// looked up when it happens).
    pub fn upstream_retried(&self, upstream: &str, route: &str, call: &str, reason: &str) {
        self.retries.with_label_values(&[upstream, route, call, reason]).inc();
    }

    /// A retry the upstream's budget refused.
    pub fn upstream_retry_refused(&self, upstream: &str, route: &str, call: &str) {
        self.retries_refused.with_label_values(&[upstream, route, call]).inc();
    }

    /// A request a wasm policy failed (rare: labels looked up when it
    /// happens; `callback` is the export that failed, or `start-up`).
    pub fn wasm_failed(&self, policy: &str, callback: &str) {
        self.wasm_failures.with_label_values(&[policy, callback]).inc();
    }

    /// A request the upstream's circuit breaker answered 503 at once.
    pub fn upstream_circuit_open(&self, upstream: &str, route: &str, call: &str) {
        self.overloaded.with_label_values(&[upstream, route, call]).inc();
    }

    /// A request answered 503 because no target of its upstream was usable.
    pub fn upstream_no_target(&self, upstream: &str, route: &str, call: &str) {
        self.no_target.with_label_values(&[upstream, route, call]).inc();
    }

    /// A target ejected by passive health checks (rare).
    pub fn upstream_ejected(&self, upstream: &str, target: &str) {
        self.ejections.with_label_values(&[upstream, target]).inc();
    }

    /// One active health check.
    pub fn upstream_health_checked(&self, upstream: &str, target: &str, passed: bool) {
        self.health_checks.with_label_values(&[upstream, target, if passed { "passed" } else { "failed" }]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.in_flight_gauge.set(self.in_flight.load(Ordering::Relaxed));
        self.connections_gauge.set(self.connections.load(Ordering::Relaxed));
        self.resident_memory.set(resident_bytes());
        if let Some(read) = self.call_cache_size.get() {
            let (bytes, entries) = read();
            self.call_cache_bytes.set(bytes as i64);
            self.call_cache_entries.set(entries as i64);
        }
        self.tls_handshakes_total.set(self.tls_handshakes.load(Ordering::Relaxed));
        self.tls_handshake_failures_total.set(self.tls_handshake_failures.load(Ordering::Relaxed));
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Resident set size from /proc (0 where there is none).
fn resident_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
