//! Policies around routes and compositions, compiled once per config and
//! run in SPEC §2's fixed phase order whatever order they are listed in.
//!
//! Enforced today: `ip-restriction`, `https-redirect`, `correlation-id`,
//! `key-auth`, `acl`, `rate-limit` with `scope: local`, `request-size-limit`. The other types are
//! validated but not applied yet (issue 5); every node names them in its
//! log and `/status` (see `Snapshot::unenforced_policies`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::config::validate::{parse_cidr, policy_config, sha256_hex};
use crate::config::{Config, Credential, Policy, PolicyConfig, PolicyKind, RateLimitScope};
use crate::errors::{ErrorCode, GatewayError};

pub const X_CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub const X_CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// Whether the runtime applies this policy yet.
pub fn is_enforced(policy: &Policy) -> bool {
    match policy.kind {
        PolicyKind::IpRestriction
        | PolicyKind::KeyAuth
        | PolicyKind::Acl
        | PolicyKind::HttpsRedirect
        | PolicyKind::CorrelationId
        | PolicyKind::RequestSizeLimit => true,
        // Cluster limits need Redis, which is not wired in yet: they run
        // as local limits (SPEC's fault-tolerant fallback) and are listed.
        PolicyKind::RateLimit => {
            matches!(policy_config(policy.kind, &policy.config), Ok(PolicyConfig::RateLimit(c)) if c.scope == RateLimitScope::Local)
        }
        _ => false,
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

/// Counters for each local rate-limit policy of a config, shared by every
/// chain that uses the policy.
pub fn limit_states(config: &Config) -> HashMap<String, Arc<LimitState>> {
    let mut out = HashMap::new();
    for p in &config.policies {
        if let Ok(PolicyConfig::RateLimit(c)) = policy_config(p.kind, &p.config) {
            let windows = match (c.limit, c.window, c.limits) {
                (Some(l), Some(w), _) => vec![(l, w.0)],
                (_, _, Some(list)) => list.into_iter().map(|w| (w.limit, w.window.0)).collect(),
                _ => continue,
            };
            out.insert(p.name.clone(), Arc::new(LimitState::new(windows)));
        }
    }
    out
}

/// An authenticated (or anonymous) consumer.
#[derive(Debug)]
pub struct ConsumerInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// Who holds which credential, built once per config.
#[derive(Debug, Default)]
pub struct Identities {
    by_key_digest: HashMap<String, Arc<ConsumerInfo>>,
    by_name: HashMap<String, Arc<ConsumerInfo>>,
}

impl Identities {
    pub fn build(config: &Config) -> Identities {
        let mut ids = Identities::default();
        for c in &config.consumers {
            let info = Arc::new(ConsumerInfo { name: c.name.clone(), groups: c.groups.clone() });
            ids.by_name.insert(c.name.clone(), info.clone());
            for cred in &c.credentials {
                if let Credential::KeyAuth { key_sha256: Some(d), .. } = cred {
                    ids.by_key_digest.insert(d.clone(), info.clone());
                }
            }
        }
        ids
    }
}

#[derive(Debug)]
enum Compiled {
    IpRestriction {
        allow: Vec<IpNet>,
        deny: Vec<IpNet>,
        status: StatusCode,
    },
    RateLimit {
        by: LimitBy,
        state: Arc<LimitState>,
    },
    KeyAuth {
        names: Vec<String>,
        hide: bool,
        anonymous: Option<Arc<ConsumerInfo>>,
    },
    Acl {
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
    },
    HttpsRedirect {
        status: StatusCode,
    },
    RequestSizeLimit {
        max: u64,
    },
    /// An authentication method not built yet: it accepts nobody.
    RefuseAuth,
    CorrelationId {
        header: HeaderName,
        echo: bool,
    },
}

#[derive(Debug)]
struct Step {
    name: String,
    phase: u8,
    what: Compiled,
}

/// The policies of one route or composition, in phase order.
#[derive(Debug, Default)]
pub struct PolicyChain {
    steps: Vec<Step>,
    ids: Arc<Identities>,
    /// The route or composition this chain guards (`by: route` counts per name).
    entity: String,
}

/// What the policies need to know about a request besides its headers.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The normalized path.
    pub path: &'a str,
    /// The peer is a trusted proxy (its X-Forwarded-Proto counts).
    pub trusted_peer: bool,
}

/// What the policies decided about an admitted request.
#[derive(Debug, Default)]
pub struct Admission {
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// Set when a rate limit applies: the response carries RateLimit-*.
    pub rate: Option<RateInfo>,
    /// A correlation-id policy's header and value, to echo on the answer.
    pub echo: Option<(HeaderName, HeaderValue)>,
    /// A correlation-id policy's header, which every backend call carries.
    pub correlation: Option<HeaderName>,
    /// request-size-limit: the most body bytes to accept (the body is cut,
    /// and the answer is 413, past it).
    pub body_limit: Option<u64>,
}

/// Why a request was not admitted; `rate` still goes on the answer.
#[derive(Debug)]
pub struct Refusal {
    pub error: GatewayError,
    pub rate: Option<RateInfo>,
    /// https-redirect: answer this status with this Location instead.
    pub redirect: Option<(StatusCode, HeaderValue)>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Refusal { error, rate: None, redirect: None }
    }
}

