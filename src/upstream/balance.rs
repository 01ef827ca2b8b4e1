//! Where a backend request goes: an upstream's targets and the balancer
//! that picks one, compiled once per config. A route or call with a URL is
//! an upstream of one target on the node's connector.
//!
//! Three balancers, none taking a lock: smooth weighted round-robin (one
//! shared atomic counter over an order computed at compile time),
//! least-requests (one atomic in-flight count per target, held by an
//! [`InFlight`] guard from the pick until the answer has ended) and
//! consistent hashing (a ketama-style ring built at compile time, looked up
//! by binary search).
//!
//! An upstream with `retries` or a `circuit_breaker` also counts its
//! requests and retries in flight on this node (two more atomics, held by
//! the same [`InFlight`] guard); a URL's upstream counts nothing.
//!
//! An upstream with `health` picks only usable targets (a target's health
//! is atomics in its [`TargetState`], which the health registry keeps
//! across configs); one without never looks. An upstream with
//! `resolve_every` has its [`TargetSet`] replaced whole by its resolver.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use super::health::{HealthPolicy, TargetState};
use super::Connector;

/// One target: where it connects and the `Host` it is sent.
#[derive(Debug)]
pub struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The target's `host[:port]`, the `Host` header unless a route
    /// preserves the client's.
    pub host: HeaderValue,
    pub weight: u32,
    /// `scheme://authority`, for logs, metrics and the health report.
    pub label: Arc<str>,
    /// Its health and requests in flight, node-wide.
    pub state: Arc<TargetState>,
    /// A connector of its own: a resolved address of an https name, whose
    /// certificate is checked for the name.
    pub connector: Option<Arc<Connector>>,
}

/// What a consistent-hash upstream hashes (`hash_on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The authenticated consumer's name (`X-Consumer-Name`, which only
    /// the gateway's policies set).
    Consumer,
    /// The client address, as ip-restriction and rate limits see it.
    Ip,
    /// The value of one request header (all its values, in order).
    Header(HeaderName),
    /// The request path (normalized, without the query).
    Path,
}

impl HashOn {
    /// Parses a validated `hash_on`.
    pub fn parse(s: &str) -> Option<HashOn> {
        match s {
            "consumer" => Some(HashOn::Consumer),
            "ip" => Some(HashOn::Ip),
            "path" => Some(HashOn::Path),
            other => HeaderName::from_bytes(other.strip_prefix("header:")?.as_bytes()).ok().map(HashOn::Header),
        }
    }
}

/// How an upstream is balanced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balancer {
    RoundRobin,
    LeastRequests,
    ConsistentHash(HashOn),
}

/// What a pick may read of the client's request: only consistent hashing
/// reads it, and only the one thing it hashes.
#[derive(Clone, Copy)]
pub struct PickInput<'a> {
    /// The client's request headers, after the policies ran (so
    /// `X-Consumer-Name` is the gateway's).
    pub headers: &'a HeaderMap,
    /// The connection's peer and the node's trusted proxies, from which
    /// the client address is found as the policies find it.
    pub peer: IpAddr,
    pub trusted_proxies: &'a [IpNet],
    /// The normalized request path.
    pub path: &'a str,
}

/// An upstream's targets at one time, with what the balancers precompute
/// over them: fixed for the life of a config, or replaced whole when a
/// DNS name of the upstream resolves to other addresses.
#[derive(Debug)]
pub struct TargetSet {
    pub targets: Box<[Target]>,
    /// One period of smooth weighted round-robin (nginx's algorithm) as
    /// target indexes: picking is one relaxed `fetch_add` on the plan's
    /// counter, shared by the workers, no lock. Also the fallback of
    /// consistent hashing without a key, and how least-requests breaks ties.
    order: Box<[u32]>,
    /// consistent-hash: the ring, sorted by point (empty otherwise).
    ring: Box<[(u64, u32)]>,
}

impl TargetSet {
    pub fn new(targets: Vec<Target>, balancer: &Balancer) -> TargetSet {
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let ring = match balancer {
            Balancer::ConsistentHash(_) if targets.len() > 1 => {
                let ids: Vec<(String, u32)> = targets.iter().map(|t| (t.label.to_string(), t.weight)).collect();
                hash_ring(&ids).into()
            }
            _ => Box::default(),
        };
        TargetSet { order: smooth_wrr(&weights).into(), targets: targets.into(), ring }
    }
}

/// Where a plan's targets are: fixed, or swapped by its resolver.
enum Targets {
    Fixed(TargetSet),
    Resolved(arc_swap::ArcSwap<TargetSet>),
}

/// The targets one request picks among: borrowed from the plan, or the
/// resolver's set at the time of the pick.
pub enum SetRef<'a> {
    Fixed(&'a TargetSet),
    Resolved(Arc<TargetSet>),
}

