//! Policies around routes and compositions, compiled once per config and
//! run in SPEC §2's fixed phase order whatever order they are listed in.
//!
//! The request phases run in [`PolicyChain::admit`]; what they decide about
//! the answer (CORS headers, transforms, the cache, `RateLimit-*`) travels
//! in the [`Admission`]. Long-lived state that outlives one config (the
//! Redis connection, JWK Sets, verified passwords) is in [`Services`].

pub mod cache;
pub mod cluster;
pub mod cors;
pub mod jwt;
pub mod mtls;
pub mod transform;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;
use serde_json::Value;

use crate::config::validate::{parse_cidr, policy_config};
use crate::config::{Config, ConfigError, Credential, PolicyConfig, PolicyKind, RateLimitScope};
use crate::errors::{ErrorCode, GatewayError};

pub const X_CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub const X_CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// At most this many argon2 verifications run at once per node; each takes
/// ~19 MiB and tens of milliseconds, so a flood of wrong passwords queues
/// instead of exhausting memory.
const ARGON2_AT_ONCE: usize = 4;

/// An argon2id hash of a random secret, made once per process.
fn unknown_user_hash() -> Arc<str> {
    static HASH: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let mut bytes = [0u8; 48];
        let _ = getrandom::fill(&mut bytes);
        let salt = SaltString::encode_b64(&bytes[..16]).expect("16 bytes make a valid salt");
        let hash = argon2::Argon2::default().hash_password(&bytes[16..], &salt).map(|h| h.to_string()).unwrap_or_default();
        Arc::from(hash.as_str())
    })
    .clone()
}

/// What the policies use beyond one config: the Redis connection, the JWK
/// Sets, and the cache of passwords already verified.
pub struct Services {
    pub redis: Option<Arc<cluster::RedisLimiter>>,
    pub jwks: Arc<jwt::JwksStore>,
    /// The node's Prometheus metrics (compiled routes resolve theirs here).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// SHA-256 of (username, password, stored hash) of recent successes:
    /// argon2 is slow on purpose, and a client sends its password each time.
    verified: moka::sync::Cache<[u8; 32], ()>,
    argon2_permits: tokio::sync::Semaphore,
    /// Each upstream target's health, across configs, and the active
    /// checkers.
    pub health: Arc<crate::upstream::health::Registry>,
    /// Composition calls' answers kept and shared across requests (`cache`,
    /// `collapse`), node-wide and across configs.
    pub call_store: Arc<crate::compose::exec::NodeCallStore>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("redis", &self.redis).finish_non_exhaustive()
    }
}

impl Services {
    pub fn new(redis: Option<cluster::RedisOptions>) -> Arc<Services> {
        Services::with_metrics(redis, crate::metrics::MetricsOptions::default())
    }

    pub fn with_metrics(redis: Option<cluster::RedisOptions>, metrics: crate::metrics::MetricsOptions) -> Arc<Services> {
        Services::with_call_store(redis, metrics, crate::compose::cache::DEFAULT_MAX_BYTES)
    }

