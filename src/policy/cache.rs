//! `response-cache`: GET answers kept in memory (moka, bounded by bytes,
//! expiring after `ttl`) and served to GET and HEAD, keyed by the route or
//! composition, host, path, query (when `vary_query`), the `vary_headers`
//! values, the consumer, and a digest of the request's `Authorization` and
//! `Cookie` and of a JWT's `sub`, so one caller's answer never reaches
//! another. Every answer of a cached route says what happened in
//! `Cache-Status` (RFC 9211).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::body::Body;
use crate::config::ResponseCacheConfig;

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// One stored answer.
#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
}

pub struct ResponseCache {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    ttl: Duration,
    vary_headers: Vec<HeaderName>,
    vary_query: bool,
    /// The biggest body one entry may hold: an eighth of the whole cache.
    entry_cap: usize,
    /// Answers being copied right now; at most [`COPIES_AT_ONCE`], so the
    /// copies in flight never hold more than the cache itself.
    copying: Arc<AtomicUsize>,
}

/// Copies in flight per cache: each holds at most an eighth of `max_bytes`.
const COPIES_AT_ONCE: usize = 8;

/// Gives a copy slot back when the copy ends, stored or not.
struct CopySlot(Arc<AtomicUsize>);

impl Drop for CopySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// What a request is, for the cache.
pub struct Lookup<'a> {
    pub entity: &'a str,
    pub method: &'a Method,
    /// The request's host, lower case, without port.
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub consumer: Option<&'a str>,
    /// A verified JWT's `sub`: one issuer's users share one consumer.
    pub subject: Option<&'a str>,
}

impl ResponseCache {
    pub fn new(c: &ResponseCacheConfig) -> ResponseCache {
        let max = c.max_bytes.0;
        ResponseCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max)
                .weigher(|k: &String, e: &Arc<Entry>| {
                    let headers: usize = e.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
                    (k.len() + e.body.len() + headers + 64).min(u32::MAX as usize) as u32
                })
                .time_to_live(c.ttl.0)
                .build(),
            ttl: c.ttl.0,
            vary_headers: c.vary_headers.iter().filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()).collect(),
            vary_query: c.vary_query,
            entry_cap: (max / 8).min(usize::MAX as u64) as usize,
            copying: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The key of a cacheable request; `None` for other methods. HEAD is
    /// answered from what GET stored.
    pub fn key(&self, r: &Lookup<'_>) -> Option<String> {
        if r.method != Method::GET && r.method != Method::HEAD {
            return None;
        }
        // Lengths before each part: no two different requests share a key.
        let mut key = String::with_capacity(128);
        let mut part = |s: &str| {
            key.push_str(&s.len().to_string());
            key.push(':');
            key.push_str(s);
        };
        part(r.entity);
        part(r.host);
        part(r.path);
        part(if self.vary_query { r.query.unwrap_or("") } else { "" });
        part(r.consumer.unwrap_or(""));
        for h in &self.vary_headers {
            let values: Vec<&[u8]> = r.headers.get_all(h).iter().map(HeaderValue::as_bytes).collect();
            part(&String::from_utf8_lossy(&values.join(&b","[..])));
        }
        // Whatever identifies the caller to the backend: its credentials,
        // cookies and token subject, as a digest (the key is in memory).
        use sha2::Digest;
        let mut who = sha2::Sha256::new();
        let mut any = false;
        for name in [http::header::AUTHORIZATION, http::header::COOKIE] {
            for v in r.headers.get_all(&name) {
                who.update(name.as_str().as_bytes());
                who.update((v.len() as u64).to_le_bytes());
                who.update(v.as_bytes());
                any = true;
            }
        }
        if let Some(sub) = r.subject {
            who.update(b"sub");
            who.update((sub.len() as u64).to_le_bytes());
            who.update(sub.as_bytes());
            any = true;
        }
        part(&if any { hex::encode(&who.finalize()[..16]) } else { String::new() });
        Some(key)
    }

    /// A stored answer, marked as a hit.
    pub fn get(&self, key: &str) -> Option<Response<Body>> {
        let e = self.entries.get(key)?;
        let age = e.stored.elapsed();
        if age >= self.ttl {
            return None;
        }
        let mut resp = Response::new(Body::full(e.body.clone()));
        *resp.status_mut() = e.status;
        *resp.headers_mut() = e.headers.clone();
        let left = (self.ttl - age).as_secs();
        if let Ok(v) = HeaderValue::from_str(&format!("manifold; hit; ttl={left}")) {
            resp.headers_mut().insert(CACHE_STATUS, v);
        }
        resp.headers_mut().insert(http::header::AGE, HeaderValue::from(age.as_secs()));
        Some(resp)
    }

    /// Passes a GET's answer on, storing it on the way when it may be
    /// stored.
    pub fn store(self: &Arc<Self>, key: String, mut resp: Response<Body>) -> Response<Body> {
        let declared = resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let too_big = declared.is_some_and(|len| len > self.entry_cap as u64);
        if !self.storable(&resp) || too_big {
            resp.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("manifold; fwd=miss; detail=not-storable"));
            return resp;
        }
        if self.copying.fetch_add(1, Ordering::AcqRel) >= COPIES_AT_ONCE {
            self.copying.fetch_sub(1, Ordering::AcqRel);
            resp.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("manifold; fwd=miss; detail=busy"));
            return resp;
        }
        let slot = CopySlot(self.copying.clone());
        resp.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("manifold; fwd=miss; stored"));
        let (parts, body) = resp.into_parts();
        let mut headers = parts.headers.clone();
        headers.remove(http::header::CONNECTION);
        headers.remove(http::header::TRANSFER_ENCODING);
        headers.remove(http::header::CONTENT_LENGTH);
        let status = parts.status;
        let this = self.clone();
        let body = Body::tee(
            body,
            self.entry_cap,
            Box::new(move |bytes| {
                let _slot = slot;
                this.entries.insert(key, Arc::new(Entry { status, headers, body: bytes, stored: Instant::now() }));
            }),
        );
        Response::from_parts(parts, body)
    }

    /// Only a 200 that says nothing against storing it, sets no cookie, and
    /// varies by nothing the key does not hold.
    fn storable(&self, resp: &Response<Body>) -> bool {
        if !storable(resp) {
            return false;
        }
        resp.headers().get_all(http::header::VARY).iter().all(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',').map(str::trim).filter(|h| !h.is_empty()).all(|h| {
                    let h = h.to_ascii_lowercase();
                    self.vary_headers.iter().any(|v| v.as_str() == h) || h == "authorization" || h == "cookie"
                })
            })
        })
    }
}

/// Only a 200 that says nothing against storing it, and sets no cookie.
fn storable(resp: &Response<Body>) -> bool {
    if resp.status() != StatusCode::OK || resp.headers().contains_key(http::header::SET_COOKIE) {
        return false;
    }
    let forbids = resp.headers().get_all(http::header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().map_or(true, |s| {
            s.split(',').any(|d| {
                let d = d.trim().to_ascii_lowercase();
                d == "no-store" || d == "private" || d == "no-cache" || d.starts_with("private=") || d.starts_with("no-cache=")
            })
        })
    });
    !forbids && resp.headers().get(http::header::VARY).is_none_or(|v| v.as_bytes() != b"*")
}