impl std::ops::Deref for SetRef<'_> {
    type Target = TargetSet;
    fn deref(&self) -> &TargetSet {
        match self {
            SetRef::Fixed(s) => s,
            SetRef::Resolved(s) => s,
        }
    }
}

/// A compiled upstream: its targets, the balancer that picks them, and how
/// connections to them are made.
pub struct UpstreamPlan {
    /// The upstream's name (`None`: a route's or call's URL).
    pub name: Option<Arc<str>>,
    targets: Targets,
    pub balancer: Balancer,
    next: AtomicUsize,
    /// Its own TLS settings (a `tls` block); `None`: the node's connector.
    pub connector: Option<Arc<Connector>>,
    /// `connect_timeout`, when set and there is no own connector (which
    /// carries it itself).
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 to the targets.
    pub http2: bool,
    /// `retries`: what is retried and the budget (`None`: no retries).
    pub retry: Option<RetryPolicy>,
    /// `health`: `None` when the upstream has none, and then picks never
    /// look at a target's health.
    pub health: Option<Arc<HealthPolicy>>,
    /// `circuit_breaker.max_in_flight` (`usize::MAX`: none).
    max_in_flight: usize,
    /// Whether requests and retries in flight are counted (a retry policy
    /// or a circuit breaker): else [`UpstreamPlan::admit`] costs nothing.
    counted: bool,
    /// Requests in flight to this upstream on this node, from admission
    /// until the answer has ended (only when `counted`).
    requests: AtomicUsize,
    /// Retries in flight on this node, from the retry's admission by the
    /// budget until its answer has ended.
    retries: AtomicUsize,
    /// Wakes the resolver early (a connect failure to a resolved target).
    pub(super) resolve_now: Arc<tokio::sync::Notify>,
    /// `resolve_every`: the targets as written and the period (`None`:
    /// the targets are fixed).
    pub resolution: Option<super::dns::Resolution>,
    /// The upstream's `tls.server_name` is set: resolved addresses keep it.
    pub own_server_name: bool,
    /// A resolver task runs for this plan.
    pub(super) resolving: std::sync::atomic::AtomicBool,
}

/// An upstream's `retries`, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries after the first one.
    pub max: u32,
    connect: bool,
    timeout: bool,
    /// Bit `s - 500` for each status 500-599 retried.
    statuses: u128,
    /// The budget as a fraction (20% is 0.2).
    budget: f64,
}

/// Retries in flight always allowed, whatever the budget (Envoy's
/// `min_retry_concurrency`): a quiet pool still retries.
pub const MIN_RETRIES_IN_FLIGHT: usize = 3;

impl RetryPolicy {
    /// From validated `on` words (`connect`, `timeout`, a status 500-599 as
    /// a number or a string) and a budget in percent.
    pub fn new<'a>(max: u32, on: impl IntoIterator<Item = &'a str>, budget_percent: f64) -> RetryPolicy {
        let mut p = RetryPolicy { max, connect: false, timeout: false, statuses: 0, budget: (budget_percent / 100.0).clamp(0.0, 1.0) };
        for word in on {
            match word {
                "connect" => p.connect = true,
                "timeout" => p.timeout = true,
                n => {
                    if let Some(s) = n.parse::<u16>().ok().filter(|s| (500..=599).contains(s)) {
                        p.statuses |= 1u128 << (s - 500);
                    }
                }
            }
        }
        p
    }

    /// Whether a failure of this cause is retried (`connect`: no
    /// connection, or the connection closed before the answer's head, as
    /// nginx's `error`; `timeout`: no answer head in time).
    pub fn on_cause(&self, cause: super::Cause) -> bool {
        match cause {
            super::Cause::Connect | super::Cause::Closed => self.connect,
            super::Cause::Timeout => self.timeout,
            _ => false,
        }
    }

    /// Whether an answer of this status is retried.
    pub fn on_status(&self, status: u16) -> bool {
        (500..=599).contains(&status) && self.statuses & (1u128 << (status - 500)) != 0
    }

    /// Why the outcome of a try is tried again (its status, or its failure's
    /// cause, for the metric's `reason`), or `None`: `retried` tries were
    /// sent again already, or the deadline passed, or the outcome is not
    /// one `on` names. The client's own faults are never retried.
    pub fn reason<B>(
        &self,
        retried: usize,
        deadline: tokio::time::Instant,
        outcome: &Result<http::Response<B>, super::UpstreamError>,
    ) -> Option<String> {
        if retried >= self.max as usize || tokio::time::Instant::now() >= deadline {
            return None;
        }
        match outcome {
            Ok(resp) if self.on_status(resp.status().as_u16()) => Some(resp.status().as_str().to_string()),
            Err(e) if e.fault() == super::Fault::Upstream && self.on_cause(e.cause) => Some(e.cause.as_str().to_string()),
            _ => None,
        }
    }
}