    /// With a store of `call_cache_max_bytes` for composition calls' answers.
    pub fn with_call_store(
        redis: Option<cluster::RedisOptions>,
        metrics: crate::metrics::MetricsOptions,
        call_cache_max_bytes: u64,
    ) -> Arc<Services> {
        let call_store = Arc::new(crate::compose::exec::NodeCallStore::new(call_cache_max_bytes));
        let metrics = crate::metrics::Metrics::new(metrics);
        let store = call_store.clone();
        metrics.call_cache_size(move || store.size());
        Arc::new(Services {
            call_store,
            redis: redis.map(|o| Arc::new(cluster::RedisLimiter::new(o))),
            jwks: Arc::new(jwt::JwksStore::default()),
            metrics,
            verified: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(300)).build(),
            argon2_permits: tokio::sync::Semaphore::new(ARGON2_AT_ONCE),
            health: Default::default(),
        })
    }

    /// The background work: refreshing JWK Sets.
    /// Spawned on the control runtime, which outlives every request.
    pub fn spawn_background(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        runtime.spawn(self.jwks.clone().run());
    }

    /// Errors a config has on a node with these services: a cluster rate
    /// limit needs Redis.
    pub fn check(&self, config: &Config) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        for p in &config.policies {
            if let Ok(PolicyConfig::RateLimit(c)) = policy_config(p.kind, &p.config) {
                if c.scope == RateLimitScope::Cluster && self.redis.is_none() {
                    errs.push(ConfigError {
                        file: None,
                        path: format!("policies.{}.config.scope", p.name),
                        message: "scope: cluster needs Redis: set MANIFOLD_REDIS_URL (or use scope: local)".into(),
                    });
                }
            }
        }
        for comp in &config.compositions {
            for (name, call) in &comp.calls {
                if call.cache.as_ref().is_some_and(|c| c.scope == Some(crate::config::CacheScope::Cluster)) && self.redis.is_none() {
                    errs.push(ConfigError {
                        file: None,
                        path: format!("compositions.{}.calls.{name}.cache.scope", comp.name),
                        message: "scope: cluster needs Redis: set MANIFOLD_REDIS_URL (or use scope: local)".into(),
                    });
                }
            }
        }
        errs
    }

    /// Checks a basic-auth password against its argon2 hash, off the
    /// worker thread, remembering successes.
    async fn verify_password(&self, username: &str, password: &str, hash: Option<&Arc<str>>) -> bool {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [username.as_bytes(), password.as_bytes(), hash.map_or(&b""[..], |h| h.as_bytes())] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        if hash.is_some() && self.verified.contains_key(&key) {
            return true;
        }
        // A flood of wrong passwords queues; a check that waits too long
        // fails rather than pile up without bound.
        let Ok(Ok(_permit)) = tokio::time::timeout(Duration::from_secs(2), self.argon2_permits.acquire()).await else { return false };
        let (password, hash) = (password.to_string(), hash.cloned());
        let ok = tokio::task::spawn_blocking(move || {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            // No such user: check against a hash nobody knows the password
            // of, so the answer takes as long as for a wrong password.
            let hash = hash.unwrap_or_else(unknown_user_hash);
            let verified = PasswordHash::new(&hash)
                .is_ok_and(|parsed| argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok());
            verified && hash.as_ref() != unknown_user_hash().as_ref()
        })
        .await
        .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
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

/// What each policy of a config keeps, shared by every chain that uses
/// the policy: rate-limit counters (one quota), caches, compiled transforms.
#[derive(Debug, Default)]
pub struct PolicyStates {
    limits: HashMap<String, Arc<LimitState>>,
    transforms: HashMap<String, Arc<transform::Transform>>,
    caches: HashMap<String, Arc<cache::ResponseCache>>,
}

impl PolicyStates {
    pub fn build(config: &Config) -> PolicyStates {
        let mut out = PolicyStates::default();
        for p in &config.policies {
            match policy_config(p.kind, &p.config) {
                Ok(PolicyConfig::RateLimit(c)) => {
                    let windows = match (c.limit, c.window, c.limits) {
                        (Some(l), Some(w), _) => vec![(l, w.0)],
                        (_, _, Some(list)) => list.into_iter().map(|w| (w.limit, w.window.0)).collect(),
                        _ => continue,
                    };
                    out.limits.insert(p.name.clone(), Arc::new(LimitState::new(windows)));
                }
                Ok(PolicyConfig::RequestTransform(c) | PolicyConfig::ResponseTransform(c)) => {
                    if let Ok(t) = transform::Transform::compile(&c) {
                        out.transforms.insert(p.name.clone(), Arc::new(t));
                    }
                }
                Ok(PolicyConfig::ResponseCache(c)) => {
                    out.caches.insert(p.name.clone(), Arc::new(cache::ResponseCache::new(&c)));
                }
                _ => {}
            }
        }
        out
    }
}

/// An authenticated (or anonymous) consumer.
#[derive(Debug)]
pub struct ConsumerInfo {
    pub name: String,
    pub groups: Vec<String>,
    /// `X-Consumer-Name` and `X-Consumer-Groups`, made once per config.
    name_header: Option<HeaderValue>,
    groups_header: Option<HeaderValue>,
    /// This consumer's rate-limit bucket (`by: consumer`).
    limit_key: String,
}

impl ConsumerInfo {
    pub fn new(name: &str, groups: &[String]) -> ConsumerInfo {
        ConsumerInfo {
            name: name.to_string(),
            groups: groups.to_vec(),
            name_header: HeaderValue::from_str(name).ok(),
            groups_header: HeaderValue::from_str(&groups.join(",")).ok(),
            limit_key: format!("c:{name}"),
        }
    }
}

/// Who holds which credential, built once per config.
#[derive(Debug, Default)]
pub struct Identities {
    /// SHA-256 of each API key (the config holds them in hex).
    by_key_digest: HashMap<[u8; 32], Arc<ConsumerInfo>>,
    by_name: HashMap<String, Arc<ConsumerInfo>>,
    /// basic-auth username -> consumer and argon2 hash.
    by_username: HashMap<String, (Arc<ConsumerInfo>, Arc<str>)>,
    /// jwt issuer -> consumer, algorithm and key.
    by_issuer: HashMap<String, jwt::IssuerKey>,
    mtls: mtls::MtlsIdentities,
}

impl Identities {
    pub fn build(config: &Config) -> Identities {
        let mut ids = Identities::default();
        for c in &config.consumers {
            let info = Arc::new(ConsumerInfo::new(&c.name, &c.groups));
            ids.by_name.insert(c.name.clone(), info.clone());
            for cred in &c.credentials {
                match cred {
                    Credential::KeyAuth { key_sha256: Some(d), .. } => {
                        let mut digest = [0u8; 32];
                        if hex::decode_to_slice(d, &mut digest).is_ok() {
                            ids.by_key_digest.insert(digest, info.clone());
                        }
                    }
                    Credential::BasicAuth { username, password_hash: Some(h), .. } => {
                        ids.by_username.entry(username.clone()).or_insert_with(|| (info.clone(), Arc::from(h.as_str())));
                    }
                    Credential::Jwt { issuer, algorithm, secret, public_key } => {
                        if let Ok((algorithm, key)) = jwt::decoding_key(algorithm, secret.as_deref(), public_key.as_deref()) {
                            ids.by_issuer.entry(issuer.clone()).or_insert(jwt::IssuerKey { consumer: info.clone(), algorithm, key });
                        }
                    }
                    Credential::Mtls { subject, san } => ids.mtls.add(subject.as_deref(), san.as_deref(), &info),
                    _ => {}
                }
            }
        }
        ids
    }
}

/// A rate limit counted in Redis, with the local counters as fallback.
#[derive(Debug)]
struct ClusterLimit {
    limiter: Arc<cluster::RedisLimiter>,
    policy: String,
    fault_tolerant: bool,
    /// (length in ms, limit) of each window, as the script takes them.
    windows: Arc<[(u64, u64)]>,
}

#[derive(Debug)]
enum Compiled {
    IpRestriction { allow: Vec<IpNet>, deny: Vec<IpNet>, status: StatusCode },
    RateLimit { by: LimitBy, state: Arc<LimitState>, cluster: Option<ClusterLimit> },
    KeyAuth { names: Vec<String>, hide: bool, anonymous: Option<Arc<ConsumerInfo>> },
    BasicAuth { hide: bool, anonymous: Option<Arc<ConsumerInfo>> },
    Jwt { policy: jwt::JwtPolicy, anonymous: Option<Arc<ConsumerInfo>> },
    MtlsAuth { policy: Arc<mtls::MtlsPolicy>, anonymous: Option<Arc<ConsumerInfo>> },
    Acl { allow: Option<Vec<String>>, deny: Option<Vec<String>> },
    HttpsRedirect { status: StatusCode },
    Cors(Arc<cors::Cors>),
    RequestSizeLimit { max: u64 },
    CorrelationId { header: HeaderName, echo: bool },
    RequestTransform(Arc<transform::Transform>),
    ResponseTransform(Arc<transform::Transform>),
    ResponseCache(Arc<cache::ResponseCache>),
}

#[derive(Debug)]
struct Step {
    name: Arc<str>,
    phase: u8,
    what: Compiled,
}

/// The policies of one route or composition, in phase order.
#[derive(Debug, Default)]
pub struct PolicyChain {
    steps: Vec<Step>,
    ids: Arc<Identities>,
    services: Option<Arc<Services>>,
    /// The route or composition this chain guards (`by: route` counts per name).
    entity: String,
}

/// What the policies need to know about a request besides its headers.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub method: &'a http::Method,
    /// The normalized path.
    pub path: &'a str,
    /// The peer is a trusted proxy (its X-Forwarded-Proto counts).
    pub trusted_peer: bool,
    /// The request came over the TLS listener (and what its handshake showed).
    pub tls: Option<&'a crate::server::tls::TlsConn>,
}