/// `RateLimit-*` headers, and `Retry-After` on a 429.
pub fn rate_headers(headers: &mut HeaderMap, rate: &RateInfo, refused: bool) {
    headers.insert(HeaderName::from_static("ratelimit-limit"), HeaderValue::from(rate.limit));
    headers.insert(HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(rate.remaining));
    headers.insert(HeaderName::from_static("ratelimit-reset"), HeaderValue::from(rate.reset_secs));
    if refused {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(rate.reset_secs));
    }
}

fn phase(kind: PolicyKind) -> u8 {
    match kind {
        PolicyKind::IpRestriction => 0,
        PolicyKind::HttpsRedirect => 1,
        PolicyKind::Cors => 2,
        PolicyKind::CorrelationId => 3,
        PolicyKind::KeyAuth | PolicyKind::BasicAuth | PolicyKind::Jwt => 4,
        PolicyKind::Acl => 5,
        PolicyKind::RateLimit => 6,
        PolicyKind::RequestSizeLimit => 7,
        PolicyKind::RequestTransform => 8,
        PolicyKind::ResponseTransform => 9,
        PolicyKind::ResponseCache => 10,
    }
}

const AUTH_PHASE: u8 = 4;

impl PolicyChain {
    /// The chain for an entity with these attached policies, plus the
    /// global ones. The config is valid, so every name resolves.
    pub fn build(
        config: &Config,
        entity: &str,
        attached: &[String],
        ids: &Arc<Identities>,
        limits: &HashMap<String, Arc<LimitState>>,
    ) -> PolicyChain {
        let mut steps = Vec::new();
        for p in config.policies.iter().filter(|p| p.global || attached.contains(&p.name)) {
            // An authentication method this build cannot check fails closed:
            // it accepts nobody, so the route is never open by mistake.
            if matches!(p.kind, PolicyKind::Jwt | PolicyKind::BasicAuth) {
                steps.push(Step { name: p.name.clone(), phase: AUTH_PHASE, what: Compiled::RefuseAuth });
                continue;
            }
            if !is_enforced(p) && p.kind != PolicyKind::RateLimit {
                continue;
            }
            let Ok(typed) = policy_config(p.kind, &p.config) else { continue };
            let what = match typed {
                PolicyConfig::IpRestriction(c) => Compiled::IpRestriction {
                    allow: c.allow.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    deny: c.deny.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::FORBIDDEN),
                },
                PolicyConfig::KeyAuth(c) => Compiled::KeyAuth {
                    names: c.key_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                    hide: c.hide_credentials,
                    anonymous: c.anonymous.as_ref().and_then(|a| ids.by_name.get(a).cloned()),
                },
                PolicyConfig::Acl(c) => Compiled::Acl { allow: c.allow, deny: c.deny },
                PolicyConfig::RequestSizeLimit(c) => Compiled::RequestSizeLimit { max: c.max_bytes.0 },
                PolicyConfig::HttpsRedirect(c) => {
                    Compiled::HttpsRedirect { status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::MOVED_PERMANENTLY) }
                }
                PolicyConfig::CorrelationId(c) => match HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes()) {
                    Ok(header) => Compiled::CorrelationId { header, echo: c.echo_downstream },
                    Err(_) => continue,
                },
                PolicyConfig::RateLimit(c) => {
                    let Some(state) = limits.get(&p.name) else { continue };
                    let by = match c.by.as_str() {
                        "consumer" => LimitBy::Consumer,
                        "ip" => LimitBy::Ip,
                        "route" => LimitBy::Route,
                        other => match other.strip_prefix("header:").and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()) {
                            Some(h) => LimitBy::Header(h),
                            None => continue,
                        },
                    };
                    Compiled::RateLimit { by, state: state.clone() }
                }
                _ => continue,
            };
            steps.push(Step { name: p.name.clone(), phase: phase(p.kind), what });
        }
        steps.sort_by_key(|s| s.phase);
        PolicyChain { steps, ids: ids.clone(), entity: entity.to_string() }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the request phases. On success, the consumer (if any) has been
    /// stamped on the headers as `X-Consumer-*`; the client's own were
    /// removed first. `query` may lose a key the credential came in.
    pub fn admit(
        &self,
        request: RequestFacts<'_>,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
    ) -> Result<Admission, Refusal> {
        headers.remove(X_CONSUMER_NAME);
        headers.remove(X_CONSUMER_GROUPS);
        let mut consumer: Option<Arc<ConsumerInfo>> = None;
        let mut anonymous: Option<Arc<ConsumerInfo>> = None;
        let has_auth = self.steps.iter().any(|s| s.phase == AUTH_PHASE);
        let mut auth_done = false;
        let mut rate: Option<RateInfo> = None;
        let mut echo: Option<(HeaderName, HeaderValue)> = None;
        let mut correlation: Option<HeaderName> = None;
        let mut body_limit: Option<u64> = None;
        for step in &self.steps {
            if step.phase > AUTH_PHASE && has_auth && !auth_done {
                // Leaving the authentication phase: someone must have been accepted.
                consumer = consumer.or(anonymous.take());
                if consumer.is_none() {
                    return Err(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid").into());
                }
                auth_done = true;
            }
            match &step.what {
                Compiled::RefuseAuth => {}
                Compiled::RequestSizeLimit { max } => {
                    // A declared length is checked now, before any byte is
                    // read; a streamed body is cut where it passes the limit.
                    let declared =
                        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|len| len > *max) {
                        return Err(GatewayError::new(ErrorCode::PayloadTooLarge, format!("the request body is over {max} bytes")).into());
                    }
                    body_limit = Some(body_limit.map_or(*max, |l: u64| l.min(*max)));
                }
                Compiled::HttpsRedirect { status } => {
                    // Plain HTTP here; only a trusted proxy can say the client used TLS.
                    let https = request.trusted_peer
                        && headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"));
                    if !https {
                        let host = headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
                        // Only a host[:port] may become the Location's authority.
                        let plausible = !host.is_empty()
                            && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
                        if !plausible {
                            return Err(GatewayError::new(ErrorCode::BadRequest, "the Host header is not a host name").into());
                        }
                        let location = match query.as_deref() {
                            Some(q) => format!("https://{host}{}?{q}", request.path),
                            None => format!("https://{host}{}", request.path),
                        };
                        if let Ok(location) = HeaderValue::from_str(&location) {
                            return Err(Refusal {
                                error: GatewayError::new(ErrorCode::BadRequest, "use https"),
                                rate: None,
                                redirect: Some((*status, location)),
                            });
                        }
                    }
                }
                Compiled::CorrelationId { header, echo: echo_it } => {
                    let value = match headers.get(header) {
                        Some(v) if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic) => v.clone(),
                        _ => HeaderValue::from_str(&crate::ids::new_uuid()).expect("a uuid is a valid header value"),
                    };
                    headers.insert(header.clone(), value.clone());
                    correlation = Some(header.clone());
                    if *echo_it {
                        echo = Some((header.clone(), value));
                    }
                }
                Compiled::IpRestriction { allow, deny, status } => {
                    let denied =
                        deny.iter().any(|n| n.contains(&client_ip)) || (!allow.is_empty() && !allow.iter().any(|n| n.contains(&client_ip)));
                    if denied {
                        let code = match status.as_u16() {
                            401 => ErrorCode::Unauthorized,
                            404 => ErrorCode::NotFound,
                            429 => ErrorCode::RateLimited,
                            _ => ErrorCode::Forbidden,
                        };
                        tracing::debug!(policy = %step.name, %client_ip, "ip-restriction refused");
                        return Err(GatewayError::new(code, "your address is not allowed here").into());
                    }
                }
                Compiled::KeyAuth { names, hide, anonymous: anon } => {
                    if consumer.is_some() {
                        continue; // an earlier method already accepted the request
                    }
                    if let Some(key) = find_key(headers, query, names, *hide) {
                        consumer = self.ids.by_key_digest.get(&sha256_hex(&key)).cloned();
                    }
                    if consumer.is_none() && anonymous.is_none() {
                        anonymous = anon.clone();
                    }
                }
                Compiled::Acl { allow, deny } => {
                    let groups = consumer.as_ref().map(|c| c.groups.as_slice()).unwrap_or(&[]);
                    let in_any = |list: &Vec<String>| list.iter().any(|g| groups.contains(g));
                    let refused = match (allow, deny) {
                        (Some(a), _) => !in_any(a),
                        (None, Some(d)) => in_any(d),
                        (None, None) => false,
                    };
                    if refused {
                        return Err(GatewayError::new(ErrorCode::Forbidden, "you are not allowed to use this route").into());
                    }
                }
                Compiled::RateLimit { by, state } => {
                    // A request without the key it is split by counts by address.
                    let key = match by {
                        LimitBy::Consumer => consumer.as_ref().map(|c| format!("c:{}", c.name)),
                        LimitBy::Ip => None,
                        // Hashed: a client cannot make keys large, nor read back secrets.
                        LimitBy::Header(h) => headers.get(h).map(|v| format!("h:{:016x}", fxhash_bytes(v.as_bytes()))),
                        LimitBy::Route => Some(format!("r:{}", self.entity)),
                    }
                    .unwrap_or_else(|| ip_key(client_ip));
                    match state.hit(&key) {
                        Ok(info) => {
                            if rate.is_none_or(|r| info.remaining < r.remaining) {
                                rate = Some(info);
                            }
                        }
                        Err(info) => {
                            return Err(Refusal {
                                error: GatewayError::new(ErrorCode::RateLimited, "too many requests; see Retry-After"),
                                rate: Some(info),
                                redirect: None,
                            });
                        }
                    }
                }
            }
        }
        if has_auth && !auth_done {
            consumer = consumer.or(anonymous);
            if consumer.is_none() {
                return Err(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid").into());
            }
        }
        if let Some(c) = &consumer {
            if let Ok(v) = HeaderValue::from_str(&c.name) {
                headers.insert(X_CONSUMER_NAME, v);
            }
            if let Ok(v) = HeaderValue::from_str(&c.groups.join(",")) {
                headers.insert(X_CONSUMER_GROUPS, v);
            }
        }
        Ok(Admission { consumer, rate, echo, correlation, body_limit })
    }
}