/// The methods a retry may send again (RFC 9110's idempotent ones but TRACE).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// An upstream's circuit breaker refused a request: `max_in_flight` are
/// in flight on this node already.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded;

impl std::fmt::Debug for UpstreamPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPlan")
            .field("name", &self.name)
            .field("targets", &*self.set())
            .field("balancer", &self.balancer)
            .field("http2", &self.http2)
            .finish()
    }
}

impl Target {
    /// A target with a state of its own (a URL's, or a test's).
    pub fn new(scheme: Scheme, authority: Authority, weight: u32) -> Target {
        Target::with_state(scheme, authority, weight, Arc::default())
    }

    /// A target whose health and in-flight count are `state` (shared with
    /// earlier configs through the health registry).
    pub fn with_state(scheme: Scheme, authority: Authority, weight: u32, state: Arc<TargetState>) -> Target {
        let host = HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value");
        let label = format!("{scheme}://{authority}").into();
        Target { scheme, authority, host, weight, label, state, connector: None }
    }
}

/// What one request holds in flight, released when this is dropped (the
/// answer ended, failed, or was dropped): a least-requests target's count,
/// the upstream's request count (circuit breaker, retry budget) and a
/// retry's count. One guard for all three, so an answer body holds one.
pub struct InFlight {
    plan: Arc<UpstreamPlan>,
    /// The least-requests target counted.
    target: Option<Arc<TargetState>>,
    request: bool,
    retry: bool,
}

impl InFlight {
    fn new(plan: &Arc<UpstreamPlan>, target: Option<Arc<TargetState>>, request: bool, retry: bool) -> InFlight {
        InFlight { plan: plan.clone(), target, request, retry }
    }

