//! Plain proxying: one request in, the same request out to the route's
//! upstream, bodies streamed both ways.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};

use crate::body::Body;
use crate::config::pattern::RewritePart;
use crate::errors::{ErrorCode, GatewayError};
use crate::ids::TraceContext;
use crate::snapshot::ProxyRoute;
use crate::upstream::{Client, Labels, Outbound, PickInput, Tries};

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
    /// The request came over the TLS listener: `X-Forwarded-Proto: https`.
    pub https: bool,
    pub request_id: &'a HeaderValue,
    pub trace: &'a TraceContext,
    /// The normalized request path (still percent-encoded).
    pub path: &'a str,
    pub params: &'a [(std::sync::Arc<str>, String)],
    /// request-size-limit: cut the body past this many bytes (413).
    pub body_limit: Option<u64>,
    pub metrics: Option<&'a std::sync::Arc<crate::metrics::Metrics>>,
    /// The node's trusted proxies (consistent hashing on the client's ip).
    pub trusted_proxies: &'a [ipnet::IpNet],
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
/// The error says whether the client's connection must close (its body
/// was not read to the end).
pub async fn forward(
    client: &Client,
    route: &ProxyRoute,
    fwd: Forwarding<'_>,
    req: Request<Body>,
) -> Result<Response<Body>, (GatewayError, bool)> {
    let started = tokio::time::Instant::now();
    let (mut parts, body) = req.into_parts();
    let original_host =
        parts.headers.get(header::HOST).cloned().or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));

    let path_and_query = upstream_path_and_query(route, &fwd, parts.uri.query()).map_err(|e| (e, false))?;
    let plan = &route.upstream;
    // Retried only when idempotent and the gateway holds the body whole
    // (none, or read whole by a body transform): a streamed client body
    // is sent once.
    let retries = plan.retry.is_some() && crate::upstream::idempotent(&parts.method);
    let body = match (fwd.body_limit, body) {
        (_, Body::Stream(inner)) if retries && http_body::Body::is_end_stream(&inner) => Body::Empty,
        (Some(left), Body::Stream(inner)) => Body::Capped { inner, left },
        (_, body) => body,
    };
    let retryable = retries && matches!(body, Body::Empty | Body::Full(_));
    let deadline = started + route.timeout;
    // A consistent-hash pick reads the request as the policies left it.
    let input = PickInput { headers: &parts.headers, peer: fwd.client_ip, trusted_proxies: fwd.trusted_proxies, path: fwd.path };
    let labels = Labels { route: &route.name, call: "", metrics: fwd.metrics };
    // The circuit breaker, the first pick among usable targets, and the
    // counts held until the answer has ended (least-requests' count too).
    let mut tries = match Tries::start(plan, plan.key(&input), retryable, deadline, labels) {
        Ok(t) => t,
        Err(refused) => {
            let unread = !http_body::Body::is_end_stream(&body);
            return Err((GatewayError::new(ErrorCode::UpstreamUnavailable, refused.message()), unread));
        }
    };
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
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(if fwd.https { "https" } else { "http" }));
    }
    if !(fwd.trusted_peer && h.contains_key(&X_FORWARDED_HOST)) {
        match &original_host {
            Some(host) => h.insert(X_FORWARDED_HOST.clone(), host.clone()),
            None => h.remove(&X_FORWARDED_HOST),
        };
    }

    let kept = tries.may_retry().then(|| parts.clone());
    let mut whole = Some((parts, body));
    loop {
        let (mut parts, body) = match (&kept, &whole) {
            // Kept for the next try.
            (Some(p), Some((_, b))) if tries.may_retry() => {
                let b = match b {
                    Body::Full(bytes) => Body::Full(bytes.clone()),
                    _ => Body::Empty,
                };
                (p.clone(), b)
            }
            _ => whole.take().expect("the request is sent once unless it is kept for a retry"),
        };
        let target = tries.target();
        parts.uri = Uri::from_parts({
            let mut u = http::uri::Parts::default();
            u.scheme = Some(target.scheme.clone());
            u.authority = Some(target.authority.clone());
            u.path_and_query = Some(path_and_query.clone());
            u
        })
        .map_err(|_| (GatewayError::new(ErrorCode::Internal, "cannot build the upstream URI"), false))?;
        let host = match (&original_host, route.preserve_host) {
            (Some(host), true) => host,
            _ => &target.host,
        };
        let out = Outbound {
            route: &route.name,
            call: None,
            request_id: fwd.request_id,
            trace: fwd.trace,
            correlation: None,
            host,
            connector: target.connector.as_ref().or(plan.connector.as_ref()),
            connect_timeout: plan.connect_timeout,
            http2: plan.http2,
            deadline,
            body_timeout: route.body_timeout,
            keep_headers: true,
            metrics: fwd.metrics,
        };
        // Boxed: the send future is most of this one's size, and held
        // inline it is copied (memcpy) each time the enclosing futures move.
        let result = Box::pin(client.send(out, Request::from_parts(parts, body))).await;
        if tries.again(&result) {
            // A status retried: its answer (and body) is discarded.
            drop(result);
            continue;
        }
        let resp = result.map_err(|e| (e.gateway_error(), e.closes_client()))?;
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(parts, Body::held(body, tries.finish())));
    }
}
