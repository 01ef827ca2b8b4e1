//! `response-cache`: a stored answer skips the target; an answer that may
//! be stored is copied while it streams (`policy::cache`).

use std::sync::Arc;

use http::Response;

use crate::body::Body;
use crate::config::ResponseCacheConfig;
use crate::policy::cache::{Lookup, ResponseCache as Store};
use crate::policy::filter::{Compile, Filter, Invalid, Outgoing, Phase, ResponseCx};
use crate::policy::Admission;

#[derive(Debug)]
pub struct ResponseCache(Arc<Store>);

/// The request's key, from the lookup to the store (per request, only on
/// a chain with a cache).
#[derive(Clone)]
struct Pending {
    /// Which cache (its address): the last cache of a chain that missed.
    cache: usize,
    key: String,
}

impl Filter for ResponseCache {
    type Config = ResponseCacheConfig;

    fn compile(c: &ResponseCacheConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        if c.ttl.0.is_zero() {
            cx.error("ttl", "must be more than 0");
        }
        for (i, h) in c.vary_headers.iter().enumerate() {
            cx.header_name(&format!("vary_headers[{i}]"), h);
        }
        if c.max_bytes.0 == 0 {
            cx.error("max_bytes", "must be more than 0");
        }
        if cx.has_errors() {
            return Err(cx.invalid());
        }
        Ok(ResponseCache(Arc::new(Store::new(c))))
    }

    fn phase(&self) -> Phase {
        Phase::ResponseCache
    }

    fn rewrites_request(&self) -> bool {
        true
    }

    fn upstream_request(&self, ex: &mut Admission, req: &mut Outgoing<'_>) -> Option<Response<Body>> {
        if req.upgrading {
            return None;
        }
        let key = self.0.key(&Lookup {
            entity: req.entity,
            method: &req.parts.method,
            host: req.host,
            path: req.path,
            query: req.parts.uri.query(),
            headers: &req.parts.headers,
            consumer: ex.consumer.as_ref().map(|c| c.name.as_str()),
            subject: ex.claims.as_ref().and_then(|c| c.get("sub")).and_then(|s| s.as_str()),
        })?;
        if let Some(resp) = self.0.get(&key) {
            return Some(resp);
        }
        ex.state.insert(Pending { cache: Arc::as_ptr(&self.0) as usize, key });
        None
    }

    fn has_response_phase(&self) -> bool {
        true
    }

    async fn response(&self, ex: &mut Admission, cx: &ResponseCx<'_>, resp: Response<Body>) -> Response<Body> {
        // HEAD is served from what GET stored, never stores itself.
        if cx.head || ex.state.get::<Pending>().is_none_or(|p| p.cache != Arc::as_ptr(&self.0) as usize) {
            return resp;
        }
        match ex.state.remove::<Pending>() {
            Some(p) => self.0.store(p.key, resp),
            None => resp,
        }
    }
}