/// What the policies decided about an admitted request.
#[derive(Debug, Default)]
pub struct Admission {
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// A verified JWT's claims (`request.consumer.claims`).
    pub claims: Option<Value>,
    /// Set when a rate limit applies: the response carries RateLimit-*.
    pub rate: Option<RateInfo>,
    /// A correlation-id policy's header and value, to echo on the answer.
    pub echo: Option<(HeaderName, HeaderValue)>,
    /// A correlation-id policy's header, which every backend call carries.
    pub correlation: Option<HeaderName>,
    /// request-size-limit: the most body bytes to accept (the body is cut,
    /// and the answer is 413, past it).
    pub body_limit: Option<u64>,
    /// Headers every answer gets (CORS).
    pub headers: HeaderMap,
    pub request_transforms: Vec<Arc<transform::Transform>>,
    pub response_transforms: Vec<Arc<transform::Transform>>,
    pub cache: Option<Arc<cache::ResponseCache>>,
}

/// Why a request was not admitted; `rate` still goes on the answer.
#[derive(Debug)]
pub struct Refusal {
    pub error: GatewayError,
    pub rate: Option<RateInfo>,
    /// Answer this status, with `headers` and no body, instead of the
    /// error (an https redirect, a CORS preflight).
    pub reply: Option<StatusCode>,
    /// Headers the answer carries (Location, CORS, WWW-Authenticate).
    pub headers: HeaderMap,
    /// The policy that refused, set by [`PolicyChain::admit`]. A 401 goes
    /// to the first authentication policy that was shown a credential and
    /// refused it, or, when none was shown one, to the last in the chain.
    pub policy: Option<Arc<str>>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Refusal { error, rate: None, reply: None, headers: HeaderMap::new(), policy: None }
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
        PolicyKind::KeyAuth | PolicyKind::BasicAuth | PolicyKind::Jwt | PolicyKind::MtlsAuth => AUTH_PHASE,
        PolicyKind::Acl => 5,
        PolicyKind::RateLimit => 6,
        PolicyKind::RequestSizeLimit => 7,
        PolicyKind::RequestTransform => 8,
        PolicyKind::ResponseTransform => 9,
        PolicyKind::ResponseCache => 10,
    }
}

