//! `response-cache`: GET and HEAD answers kept in memory (moka, bounded by
//! bytes, expiring after `ttl`), keyed by the route or composition, method,
//! path, query (when `vary_query`), the `vary_headers` values and the
//! consumer, so one consumer's answer never reaches another. Every answer
//! of a cached route says what happened in `Cache-Status` (RFC 9211).

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
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub consumer: Option<&'a str>,
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
        }
    }

    /// The key of a cacheable request; `None` for other methods.
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
        part(r.method.as_str());
        part(r.path);
        part(if self.vary_query { r.query.unwrap_or("") } else { "" });
        part(r.consumer.unwrap_or(""));
        for h in &self.vary_headers {
            let values: Vec<&[u8]> = r.headers.get_all(h).iter().map(HeaderValue::as_bytes).collect();
            part(&String::from_utf8_lossy(&values.join(&b","[..])));
        }
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

    /// Passes `resp` on, storing it on the way when it may be stored.
    pub fn store(self: &Arc<Self>, key: String, mut resp: Response<Body>) -> Response<Body> {
        if !storable(&resp) {
            resp.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("manifold; fwd=miss; detail=not-storable"));
            return resp;
        }
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
                this.entries.insert(key, Arc::new(Entry { status, headers, body: bytes, stored: Instant::now() }));
            }),
        );
        Response::from_parts(parts, body)
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
