//! Calls shared across requests: the node's store of cached call answers
//! (moka, bounded by bytes, `MANIFOLD_CALL_CACHE_MAX_BYTES`) and the
//! requests in flight that identical calls collapse onto (SPEC §8).
//!
//! One [`CallStore`] per node, held by `policy::Services` so it outlives
//! configs; a call with `cache` or `collapse: true` holds it in its plan,
//! every other call never touches it. Collapsing is node-wide: the proxy
//! runs one current-thread runtime per worker, and identical calls from
//! clients on different workers share one request. The leader's request
//! runs in a task spawned on its worker's runtime, so a client that goes
//! away never strands the others waiting on it; the map of requests in
//! flight is behind one mutex, taken only by these calls, for an insert
//! or a remove.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{HeaderMap, HeaderName};

/// The store's default bound, all calls together (SPEC §8).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// A call's `cache` block, compiled.
#[derive(Debug, Clone)]
pub struct CachePlan {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub vary_headers: Vec<HeaderName>,
}

/// What happened to a call's request with the store (`Server-Timing`'s
/// `cache=`, `try`'s `cache`, the `result` label of
/// `manifold_call_cache_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    Hit,
    Revalidated,
    Stale,
    Miss,
}

impl Mark {
    pub const ALL: [Mark; 4] = [Mark::Hit, Mark::Stale, Mark::Miss, Mark::Revalidated];

    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Hit => "hit",
            Mark::Stale => "stale",
            Mark::Miss => "miss",
            Mark::Revalidated => "revalidated",
        }
    }
}

/// One stored answer.
#[derive(Debug)]
pub struct Entry {
    pub stored: Instant,
    pub ttl: Duration,
    /// How long after `ttl` the entry may still be answered (the longer of
    /// `stale_while_revalidate` and `stale_if_error`).
    pub keep: Duration,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Entry {
    pub fn age(&self) -> Duration {
        self.stored.elapsed()
    }
}

struct Keep;

impl moka::Expiry<Arc<str>, Arc<Entry>> for Keep {
    fn expire_after_create(&self, _: &Arc<str>, e: &Arc<Entry>, _: std::time::Instant) -> Option<Duration> {
        Some(e.ttl + e.keep)
    }

    fn expire_after_update(&self, _: &Arc<str>, e: &Arc<Entry>, _: std::time::Instant, _: Option<Duration>) -> Option<Duration> {
        Some(e.ttl + e.keep)
    }
}

/// A request in flight, awaited by every identical call.
pub type Flight<T> = Shared<BoxFuture<'static, T>>;

/// The node's cached call answers and the requests in flight.
pub struct CallStore<T: Clone + Send + Sync + 'static> {
    entries: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    max_bytes: u64,
    flights: Mutex<HashMap<Arc<str>, Flight<T>>>,
}

