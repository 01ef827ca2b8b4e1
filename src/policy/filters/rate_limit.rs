//! `rate-limit`: sliding-window counters per key (`by`), local to the node
//! or shared through Redis (`scope: cluster`, `policy::cluster`), one quota
//! for everything the policy is attached to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderName;

use crate::config::{RateLimitConfig, RateLimitScope};
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::cluster;
use crate::policy::filter::{Bind, Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::{Refusal, Services};

#[derive(Debug)]
pub struct RateLimit {
    by: LimitBy,
    state: Arc<LimitState>,
    cluster: bool,
    fault_tolerant: bool,
    /// Bound when `scope: cluster` and the node has Redis.
    redis: Option<ClusterLimit>,
}

/// A rate limit counted in Redis, with the local counters as fallback.
#[derive(Debug)]
struct ClusterLimit {
    limiter: Arc<cluster::RedisLimiter>,
    policy: String,
    /// (length in ms, limit) of each window, as the script takes them.
    windows: Arc<[(u64, u64)]>,
}

impl Filter for RateLimit {
    type Config = RateLimitConfig;

    fn compile(c: &RateLimitConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let windows: Vec<(u64, Duration)> = match (c.limit, c.window, &c.limits) {
            (Some(l), Some(w), None) => vec![(l, w.0)],
            (None, None, Some(list)) if !list.is_empty() => list.iter().map(|w| (w.limit, w.window.0)).collect(),
            _ => {
                cx.error("", "a rate-limit has limit and window, or a non-empty limits list");
                vec![]
            }
        };
        for (limit, window) in &windows {
            if *limit == 0 || window.is_zero() {
                cx.error("", "limit and window must be more than 0");
            }
        }
        let by = match c.by.as_str() {
            "consumer" => Some(LimitBy::Consumer),
            "ip" => Some(LimitBy::Ip),
            "route" => Some(LimitBy::Route),
            other => match other.strip_prefix("header:") {
                Some(h) => match HeaderName::from_bytes(h.as_bytes()) {
                    Ok(h) => Some(LimitBy::Header(h)),
                    Err(_) => {
                        cx.error("by", format!("invalid header name {h:?}"));
                        None
                    }
                },
                None => {
                    cx.error("by", format!("invalid key {other:?}: use consumer, ip, route or header:NAME"));
                    None
                }
            },
        };
        let (Some(by), false) = (by, cx.has_errors()) else { return Err(cx.invalid()) };
        Ok(RateLimit {
            by,
            state: Arc::new(LimitState::new(windows)),
            cluster: c.scope == RateLimitScope::Cluster,
            fault_tolerant: c.fault_tolerant,
            redis: None,
        })
    }

    fn phase(&self) -> Phase {
        Phase::RateLimit
    }

    fn bind(&mut self, node: &Arc<Services>, cx: &mut Bind<'_>) {
        if !self.cluster {
            return;
        }
        match &node.redis {
            Some(limiter) => {
                self.redis = Some(ClusterLimit {
                    limiter: limiter.clone(),
                    policy: cx.name.to_string(),
                    windows: self.state.windows.iter().map(|(limit, len)| (len.as_millis().max(1) as u64, *limit)).collect(),
                })
            }
            None => cx.error("scope", "scope: cluster needs Redis: set MANIFOLD_REDIS_URL (or use scope: local)"),
        }
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        // A request without the key it is split by counts by address.
        let key = match &self.by {
            LimitBy::Consumer => cx.auth.consumer.as_ref().map(|c| c.limit_key.clone()),
            LimitBy::Ip => None,
            // Hashed: a client cannot make keys large, nor read back secrets.
            LimitBy::Header(h) => cx.headers.get(h).map(|v| format!("h:{:016x}", fxhash_bytes(v.as_bytes()))),
            LimitBy::Route => Some(format!("r:{}", cx.entity)),
        }
        .unwrap_or_else(|| ip_key(cx.client_ip));
        let verdict = match &self.redis {
            Some(c) => match c.limiter.check(&c.policy, &key, &c.windows).await {
                cluster::Verdict::Allowed(info) => Ok(info),
                cluster::Verdict::Refused(info) => Err(info),
                cluster::Verdict::Unavailable => {
                    if !self.fault_tolerant {
                        return Err(GatewayError::new(ErrorCode::UpstreamUnavailable, "the rate limit cannot be checked right now").into());
                    }
                    c.limiter.fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.state.hit(&key)
                }
            },
            None => self.state.hit(&key),
        };
        match verdict {
            Ok(info) => {
                if cx.out.rate.is_none_or(|r| info.remaining < r.remaining) {
                    cx.out.rate = Some(info);
                }
                Ok(())
            }
            Err(info) => {
                let mut r = Refusal::from(GatewayError::new(ErrorCode::RateLimited, "too many requests; see Retry-After"));
                r.rate = Some(info);
                Err(r)
            }
        }
    }
}

/// How one rate-limit policy splits its quota.
#[derive(Debug)]
enum LimitBy {
    Consumer,
    Ip,
    Header(HeaderName),
    Route,
}

/// A sliding-window counter: the previous window's count, weighted by how
/// much of it still overlaps the last `window`, plus the current one's.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    current: u64,
    previous: u64,
}

