//! `rate-limit` with `scope: cluster`: every check is one atomic Lua script
//! on Redis, so nodes share one exact sliding-window count. The clock is
//! Redis's own (`TIME`), so nodes with skewed clocks still agree.
//!
//! Each worker thread has its own multiplexed connection, opened on its
//! first check, so a check never hops to another thread (PERFORMANCE.md:
//! the cross-thread wake-ups cost more than the script).
//!
//! Redis going away never fails a request by itself: a check that errors or
//! takes longer than [`CHECK_TIMEOUT`] is answered by the policy's local
//! counters instead (`fault_tolerant`, the default) and counted in
//! [`RedisLimiter::fallbacks`]; the worker drops its connection (a silent
//! network can leave it half-open forever), and for [`BACKOFF`] every check
//! counts locally. Then one check per back-off period probes Redis while
//! the others keep counting locally, so an outage costs almost no latency.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::OnceCell;

use super::RateInfo;

/// The longest a request waits for Redis before counting locally.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed check, how long requests count locally without trying.
pub const BACKOFF: Duration = Duration::from_secs(1);

thread_local! {
    /// This worker's connection to each limiter's Redis (by limiter address).
    static CONNECTIONS: RefCell<HashMap<usize, Arc<OnceCell<MultiplexedConnection>>>> = RefCell::new(HashMap::new());
    /// This worker's batch of checks for each limiter.
    static BATCHES: RefCell<HashMap<usize, Arc<Batch>>> = RefCell::new(HashMap::new());
}

