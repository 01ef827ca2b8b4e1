//! Where a backend request goes: an upstream's targets and the balancer
//! that picks one, compiled once per config. A route or call with a URL is
//! an upstream of one target on the node's connector.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

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

/// A compiled upstream: its targets, the smooth weighted round-robin order
/// they are picked in, and how connections to them are made.
pub struct UpstreamPlan {
    /// The upstream's name (`None`: a route's or call's URL).
    pub name: Option<Arc<str>>,
    pub targets: Box<[Target]>,
    /// One period of smooth weighted round-robin (nginx's algorithm) as
    /// target indexes, computed at compile time: picking is one relaxed
    /// `fetch_add` shared by the workers, no lock.
    order: Box<[u32]>,
    next: AtomicUsize,
    /// Its own TLS settings (a `tls` block); `None`: the node's connector.
    pub connector: Option<Arc<Connector>>,
    /// `connect_timeout`, when set and there is no own connector (which
    /// carries it itself).
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 to the targets (carried; the HTTP/2 client is not built yet).
    pub http2: bool,
}

impl std::fmt::Debug for UpstreamPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPlan").field("name", &self.name).field("targets", &self.targets).field("http2", &self.http2).finish()
    }
}

impl Target {
    pub fn new(scheme: Scheme, authority: Authority, weight: u32) -> Target {
        let host = HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value");
        Target { scheme, authority, host, weight }
    }
}

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
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        UpstreamPlan {
            name,
            order: smooth_wrr(&weights).into(),
            targets: targets.into(),
            next: AtomicUsize::new(0),
            connector,
            connect_timeout,
            http2,
        }
    }

    /// The next target in smooth weighted round-robin order.
    pub fn pick(&self) -> &Target {
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.targets[self.order[n % self.order.len()] as usize]
    }
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
}
