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

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

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

/// A compiled upstream: its targets, the balancer that picks them, and how
/// connections to them are made.
pub struct UpstreamPlan {
    /// The upstream's name (`None`: a route's or call's URL).
    pub name: Option<Arc<str>>,
    pub targets: Box<[Target]>,
    pub balancer: Balancer,
    /// One period of smooth weighted round-robin (nginx's algorithm) as
    /// target indexes, computed at compile time: picking is one relaxed
    /// `fetch_add` shared by the workers, no lock. Also the fallback of
    /// consistent hashing without a key, and how least-requests breaks ties.
    order: Box<[u32]>,
    next: AtomicUsize,
    /// least-requests: the requests in flight per target on this node,
    /// shared by the workers (empty for the other balancers).
    in_flight: Box<[AtomicUsize]>,
    /// consistent-hash: the ring, sorted by point (empty otherwise).
    ring: Box<[(u64, u32)]>,
    /// Its own TLS settings (a `tls` block); `None`: the node's connector.
    pub connector: Option<Arc<Connector>>,
    /// `connect_timeout`, when set and there is no own connector (which
    /// carries it itself).
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 to the targets.
    pub http2: bool,
    /// `retries`: what is retried and the budget (`None`: no retries).
    pub retry: Option<RetryPolicy>,
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
    /// connection; `timeout`: no answer head in time).
    pub fn on_cause(&self, cause: super::Cause) -> bool {
        match cause {
            super::Cause::Connect => self.connect,
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
            .field("targets", &self.targets)
            .field("balancer", &self.balancer)
            .field("http2", &self.http2)
            .finish()
    }
}

impl Target {
    pub fn new(scheme: Scheme, authority: Authority, weight: u32) -> Target {
        let host = HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value");
        Target { scheme, authority, host, weight }
    }
}

const NO_TARGET: u32 = u32::MAX;

/// What one request holds in flight, released when this is dropped (the
/// answer ended, failed, or was dropped): a least-requests target's count,
/// the upstream's request count (circuit breaker, retry budget) and a
/// retry's count. One guard for all three, so an answer body holds one.
pub struct InFlight {
    plan: Arc<UpstreamPlan>,
    /// The least-requests target counted, or `NO_TARGET`.
    target: u32,
    request: bool,
    retry: bool,
}

impl InFlight {
    fn new(plan: &Arc<UpstreamPlan>, target: u32, request: bool, retry: bool) -> InFlight {
        InFlight { plan: plan.clone(), target, request, retry }
    }