    /// One guard holding what both hold (both of the same upstream, as
    /// one request's guards are).
    pub fn join(a: Option<InFlight>, b: Option<InFlight>) -> Option<InFlight> {
        match (a, b) {
            (Some(mut a), Some(mut b)) => {
                debug_assert!(Arc::ptr_eq(&a.plan, &b.plan));
                if let Some(t) = b.target.take() {
                    if let Some(old) = a.target.replace(t) {
                        old.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                if b.request {
                    if a.request {
                        a.plan.requests.fetch_sub(1, Ordering::Relaxed);
                    }
                    a.request = true;
                    b.request = false;
                }
                if b.retry {
                    if a.retry {
                        a.plan.retries.fetch_sub(1, Ordering::Relaxed);
                    }
                    a.retry = true;
                    b.retry = false;
                }
                Some(a)
            }
            (a, b) => a.or(b),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(t) = &self.target {
            t.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if self.request {
            self.plan.requests.fetch_sub(1, Ordering::Relaxed);
        }
        if self.retry {
            self.plan.retries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("target", &self.target.is_some())
            .field("request", &self.request)
            .field("retry", &self.retry)
            .finish()
    }
}

/// A picked target, its index in the set, and for least-requests the
/// guard that counts it.
pub struct Picked<'a> {
    pub set: SetRef<'a>,
    pub index: u32,
    pub in_flight: Option<InFlight>,
}

impl Picked<'_> {
    pub fn target(&self) -> &Target {
        &self.set.targets[self.index as usize]
    }
}

/// Ring points per unit of weight: a target of the default weight 100 has
/// 400 points, enough for its share to be within a few percent of its
/// weight's.
const POINTS_PER_WEIGHT: u32 = 4;

impl UpstreamPlan {
    /// A URL's one target, on the node's connector.
    pub fn single(scheme: Scheme, authority: Authority) -> UpstreamPlan {
        UpstreamPlan::new(None, vec![Target::new(scheme, authority, 1)], None, None, false)
    }

    pub fn new(
        name: Option<Arc<str>>,
        targets: Vec<Target>,
        connector: Option<Arc<Connector>>,
        connect_timeout: Option<Duration>,
        http2: bool,
    ) -> UpstreamPlan {
        UpstreamPlan::with_balancer(name, targets, Balancer::RoundRobin, connector, connect_timeout, http2)
    }

    pub fn with_balancer(
        name: Option<Arc<str>>,
        targets: Vec<Target>,
        balancer: Balancer,
        connector: Option<Arc<Connector>>,
        connect_timeout: Option<Duration>,
        http2: bool,
    ) -> UpstreamPlan {
        UpstreamPlan {
            name,
            targets: Targets::Fixed(TargetSet::new(targets, &balancer)),
            balancer,
            next: AtomicUsize::new(0),
            connector,
            connect_timeout,
            http2,
            retry: None,
            health: None,
            max_in_flight: usize::MAX,
            counted: false,
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            resolve_now: Arc::default(),
            resolution: None,
            own_server_name: false,
            resolving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same plan with `retries` and a `circuit_breaker`.
    pub fn with_resilience(mut self, retry: Option<RetryPolicy>, max_in_flight: Option<usize>) -> UpstreamPlan {
        self.counted = retry.is_some() || max_in_flight.is_some();
        self.retry = retry;
        self.max_in_flight = max_in_flight.unwrap_or(usize::MAX);
        self
    }

    /// The same plan with `health`.
    pub fn with_health(mut self, health: Option<Arc<HealthPolicy>>) -> UpstreamPlan {
        self.health = health;
        self
    }

    /// The same plan with targets its resolver replaces (`resolve_every`).
    pub fn resolved(mut self, resolution: super::dns::Resolution) -> UpstreamPlan {
        if let Targets::Fixed(set) = self.targets {
            self.targets = Targets::Resolved(arc_swap::ArcSwap::from_pointee(set));
        }
        self.own_server_name = self.connector.as_ref().is_some_and(|c| c.has_server_name());
        self.resolution = Some(resolution);
        self
    }

    /// Whether the targets come from a resolver.
    pub fn is_resolved(&self) -> bool {
        matches!(self.targets, Targets::Resolved(_))
    }

    /// Replaces the targets (the resolver found other addresses).
    pub fn replace_targets(&self, targets: Vec<Target>) {
        if let Targets::Resolved(cell) = &self.targets {
            cell.store(Arc::new(TargetSet::new(targets, &self.balancer)));
        }
    }

    /// The targets now.
    pub fn set(&self) -> SetRef<'_> {
        match &self.targets {
            Targets::Fixed(set) => SetRef::Fixed(set),
            Targets::Resolved(cell) => SetRef::Resolved(cell.load_full()),
        }
    }

    /// Admits one request (before its first pick): `Err` when the circuit
    /// breaker's `max_in_flight` are in flight already. The guard counts
    /// it until the answer has ended; `None` when this upstream counts
    /// nothing (no retries, no circuit breaker): one branch, no atomic.
    #[inline]
    pub fn admit(self: &Arc<Self>) -> Result<Option<InFlight>, Overloaded> {
        if !self.counted {
            return Ok(None);
        }
        if self.requests.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
            self.requests.fetch_sub(1, Ordering::Relaxed);
            return Err(Overloaded);
        }
        Ok(Some(InFlight::new(self, None, true, false)))
    }

    /// Admits one retry by the budget: retries in flight on this node stay
    /// within `max(3, budget × requests in flight)`. `None`: refused.
    pub fn admit_retry(self: &Arc<Self>) -> Option<InFlight> {
        let budget = self.retry.as_ref()?.budget;
        let allowed = ((budget * self.requests.load(Ordering::Relaxed) as f64) as usize).max(MIN_RETRIES_IN_FLIGHT);
        if self.retries.fetch_add(1, Ordering::Relaxed) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight::new(self, None, false, true))
    }

    /// Requests and retries in flight to this upstream on this node (with
    /// `retries` or a circuit breaker; else 0).
    pub fn requests_in_flight(&self) -> (usize, usize) {
        (self.requests.load(Ordering::Relaxed), self.retries.load(Ordering::Relaxed))
    }

    /// Picks a target for a retry: the next usable one in round-robin
    /// order that was not tried yet, when there is one (else the
    /// balancer's pick again). `None`: no target is usable.
    pub fn pick_retry<'a>(self: &'a Arc<Self>, key: Option<u64>, tried: &[u32]) -> Option<Picked<'a>> {
        let set = self.set();
        let n = set.targets.len();
        if n > 1 && tried.len() < n {
            let now = self.health_clock();
            let fresh = |i: usize| !tried.contains(&(i as u32)) && usable(&set, i, now);
            // From where round-robin is now, without moving it: a retry
            // does not shift the order the first tries of others follow.
            let at = self.next.load(Ordering::Relaxed);
            for k in 0..set.order.len() {
                let index = set.order[(at + k) % set.order.len()] as usize;
                if fresh(index) {
                    return Some(self.picked(set, index));
                }
            }
            if let Some(index) = (0..n).find(|i| fresh(*i)) {
                return Some(self.picked(set, index));
            }
        }
        self.pick_in(set, key)
    }

    fn picked<'a>(self: &'a Arc<Self>, set: SetRef<'a>, index: usize) -> Picked<'a> {
        let in_flight = (self.balancer == Balancer::LeastRequests && set.targets.len() > 1).then(|| {
            let state = &set.targets[index].state;
            state.in_flight.fetch_add(1, Ordering::Relaxed);
            InFlight::new(self, Some(state.clone()), false, false)
        });
        Picked { set, index: index as u32, in_flight }
    }

    /// The index of the next target in smooth weighted round-robin order,
    /// whatever its health.
    pub fn pick_index(&self) -> usize {
        self.next_index(&self.set())
    }