/// The key from the first configured header, else query parameter; removed
/// from the request when `hide`.
fn find_key(headers: &mut HeaderMap, query: &mut Option<String>, names: &[String], hide: bool) -> Option<String> {
    for name in names {
        if let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string) {
            if hide {
                headers.remove(name.as_str());
            }
            return Some(v);
        }
    }
    let q = query.as_deref()?;
    for name in names {
        let mut found = None;
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if found.is_none() && k == name {
                    found = Some(crate::compose::context::percent_decode(v, true));
                    return !hide;
                }
                true
            })
            .collect();
        if let Some(key) = found {
            if hide {
                *query = if kept.is_empty() { None } else { Some(kept.join("&")) };
            }
            return Some(key);
        }
    }
    None
}

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let peer = unmap(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| {
            let s = s.trim();
            s.parse::<IpAddr>().ok().or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        })
        .collect();
    for hop in hops.into_iter().rev() {
        // A hop that does not parse ends the walk: what lies beyond it was
        // not vouched for by anyone we trust.
        let Some(hop) = hop else { break };
        let hop = unmap(hop);
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    // An IPv4 address seen as IPv4-mapped IPv6 is the same client.
    unmap(client)
}

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
    fn the_client_address_comes_through_trusted_proxies_only() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, 198.51.100.7, 10.1.1.1"));
        let proxy: IpAddr = "10.9.9.9".parse().unwrap();
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(proxy, &h, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(mapped, &HeaderMap::new(), &trusted), stranger);
        // A hop that does not parse ends the walk at the last trusted one.
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, unknown, 10.1.1.1"));
        assert_eq!(client_ip(proxy, &h, &trusted), "10.1.1.1".parse::<IpAddr>().unwrap());
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, 198.51.100.7:4711"));
        assert_eq!(client_ip(proxy, &h, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
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
