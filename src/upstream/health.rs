//! Target health: what a node knows of each target of its upstreams, kept
//! across config swaps, and the two ways it learns it.
//!
//! - **Active** checks: one task per target on the control runtime (never
//!   on a proxy worker) requests the upstream's `health.active.path` every
//!   `interval`; `unhealthy_after` failures in a row take the target out,
//!   `healthy_after` successes in a row bring it back. A target starts
//!   healthy.
//! - **Passive** ejection: every answer of real traffic is observed where
//!   the request was sent ([`super::Tries`]); a connect error, a timeout, a
//!   broken answer or a 5xx counts against the target (never a client's
//!   fault), and `failures` of them within one `window` eject it for
//!   `eject_for`, unless `max_ejected` of the pool are ejected already.
//!
//! A [`TargetState`] is node-wide and shared by the workers (atomics only
//! on the request path). The [`Registry`] hands the same state to every
//! compiled config whose upstream has the same name, target and health
//! settings, so a config swap that leaves a target alone leaves its health
//! alone; it holds states weakly, so a target gone from every live config
//! is forgotten, and its checker stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request};
use serde_json::{json, Value};

use super::{Client, Connector};
use crate::body::Body;
use crate::config::model::{StatusSpec, UpstreamHealth};

/// An upstream's `health`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    pub active: Option<ActivePolicy>,
    pub passive: Option<PassivePolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivePolicy {
    pub path: PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    /// Inclusive ranges of the statuses that pass.
    pub statuses: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PassivePolicy {
    pub failures: u32,
    pub window: Duration,
    pub eject_for: Duration,
    /// The largest share of the pool ejected at once, 0.0 to 1.0.
    pub max_ejected: f64,
}

impl HealthPolicy {
    /// From a validated `health` block, its defaults filled in as the
    /// docs say.
    pub fn compile(h: &UpstreamHealth) -> HealthPolicy {
        let active = h.active.as_ref().map(|a| ActivePolicy {
            path: a.path.parse().unwrap_or_else(|_| PathAndQuery::from_static("/")),
            interval: a.interval.map_or(Duration::from_secs(5), |d| d.0),
            timeout: a.timeout.map_or(Duration::from_secs(1), |d| d.0),
            healthy_after: a.healthy_after.unwrap_or(2).max(1),
            unhealthy_after: a.unhealthy_after.unwrap_or(3).max(1),
            statuses: match &a.statuses {
                Some(s) => s.iter().filter_map(status_range).collect(),
                None => vec![(200, 399)],
            },
        });
        let passive = h.passive.as_ref().map(|p| PassivePolicy {
            failures: p.failures.unwrap_or(5).max(1),
            window: p.window.map_or(Duration::from_secs(10), |d| d.0),
            eject_for: p.eject_for.map_or(Duration::from_secs(30), |d| d.0),
            max_ejected: p.max_ejected.map_or(50.0, |m| m.0).clamp(0.0, 100.0) / 100.0,
        });
        HealthPolicy { active, passive }
    }

    fn passes(&self, status: u16) -> bool {
        self.active.as_ref().is_none_or(|a| a.statuses.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)))
    }
}

/// `200`, `"200"` or `"200-399"` as an inclusive range (validated before).
fn status_range(s: &StatusSpec) -> Option<(u16, u16)> {
    match s {
        StatusSpec::Code(c) => Some((*c, *c)),
        StatusSpec::Text(t) => match t.split_once('-') {
            Some((lo, hi)) => Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)),
            None => t.trim().parse().ok().map(|c| (c, c)),
        },
    }
}

/// Milliseconds on the node's monotonic clock, never 0 (0 means "never").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What the node knows of one target: shared by every worker and by every
/// live config that has this target with the same health settings.
#[derive(Debug, Default)]
pub struct TargetState {
    /// Requests in flight to the target on this node (least-requests).
    pub in_flight: AtomicUsize,
    /// Active checks say it is down.
    active_down: AtomicBool,
    /// Successes (positive) or failures (negative) in a row, active checks.
    streak: AtomicU64,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    last_check: Mutex<Option<LastCheck>>,
    /// Passive: the current window's start and its failures.
    window_start: AtomicU64,
    window_failures: AtomicU32,
    /// Passive: ejected until then (`now_ms`), 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU64,
    /// A checker task runs for this state.
    checking: AtomicBool,
}

#[derive(Debug, Clone)]
struct LastCheck {
    at: Instant,
    outcome: Result<u16, String>,
}