    fn next_index(&self, set: &TargetSet) -> usize {
        if set.targets.len() == 1 {
            return 0;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        set.order[n % set.order.len()] as usize
    }

    /// The health clock when the plan has health settings, else 0 (and
    /// then every target is usable whatever its state).
    #[inline]
    fn health_clock(&self) -> u64 {
        if self.health.is_some() {
            super::health::now_ms()
        } else {
            0
        }
    }

    /// Picks a target for one request by the upstream's balancer, among
    /// the usable ones. With least-requests the answer holds an
    /// [`InFlight`] guard: keep it until the answer has ended. `None`: no
    /// target is usable (every one unhealthy or ejected).
    /// `key`: the request's [`UpstreamPlan::key`].
    #[inline]
    pub fn pick_for<'a>(self: &'a Arc<Self>, key: Option<u64>) -> Option<Picked<'a>> {
        let set = self.set();
        if set.targets.len() == 1 && self.health.is_none() {
            return Some(Picked { set, index: 0, in_flight: None });
        }
        self.pick_in(set, key)
    }

    /// What a consistent-hash upstream hashes of the request (`None`:
    /// another balancer, or the request has no such key, and then the
    /// pick is round-robin). Computed once per request: a retry's pick
    /// uses the same key.
    #[inline]
    pub fn key(&self, input: &PickInput<'_>) -> Option<u64> {
        match &self.balancer {
            Balancer::ConsistentHash(on) => hash_key(on, input),
            _ => None,
        }
    }

    fn pick_in<'a>(self: &'a Arc<Self>, set: SetRef<'a>, key: Option<u64>) -> Option<Picked<'a>> {
        let now = self.health_clock();
        let n = set.targets.len();
        let index = match &self.balancer {
            Balancer::LeastRequests if n > 1 => return self.least_requests(&set, now).map(|i| self.picked(set, i)),
            Balancer::ConsistentHash(_) if n > 1 => match key {
                Some(h) => ring_lookup(&set, h, now)?,
                None => self.round_robin(&set, now)?,
            },
            _ => self.round_robin(&set, now)?,
        };
        Some(Picked { set, index: index as u32, in_flight: None })
    }

    /// The next usable target in round-robin order.
    fn round_robin(&self, set: &TargetSet, now: u64) -> Option<usize> {
        let first = self.next_index(set);
        if usable(set, first, now) {
            return Some(first);
        }
        for _ in 0..set.order.len() {
            let i = self.next_index(set);
            if usable(set, i, now) {
                return Some(i);
            }
        }
        (0..set.targets.len()).find(|i| usable(set, *i, now))
    }

    /// The usable target with the fewest requests in flight relative to
    /// its weight (`in_flight / weight`, compared by cross-multiplying).
    /// The scan starts at the next round-robin pick and keeps the first of
    /// equals, so tied targets share the load by their weights.
    fn least_requests(&self, set: &TargetSet, now: u64) -> Option<usize> {
        let n = set.targets.len();
        let start = self.next_index(set);
        let mut best: Option<(usize, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !usable(set, i, now) {
                continue;
            }
            let load = set.targets[i].state.in_flight.load(Ordering::Relaxed) as u64;
            // load / w_i < best_load / w_best
            match best {
                Some((b, best_load)) if load * u64::from(set.targets[b].weight) >= best_load * u64::from(set.targets[i].weight) => {}
                _ => best = Some((i, load)),
            }
        }
        best.map(|(i, _)| i)
    }

    /// Requests in flight to target `index` on this node (least-requests).
    pub fn in_flight(&self, index: usize) -> usize {
        self.set().targets.get(index).map_or(0, |t| t.state.in_flight.load(Ordering::Relaxed))
    }

    /// Observes the outcome of one request to target `index` of `set`
    /// (passive health): a failure the target caused counts against it.
    /// `true` when this ejected the target.
    pub fn observe<B>(&self, set: &TargetSet, index: u32, outcome: &Result<http::Response<B>, super::UpstreamError>) -> bool {
        let failed = match outcome {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => e.fault() == super::Fault::Upstream,
        };
        if let Err(e) = outcome {
            if e.cause == super::Cause::Connect && self.is_resolved() {
                self.resolve_now.notify_one();
            }
        }
        let Some(passive) = self.health.as_ref().and_then(|h| h.passive.as_ref()) else { return false };
        if !failed {
            return false;
        }
        let Some(target) = set.targets.get(index as usize) else { return false };
        let upstream = self.name.as_deref().unwrap_or("");
        super::health::observe(passive, &target.state, &mut set.targets.iter().map(|t| &*t.state), upstream, &target.label)
    }
}

/// Whether target `i` may take a request (`now` 0: health not watched).
#[inline]
fn usable(set: &TargetSet, i: usize, now: u64) -> bool {
    now == 0 || set.targets[i].state.usable(now)
}

