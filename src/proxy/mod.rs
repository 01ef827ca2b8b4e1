//! Plain proxying: one request in, the same request out to the route's
//! upstream, bodies streamed both ways.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::pattern::RewritePart;
use crate::errors::{ErrorCode, GatewayError};
use crate::ids::{TraceContext, REQUEST_ID_HEADER, TRACEPARENT};
use crate::otel::CallSpan;
use crate::snapshot::ProxyRoute;

pub type HttpClient = Client<HttpConnector, Body>;

/// Idle backend connections kept per backend host and worker (nginx's
/// `keepalive` directive counts the same way; Kong keeps 512 per pool).
pub const MAX_IDLE_PER_HOST: usize = 64;

/// The pooled backend client. One per worker thread, so a connection and the
/// backend calls it makes stay on one thread (see PERFORMANCE.md). Redirects
/// are never followed and proxy environment variables never read.
///
/// At most [`MAX_IDLE_PER_HOST`] idle connections per backend are kept per
/// worker: a burst (1,000 compositions of 3 calls at once opens 3,000
/// backend connections) must not stay pooled, and memory with it, once it
/// is over. Steady load reuses far fewer: each busy connection returns to the
/// pool as soon as its answer is read.
pub fn new_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers: every header `Connection` names first, then
/// the fixed list and every `Proxy-*` header. Runs before the gateway adds
/// its own headers, so a client cannot make it drop them (`Connection:
/// X-Forwarded-For`).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Parsed as bytes: a value that is not visible ASCII still names headers.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [header::CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// What the proxy needs to know about the request besides the request.
pub struct Forwarding<'a> {
    pub client_ip: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-Proto/Host` are kept.
    pub trusted_peer: bool,
    pub request_id: &'a HeaderValue,
    pub trace: &'a TraceContext,
    /// The normalized request path (still percent-encoded).
    pub path: &'a str,
    pub params: &'a [(std::sync::Arc<str>, String)],
    /// request-size-limit: cut the body past this many bytes (413).
    pub body_limit: Option<u64>,
}

fn upstream_path_and_query(route: &ProxyRoute, fwd: &Forwarding, query: Option<&str>) -> Result<PathAndQuery, GatewayError> {
    let mut p = String::with_capacity(route.base_path.len() + fwd.path.len() + query.map_or(0, |q| q.len() + 1));
    p.push_str(&route.base_path);
    match &route.rewrite {
        None => p.push_str(fwd.path),
        Some(parts) => {
            for part in parts {
                match part {
                    RewritePart::Literal(s) => p.push_str(s),
                    RewritePart::Param(name) => {
                        if let Some((_, v)) = fwd.params.iter().find(|(n, _)| **n == **name) {
                            p.push_str(v);
                        }
                    }
                }
            }
        }
    }
    if p.is_empty() {
        p.push('/');
    }
    if let Some(q) = query {
        p.push('?');
        p.push_str(q);
    }
    PathAndQuery::try_from(p).map_err(|_| GatewayError::new(ErrorCode::BadRequest, "the rewritten path is not valid"))
}

/// Forwards `req` to the route's upstream and streams the answer back.
pub async fn forward(
    client: &HttpClient,
    route: &ProxyRoute,
    fwd: Forwarding<'_>,
    req: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let original_host =
        parts.headers.get(header::HOST).cloned().or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));

    let path_and_query = upstream_path_and_query(route, &fwd, parts.uri.query())?;
    parts.uri = Uri::from_parts({
        let mut u = http::uri::Parts::default();
        u.scheme = Some(route.scheme.clone());
        u.authority = Some(route.authority.clone());
        u.path_and_query = Some(path_and_query);
        u
    })
    .map_err(|_| GatewayError::new(ErrorCode::Internal, "cannot build the upstream URI"))?;
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    remove_hop_by_hop(h);
    let client_ip = fwd.client_ip.to_string();
    let prev: Vec<&str> =
        h.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty()).collect();
    let xff = if prev.is_empty() { client_ip } else { format!("{}, {client_ip}", prev.join(", ")) };
    h.remove(&X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(fwd.trusted_peer && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if !(fwd.trusted_peer && h.contains_key(&X_FORWARDED_HOST)) {
        match &original_host {
            Some(host) => h.insert(X_FORWARDED_HOST.clone(), host.clone()),
            None => h.remove(&X_FORWARDED_HOST),
        };
    }
    match (&original_host, route.preserve_host) {
        (Some(host), true) => h.insert(header::HOST, host.clone()),
        _ => h.insert(header::HOST, route.upstream_host.clone()),
    };
    h.insert(REQUEST_ID_HEADER, fwd.request_id.clone());
    h.insert(TRACEPARENT, fwd.trace.child());
    let mut span = CallSpan::start(Some(fwd.trace), &route.name, &parts.method, &parts.uri, &mut parts.headers);

    let body = match (fwd.body_limit, body) {
        (Some(left), Body::Stream(inner)) => Body::Capped { inner, left },
        (_, body) => body,
    };
    let upstream_req = Request::from_parts(parts, body);
    let result = tokio::time::timeout(route.timeout, client.request(upstream_req)).await;
    let resp = match result {
        Err(_) => {
            span.finish(None, Some("timeout"));
            tracing::warn!(request_id = fwd.request_id.to_str().unwrap_or(""), route = %route.name, "upstream timed out after {:?}", route.timeout);
            return Err(GatewayError::new(ErrorCode::UpstreamTimeout, "the upstream did not answer in time"));
        }
        Ok(Err(e)) if crate::body::is_too_large(&e) => {
            span.finish(None, Some("body_too_large"));
            return Err(GatewayError::new(ErrorCode::PayloadTooLarge, "the request body is over this route's size limit"));
        }
        Ok(Err(e)) => {
            span.finish(None, Some(if e.is_connect() { "connect" } else { "upstream" }));
            tracing::warn!(request_id = fwd.request_id.to_str().unwrap_or(""), route = %route.name, error = %error_chain(&e), "upstream request failed");
            let message = if e.is_connect() { "the upstream could not be reached" } else { "the upstream connection failed" };
            return Err(GatewayError::new(ErrorCode::UpstreamError, message));
        }
        Ok(Ok(resp)) => resp,
    };
    span.finish(Some(resp.status().as_u16()), None);
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::Stream(body)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
