//! `rate-limit` with `scope: cluster`: every check is one atomic Lua script
//! on Redis, so nodes share one exact sliding-window count. The clock is
//! Redis's own (`TIME`), so nodes with skewed clocks still agree.
//!
//! Redis going away never fails a request by itself: a check that errors or
//! takes longer than [`CHECK_TIMEOUT`] is answered by the policy's local
//! counters instead (`fault_tolerant`, the default), counted in
//! [`RedisLimiter::fallbacks`], and Redis is left alone for [`BACKOFF`]
//! before the next try, so an outage costs no latency per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::RateInfo;

/// The longest a request waits for Redis before counting locally.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed check, how long requests count locally without trying.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// KEYS[1]: the bucket's base key. ARGV: window length in ms and limit, per
/// window. Each window keeps a counter per fixed period; the previous
/// period's count is weighted by how much of it still overlaps the sliding
/// window. Nothing is counted when any window is full.
/// Returns {refused, limit, remaining, reset_secs} of the tightest window.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local refused = 0
local best_limit, best_remaining, best_reset = 0, -1, 1
local current = {}
for i = 1, #ARGV / 2 do
  local len = tonumber(ARGV[2 * i - 1])
  local limit = tonumber(ARGV[2 * i])
  local period = math.floor(now / len)
  local ck = KEYS[1] .. ':' .. len .. ':' .. period
  local pk = KEYS[1] .. ':' .. len .. ':' .. (period - 1)
  local cur = tonumber(redis.call('GET', ck) or '0')
  local prev = tonumber(redis.call('GET', pk) or '0')
  local elapsed = now - period * len
  local used = math.floor(prev * (len - elapsed) / len) + cur
  if used >= limit then refused = 1 end
  local remaining = limit - used - 1
  if remaining < 0 then remaining = 0 end
  local reset = math.ceil((len - elapsed) / 1000)
  if reset < 1 then reset = 1 end
  if best_remaining < 0 or remaining < best_remaining then
    best_limit, best_remaining, best_reset = limit, remaining, reset
  end
  current[i] = {ck, len}
end
if refused == 1 then
  best_remaining = 0
else
  for i = 1, #current do
    redis.call('INCR', current[i][1])
    redis.call('PEXPIRE', current[i][1], 2 * current[i][2] + 1000)
  end
end
return {refused, best_limit, best_remaining, best_reset}
"#;

/// How to reach Redis: its URL and the prefix of every key, so several
/// gateway clusters (or tests) can share one server.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub url: String,
    pub prefix: String,
}

/// The shared Redis connection of one node, and its health.
pub struct RedisLimiter {
    options: RedisOptions,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    /// Set while a connection attempt runs, so only one runs.
    connecting: AtomicBool,
    /// Millis since `epoch` before which checks go straight to local.
    down_until: AtomicU64,
    epoch: Instant,
    /// Checks answered by the local fallback because Redis failed.
    pub fallbacks: AtomicU64,
    /// Whether the last check reached Redis.
    pub reachable: AtomicBool,
}

/// What a cluster check found.
pub enum Verdict {
    Allowed(RateInfo),
    Refused(RateInfo),
    /// Redis could not be asked: the caller falls back or refuses.
    Unavailable,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter").field("prefix", &self.options.prefix).finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter that connects on first use (see [`RedisLimiter::connect`]).
    pub fn new(options: RedisOptions) -> RedisLimiter {
        RedisLimiter {
            options,
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(SCRIPT),
            connecting: AtomicBool::new(false),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            fallbacks: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    /// Opens the connection. Its reconnections run on the runtime this is
    /// called on, which must outlive the limiter's users (the control one).
    pub async fn connect(self: &Arc<Self>) {
        if self.conn.load().is_some() || self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared however this ends, a timeout that drops the future included.
        struct Clear<'a>(&'a AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _clear = Clear(&self.connecting);
        let result = async {
            let client = redis::Client::open(self.options.url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CHECK_TIMEOUT)
                .set_response_timeout(CHECK_TIMEOUT)
                .set_number_of_retries(1)
                .set_max_delay(200);
            ConnectionManager::new_with_config(client, config).await
        }
        .await;
        match result {
            Ok(conn) => {
                tracing::info!(prefix = %self.options.prefix, "connected to Redis for cluster rate limits");
                self.conn.store(Some(Arc::new(conn)));
                self.reachable.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis: cluster rate limits count locally until it answers");
                self.reachable.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Keeps trying to connect until it works (run on the control runtime).
    pub async fn keep_connecting(self: Arc<Self>) {
        while self.conn.load().is_none() {
            self.connect().await;
            if self.conn.load().is_none() {
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// One atomic check-and-count of `key` under `policy` for `windows`.
    pub async fn check(&self, policy: &str, key: &str, windows: &[(u64, Duration)]) -> Verdict {
        if self.now_ms() < self.down_until.load(Ordering::Relaxed) {
            return Verdict::Unavailable;
        }
        let Some(conn) = self.conn.load_full() else { return Verdict::Unavailable };
        let mut conn = (*conn).clone();
        // The braces are a Redis Cluster hash tag: every key of a bucket
        // lands on one shard, as the script needs.
        let base = format!("{}:rl:{{{policy}:{key}}}", self.options.prefix);
        let mut inv = self.script.key(base);
        for (limit, len) in windows {
            inv.arg(len.as_millis().max(1) as u64).arg(*limit);
        }
        let result: Result<redis::RedisResult<(u8, u64, u64, u64)>, _> =
            tokio::time::timeout(CHECK_TIMEOUT, inv.invoke_async(&mut conn)).await;
        match result {
            Ok(Ok((refused, limit, remaining, reset_secs))) => {
                self.reachable.store(true, Ordering::Relaxed);
                let info = RateInfo { limit, remaining, reset_secs };
                if refused == 1 {
                    Verdict::Refused(info)
                } else {
                    Verdict::Allowed(info)
                }
            }
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("timed out"),
        }
    }

    fn failed(&self, why: &str) -> Verdict {
        let was = self.reachable.swap(false, Ordering::Relaxed);
        if was {
            tracing::warn!(error = why, "Redis failed a rate-limit check: counting locally for now");
        }
        self.down_until.store(self.now_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        Verdict::Unavailable
    }
}