/// The usable target owning the first ring point at or after `h`: a key
/// whose target is out goes to the next target on the ring, as it would
/// if that target had left the pool.
fn ring_lookup(set: &TargetSet, h: u64, now: u64) -> Option<usize> {
    let ring = &set.ring;
    let at = ring.partition_point(|(p, _)| *p < h);
    let mut seen = 0u128;
    let n = set.targets.len();
    for k in 0..ring.len() {
        let t = ring[(at + k) % ring.len()].1 as usize;
        if usable(set, t, now) {
            return Some(t);
        }
        if t < 128 {
            seen |= 1 << t;
            if seen.count_ones() as usize >= n {
                return None;
            }
        }
    }
    None
}

/// The same hash the ring uses, of a string (checkers spread their start).
pub fn hash_str(s: &str) -> u64 {
    hash64(s.as_bytes())
}

/// The hash of a request's key, or `None` when it has none (no consumer,
/// no such header): the caller falls back to round-robin.
fn hash_key(on: &HashOn, input: &PickInput<'_>) -> Option<u64> {
    match on {
        HashOn::Consumer => input.headers.get(crate::policy::X_CONSUMER_NAME).map(|v| hash64(v.as_bytes())),
        HashOn::Header(name) => {
            let mut values = input.headers.get_all(name).iter();
            let first = values.next()?;
            let mut h = Fnv::default();
            h.write(first.as_bytes());
            for v in values {
                h.write(b",");
                h.write(v.as_bytes());
            }
            Some(h.finish())
        }
        HashOn::Path => Some(hash64(input.path.as_bytes())),
        HashOn::Ip => {
            let ip = crate::policy::client_ip(input.peer, input.headers, input.trusted_proxies);
            Some(match ip {
                IpAddr::V4(v4) => hash64(&v4.octets()),
                IpAddr::V6(v6) => hash64(&v6.octets()),
            })
        }
    }
}

/// FNV-1a over the bytes, then murmur3's 64-bit finalizer so that keys
/// differing in one byte land far apart on the ring. Fixed, so every node
/// (and every version) puts a key at the same place.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^= k >> 33;
        k
    }
}

fn hash64(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    h.finish()
}