const AUTH_PHASE: u8 = 4;

fn unauthorized(basic: bool) -> Refusal {
    let mut r = Refusal::from(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid"));
    if basic {
        r.headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"manifold\""));
    }
    r
}

/// The username and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

impl PolicyChain {
    /// The chain for an entity with these attached policies, plus the
    /// global ones. The config is valid, so every name resolves.
    pub fn build(
        config: &Config,
        entity: &str,
        attached: &[String],
        ids: &Arc<Identities>,
        states: &PolicyStates,
        services: &Arc<Services>,
    ) -> PolicyChain {
        let mut steps = Vec::new();
        for p in config.policies.iter().filter(|p| p.global || attached.contains(&p.name)) {
            let Ok(typed) = policy_config(p.kind, &p.config) else { continue };
            let anonymous = |a: &Option<String>| a.as_ref().and_then(|a| ids.by_name.get(a).cloned());
            let what = match typed {
                PolicyConfig::IpRestriction(c) => Compiled::IpRestriction {
                    allow: c.allow.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    deny: c.deny.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::FORBIDDEN),
                },
                PolicyConfig::KeyAuth(c) => Compiled::KeyAuth {
                    names: c.key_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                    hide: c.hide_credentials,
                    anonymous: anonymous(&c.anonymous),
                },
                PolicyConfig::BasicAuth(c) => Compiled::BasicAuth { hide: c.hide_credentials, anonymous: anonymous(&c.anonymous) },
                PolicyConfig::Jwt(c) => {
                    let Ok(header) = HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes()) else { continue };
                    let policy = jwt::JwtPolicy {
                        header,
                        query_param: c.query_param.clone(),
                        verify_exp: c.claims_to_verify.iter().any(|x| x == "exp"),
                        verify_nbf: c.claims_to_verify.iter().any(|x| x == "nbf"),
                        leeway: c.leeway.0.as_secs(),
                        jwks: c.jwks_url.as_deref().map(|u| services.jwks.entry(u)),
                    };
                    Compiled::Jwt { policy, anonymous: anonymous(&c.anonymous) }
                }
                PolicyConfig::MtlsAuth(c) => match mtls::MtlsPolicy::new(&c.ca) {
                    Ok(policy) => Compiled::MtlsAuth { policy: Arc::new(policy), anonymous: anonymous(&c.anonymous) },
                    // Validated already; an authentication policy that cannot
                    // be built refuses everyone rather than being skipped.
                    Err(e) => {
                        tracing::error!(policy = %p.name, error = %e, "mtls-auth cannot be built: it refuses every request");
                        Compiled::MtlsAuth { policy: Arc::new(mtls::MtlsPolicy::refusing()), anonymous: None }
                    }
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
                PolicyConfig::Cors(c) => Compiled::Cors(Arc::new(cors::Cors::new(&c))),
                PolicyConfig::RequestTransform(_) => match states.transforms.get(&p.name) {
                    Some(t) => Compiled::RequestTransform(t.clone()),
                    None => continue,
                },
                PolicyConfig::ResponseTransform(_) => match states.transforms.get(&p.name) {
                    Some(t) => Compiled::ResponseTransform(t.clone()),
                    None => continue,
                },
                PolicyConfig::ResponseCache(_) => match states.caches.get(&p.name) {
                    Some(c) => Compiled::ResponseCache(c.clone()),
                    None => continue,
                },
                PolicyConfig::RateLimit(c) => {
                    let Some(state) = states.limits.get(&p.name) else { continue };
                    let by = match c.by.as_str() {
                        "consumer" => LimitBy::Consumer,
                        "ip" => LimitBy::Ip,
                        "route" => LimitBy::Route,
                        other => match other.strip_prefix("header:").and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()) {
                            Some(h) => LimitBy::Header(h),
                            None => continue,
                        },
                    };
                    let cluster = match (c.scope, &services.redis) {
                        (RateLimitScope::Cluster, Some(limiter)) => Some(ClusterLimit {
                            limiter: limiter.clone(),
                            policy: p.name.clone(),
                            fault_tolerant: c.fault_tolerant,
                            windows: state.windows.iter().map(|(limit, len)| (len.as_millis().max(1) as u64, *limit)).collect(),
                        }),
                        _ => None,
                    };
                    Compiled::RateLimit { by, state: state.clone(), cluster }
                }
            };
            steps.push(Step { name: Arc::from(p.name.as_str()), phase: phase(p.kind), what });
        }
        steps.sort_by_key(|s| s.phase);
        PolicyChain { steps, ids: ids.clone(), services: Some(services.clone()), entity: entity.to_string() }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The route or composition this chain guards.
    pub fn entity(&self) -> &str {
        &self.entity
    }

    /// Whether a CORS policy answers this chain's preflights.
    pub fn has_cors(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.what, Compiled::Cors(_)))
    }

    /// Runs the request phases. On success, the consumer (if any) has been
    /// stamped on the headers as `X-Consumer-*`; the client's own were
    /// removed first. `query` may lose a key the credential came in.
    pub async fn admit(
        &self,
        request: RequestFacts<'_>,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
    ) -> Result<Admission, Refusal> {
        let mut at = 0;
        self.run_steps(request, client_ip, headers, query, &mut at).await.map_err(|mut r| {
            r.policy = self.steps.get(at).map(|s| s.name.clone());
            r
        })
    }

    /// [`admit`](Self::admit)'s work; `at` follows the step being run, so a
    /// refusal can name its policy.
    async fn run_steps(
        &self,
        request: RequestFacts<'_>,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
        at: &mut usize,
    ) -> Result<Admission, Refusal> {
        headers.remove(X_CONSUMER_NAME);
        headers.remove(X_CONSUMER_GROUPS);
        let mut consumer: Option<Arc<ConsumerInfo>> = None;
        let mut anonymous: Option<Arc<ConsumerInfo>> = None;
        let has_auth = self.steps.iter().any(|s| s.phase == AUTH_PHASE);
        let mut basic_offered = false;
        let mut auth_done = false;
        // The authentication policy that was shown a credential and refused
        // it: a 401 is counted against it rather than the last one in the chain.
        let mut blame: Option<usize> = None;
        let mut out = Admission::default();
        // Headers the answer gets however it ends (CORS), once known.
        let refuse = |r: Refusal, extra: &HeaderMap| {
            let mut r = r;
            for (k, v) in extra {
                r.headers.insert(k.clone(), v.clone());
            }
            r
        };
        for (i, step) in self.steps.iter().enumerate() {
            if step.phase > AUTH_PHASE && has_auth && !auth_done {
                // Leaving the authentication phase: someone must have been
                // accepted (`at` is still the last authentication policy).
                consumer = consumer.or(anonymous.take());
                if consumer.is_none() {
                    *at = blame.unwrap_or(*at);
                    return Err(refuse(unauthorized(basic_offered), &out.headers));
                }
                auth_done = true;
            }
            *at = i;
            match &step.what {
                Compiled::RequestSizeLimit { max } => {
                    // A declared length is checked now, before any byte is
                    // read; a streamed body is cut where it passes the limit.
                    let declared =
                        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|len| len > *max) {
                        let e = GatewayError::new(ErrorCode::PayloadTooLarge, format!("the request body is over {max} bytes"));
                        return Err(refuse(e.into(), &out.headers));
                    }
                    out.body_limit = Some(out.body_limit.map_or(*max, |l: u64| l.min(*max)));
                }
                Compiled::HttpsRedirect { status } => {
                    // Plain HTTP here; only a trusted proxy can say the client used TLS.
                    let https = request.tls.is_some()
                        || request.trusted_peer
                            && headers
                                .get("x-forwarded-proto")
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|p| p.eq_ignore_ascii_case("https"));
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
                            let mut r = Refusal::from(GatewayError::new(ErrorCode::BadRequest, "use https"));
                            r.reply = Some(*status);
                            r.headers.insert(http::header::LOCATION, location);
                            return Err(r);
                        }
                    }
                }
                Compiled::Cors(cors) => {
                    if cors::is_preflight(request.method, headers) {
                        return Err(match cors.preflight(headers) {
                            Some(h) => Refusal {
                                error: GatewayError::new(ErrorCode::BadRequest, "preflight"),
                                rate: None,
                                reply: Some(StatusCode::NO_CONTENT),
                                headers: h,
                                policy: None,
                            },
                            None => {
                                GatewayError::new(ErrorCode::Forbidden, "this origin or method is not allowed by the CORS policy").into()
                            }
                        });
                    }
                    out.headers.extend(cors.actual(headers));
                }
                Compiled::CorrelationId { header, echo: echo_it } => {
                    let value = match headers.get(header) {
                        Some(v) if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic) => v.clone(),
                        _ => HeaderValue::from_str(&crate::ids::new_uuid()).expect("a uuid is a valid header value"),
                    };
                    headers.insert(header.clone(), value.clone());
                    out.correlation = Some(header.clone());
                    if *echo_it {
                        out.echo = Some((header.clone(), value));
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
                        use sha2::Digest;
                        let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
                        consumer = self.ids.by_key_digest.get(&digest).cloned();
                        if consumer.is_none() {
                            blame = blame.or(Some(i));
                        }
                    }
                    if consumer.is_none() && anonymous.is_none() {
                        anonymous = anon.clone();
                    }
                }
                Compiled::BasicAuth { hide, anonymous: anon } => {
                    basic_offered = true;
                    if consumer.is_some() {
                        continue;
                    }
                    if let (Some((user, pass)), Some(services)) = (basic_credentials(headers), &self.services) {
                        blame = blame.or(Some(i));
                        match self.ids.by_username.get(&user) {
                            Some((info, hash)) => {
                                if services.verify_password(&user, &pass, Some(hash)).await {
                                    consumer = Some(info.clone());
                                    if *hide {
                                        headers.remove(http::header::AUTHORIZATION);
                                    }
                                }
                            }
                            // As slow as a wrong password: the time taken
                            // does not tell which usernames exist.
                            None => {
                                let _ = services.verify_password(&user, &pass, None).await;
                            }
                        }
                    }
                    if consumer.is_none() && anonymous.is_none() {
                        anonymous = anon.clone();
                    }
                }
                Compiled::Jwt { policy, anonymous: anon } => {
                    if consumer.is_some() {
                        continue;
                    }
                    if let Some(token) = policy.find_token(headers, query.as_deref()) {
                        match policy.verify(&token, &self.ids.by_issuer) {
                            Ok((info, claims)) => {
                                consumer = Some(info);
                                out.claims = Some(claims);
                            }
                            Err(why) => {
                                blame = blame.or(Some(i));
                                tracing::debug!(policy = %step.name, why, "jwt refused");
                            }
                        }
                    }
                    if consumer.is_none() && anonymous.is_none() {
                        anonymous = anon.clone();
                    }
                }
                Compiled::MtlsAuth { policy, anonymous: anon } => {
                    if consumer.is_some() {
                        continue;
                    }
                    match policy.identify(request.tls, &self.ids.mtls) {
                        Ok(found) => consumer = found,
                        Err(why) => {
                            blame = blame.or(Some(i));
                            tracing::debug!(policy = %step.name, why, "mtls-auth refused");
                        }
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
                        let e = GatewayError::new(ErrorCode::Forbidden, "you are not allowed to use this route");
                        return Err(refuse(e.into(), &out.headers));
                    }
                }
                Compiled::RateLimit { by, state, cluster } => {
                    // A request without the key it is split by counts by address.
                    let key = match by {
                        LimitBy::Consumer => consumer.as_ref().map(|c| c.limit_key.clone()),
                        LimitBy::Ip => None,
                        // Hashed: a client cannot make keys large, nor read back secrets.
                        LimitBy::Header(h) => headers.get(h).map(|v| format!("h:{:016x}", fxhash_bytes(v.as_bytes()))),
                        LimitBy::Route => Some(format!("r:{}", self.entity)),
                    }
                    .unwrap_or_else(|| ip_key(client_ip));
                    let verdict = match cluster {
                        Some(c) => match c.limiter.check(&c.policy, &key, &c.windows).await {
                            cluster::Verdict::Allowed(info) => Ok(info),
                            cluster::Verdict::Refused(info) => Err(info),
                            cluster::Verdict::Unavailable => {
                                if !c.fault_tolerant {
                                    let e = GatewayError::new(ErrorCode::UpstreamUnavailable, "the rate limit cannot be checked right now");
                                    return Err(refuse(e.into(), &out.headers));
                                }
                                c.limiter.fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                state.hit(&key)
                            }
                        },
                        None => state.hit(&key),
                    };
                    match verdict {
                        Ok(info) => {
                            if out.rate.is_none_or(|r| info.remaining < r.remaining) {
                                out.rate = Some(info);
                            }
                        }
                        Err(info) => {
                            let mut r = refuse(
                                GatewayError::new(ErrorCode::RateLimited, "too many requests; see Retry-After").into(),
                                &out.headers,
                            );
                            r.rate = Some(info);
                            return Err(r);
                        }
                    }
                }
                Compiled::RequestTransform(t) => out.request_transforms.push(t.clone()),
                Compiled::ResponseTransform(t) => out.response_transforms.push(t.clone()),
                Compiled::ResponseCache(c) => out.cache = Some(c.clone()),
            }
        }
        if has_auth && !auth_done {
            consumer = consumer.or(anonymous);
            if consumer.is_none() {
                *at = blame.unwrap_or(*at);
                return Err(refuse(unauthorized(basic_offered), &out.headers));
            }
        }
        if let Some(c) = &consumer {
            if let Some(v) = &c.name_header {
                headers.insert(X_CONSUMER_NAME, v.clone());
            }
            if let Some(v) = &c.groups_header {
                headers.insert(X_CONSUMER_GROUPS, v.clone());
            }
        }
        out.consumer = consumer;
        Ok(out)
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
