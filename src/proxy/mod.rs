//! Plain proxying: one request in, the same request out to the route's
//! upstream, bodies streamed both ways. `tunnel.rs`: WebSocket tunnels.

pub mod tunnel;

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

/// Which hop-by-hop headers a message holds, found in one pass over its
/// names (bits of [`hop_by_hop_kind`]).
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |found, name| found | hop_by_hop_kind(name))
}

const HOP_CONNECTION: u8 = 1;
const HOP_FIXED: u8 = 2;
const HOP_PROXY: u8 = 4;

fn hop_by_hop_kind(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        HOP_CONNECTION
    } else if name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
    {
        HOP_FIXED
    } else if name.as_str().starts_with("proxy-") {
        HOP_PROXY
    } else {
        0
    }
}

/// Removes hop-by-hop headers: every header `Connection` names first, then
/// the fixed list and every `Proxy-*` header. Runs before the gateway adds
/// its own headers, so a client cannot make it drop them (`Connection:
/// X-Forwarded-For`).
///
/// One pass over the names first: most requests hold none of them, and
/// most answers only `Connection: keep-alive`, so the common case removes
/// what is there instead of looking up every name of the list.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let present = hop_by_hop_present(headers);
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Parsed as bytes: a value that is not visible ASCII still names
        // headers. `keep-alive` is removed below anyway.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|name| !name.eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    // Recomputed: `Connection` may have named (and so removed) some.
    let present = hop_by_hop_present(headers);
    if present & HOP_FIXED != 0 {
        for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE] {
            headers.remove(name);
        }
        headers.remove("keep-alive");
    }
    if present & HOP_PROXY != 0 {
        let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
        for name in proxy {
            headers.remove(name);
        }
    }
}

/// Appends an address as text; IPv4 (nearly every client) without the
/// formatting machinery, which cost more than the rest of the header work.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// `X-Forwarded-For`: the values the request came with (empty ones
/// dropped), then the client's address.
fn forwarded_for(headers: &HeaderMap, client_ip: IpAddr) -> Option<HeaderValue> {
    let mut xff = String::with_capacity(48);
    for v in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
        for part in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            xff.push_str(part);
            xff.push_str(", ");
        }
    }
    push_ip(&mut xff, client_ip);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)).ok()
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
    /// A WebSocket handshake on a route with `websocket: true`: sent with
    /// `Connection: Upgrade` and `Upgrade: websocket`, and a 101 accepted.
    pub upgrade: bool,
    /// A gRPC call on a route to an HTTP/2 upstream: its `grpc-timeout`
    /// (`Some(None)`: none sent). `TE: trailers` is sent on, and the
    /// smaller of the deadline and the route's timeout applies.
    pub grpc: Option<Option<std::time::Duration>>,
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A `grpc-timeout` value: at most 8 digits and a unit (gRPC over HTTP/2).
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = v.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value, in milliseconds (rounded up).
fn grpc_timeout_value(d: std::time::Duration) -> HeaderValue {
    let ms = d.as_nanos().div_ceil(1_000_000).min(99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m"))
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
    let timeout = match fwd.grpc {
        Some(Some(asked)) => asked.min(route.timeout),
        _ => route.timeout,
    };
    let deadline = started + timeout;
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
    if fwd.upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if let Some(asked) = fwd.grpc {
        // gRPC servers may insist on it (RFC 9113 §8.2.2 allows only this TE).
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        if asked.is_some() {
            h.insert(GRPC_TIMEOUT.clone(), grpc_timeout_value(timeout));
        }
    }
    match forwarded_for(h, fwd.client_ip) {
        // `insert` replaces every value the client sent.
        Some(v) => h.insert(X_FORWARDED_FOR.clone(), v),
        None => h.remove(&X_FORWARDED_FOR),
    };
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
        // The gateway answers in its own HTTP version (RFC 9110 §6.2), not
        // the backend's: hyper writes 1.1, or 1.0 to a 1.0 client.
        parts.version = Version::HTTP_11;
        return Ok(Response::from_parts(parts, Body::held(body, tries.finish())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret, close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-x", "y"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
        // Named by Connection only: removed too.
        let mut h = map(&[("connection", "x-a"), ("x-a", "1"), ("x-b", "2")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-b"]);
        // Without Connection, the fixed list still goes.
        let mut h = map(&[("transfer-encoding", "chunked"), ("trailer", "x"), ("x-b", "2")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-b"]);
        let mut h = map(&[("x-b", "2")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn forwarded_for_values() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (octets, text) in [("0.0.0.0", "0.0.0.0"), ("10.9.99.100", "10.9.99.100"), ("255.250.1.109", "255.250.1.109")] {
            assert_eq!(forwarded_for(&HeaderMap::new(), ip(octets)).unwrap(), text);
        }
        assert_eq!(forwarded_for(&HeaderMap::new(), ip("::1")).unwrap(), "::1");
        let h = map(&[("x-forwarded-for", "203.0.113.9, 198.51.100.2"), ("x-forwarded-for", " "), ("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(forwarded_for(&h, ip("127.0.0.1")).unwrap(), "203.0.113.9, 198.51.100.2, 192.0.2.1, 127.0.0.1");
    }
}