impl<T: Clone + Send + Sync + 'static> std::fmt::Debug for CallStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStore").field("max_bytes", &self.max_bytes).finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> CallStore<T> {
    pub fn new(max_bytes: u64) -> CallStore<T> {
        CallStore {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &Arc<str>, e: &Arc<Entry>| {
                    let headers: usize = e.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
                    (k.len() + e.body.len() + headers + 128).min(u32::MAX as usize) as u32
                })
                .expire_after(Keep)
                .build(),
            max_bytes,
            flights: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }

    pub fn put(&self, key: Arc<str>, entry: Entry) {
        // An entry bigger than a quarter of the store would push out most
        // of what it holds.
        if (entry.body.len() as u64) <= self.max_bytes / 4 {
            self.entries.insert(key, Arc::new(entry));
        }
    }

    /// Keeps an entry read from elsewhere (Redis), within the same bound.
    pub fn put_shared(&self, key: Arc<str>, entry: Arc<Entry>) {
        if (entry.body.len() as u64) <= self.max_bytes / 4 {
            self.entries.insert(key, entry);
        }
    }

    /// Bytes held (by the weigher) and entries, after pending evictions.
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.weighted_size(), self.entries.entry_count())
    }

    /// The request in flight under `key`, or a new one: `start` spawns
    /// it (it must call [`CallStore::landed`] when it ends). `true` when
    /// this caller started it.
    pub fn flight(&self, key: &Arc<str>, start: impl FnOnce() -> BoxFuture<'static, T>) -> (Flight<T>, bool) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flights.get(key) {
            return (f.clone(), false);
        }
        let f = start().shared();
        flights.insert(key.clone(), f.clone());
        (f, true)
    }

    /// Whether a request is in flight under `key`.
    pub fn in_flight(&self, key: &str) -> bool {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }

    /// The request under `key` ended: later calls start their own.
    pub fn landed(&self, key: &str) {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// An entry as Redis keeps it (`scope: cluster`): its age travels as the
/// wall-clock time it was stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    stored_unix_ms: u64,
    ttl_ms: u64,
    keep_ms: u64,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// An entry's bytes for Redis (a JSON body is UTF-8; headers that are
/// not text are left out).
pub fn to_wire(e: &Entry) -> Option<Vec<u8>> {
    let wire = Wire {
        stored_unix_ms: unix_ms().saturating_sub(e.age().as_millis() as u64),
        ttl_ms: e.ttl.as_millis() as u64,
        keep_ms: e.keep.as_millis() as u64,
        status: e.status,
        headers: e.headers.iter().filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string()))).collect(),
        body: String::from_utf8(e.body.to_vec()).ok()?,
    };
    serde_json::to_vec(&wire).ok()
}

/// An entry read from Redis, its age kept; `None` when it is past use.
pub fn from_wire(bytes: &[u8]) -> Option<Entry> {
    let w: Wire = serde_json::from_slice(bytes).ok()?;
    let age = Duration::from_millis(unix_ms().saturating_sub(w.stored_unix_ms));
    let (ttl, keep) = (Duration::from_millis(w.ttl_ms), Duration::from_millis(w.keep_ms));
    if age >= ttl + keep {
        return None;
    }
    let mut headers = HeaderMap::new();
    for (n, v) in w.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), http::HeaderValue::from_str(&v)) {
            headers.append(n, v);
        }
    }
    Some(Entry { stored: Instant::now().checked_sub(age)?, ttl, keep, status: w.status, headers, body: Bytes::from(w.body) })
}

/// Whether the backend allows its answer to be kept (`no-store` and
/// `private` say no).
pub fn storable(headers: &HeaderMap) -> bool {
    !headers.get_all(http::header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|d| {
            let d = d.trim().split('=').next().unwrap_or("").trim();
            d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private")
        })
    })
}

/// Lengths before each part: no two different requests share a key.
pub fn key_part(key: &mut String, s: &[u8]) {
    key.push_str(&s.len().to_string());
    key.push(':');
    key.push_str(&String::from_utf8_lossy(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_store_and_private_are_not_kept() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::CACHE_CONTROL, v.parse().unwrap());
            m
        };
        assert!(storable(&HeaderMap::new()));
        assert!(storable(&h("max-age=10, public")));
        assert!(!storable(&h("max-age=10, no-store")));
        assert!(!storable(&h("Private")));
        assert!(!storable(&h("private=\"set-cookie\"")));
    }

    #[test]
    fn the_store_stays_within_its_bound() {
        let store: CallStore<()> = CallStore::new(1 << 20);
        for i in 0..500 {
            let entry = Entry {
                stored: Instant::now(),
                ttl: Duration::from_secs(60),
                keep: Duration::ZERO,
                status: 200,
                headers: HeaderMap::new(),
                body: Bytes::from(vec![b'x'; 10_000]),
            };
            store.put(format!("k{i}").into(), entry);
        }
        let (bytes, entries) = store.size();
        assert!(bytes <= 1 << 20, "{bytes}");
        assert!(entries > 10 && entries < 500, "{entries}");
    }
}