/// A batch of checks, each atomic, run in order in one script. Checks of
/// one bucket (the same key and windows: one consumer, one route) come as
/// one group, so Redis does work per bucket, not per request: KEYS[g] is
/// group g's bucket; ARGV holds, per group, its number of checks, its
/// number of windows, then each window's length in ms and limit.
///
/// Each window keeps a counter per fixed period; the previous period's
/// count is weighted by how much of it still overlaps the sliding window.
/// A check counts nothing when any of its windows is full, and each
/// admitted check counts in every window, so of a group of `count` checks
/// the first `min(count, room)` are admitted, where `room` is the least
/// `limit - used` over the windows; that is what running them one by one
/// would give. Counters are read and written once per batch. Returns, per
/// group, {admitted, limit, room, reset_secs} of its tightest window
/// (room clamped at 0): check j of the group (from 0) is admitted when
/// j < admitted, with `room - j - 1` remaining.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local seen = {}
local order = {}
local a = 1
for g = 1, #KEYS do
  local count = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  local room, t_limit, t_reset
  local current = {}
  for i = 1, n do
    local len = tonumber(ARGV[a])
    local limit = tonumber(ARGV[a + 1])
    a = a + 2
    local period = math.floor(now / len)
    local ck = KEYS[g] .. ':' .. i .. ':' .. len .. ':' .. period
    local st = seen[ck]
    if not st then
      local pk = KEYS[g] .. ':' .. i .. ':' .. len .. ':' .. (period - 1)
      local got = redis.call('MGET', ck, pk)
      st = {cur = tonumber(got[1] or '0'), prev = tonumber(got[2] or '0'), add = 0, len = len}
      seen[ck] = st
      order[#order + 1] = ck
    end
    local elapsed = now - period * len
    local used = math.floor(st.prev * (len - elapsed) / len) + st.cur + st.add
    local reset = math.ceil((len - elapsed) / 1000)
    if reset < 1 then reset = 1 end
    if room == nil or limit - used < room then
      room, t_limit, t_reset = limit - used, limit, reset
    end
    current[i] = st
  end
  if room < 0 then room = 0 end
  local admitted = math.min(count, room)
  for i = 1, #current do
    current[i].add = current[i].add + admitted
  end
  out[#out + 1] = admitted
  out[#out + 1] = t_limit
  out[#out + 1] = room
  out[#out + 1] = t_reset
end
for _, ck in ipairs(order) do
  local st = seen[ck]
  if st.add > 0 then
    if redis.call('INCRBY', ck, st.add) == st.add then
      redis.call('PEXPIRE', ck, 2 * st.len + 1000)
    end
  end
end
return out
"#;

/// Event-loop turns a batch waits for more checks before it is sent.
const BATCH_TURNS: usize = 2;

/// The most checks one script runs, so one batch cannot hold Redis long.
const MAX_BATCH: usize = 256;

/// A check waiting for the worker's next batch.
struct Pending {
    key: String,
    /// (length in ms, limit) of each window.
    windows: Arc<[(u64, u64)]>,
    reply: tokio::sync::oneshot::Sender<Verdict>,
}

/// One worker's queue of checks for one limiter, and whether a task is
/// scheduled to send them.
#[derive(Default)]
struct Batch {
    queue: std::sync::Mutex<(Vec<Pending>, bool)>,
}

/// The checks of a batch by bucket, in order of arrival within each and
/// by first arrival across: checks with the same key and windows form one
/// group (the windows differ only across a config change).
fn group_by_bucket(items: &[Pending]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    type Bucket<'a> = (&'a str, &'a [(u64, u64)]);
    let mut index: HashMap<Bucket, usize> = HashMap::new();
    for (i, p) in items.iter().enumerate() {
        match index.entry((p.key.as_str(), &p.windows[..])) {
            std::collections::hash_map::Entry::Occupied(e) => groups[*e.get()].push(i),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// How to reach Redis: its URL and the prefix of every key, so several
/// gateway clusters (or tests) can share one server.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub url: String,
    pub prefix: String,
}

/// One node's access to Redis for cluster limits, and its health.
pub struct RedisLimiter {
    options: RedisOptions,
    client: Option<redis::Client>,
    script: redis::Script,
    /// 0 while healthy; else millis since `epoch` before which checks go
    /// straight to local counting.
    down_until: AtomicU64,
    epoch: Instant,
    /// Checks answered by the local fallback because Redis failed.
    pub fallbacks: AtomicU64,
    /// Whether the last check (or the start-up ping) reached Redis.
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
    pub fn new(options: RedisOptions) -> RedisLimiter {
        let client = match redis::Client::open(options.url.as_str()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "MANIFOLD_REDIS_URL is not a Redis URL: cluster rate limits count locally");
                None
            }
        };
        RedisLimiter {
            options,
            client,
            script: redis::Script::new(SCRIPT),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            fallbacks: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
        }
    }

    async fn open(&self) -> redis::RedisResult<MultiplexedConnection> {
        let Some(client) = &self.client else {
            return Err(redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "invalid Redis URL")));
        };
        let config = AsyncConnectionConfig::new().set_connection_timeout(CHECK_TIMEOUT).set_response_timeout(CHECK_TIMEOUT);
        client.get_multiplexed_async_connection_with_config(&config).await
    }

    /// Checks that Redis answers (at start-up, before the node serves).
    pub async fn ping(&self) -> bool {
        let ok = async {
            let mut conn = self.open().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        }
        .await;
        match ok {
            Ok(_) => {
                tracing::info!(prefix = %self.options.prefix, "Redis answers: cluster rate limits count there");
                self.reachable.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis: cluster rate limits count locally until it answers");
                self.reachable.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn slot(&self) -> Arc<OnceCell<MultiplexedConnection>> {
        let id = self as *const RedisLimiter as usize;
        CONNECTIONS.with(|c| c.borrow_mut().entry(id).or_default().clone())
    }

    /// Forgets this worker's connection, so the next check opens a new one.
    fn drop_connection(&self) {
        let id = self as *const RedisLimiter as usize;
        CONNECTIONS.with(|c| c.borrow_mut().remove(&id));
    }

    /// One atomic check-and-count of `key` under `policy` for `windows`.
    ///
    /// Checks a worker makes while its previous batch is with Redis go
    /// together in the next one: one round trip and one script run for many
    /// requests, each still atomic, so the count stays exact while Redis and
    /// the worker do a fraction of the work per request.
    pub async fn check(self: &Arc<Self>, policy: &str, key: &str, windows: &Arc<[(u64, u64)]>) -> Verdict {
        let now = self.now_ms();
        let down = self.down_until.load(Ordering::Relaxed);
        if down != 0 {
            // Recovering: one check per back-off period probes Redis; the
            // others count locally rather than wait on it.
            if now < down
                || self.down_until.compare_exchange(down, now + BACKOFF.as_millis() as u64, Ordering::AcqRel, Ordering::Relaxed).is_err()
            {
                return Verdict::Unavailable;
            }
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending { key: format!("{}:rl:{policy}:{key}", self.options.prefix), windows: windows.clone(), reply };
        let id = Arc::as_ptr(self) as usize;
        let batch = BATCHES.with(|b| b.borrow_mut().entry(id).or_default().clone());
        {
            let mut queue = batch.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.0.push(pending);
            if !queue.1 {
                queue.1 = true;
                self.schedule(batch.clone());
            }
        }
        // No timer of its own: every batch is bounded by CHECK_TIMEOUT and
        // answers each of its checks, Unavailable when it fails.
        answer.await.unwrap_or(Verdict::Unavailable)
    }

    fn schedule(self: &Arc<Self>, batch: Arc<Batch>) {
        tokio::spawn(self.clone().send_queued(batch));
    }

    /// Sends this worker's queued checks, a batch at a time, until none
    /// are left: checks made while one batch is with Redis go together in
    /// the next.
    async fn send_queued(self: Arc<Self>, batch: Arc<Batch>) {
        loop {
            // A few turns of the event loop first (yield_now wakes after the
            // I/O driver is polled): requests whose bytes arrived meanwhile
            // make their checks and join this batch, like a database's group
            // commit. No timer: an idle worker's turn takes microseconds; a
            // busy one's batches grow (bench/policies.sh: 8-9 checks a script
            // with no turn, 11 with one, 12-13 with two), so Redis and the
            // worker run fewer scripts and switch tasks less.
            for _ in 0..BATCH_TURNS {
                tokio::task::yield_now().await;
            }
            let items: Vec<Pending> = {
                let mut queue = batch.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.0.is_empty() {
                    queue.1 = false;
                    return;
                }
                let n = queue.0.len().min(MAX_BATCH);
                queue.0.drain(..n).collect()
            };
            self.send(items).await;
        }
    }

    async fn send(&self, items: Vec<Pending>) {
        let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
        let groups = group_by_bucket(&items);
        let mut inv = self.script.prepare_invoke();
        for g in &groups {
            inv.key(items[g[0]].key.as_str());
        }
        for g in &groups {
            let windows = &items[g[0]].windows;
            inv.arg(g.len()).arg(windows.len());
            for (len, limit) in windows.iter() {
                inv.arg(*len).arg(*limit);
            }
        }
        // A connection this worker has not used since Redis went away is
        // dead: the first error opens a new one and tries once more.
        let mut last_error = String::new();
        let mut values = None;
        for _ in 0..2 {
            let slot = self.slot();
            let mut conn = match tokio::time::timeout_at(deadline, slot.get_or_try_init(|| self.open())).await {
                Ok(Ok(conn)) => conn.clone(),
                Ok(Err(e)) => return self.fail_all(items, &e.to_string()),
                Err(_) => return self.fail_all(items, "connecting timed out"),
            };
            let result: Result<redis::RedisResult<Vec<u64>>, _> = tokio::time::timeout_at(deadline, inv.invoke_async(&mut conn)).await;
            match result {
                Ok(Ok(v)) if v.len() == groups.len() * 4 => {
                    values = Some(v);
                    break;
                }
                Ok(Ok(_)) => return self.fail_all(items, "the script answered an unexpected shape"),
                Ok(Err(e)) => {
                    self.drop_connection();
                    last_error = e.to_string();
                }
                Err(_) => return self.fail_all(items, "timed out"),
            }
        }
        let Some(values) = values else { return self.fail_all(items, &last_error) };
        if self.down_until.load(Ordering::Relaxed) != 0 || !self.reachable.load(Ordering::Relaxed) {
            tracing::info!("Redis answers again: cluster rate limits count there");
            self.down_until.store(0, Ordering::Relaxed);
            self.reachable.store(true, Ordering::Relaxed);
        }
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(items.len());
        verdicts.resize_with(items.len(), || None);
        for (g, v) in groups.iter().zip(values.chunks_exact(4)) {
            let (admitted, limit, room, reset_secs) = (v[0], v[1], v[2], v[3]);
            for (j, &i) in g.iter().enumerate() {
                let j = j as u64;
                verdicts[i] = Some(if j < admitted {
                    Verdict::Allowed(RateInfo { limit, remaining: room - j - 1, reset_secs })
                } else {
                    Verdict::Refused(RateInfo { limit, remaining: 0, reset_secs })
                });
            }
        }
        for (p, verdict) in items.into_iter().zip(verdicts) {
            let _ = p.reply.send(verdict.unwrap_or(Verdict::Unavailable));
        }
    }

    /// A composition call's cached answer (`cache.scope: cluster`), or
    /// `None`: there is none, or Redis could not say within
    /// [`CHECK_TIMEOUT`] (the call goes on node-local).
    pub async fn cached_call(&self, key: &str) -> Option<Vec<u8>> {
        let key = format!("{}:call:{key}", self.options.prefix);
        self.one_command(redis::cmd("GET").arg(key).clone()).await.flatten()
    }

    /// Keeps a composition call's answer for `keep` (best effort).
    pub async fn store_call(&self, key: &str, value: Vec<u8>, keep: Duration) {
        let key = format!("{}:call:{key}", self.options.prefix);
        let ms = keep.as_millis().max(1) as u64;
        let _: Option<Option<String>> = self.one_command(redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ms).clone()).await;
    }

    /// One command on this worker's connection, bounded by
    /// [`CHECK_TIMEOUT`]; `None` when Redis is backing off or fails.
    async fn one_command<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        let down = self.down_until.load(Ordering::Relaxed);
        if down != 0 && self.now_ms() < down {
            return None;
        }
        let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
        let slot = self.slot();
        let mut conn = match tokio::time::timeout_at(deadline, slot.get_or_try_init(|| self.open())).await {
            Ok(Ok(conn)) => conn.clone(),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                return None;
            }
            Err(_) => {
                self.failed("connecting timed out");
                return None;
            }
        };
        match tokio::time::timeout_at(deadline, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                if self.down_until.load(Ordering::Relaxed) != 0 {
                    self.down_until.store(0, Ordering::Relaxed);
                    self.reachable.store(true, Ordering::Relaxed);
                }
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    fn fail_all(&self, items: Vec<Pending>, why: &str) {
        self.failed(why);
        for p in items {
            let _ = p.reply.send(Verdict::Unavailable);
        }
    }

    fn failed(&self, why: &str) -> Verdict {
        self.drop_connection();
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = why, "Redis failed a rate-limit check: counting locally for now");
        }
        self.down_until.store(self.now_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        Verdict::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(key: &str, windows: &Arc<[(u64, u64)]>) -> Pending {
        Pending { key: key.to_string(), windows: windows.clone(), reply: tokio::sync::oneshot::channel().0 }
    }

    #[test]
    fn checks_group_by_key_and_windows_in_arrival_order() {
        let minute: Arc<[(u64, u64)]> = Arc::from(vec![(60_000, 10)]);
        let both: Arc<[(u64, u64)]> = Arc::from(vec![(60_000, 10), (3_600_000, 100)]);
        let minute_again: Arc<[(u64, u64)]> = Arc::from(vec![(60_000, 10)]);
        let items = [pending("a", &minute), pending("b", &minute), pending("a", &minute_again), pending("a", &both), pending("b", &minute)];
        // Equal windows group even from another Arc (the same policy compiled
        // twice); other windows (a config change) make a group of their own.
        assert_eq!(group_by_bucket(&items), vec![vec![0, 2], vec![1, 4], vec![3]]);
    }
}