    /// One guard holding what both hold (both of the same upstream, as
    /// one request's guards are).
    pub fn join(a: Option<InFlight>, b: Option<InFlight>) -> Option<InFlight> {
        match (a, b) {
            (Some(mut a), Some(mut b)) => {
                debug_assert!(Arc::ptr_eq(&a.plan, &b.plan));
                if b.target != NO_TARGET {
                    if a.target != NO_TARGET {
                        a.plan.in_flight[a.target as usize].fetch_sub(1, Ordering::Relaxed);
                    }
                    a.target = std::mem::replace(&mut b.target, NO_TARGET);
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
        if self.target != NO_TARGET {
            self.plan.in_flight[self.target as usize].fetch_sub(1, Ordering::Relaxed);
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
        f.debug_struct("InFlight").field("target", &self.target).field("request", &self.request).field("retry", &self.retry).finish()
    }
}

/// A picked target, its index, and for least-requests the guard that
/// counts it.
pub struct Picked<'a> {
    pub target: &'a Target,
    pub index: u32,
    pub in_flight: Option<InFlight>,
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
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let in_flight = match balancer {
            Balancer::LeastRequests if targets.len() > 1 => targets.iter().map(|_| AtomicUsize::new(0)).collect(),
            _ => Box::default(),
        };
        let ring = match balancer {
            Balancer::ConsistentHash(_) if targets.len() > 1 => {
                let ids: Vec<(String, u32)> = targets.iter().map(|t| (format!("{}://{}", t.scheme, t.authority), t.weight)).collect();
                hash_ring(&ids).into()
            }
            _ => Box::default(),
        };
        UpstreamPlan {
            name,
            order: smooth_wrr(&weights).into(),
            targets: targets.into(),
            balancer,
            next: AtomicUsize::new(0),
            in_flight,
            ring,
            connector,
            connect_timeout,
            http2,
            retry: None,
            max_in_flight: usize::MAX,
            counted: false,
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
        }
    }

    /// The same plan with `retries` and a `circuit_breaker`.
    pub fn with_resilience(mut self, retry: Option<RetryPolicy>, max_in_flight: Option<usize>) -> UpstreamPlan {
        self.counted = retry.is_some() || max_in_flight.is_some();
        self.retry = retry;
        self.max_in_flight = max_in_flight.unwrap_or(usize::MAX);
        self
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
        Ok(Some(InFlight::new(self, NO_TARGET, true, false)))
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
        Some(InFlight::new(self, NO_TARGET, false, true))
    }

    /// Requests and retries in flight to this upstream on this node (with
    /// `retries` or a circuit breaker; else 0).
    pub fn requests_in_flight(&self) -> (usize, usize) {
        (self.requests.load(Ordering::Relaxed), self.retries.load(Ordering::Relaxed))
    }

    /// Picks a target for a retry: the next in round-robin order that was
    /// not tried yet, when there is one (else the balancer's pick again).
    pub fn pick_retry<'a>(self: &'a Arc<Self>, input: &PickInput<'_>, tried: &[u32]) -> Picked<'a> {
        let n = self.targets.len();
        if n > 1 && tried.len() < n {
            for _ in 0..self.order.len().max(n) {
                let index = self.next_index();
                if !tried.contains(&(index as u32)) {
                    return self.picked(index);
                }
            }
            if let Some(index) = (0..n).find(|i| !tried.contains(&(*i as u32))) {
                return self.picked(index);
            }
        }
        self.pick_for(input)
    }

    fn picked(self: &Arc<Self>, index: usize) -> Picked<'_> {
        let in_flight = (!self.in_flight.is_empty()).then(|| {
            self.in_flight[index].fetch_add(1, Ordering::Relaxed);
            InFlight::new(self, index as u32, false, false)
        });
        Picked { target: &self.targets[index], index: index as u32, in_flight }
    }

    /// The next target in smooth weighted round-robin order.
    pub fn pick(&self) -> &Target {
        &self.targets[self.next_index()]
    }

    fn next_index(&self) -> usize {
        if self.targets.len() == 1 {
            return 0;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.order[n % self.order.len()] as usize
    }

    /// Picks a target for one request by the upstream's balancer. With
    /// least-requests the answer holds an [`InFlight`] guard: keep it until
    /// the answer has ended.
    pub fn pick_for<'a>(self: &'a Arc<Self>, input: &PickInput<'_>) -> Picked<'a> {
        if self.targets.len() == 1 {
            return Picked { target: &self.targets[0], index: 0, in_flight: None };
        }
        match &self.balancer {
            Balancer::RoundRobin => {
                let index = self.next_index();
                Picked { target: &self.targets[index], index: index as u32, in_flight: None }
            }
            Balancer::LeastRequests => self.picked(self.least_requests()),
            Balancer::ConsistentHash(on) => {
                let index = match hash_key(on, input) {
                    Some(h) => self.ring_lookup(h),
                    None => self.next_index(),
                };
                Picked { target: &self.targets[index], index: index as u32, in_flight: None }
            }
        }
    }

    /// The target with the fewest requests in flight relative to its
    /// weight (`in_flight / weight`, compared by cross-multiplying). The
    /// scan starts at the next round-robin pick and keeps the first of
    /// equals, so tied targets share the load by their weights.
    fn least_requests(&self) -> usize {
        let n = self.targets.len();
        let start = self.next_index();
        let mut best = start;
        let mut best_load = self.in_flight[start].load(Ordering::Relaxed) as u64;
        for k in 1..n {
            let i = (start + k) % n;
            let load = self.in_flight[i].load(Ordering::Relaxed) as u64;
            // load / w_i < best_load / w_best
            if load * u64::from(self.targets[best].weight) < best_load * u64::from(self.targets[i].weight) {
                best = i;
                best_load = load;
            }
        }
        best
    }

    fn ring_lookup(&self, h: u64) -> usize {
        let at = self.ring.partition_point(|(p, _)| *p < h);
        self.ring[if at == self.ring.len() { 0 } else { at }].1 as usize
    }

    /// Requests in flight to target `index` on this node (least-requests).
    pub fn in_flight(&self, index: usize) -> usize {
        self.in_flight.get(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }
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
            let port = plan.pick().authority.port_u16().unwrap();
            counts[port as usize - 1] += 1;
        }
        assert_eq!(counts, [10, 20, 30]);
    }

    fn plan(weights: &[u32], balancer: Balancer) -> Arc<UpstreamPlan> {
        let t = |i: usize, weight| Target::new(Scheme::HTTP, format!("10.0.0.{}:80", i + 1).parse().unwrap(), weight);
        let targets = weights.iter().enumerate().map(|(i, w)| t(i, *w)).collect();
        Arc::new(UpstreamPlan::with_balancer(None, targets, balancer, None, None, false))
    }

    fn input<'a>(headers: &'a HeaderMap, path: &'a str) -> PickInput<'a> {
        PickInput { headers, peer: IpAddr::from([127, 0, 0, 1]), trusted_proxies: &[], path }
    }

    fn index_of(plan: &UpstreamPlan, t: &Target) -> usize {
        plan.targets.iter().position(|x| std::ptr::eq(x, t)).unwrap()
    }

    #[test]
    fn least_requests_prefers_the_least_loaded_by_weight_and_releases() {
        let plan = plan(&[100, 100, 200], Balancer::LeastRequests);
        let h = HeaderMap::new();
        // Idle, ties go round-robin by weight: 4 picks released at once.
        let mut counts = [0; 3];
        for _ in 0..40 {
            let p = plan.pick_for(&input(&h, "/"));
            counts[index_of(&plan, p.target)] += 1;
        }
        assert_eq!(counts, [10, 10, 20]);
        assert!((0..3).all(|i| plan.in_flight(i) == 0));
        // Held: the heavy target takes two for each one of the others.
        let held: Vec<Picked> = (0..40).map(|_| plan.pick_for(&input(&h, "/"))).collect();
        let on = |i| held.iter().filter(|p| index_of(&plan, p.target) == i).count();
        assert_eq!((on(0), on(1), on(2)), (10, 10, 20));
        assert_eq!((plan.in_flight(0), plan.in_flight(1), plan.in_flight(2)), (10, 10, 20));
        // Releasing target 0's requests sends the next ones there.
        let (zero, rest): (Vec<Picked>, Vec<Picked>) = held.into_iter().partition(|p| index_of(&plan, p.target) == 0);
        drop(zero);
        assert_eq!(plan.in_flight(0), 0);
        let next: Vec<Picked> = (0..10).map(|_| plan.pick_for(&input(&h, "/"))).collect();
        assert!(next.iter().all(|p| index_of(&plan, p.target) == 0));
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
        let first = index_of(&plan, plan.pick_for(&input(&h, "/")).target);
        for _ in 0..20 {
            let p = plan.pick_for(&input(&h, "/"));
            assert!(p.in_flight.is_none());
            assert_eq!(index_of(&plan, p.target), first);
        }
        // No header: round-robin over all three.
        let none = HeaderMap::new();
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[index_of(&plan, plan.pick_for(&input(&none, "/")).target)] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        // By path.
        let by_path = self::plan(&[100, 100, 100], Balancer::ConsistentHash(HashOn::Path));
        let spread: std::collections::HashSet<usize> =
            (0..60).map(|i| index_of(&by_path, by_path.pick_for(&input(&none, &format!("/p/{i}"))).target)).collect();
        assert_eq!(spread.len(), 3);
        let a = index_of(&by_path, by_path.pick_for(&input(&none, "/p/7")).target);
        assert_eq!(index_of(&by_path, by_path.pick_for(&input(&h, "/p/7")).target), a);
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
        let first = plan.pick_for(&input(&h, "/"));
        let next = plan.pick_retry(&input(&h, "/"), &[first.index]);
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
