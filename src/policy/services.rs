//! What the policies use beyond one config, node-wide and across configs:
//! the Redis connection, the JWK Sets, the cache of verified passwords,
//! the metrics, the upstream health registry and the composition call
//! store. Bound to a compiled config's filters by `compile::bind`.

use std::sync::Arc;
use std::time::Duration;

use super::{cluster, jwt};
use crate::config::{Config, ConfigError};

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
    pub call_store: Arc<crate::compose::call::NodeCallStore>,
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
        let call_store = Arc::new(crate::compose::call::NodeCallStore::new(call_cache_max_bytes));
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

    /// Errors a config's compositions have on a node with these services:
    /// a cluster call cache needs Redis. (A policy's are its filter's
    /// `bind`.)
    pub fn check(&self, config: &Config) -> Vec<ConfigError> {
        let mut errs = Vec::new();
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
    pub(crate) async fn verify_password(&self, username: &str, password: &str, hash: Option<&Arc<str>>) -> bool {
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