/// A local rate limit's counters, shared by everything the policy is
/// attached to, in shards so workers rarely meet on one lock.
#[derive(Debug)]
pub struct LimitState {
    windows: Vec<(u64, Duration)>,
    max_keys_per_shard: usize,
    shards: Vec<Mutex<HashMap<String, Vec<Window>>>>,
}

/// What a limited response carries: the tightest window's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

impl LimitState {
    fn new(windows: Vec<(u64, Duration)>) -> LimitState {
        LimitState { windows, max_keys_per_shard: MAX_KEYS_PER_SHARD, shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    /// Counts one request for `key`; `Err` when any window is full.
    fn hit(&self, key: &str) -> Result<RateInfo, RateInfo> {
        self.hit_at(key, Instant::now())
    }

    fn hit_at(&self, key: &str, now: Instant) -> Result<RateInfo, RateInfo> {
        let shard = &self.shards[(fxhash(key) % self.shards.len() as u64) as usize];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys_per_shard {
            let longest = self.windows.iter().map(|(_, len)| *len).max().unwrap_or_default();
            map.retain(|_, wins| wins.iter().any(|w| now.saturating_duration_since(w.start) < longest * 2));
            if map.len() >= self.max_keys_per_shard {
                return Err(RateInfo { limit: self.windows.first().map_or(0, |w| w.0), remaining: 0, reset_secs: 1 });
            }
        }
        let wins = map
            .entry(key.to_string())
            .or_insert_with(|| self.windows.iter().map(|_| Window { start: now, current: 0, previous: 0 }).collect());
        let mut tightest: Option<RateInfo> = None;
        let mut refused = false;
        for ((limit, len), w) in self.windows.iter().zip(wins.iter_mut()) {
            let mut elapsed = now.duration_since(w.start);
            if elapsed >= *len {
                let periods = elapsed.as_nanos() / len.as_nanos().max(1);
                if periods == 1 {
                    w.previous = w.current;
                    w.start += *len;
                } else {
                    // Idle for two windows or more: nothing of them counts.
                    w.previous = 0;
                    w.start = now;
                }
                w.current = 0;
                elapsed = now.duration_since(w.start);
            }
            let overlap = 1.0 - elapsed.as_secs_f64() / len.as_secs_f64();
            let used = (w.previous as f64 * overlap).floor() as u64 + w.current;
            let reset_secs = (*len - elapsed).as_secs().max(1);
            if used >= *limit {
                refused = true;
            }
            let remaining = limit.saturating_sub(used + 1);
            let info = RateInfo { limit: *limit, remaining, reset_secs };
            if tightest.is_none_or(|t| remaining < t.remaining) {
                tightest = Some(info);
            }
        }
        let info = tightest.unwrap_or(RateInfo { limit: 0, remaining: 0, reset_secs: 1 });
        if refused {
            return Err(RateInfo { remaining: 0, ..info });
        }
        for w in wins.iter_mut() {
            w.current += 1;
        }
        Ok(info)
    }
}

fn fxhash(s: &str) -> u64 {
    fxhash_bytes(s.as_bytes())
}

fn fxhash_bytes(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// An address's bucket: IPv6 clients by /64, since one host easily holds a
/// whole /64 and would otherwise get a fresh quota per address.
fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Most keys one shard keeps; past it, keys idle for two windows go first,
/// then the shard refuses new keys rather than grow.
const MAX_KEYS_PER_SHARD: usize = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sliding_window_forgets_gradually() {
        let state = LimitState::new(vec![(10, Duration::from_secs(60))]);
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(state.hit_at("k", t0).map(|r| r.remaining), Ok(9 - i));
        }
        assert!(state.hit_at("k", t0 + Duration::from_secs(59)).is_err(), "full for the whole window");
        // Halfway through the next window, half of the last one still counts.
        let half = t0 + Duration::from_secs(90);
        for _ in 0..5 {
            assert!(state.hit_at("k", half).is_ok());
        }
        assert!(state.hit_at("k", half).is_err());
        // Two windows later, nothing of it is left.
        assert_eq!(state.hit_at("k", t0 + Duration::from_secs(181)).map(|r| r.remaining), Ok(9));
        // Keys are independent.
        assert!(state.hit_at("other", half).is_ok());
    }

    #[test]
    fn counters_stay_bounded_and_ipv6_counts_by_prefix() {
        let mut state = LimitState::new(vec![(1, Duration::from_secs(60))]);
        state.max_keys_per_shard = 4;
        let t0 = Instant::now();
        let keys = |state: &LimitState| state.shards.iter().map(|s| s.lock().unwrap().len()).sum::<usize>();
        for i in 0..1000 {
            let _ = state.hit_at(&format!("k{i}"), t0);
        }
        assert!(keys(&state) <= 16 * 4, "a client choosing keys cannot grow the map");
        // Once the old keys have been idle for two windows, they make room.
        let later = t0 + Duration::from_secs(121);
        assert!(state.hit_at("fresh", later).is_ok());
        assert!(keys(&state) <= 16 * 4);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key("10.0.0.1".parse().unwrap()), ip_key("10.0.0.2".parse().unwrap()));
    }
}