/// The health of a target as the balancers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Active checks failed.
    Unhealthy,
    /// Passive ejection, for its `eject_for`.
    Ejected,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Ejected => "ejected",
        }
    }
}

impl TargetState {
    /// Whether the target may take a request now.
    #[inline]
    pub fn usable(&self, now: u64) -> bool {
        !self.active_down.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    pub fn health(&self, now: u64) -> Health {
        if self.active_down.load(Ordering::Relaxed) {
            Health::Unhealthy
        } else if self.ejected_until.load(Ordering::Relaxed) > now {
            Health::Ejected
        } else {
            Health::Healthy
        }
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Counts one failure of real traffic in the current window; `true`
    /// when it makes `failures` (the caller then decides on ejection).
    fn count_failure(&self, p: &PassivePolicy, now: u64) -> bool {
        let window = p.window.as_millis() as u64;
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= window {
            // A new window: whoever swaps the start resets the count.
            if self.window_start.compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                self.window_failures.store(0, Ordering::Relaxed);
            }
        }
        self.window_failures.fetch_add(1, Ordering::Relaxed) + 1 == p.failures
    }

    /// Ejects the target for `for_ms` from `now`; `false` when another
    /// request did first.
    fn eject(&self, now: u64, for_ms: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until > now {
            return false;
        }
        if self.ejected_until.compare_exchange(until, now + for_ms, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        self.window_failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records one active check; returns the new state when it changed.
    fn checked(&self, policy: &ActivePolicy, outcome: Result<u16, String>, passes: bool) -> Option<bool> {
        if passes {
            self.checks_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.checks_failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.last_check.lock() {
            *last = Some(LastCheck { at: Instant::now(), outcome });
        }
        // The streak: successes in the low half, failures in the high.
        let streak = self.streak.load(Ordering::Relaxed);
        let (ok, failed) = (streak & 0xffff_ffff, streak >> 32);
        let (ok, failed) = if passes { (ok + 1, 0) } else { (0, failed + 1) };
        self.streak.store(ok | (failed << 32), Ordering::Relaxed);
        let down = self.active_down.load(Ordering::Relaxed);
        if down && ok >= u64::from(policy.healthy_after) {
            self.active_down.store(false, Ordering::Relaxed);
            return Some(true);
        }
        if !down && failed >= u64::from(policy.unhealthy_after) {
            self.active_down.store(true, Ordering::Relaxed);
            return Some(false);
        }
        None
    }

    /// The target's part of `GET /upstreams/{name}/health`.
    pub fn report(&self, now: u64, policy: Option<&HealthPolicy>) -> Value {
        let active = policy.and_then(|p| p.active.as_ref()).map(|_| {
            let last = self.last_check.lock().ok().and_then(|l| l.clone());
            let streak = self.streak.load(Ordering::Relaxed);
            json!({
                "checks_passed": self.checks_ok.load(Ordering::Relaxed),
                "checks_failed": self.checks_failed.load(Ordering::Relaxed),
                "passed_in_a_row": streak & 0xffff_ffff,
                "failed_in_a_row": streak >> 32,
                "last_check": last.map(|l| {
                    let ago = l.at.elapsed().as_millis() as u64;
                    match l.outcome {
                        Ok(status) => json!({"ms_ago": ago, "status": status}),
                        Err(error) => json!({"ms_ago": ago, "error": error}),
                    }
                }),
            })
        });
        let passive = policy.and_then(|p| p.passive.as_ref()).map(|p| {
            let until = self.ejected_until.load(Ordering::Relaxed);
            let in_window = now.saturating_sub(self.window_start.load(Ordering::Relaxed)) < p.window.as_millis() as u64;
            json!({
                "failures_in_window": if in_window { self.window_failures.load(Ordering::Relaxed) } else { 0 },
                "ejections": self.ejections.load(Ordering::Relaxed),
                "ejected_for_ms": until.saturating_sub(now),
            })
        });
        json!({
            "state": self.health(now).as_str(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "active": active,
            "passive": passive,
        })
    }

    pub fn checks(&self) -> (u64, u64) {
        (self.checks_ok.load(Ordering::Relaxed), self.checks_failed.load(Ordering::Relaxed))
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// Observes one outcome of real traffic for passive ejection: `failed`
/// says whether the target caused a failure. `siblings` are the pool's
/// states (for `max_ejected`). Returns `true` when this ejected the target.
pub fn observe(
    policy: &PassivePolicy,
    state: &TargetState,
    siblings: &mut dyn Iterator<Item = &TargetState>,
    upstream: &str,
    target: &str,
) -> bool {
    let now = now_ms();
    if !state.count_failure(policy, now) {
        return false;
    }
    let (mut pool, mut ejected) = (0usize, 0usize);
    for s in siblings {
        pool += 1;
        ejected += usize::from(s.ejected(now));
    }
    let allowed = (policy.max_ejected * pool as f64 + 1e-9).floor() as usize;
    if ejected >= allowed {
        tracing::warn!(
            upstream,
            upstream_target = target,
            failures = policy.failures,
            "target failing, but not ejected: {ejected} of {pool} targets are ejected already (max_ejected)"
        );
        // The count stays past `failures`: said once per window, and the
        // target is ejected in a later window if it still fails.
        return false;
    }
    if !state.eject(now, policy.eject_for.as_millis() as u64) {
        return false;
    }
    tracing::warn!(
        upstream,
        upstream_target = target,
        failures = policy.failures,
        window = ?policy.window,
        eject_for = ?policy.eject_for,
        "target ejected: {} failures within the window",
        policy.failures
    );
    true
}

/// The key a state is kept under: the same upstream, target and health
/// settings share it across configs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    upstream: String,
    target: String,
    health: String,
}

/// Where a checker connects: everything of a target and its upstream a
/// check needs, owned by the checker task.
pub struct CheckTarget {
    pub upstream: Arc<str>,
    pub label: String,
    pub scheme: Scheme,
    pub authority: Authority,
    pub host: HeaderValue,
    pub connector: Option<Arc<Connector>>,
    pub connect_timeout: Option<Duration>,
    pub http2: bool,
}

/// The node's target states, and what runs the active checks and the
/// resolvers.
#[derive(Default)]
pub struct Registry {
    states: Mutex<HashMap<Key, Weak<TargetState>>>,
    /// The control runtime, its client and the node's connector, once the
    /// node runs.
    runner: OnceLock<(tokio::runtime::Handle, Client, Arc<Connector>)>,
    metrics: OnceLock<Arc<crate::metrics::Metrics>>,
    /// The last addresses each name of an upstream resolved to
    /// (`upstream/host:port`), so a new config starts from them.
    resolved: Mutex<HashMap<String, Vec<std::net::IpAddr>>>,
    /// Looked up before the system resolver (`--hosts-file`).
    hosts_file: OnceLock<std::path::PathBuf>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// The state of `target` of `upstream` under `health`: the one a live
    /// config has already, or a new one.
    pub fn state(&self, upstream: &str, target: &str, health: Option<&HealthPolicy>) -> Arc<TargetState> {
        let key = Key { upstream: upstream.to_string(), target: target.to_string(), health: format!("{health:?}") };
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = states.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        states.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(TargetState::default());
        states.insert(key, Arc::downgrade(&s));
        s
    }

    /// Lets the registry run checks: on `runtime`, the control runtime,
    /// with its own client over the node's connector.
    pub fn bind(&self, runtime: tokio::runtime::Handle, connector: Arc<Connector>, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.runner.set((runtime, Client::new(connector.clone()), connector));
        let _ = self.metrics.set(metrics);
    }

    /// Names are looked up in `path` (hosts(5) format) before the system's
    /// resolver. Set once, before the node serves.
    pub fn set_hosts_file(&self, path: std::path::PathBuf) {
        let _ = self.hosts_file.set(path);
    }

    /// The node's connector, once bound.
    pub fn node_connector(&self) -> Option<&Arc<Connector>> {
        self.runner.get().map(|(_, _, c)| c)
    }

    pub(super) fn remember(&self, upstream: &str, authority: &str, ips: &[std::net::IpAddr]) {
        if let Ok(mut r) = self.resolved.lock() {
            r.insert(format!("{upstream}/{authority}"), ips.to_vec());
        }
    }

    /// The addresses `host:port` of `upstream` resolved to last; before its
    /// first resolution, what the hosts file says of `host` (a file read,
    /// no network), so a name only the hosts file knows is never sent to
    /// the system's resolver.
    pub fn cached(&self, upstream: &str, authority: &str, host: &str) -> Option<Vec<std::net::IpAddr>> {
        if let Some(ips) = self.resolved.lock().ok()?.get(&format!("{upstream}/{authority}")) {
            return Some(ips.clone());
        }
        let text = std::fs::read_to_string(self.hosts_file.get()?).ok()?;
        Some(super::dns::from_hosts(&text, host)).filter(|ips| !ips.is_empty())
    }

    /// Starts what runs for `plan` off the request path: its resolver
    /// (`resolve_every`) and the checkers of its targets.
    pub fn start_background(self: &Arc<Self>, plan: &Arc<super::UpstreamPlan>) {
        if let Some((runtime, _, connector)) = self.runner.get() {
            if plan.resolution.is_some() && !plan.resolving.swap(true, Ordering::Relaxed) {
                let cx = super::dns::ResolverContext {
                    hosts_file: self.hosts_file.get().cloned(),
                    registry: Arc::downgrade(self),
                    connector: connector.clone(),
                };
                runtime.spawn(super::dns::run(Arc::downgrade(plan), cx));
            }
        }
        start_checks(self, plan);
    }

    /// Starts the checker of `state` unless one runs already (or the
    /// registry is not bound: a config compiled but never served).
    pub fn start_checks(&self, state: &Arc<TargetState>, policy: &Arc<HealthPolicy>, target: CheckTarget) {
        let Some((runtime, client, _)) = self.runner.get() else { return };
        if policy.active.is_none() || state.checking.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(state);
        let (client, policy, metrics) = (client.clone(), policy.clone(), self.metrics.get().cloned());
        runtime.spawn(check_loop(weak, policy, target, client, metrics));
    }
}

/// `GET /upstreams/{name}/health`: every target of `plan` as this node
/// sees it now.
pub fn report(plan: &super::UpstreamPlan) -> Value {
    let now = now_ms();
    let set = plan.set();
    let policy = plan.health.as_deref();
    let targets: Vec<Value> = set
        .targets
        .iter()
        .map(|t| {
            // The target first, as a reader looks for it.
            let mut v = serde_json::Map::new();
            v.insert("target".into(), json!(t.label.as_ref()));
            v.insert("weight".into(), json!(t.weight));
            if let Value::Object(rest) = t.state.report(now, policy) {
                v.extend(rest);
            }
            Value::Object(v)
        })
        .collect();
    let usable = set.targets.iter().filter(|t| policy.is_none() || t.state.usable(now)).count();
    json!({
        "upstream": plan.name.as_deref(),
        "checks": { "active": policy.is_some_and(|p| p.active.is_some()), "passive": policy.is_some_and(|p| p.passive.is_some()) },
        "usable": usable,
        "targets": targets,
    })
}

/// Starts the checkers of `plan`'s targets that have none running.
pub fn start_checks(registry: &Registry, plan: &super::UpstreamPlan) {
    let Some(policy) = plan.health.as_ref().filter(|p| p.active.is_some()) else { return };
    let upstream: Arc<str> = plan.name.clone().unwrap_or_else(|| "".into());
    for t in plan.set().targets.iter() {
        let target = CheckTarget {
            upstream: upstream.clone(),
            label: t.label.to_string(),
            scheme: t.scheme.clone(),
            authority: t.authority.clone(),
            host: t.host.clone(),
            connector: t.connector.clone().or_else(|| plan.connector.clone()),
            connect_timeout: plan.connect_timeout,
            http2: plan.http2,
        };
        registry.start_checks(&t.state, policy, target);
    }
}

/// One target's checker: runs until the target is in no live config.
async fn check_loop(
    state: Weak<TargetState>,
    policy: Arc<HealthPolicy>,
    target: CheckTarget,
    client: Client,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) {
    let Some(active) = policy.active.clone() else { return };
    // The first check soon, spread a little so that a pool's checkers do
    // not fire at once.
    let spread = (crate::upstream::balance::hash_str(&target.label) % 100) as u32;
    tokio::time::sleep(active.interval.min(Duration::from_millis(50)) * spread / 100).await;
    loop {
        if state.strong_count() == 0 {
            return;
        }
        let outcome = check_once(&client, &target, &active).await;
        let Some(s) = state.upgrade() else { return };
        let passes = matches!(outcome, Ok(status) if policy.passes(status));
        if let Some(m) = &metrics {
            m.upstream_health_checked(&target.upstream, &target.label, passes);
        }
        let describe = match &outcome {
            Ok(status) => format!("status {status}"),
            Err(e) => e.clone(),
        };
        match s.checked(&active, outcome, passes) {
            Some(true) => tracing::info!(
                upstream = %target.upstream,
                upstream_target = %target.label,
                "target healthy again: {} checks passed in a row",
                active.healthy_after
            ),
            Some(false) => tracing::warn!(
                upstream = %target.upstream,
                upstream_target = %target.label,
                last = %describe,
                "target unhealthy: {} checks failed in a row",
                active.unhealthy_after
            ),
            None => {}
        }
        drop(s);
        tokio::time::sleep(active.interval).await;
    }
}

/// One check: the status, or what went wrong (for the health report).
async fn check_once(client: &Client, t: &CheckTarget, active: &ActivePolicy) -> Result<u16, String> {
    let uri = http::Uri::builder()
        .scheme(t.scheme.clone())
        .authority(t.authority.clone())
        .path_and_query(active.path.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = Request::new(Body::Empty);
    *req.uri_mut() = uri;
    req.headers_mut().insert(http::header::HOST, t.host.clone());
    req.headers_mut().insert(http::header::USER_AGENT, HeaderValue::from_static("manifold-health-check"));
    let deadline = tokio::time::Instant::now() + active.timeout;
    let send = client.send_plain(req, t.connector.as_ref(), t.connect_timeout, t.http2, deadline);
    match send.await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            // Read to the end within the timeout, so the connection can
            // serve the next check.
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 64 * 1024));
            let _ = tokio::time::timeout_at(deadline, body).await;
            Ok(status)
        }
        Err(e) => Err(e.cause.as_str().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive(failures: u32, max_ejected: f64) -> PassivePolicy {
        PassivePolicy { failures, window: Duration::from_secs(60), eject_for: Duration::from_secs(60), max_ejected }
    }

    #[test]
    fn failures_in_a_window_eject_within_max_ejected() {
        let p = passive(3, 0.5);
        let pool: Vec<TargetState> = (0..4).map(|_| TargetState::default()).collect();
        let observe_n = |i: usize, n: usize| (0..n).map(|_| observe(&p, &pool[i], &mut pool.iter(), "u", "t")).filter(|e| *e).count();
        assert_eq!(observe_n(0, 2), 0);
        assert!(pool[0].usable(now_ms()));
        assert_eq!(observe_n(0, 1), 1);
        assert_eq!(pool[0].health(now_ms()), Health::Ejected);
        assert_eq!(observe_n(1, 3), 1);
        // Half of four are ejected: the third is not.
        assert_eq!(observe_n(2, 6), 0);
        assert!(pool[2].usable(now_ms()));
        assert_eq!(pool[0].ejections() + pool[1].ejections(), 2);
    }

    #[test]
    fn active_checks_flip_after_their_streaks() {
        let policy = ActivePolicy {
            path: PathAndQuery::from_static("/h"),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
            statuses: vec![(200, 399)],
        };
        let s = TargetState::default();
        assert_eq!(s.checked(&policy, Err("connect".into()), false), None);
        assert_eq!(s.checked(&policy, Err("connect".into()), false), None);
        assert_eq!(s.checked(&policy, Ok(200), true), None);
        assert_eq!(s.checked(&policy, Ok(500), false), None);
        assert_eq!(s.checked(&policy, Ok(500), false), None);
        assert_eq!(s.checked(&policy, Ok(500), false), Some(false));
        assert_eq!(s.health(now_ms()), Health::Unhealthy);
        assert_eq!(s.checked(&policy, Ok(200), true), None);
        assert_eq!(s.checked(&policy, Ok(200), true), Some(true));
        assert!(s.usable(now_ms()));
        assert_eq!(s.checks(), (3, 5));
    }

    #[test]
    fn statuses_parse_as_ranges() {
        assert_eq!(status_range(&StatusSpec::Code(204)), Some((204, 204)));
        assert_eq!(status_range(&StatusSpec::Text("200-399".into())), Some((200, 399)));
        assert_eq!(status_range(&StatusSpec::Text("418".into())), Some((418, 418)));
    }

    #[test]
    fn the_registry_shares_states_while_a_config_holds_them() {
        let r = Registry::default();
        let a = r.state("u", "http://a", None);
        assert!(Arc::ptr_eq(&a, &r.state("u", "http://a", None)));
        assert!(!Arc::ptr_eq(&a, &r.state("v", "http://a", None)));
        let p = HealthPolicy { active: None, passive: Some(passive(1, 1.0)) };
        assert!(!Arc::ptr_eq(&a, &r.state("u", "http://a", Some(&p))));
        a.in_flight.store(7, Ordering::Relaxed);
        drop(a);
        assert_eq!(r.state("u", "http://a", None).in_flight.load(Ordering::Relaxed), 0);
    }
}