/// A ketama-style ring: each target (by its URL) gets `weight *
/// POINTS_PER_WEIGHT` points, the hashes of `"URL#i"`; a key belongs to the
/// first point at or after its hash. A target's points depend on it alone,
/// so removing a target moves only the keys it had, and adding one moves
/// to it only the keys it takes. Ties between points (vanishingly rare)
/// are ordered by target index.
pub fn hash_ring(targets: &[(String, u32)]) -> Vec<(u64, u32)> {
    let mut ring = Vec::with_capacity(targets.iter().map(|(_, w)| (*w * POINTS_PER_WEIGHT) as usize).sum());
    for (index, (id, weight)) in targets.iter().enumerate() {
        for i in 0..weight.max(&1) * POINTS_PER_WEIGHT {
            let mut h = Fnv::default();
            h.write(id.as_bytes());
            h.write(b"#");
            h.write(i.to_string().as_bytes());
            ring.push((h.finish(), index as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One period of nginx's smooth weighted round-robin: each step every
/// target's current weight grows by its weight, the largest (the first on
/// a tie) is picked and loses the total. Weights are divided by their gcd
/// first, which does not change the order; the period is their sum.
pub fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|w| i64::from((*w / g).max(1))).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_round_robin_is_nginx_order() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(smooth_wrr(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(&[100, 100]), [0, 1]);
        assert_eq!(smooth_wrr(&[1]), [0]);
        let order = smooth_wrr(&[100, 200, 300]);
        assert_eq!(order, [2, 1, 0, 2, 1, 2]);
        let order = smooth_wrr(&[7, 1000, 3]);
        assert_eq!(order.len(), 1010);
        for (i, w) in [7, 1000, 3].into_iter().enumerate() {
            assert_eq!(order.iter().filter(|&&t| t as usize == i).count(), w);
        }
    }

    #[test]
    fn picks_follow_the_order_and_wrap() {
        let t = |port: u16, weight| Target::new(Scheme::HTTP, format!("127.0.0.1:{port}").parse().unwrap(), weight);
        let plan = UpstreamPlan::new(None, vec![t(1, 1), t(2, 2), t(3, 3)], None, None, false);
        let mut counts = [0; 3];
        for _ in 0..60 {
            let port = plan.set().targets[plan.pick_index()].authority.port_u16().unwrap();
            counts[port as usize - 1] += 1;
        }
        assert_eq!(counts, [10, 20, 30]);
    }

    fn plan(weights: &[u32], balancer: Balancer) -> Arc<UpstreamPlan> {
        let t = |i: usize, weight| Target::new(Scheme::HTTP, format!("10.0.0.{}:80", i + 1).parse().unwrap(), weight);
        let targets = weights.iter().enumerate().map(|(i, w)| t(i, *w)).collect();
        Arc::new(UpstreamPlan::with_balancer(None, targets, balancer, None, None, false))
    }

    fn pick<'a>(plan: &'a Arc<UpstreamPlan>, input: &PickInput<'_>) -> Picked<'a> {
        plan.pick_for(plan.key(input)).expect("a usable target")
    }

    fn input<'a>(headers: &'a HeaderMap, path: &'a str) -> PickInput<'a> {
        PickInput { headers, peer: IpAddr::from([127, 0, 0, 1]), trusted_proxies: &[], path }
    }

    fn index_of(plan: &UpstreamPlan, t: &Target) -> usize {
        plan.set().targets.iter().position(|x| x.label == t.label).unwrap()
    }

    #[test]
    fn least_requests_prefers_the_least_loaded_by_weight_and_releases() {
        let plan = plan(&[100, 100, 200], Balancer::LeastRequests);
        let h = HeaderMap::new();
        // Idle, ties go round-robin by weight: 4 picks released at once.
        let mut counts = [0; 3];
        for _ in 0..40 {
            let p = pick(&plan, &input(&h, "/"));
            counts[index_of(&plan, p.target())] += 1;
        }
        assert_eq!(counts, [10, 10, 20]);
        assert!((0..3).all(|i| plan.in_flight(i) == 0));
        // Held: the heavy target takes two for each one of the others.
        let held: Vec<Picked> = (0..40).map(|_| pick(&plan, &input(&h, "/"))).collect();
        let on = |i| held.iter().filter(|p| index_of(&plan, p.target()) == i).count();
        assert_eq!((on(0), on(1), on(2)), (10, 10, 20));
        assert_eq!((plan.in_flight(0), plan.in_flight(1), plan.in_flight(2)), (10, 10, 20));
        // Releasing target 0's requests sends the next ones there.
        let (zero, rest): (Vec<Picked>, Vec<Picked>) = held.into_iter().partition(|p| index_of(&plan, p.target()) == 0);
        drop(zero);
        assert_eq!(plan.in_flight(0), 0);
        let next: Vec<Picked> = (0..10).map(|_| pick(&plan, &input(&h, "/"))).collect();
        assert!(next.iter().all(|p| index_of(&plan, p.target()) == 0));
        drop((next, rest));
        assert!((0..3).all(|i| plan.in_flight(i) == 0));
    }

    fn share(ring: &[(u64, u32)], targets: usize, keys: u32) -> Vec<usize> {
        let mut counts = vec![0; targets];
        for k in 0..keys {
            let h = hash64(format!("key-{k}").as_bytes());
            let at = ring.partition_point(|(p, _)| *p < h);
            counts[ring[if at == ring.len() { 0 } else { at }].1 as usize] += 1;
        }
        counts
    }

    fn lookup(ring: &[(u64, u32)], key: &str) -> u32 {
        let h = hash64(key.as_bytes());
        let at = ring.partition_point(|(p, _)| *p < h);
        ring[if at == ring.len() { 0 } else { at }].1
    }

    #[test]
    fn the_ring_spreads_keys_by_weight() {
        let ids = |w: &[u32]| w.iter().enumerate().map(|(i, w)| (format!("http://10.0.0.{i}:80"), *w)).collect::<Vec<_>>();
        for weights in [vec![100, 100, 100], vec![100, 200, 300, 400], vec![100; 10]] {
            let ring = hash_ring(&ids(&weights));
            let keys = 100_000;
            let counts = share(&ring, weights.len(), keys);
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let want = f64::from(keys) * f64::from(*w) / f64::from(total);
                let got = counts[i] as f64;
                assert!((got - want).abs() / want < 0.15, "target {i} of {weights:?}: {got} keys, want about {want}");
            }
        }
    }

    #[test]
    fn the_ring_moves_only_the_keys_of_a_target_that_leaves_or_joins() {
        let all: Vec<(String, u32)> = (0..5).map(|i| (format!("http://10.0.0.{i}:80"), 100)).collect();
        let full = hash_ring(&all);
        // Target 2 leaves: every key of the others stays where it was.
        let fewer: Vec<(String, u32)> = all.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, t)| t.clone()).collect();
        let small = hash_ring(&fewer);
        let url = |ts: &[(String, u32)], i: u32| ts[i as usize].0.clone();
        let mut moved = 0;
        for k in 0..20_000 {
            let key = format!("user-{k}");
            let before = url(&all, lookup(&full, &key));
            let after = url(&fewer, lookup(&small, &key));
            if before != url(&all, 2) {
                assert_eq!(before, after, "{key} moved off a target that stayed");
            } else {
                moved += 1;
            }
        }
        // About a fifth of the keys were on target 2, and only they moved.
        assert!((3_000..5_000).contains(&moved), "{moved}");
        // A target joining (2 back again) takes keys only for itself.
        for k in 0..20_000 {
            let key = format!("user-{k}");
            let before = url(&fewer, lookup(&small, &key));
            let after = url(&all, lookup(&full, &key));
            assert!(after == before || after == url(&all, 2), "{key} moved between targets that stayed");
        }
    }

    #[test]
    fn consistent_hash_picks_by_key_and_falls_back_to_round_robin() {
        let plan = plan(&[100, 100, 100], Balancer::ConsistentHash(HashOn::Header(HeaderName::from_static("x-user"))));
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        let first = index_of(&plan, pick(&plan, &input(&h, "/")).target());
        for _ in 0..20 {
            let p = pick(&plan, &input(&h, "/"));
            assert!(p.in_flight.is_none());
            assert_eq!(index_of(&plan, p.target()), first);
        }
        // No header: round-robin over all three.
        let none = HeaderMap::new();
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[index_of(&plan, pick(&plan, &input(&none, "/")).target())] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        // By path.
        let by_path = self::plan(&[100, 100, 100], Balancer::ConsistentHash(HashOn::Path));
        let spread: std::collections::HashSet<usize> =
            (0..60).map(|i| index_of(&by_path, pick(&by_path, &input(&none, &format!("/p/{i}"))).target())).collect();
        assert_eq!(spread.len(), 3);
        let a = index_of(&by_path, pick(&by_path, &input(&none, "/p/7")).target());
        assert_eq!(index_of(&by_path, pick(&by_path, &input(&h, "/p/7")).target()), a);
    }

    #[test]
    fn the_circuit_breaker_and_the_retry_budget_count_in_one_guard() {
        let t = |i: usize| Target::new(Scheme::HTTP, format!("10.0.0.{}:80", i + 1).parse().unwrap(), 100);
        let retry = RetryPolicy::new(2, ["connect", "503"], 50.0);
        assert!(retry.on_cause(crate::upstream::Cause::Connect) && !retry.on_cause(crate::upstream::Cause::Timeout));
        assert!(retry.on_status(503) && !retry.on_status(502) && !retry.on_status(200));
        let plan = Arc::new(
            UpstreamPlan::with_balancer(None, vec![t(0), t(1)], Balancer::LeastRequests, None, None, false)
                .with_resilience(Some(retry), Some(10)),
        );
        // Ten admitted, the eleventh refused, and a release lets one in.
        let mut admitted: Vec<InFlight> = (0..10).map(|_| plan.admit().unwrap().unwrap()).collect();
        assert!(plan.admit().is_err());
        assert_eq!(plan.requests_in_flight(), (10, 0));
        admitted.pop();
        admitted.push(plan.admit().unwrap().unwrap());
        assert!(plan.admit().is_err());
        // Budget: 50% of 10 in flight is 5 retries.
        let retries: Vec<InFlight> = (0..5).map(|_| plan.admit_retry().unwrap()).collect();
        assert!(plan.admit_retry().is_none());
        drop(retries);
        // A retry goes to the target not tried; joined guards release all.
        let h = HeaderMap::new();
        let first = pick(&plan, &input(&h, "/"));
        let next = plan.pick_retry(None, &[first.index]).unwrap();
        assert_ne!(next.index, first.index);
        drop(first);
        let guard = InFlight::join(InFlight::join(admitted.pop(), next.in_flight), plan.admit_retry());
        assert_eq!(plan.in_flight(0) + plan.in_flight(1), 1);
        assert_eq!(plan.requests_in_flight(), (10, 1));
        drop((guard, admitted));
        assert_eq!(plan.in_flight(0) + plan.in_flight(1), 0);
        assert_eq!(plan.requests_in_flight(), (0, 0));
        // Below 3 requests the minimum of 3 retries applies.
        let plan = Arc::new(
            UpstreamPlan::new(None, vec![t(0)], None, None, false).with_resilience(Some(RetryPolicy::new(1, ["connect"], 0.0)), None),
        );
        let r: Vec<_> = (0..3).map(|_| plan.admit_retry().unwrap()).collect();
        assert!(plan.admit_retry().is_none());
        drop(r);
        // No retries and no breaker: nothing is counted.
        let plain = Arc::new(UpstreamPlan::new(None, vec![t(0)], None, None, false));
        assert!(plain.admit().unwrap().is_none());
        assert_eq!(plain.requests_in_flight(), (0, 0));
    }

    #[test]
    fn hash_on_parses_its_forms() {
        assert_eq!(HashOn::parse("consumer"), Some(HashOn::Consumer));
        assert_eq!(HashOn::parse("ip"), Some(HashOn::Ip));
        assert_eq!(HashOn::parse("path"), Some(HashOn::Path));
        assert_eq!(HashOn::parse("header:X-User"), Some(HashOn::Header(HeaderName::from_static("x-user"))));
        assert_eq!(HashOn::parse("header:bad header"), None);
        assert_eq!(HashOn::parse("cookie"), None);
    }
}
