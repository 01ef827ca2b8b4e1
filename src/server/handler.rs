//! One request, from the wire to the answer: hygiene, routing, then the
//! route's target. Policies slot in between routing and the target.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use super::conn_io::{ConnActivity, Guarded, InFlight};
use super::hygiene::{check_head, normalize_path};
use super::Shared;
use crate::body::Body;
use crate::compose::{
    self,
    context::{request_context, MAX_REQUEST_BODY},
};
use crate::errors::{ErrorCode, GatewayError};
use crate::ids::{request_id, TraceContext, REQUEST_ID_HEADER};
use crate::otel::ServerSpan;
use crate::policy::filter::{set_query, BodyStop, Outgoing, ResponseCx, WholeBody};
use crate::policy::{finish, Admission, Refusal};
use crate::proxy::{self, Forwarding};
use crate::snapshot::{RouteMatch, Target};

/// What one worker thread owns: the shared state and its own client.
pub struct Worker {
    shared: Arc<Shared>,
    client: crate::upstream::Client,
    /// This worker's WebSocket tunnels, closed last when the node drains.
    tunnels: crate::proxy::tunnel::Tunnels,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        let client = crate::upstream::Client::new(shared.connector.clone());
        Arc::new(Worker { shared, client, tunnels: Default::default() })
    }

    /// Closes this worker's WebSocket tunnels and waits at most `wait` for
    /// them to end (the last step of a drain).
    pub async fn close_tunnels(&self, wait: std::time::Duration) {
        self.tunnels.close_all(wait).await;
    }

    /// Waits for `connections` (hyper's graceful shutdown) to end and for
    /// the node to have no request in flight, then closes this worker's
    /// tunnels: tunnels go last, but an HTTP/2 connection carrying one
    /// (extended CONNECT) does not hold the drain until its time is up.
    pub async fn drain(&self, connections: impl Future<Output = ()>) {
        tokio::pin!(connections);
        let mut ended = false;
        let mut every = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = &mut connections, if !ended => ended = true,
                _ = every.tick() => {}
            }
            // Node-wide: another worker's request may still be in flight.
            let idle = self.shared.services.metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0;
            if idle && self.tunnels.open() > 0 {
                self.tunnels.close_all(std::time::Duration::from_secs(5)).await;
            }
            if ended && (idle || self.tunnels.open() == 0) {
                return;
            }
        }
    }

    pub fn service(self: &Arc<Self>, peer: SocketAddr, activity: Arc<ConnActivity>) -> ConnService {
        ConnService { worker: self.clone(), peer, activity }
    }
}

/// The per-connection hyper service.
#[derive(Clone)]
pub struct ConnService {
    worker: Arc<Worker>,
    peer: SocketAddr,
    activity: Arc<ConnActivity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Guarded<Body>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let worker = self.worker.clone();
        let peer = self.peer;
        let in_flight = self.activity.start();
        Box::pin(async move {
            let resp = handle(&worker, peer, req, &in_flight).await;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                in_flight.switching_protocols();
            }
            Ok(resp.map(|body| Guarded::new(body, in_flight)))
        })
    }
}

/// A composition's request body: JSON when it is JSON, else null. A body
/// that claims to be JSON and is not is the client's error.
pub async fn read_json_body(headers: &http::HeaderMap, body: Incoming, limit: usize) -> Result<serde_json::Value, GatewayError> {
    let bytes = read_body(body, limit).await?;
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(v),
        Err(_) if says_json(headers) => Err(GatewayError::new(ErrorCode::BadRequest, "the request body is not valid JSON")),
        Err(_) => Ok(serde_json::Value::Null),
    }
}

/// Whether a message's Content-Type says JSON.
fn says_json(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"))
}

/// A client's whole body, up to `limit` bytes (413 past it).
async fn read_body(body: Incoming, limit: usize) -> Result<bytes::Bytes, GatewayError> {
    use http_body_util::{BodyExt, Limited};
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::new(ErrorCode::PayloadTooLarge, "the request body is too large"))
        }
        Err(_) => Err(GatewayError::new(ErrorCode::BadRequest, "the request body could not be read")),
    }
}

/// The host a request is for: lower case, without port.
fn request_host<B>(req: &Request<B>) -> String {
    let raw =
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str())).unwrap_or("");
    let host = if raw.starts_with('[') { raw.split_inclusive(']').next().unwrap_or("") } else { raw.split(':').next().unwrap_or("") };
    let mut host = host.to_string();
    host.make_ascii_lowercase();
    host
}

/// What the request path learnt about a request, for metrics, the access
/// log and its trace span.
#[derive(Default)]
struct Matched {
    metrics: Option<crate::metrics::RouteMetrics>,
    consumer: Option<Arc<str>>,
    span: ServerSpan,
    /// A gRPC call on a route to an HTTP/2 upstream: gateway-made errors
    /// are gRPC statuses.
    grpc: bool,
}

/// A protocol upgrade the request asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    None,
    /// HTTP/1.1 `Upgrade: websocket`.
    WebSocket,
    /// HTTP/2 extended CONNECT with `:protocol websocket` (RFC 8441).
    Http2WebSocket,
    /// Any other protocol (`h2c` alone is ignored, as RFC 9110 allows).
    Other,
}

fn requested_upgrade<B>(req: &Request<B>) -> Upgrade {
    if req.method() == Method::CONNECT {
        return match req.extensions().get::<hyper::ext::Protocol>() {
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => Upgrade::Http2WebSocket,
            Some(_) => Upgrade::Other,
            None => Upgrade::None,
        };
    }
    let Some(value) = req.headers().get(header::UPGRADE) else { return Upgrade::None };
    let mut tokens = value.as_bytes().split(|b| *b == b',').map(|t| t.trim_ascii());
    if tokens.clone().any(|t| t.split(|b| *b == b'/').next().is_some_and(|p| p.eq_ignore_ascii_case(b"websocket"))) {
        Upgrade::WebSocket
    } else if tokens.all(|t| t.eq_ignore_ascii_case(b"h2c")) {
        Upgrade::None
    } else {
        Upgrade::Other
    }
}

/// Whether a request is a gRPC call (`application/grpc`, `+proto`...).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pub async fn handle(worker: &Worker, peer: SocketAddr, req: Request<Incoming>, in_flight: &InFlight) -> Response<Body> {
    let started = std::time::Instant::now();
    let metrics = &worker.shared.services.metrics;
    metrics.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request_id = request_id(req.headers());
    let mut trace = TraceContext::from_headers(req.headers());
    let span = ServerSpan::start(&mut trace, req.method(), &request_id);
    let log = crate::access_log::wanted().then(|| crate::access_log::Start::new(&req, peer, started));
    let mut matched = Matched { span, ..Matched::default() };
    let mut resp = match route_and_run(worker, peer, &request_id, &trace, req, &mut matched, in_flight).await {
        Ok(resp) => resp,
        Err((e, close)) => {
            let mut resp = if matched.grpc {
                e.into_grpc_response(request_id.to_str().unwrap_or(""))
            } else {
                e.into_response(request_id.to_str().unwrap_or(""))
            };
            if close {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    resp.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    // Requests no route matched are not counted by route: their paths are
    // the client's choice, and labels must stay bounded.
    // A gRPC error is an HTTP 200: counted as the error it stands for.
    let status = match matched.grpc {
        true => resp.extensions().get::<crate::errors::ErrorStatus>().map_or(resp.status(), |s| s.0),
        false => resp.status(),
    };
    if let Some(m) = &matched.metrics {
        m.record(status.as_u16(), started.elapsed(), matched.consumer.as_deref());
    }
    if let Some(log) = log {
        log.finish(&mut resp, matched.metrics.as_ref(), matched.consumer.as_deref());
    }
    matched.span.finish(status.as_u16(), matched.consumer.as_deref());
    metrics.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    resp
}

async fn route_and_run(
    worker: &Worker,
    peer: SocketAddr,
    request_id: &HeaderValue,
    trace: &TraceContext,
    req: Request<Incoming>,
    matched: &mut Matched,
    in_flight: &InFlight,
) -> Result<Response<Body>, (GatewayError, bool)> {
    let shared = &worker.shared;
    check_head(&req, &shared.limits).map_err(|e| (e, true))?;
    let mut req = req;
    let upgrade = requested_upgrade(&req);
    if upgrade == Upgrade::Http2WebSocket {
        // Routed, authorized and sent on as the HTTP/1.1 handshake it stands for.
        *req.method_mut() = Method::GET;
    }
    // Request targets other than a path (RFC 9112 §3.2).
    if req.method() == Method::CONNECT {
        // A tunnel request: the client may send tunnel bytes next, so the
        // connection closes after the answer.
        let e = GatewayError::new(ErrorCode::MethodNotAllowed, "CONNECT is not supported: this is a reverse proxy, not a forward proxy");
        return Err((e, true));
    }
    if req.uri().path() == "*" && req.uri().authority().is_none() {
        if req.method() != Method::OPTIONS {
            return Err((GatewayError::new(ErrorCode::BadRequest, "the request target * is only for OPTIONS"), false));
        }
        // OPTIONS * asks what the server supports, not any resource.
        let mut resp = Response::new(Body::Empty);
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
        return Ok(resp);
    }
    // An absolute-form target (`GET http://host/path`) names its own host:
    // it is the one routed and forwarded, whatever Host says (RFC 9112
    // §3.2.2: the Host header is then ignored). HTTP/2's :authority is
    // the URI's authority too, and takes precedence over Host likewise.
    if let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) {
        if authority.contains('@') {
            // RFC 9110 §4.2.4: user info in an http(s) target is an error.
            return Err((GatewayError::new(ErrorCode::BadRequest, "the request target must not hold user information"), false));
        }
        if let Ok(v) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    // A Uri clone shares its bytes, so the normalized path borrows for free.
    let uri = req.uri().clone();
    let path = normalize_path(uri.path()).map_err(|e| (e, false))?;
    let host = request_host(&req);

    let preflight = crate::policy::cors::is_preflight(req.method(), req.headers());
    let (target, params, policies) = {
        let snap = shared.snapshot.load();
        let mut found = snap.router.find(&host, req.method(), &path);
        // A CORS preflight asks about another method: route it as that
        // method, so the route's cors policy answers it instead of a 405.
        // The asked method's route, else (none serves it) any route of
        // the path with a cors policy: it answers for the path.
        // A route that serves the asked method decides alone (another
        // route's cors policy must not open it to other origins).
        if preflight {
            if let RouteMatch::MethodNotAllowed(allowed) = &found {
                let asked = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD).and_then(|m| Method::from_bytes(m.as_bytes()).ok());
                let for_asked = asked.map(|m| snap.router.find(&host, &m, &path));
                match for_asked {
                    Some(again @ RouteMatch::Found { .. }) => {
                        if matches!(&again, RouteMatch::Found { policies, .. } if policies.has_cors()) {
                            found = again;
                        }
                    }
                    _ => {
                        for m in allowed.iter() {
                            let again = snap.router.find(&host, m, &path);
                            if matches!(&again, RouteMatch::Found { policies, .. } if policies.has_cors()) {
                                found = again;
                                break;
                            }
                        }
                    }
                }
            }
        }
        match found {
            RouteMatch::Found { target, params, policies, metrics, pattern } => {
                matched.span.routed(req.method(), pattern, metrics.kind(), metrics.route());
                matched.metrics = Some(metrics.clone());
                if let Target::Proxy(route) = target {
                    matched.grpc = route.grpc && is_grpc(req.headers());
                }
                (target.clone(), params, policies.clone())
            }
            RouteMatch::NotFound => return Err((GatewayError::new(ErrorCode::NotFound, "no route matches the request"), false)),
            RouteMatch::MethodNotAllowed(allowed) => {
                let list = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                let mut resp = GatewayError::new(ErrorCode::MethodNotAllowed, format!("the method is not allowed here; allowed: {list}"))
                    .into_response(request_id.to_str().unwrap_or(""));
                if let Ok(v) = HeaderValue::from_str(&list) {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
                return Ok(resp);
            }
        }
    };

    // An upgrade is tunnelled only where the route allows it (SPEC §2):
    // refused before anything reaches the backend or the policies.
    let tunnel_idle = match &target {
        Target::Proxy(route) => route.websocket,
        Target::Composition(_) => None,
    };
    let upgrading = match (upgrade, tunnel_idle) {
        (Upgrade::None, _) => false,
        (Upgrade::WebSocket | Upgrade::Http2WebSocket, Some(_)) => true,
        (Upgrade::Other, Some(_)) => {
            return Err((GatewayError::new(ErrorCode::BadRequest, "only websocket upgrades are tunnelled on this route"), true));
        }
        (_, None) => {
            return Err((
                GatewayError::new(ErrorCode::BadRequest, "this route does not accept protocol upgrades (websocket is not enabled)"),
                true,
            ));
        }
    };

    // Policies, in phase order; they may refuse the request, name its
    // consumer, and take a credential out of the headers or query.
    let (mut parts, body) = req.into_parts();
    let mut admission = if policies.is_empty() {
        // Consumer headers only ever come from the gateway.
        parts.headers.remove(crate::policy::X_CONSUMER_NAME);
        parts.headers.remove(crate::policy::X_CONSUMER_GROUPS);
        Admission::default()
    } else {
        // Hop-by-hop headers go first, so `Connection: x-consumer-name`
        // cannot remove what the policies are about to set.
        crate::proxy::remove_hop_by_hop(&mut parts.headers);
        let mut query = parts.uri.query().map(str::to_string);
        let client_ip = crate::policy::client_ip(peer.ip(), &parts.headers, &shared.trusted_proxies);
        let peer_ip = match peer.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(peer.ip()),
            v4 => v4,
        };
        let trusted_peer = shared.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
        let tls = parts.extensions.get::<Arc<super::tls::TlsConn>>().map(|t| &**t);
        let facts = crate::policy::RequestFacts { method: &parts.method, path: &path, trusted_peer, tls };
        let admission = match policies.admit(facts, client_ip, &mut parts.headers, &mut query).await {
            Ok(a) => a,
            Err(refusal) => {
                if let (Some(m), None) = (matched.metrics.as_ref(), refusal.reply) {
                    m.refused(refusal.policy.as_deref(), refusal.error.code.as_str());
                }
                return Ok(refusal_response(refusal, request_id, matched.grpc));
            }
        };
        if query.as_deref() != parts.uri.query() {
            set_query(&mut parts.uri, query.as_deref());
        }
        matched.consumer = admission.consumer.as_ref().map(|c| Arc::<str>::from(c.name.as_str()));
        admission
    };

    // The filters change what goes on (request-transform: headers and
    // query now, a JSON body below, where the target reads it), or answer
    // themselves (response-cache: a stored answer skips the target).
    if let Some(resp) = policies.upstream_request(
        &mut admission,
        &mut Outgoing { parts: &mut parts, params: &params, host: &host, path: &path, entity: policies.entity(), upgrading, request_id },
    ) {
        return Ok(finish(resp, &admission));
    }
    // A wasm module's `:path` is the path the target gets.
    let path = match admission.wasm.take_path() {
        Some(p) => std::borrow::Cow::Owned(p),
        None => path,
    };

    let head = parts.method == Method::HEAD;
    let result = match target {
        Target::Proxy(route) => {
            let trusted_peer = shared.trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
            let body = if !policies.reads_request_body() {
                Body::Stream(body)
            } else {
                // Read whole (within the size limit) for the filters that
                // read it (a transform changes a JSON object; any other
                // body goes on byte for byte).
                let limit = admission.body_limit.map_or(MAX_REQUEST_BODY, |l| (l as usize).min(MAX_REQUEST_BODY));
                // Within the route's timeout: a client that stops sending
                // cannot hold the buffer.
                let bytes = match tokio::time::timeout(route.timeout, read_body(body, limit)).await {
                    Ok(bytes) => bytes.map_err(|e| (e, false))?,
                    Err(_) => return Err((GatewayError::new(ErrorCode::RequestTimeout, "the request body did not arrive in time"), true)),
                };
                let mut whole = WholeBody::from_bytes(bytes);
                let req = Outgoing {
                    parts: &mut parts,
                    params: &params,
                    host: &host,
                    path: &path,
                    entity: policies.entity(),
                    upgrading,
                    request_id,
                };
                if let Some(end) = body_phase(&policies, &mut admission, &req, &mut whole) {
                    return end;
                }
                let bytes = whole.into_bytes();
                parts.headers.remove(header::TRANSFER_ENCODING);
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Body::full(bytes)
            };
            let on_upgrade = if upgrading {
                let Some(on) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
                    return Err((GatewayError::new(ErrorCode::BadRequest, "the connection cannot be upgraded"), true));
                };
                if upgrade == Upgrade::Http2WebSocket {
                    http2_handshake(&mut parts.headers);
                }
                Some(on)
            } else {
                None
            };
            let grpc = matched.grpc.then(|| parts.headers.get("grpc-timeout").and_then(proxy::parse_grpc_timeout));
            let https = parts.extensions.get::<Arc<super::tls::TlsConn>>().is_some();
            let req = Request::from_parts(parts, body);
            let fwd = Forwarding {
                https,
                client_ip: peer.ip(),
                trusted_peer,
                request_id,
                trace,
                path: &path,
                params: &params,
                body_limit: admission.body_limit,
                metrics: Some(&worker.shared.services.metrics),
                trusted_proxies: &shared.trusted_proxies,
                upgrade: upgrading,
                grpc,
            };
            let result = proxy::forward(&worker.client, &route, fwd, req).await;
            if let (Some(on_upgrade), Some(idle)) = (on_upgrade, tunnel_idle) {
                let resp = result?;
                let resp = open_tunnel(worker, resp, on_upgrade, idle, upgrade == Upgrade::Http2WebSocket, in_flight)?;
                // A handshake's answer is the backend's: no transform, no cache.
                return Ok(finish(resp, &admission));
            }
            result
        }
        Target::Composition(plan) => {
            // The body counts against the composition's deadline: a client that
            // stops sending it cannot hold the connection.
            let limit = admission.body_limit.map_or(MAX_REQUEST_BODY, |l| (l as usize).min(MAX_REQUEST_BODY));
            let mut body = match tokio::time::timeout(plan.deadline, read_json_body(&parts.headers, body, limit)).await {
                Ok(body) => body.map_err(|e| (e, false))?,
                Err(_) => return Err((GatewayError::new(ErrorCode::RequestTimeout, "the request body did not arrive in time"), true)),
            };
            if policies.reads_request_body() {
                let mut whole = WholeBody::from_json(body);
                let req = Outgoing {
                    parts: &mut parts,
                    params: &params,
                    host: &host,
                    path: &path,
                    entity: policies.entity(),
                    upgrading,
                    request_id,
                };
                if let Some(end) = body_phase(&policies, &mut admission, &req, &mut whole) {
                    return end;
                }
                body = whole.into_json();
            }
            let headers = plan.reads_headers.then_some(&parts.headers);
            let mut request = request_context(&parts.method, &params, parts.uri.query(), headers, body);
            admission.add_consumer(&mut request);
            let ex = compose::Exchange {
                client: &worker.client,
                request_id,
                trace,
                client_headers: &parts.headers,
                record: false,
                correlation: admission.correlation.clone(),
                metrics: Some(&worker.shared.services.metrics),
                pick: crate::upstream::PickInput {
                    headers: &parts.headers,
                    peer: peer.ip(),
                    trusted_proxies: &shared.trusted_proxies,
                    path: &path,
                },
            };
            Ok(compose::run(ex, &plan, request).await.response)
        }
    };
    let resp = result?;

    // The response phase: response-transform, then response-cache, as
    // SPEC's phase order says.
    let resp = policies.respond(&mut admission, &ResponseCx { head, request_id }, resp).await;
    Ok(finish(resp, &admission))
}

/// The request-body phase: `None` lets the request on; `Some` is how it
/// ends (a gateway error, or a filter's own answer with the chain's
/// headers).
fn body_phase(
    policies: &crate::policy::PolicyChain,
    admission: &mut Admission,
    req: &Outgoing<'_>,
    whole: &mut WholeBody,
) -> Option<Result<Response<Body>, (GatewayError, bool)>> {
    match policies.request_body(admission, req, whole) {
        Ok(()) => None,
        Err(BodyStop::Error(e)) => Some(Err((e, false))),
        Err(BodyStop::Answer(resp)) => Some(Ok(finish(*resp, admission))),
    }
}

/// The client's HTTP/2 extended CONNECT as the HTTP/1.1 handshake the
/// backend expects: a key of its own (RFC 8441 has none; the backend's
/// accept value answers the gateway's key and is not passed on).
fn http2_handshake(headers: &mut http::HeaderMap) {
    use base64::Engine as _;
    let key: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    if let Ok(v) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    headers.entry(header::SEC_WEBSOCKET_VERSION).or_insert(HeaderValue::from_static("13"));
}

/// The backend's answer to a WebSocket handshake: on a 101, the tunnel
/// starts (once hyper hands the client's connection over) and the client
/// gets the 101 (HTTP/1.1) or a 200 (extended CONNECT); any other answer
/// is passed on as it is, but a 2xx, which would open a tunnel no backend
/// accepted, is a 502.
fn open_tunnel(
    worker: &Worker,
    mut resp: Response<Body>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
    http2: bool,
    in_flight: &InFlight,
) -> Result<Response<Body>, (GatewayError, bool)> {
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        if resp.status().is_success() {
            return Err((GatewayError::new(ErrorCode::UpstreamError, "the upstream did not accept the websocket handshake"), true));
        }
        return Ok(resp);
    }
    let Some((backend, rest)) = resp.extensions_mut().remove::<crate::upstream::Upgraded>().and_then(|u| u.take()) else {
        return Err((GatewayError::new(ErrorCode::Internal, "the upstream connection was not handed over"), true));
    };
    worker.tunnels.spawn(on_upgrade, backend, rest, idle, in_flight.hold());
    if http2 {
        *resp.status_mut() = http::StatusCode::OK;
        resp.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(resp)
}

fn refusal_response(refusal: Refusal, request_id: &HeaderValue, grpc: bool) -> Response<Body> {
    let mut resp = match refusal.reply {
        Some(status) => {
            let mut resp = Response::new(refusal.body.map_or(Body::Empty, Body::full));
            *resp.status_mut() = status;
            resp
        }
        None if grpc => refusal.error.into_grpc_response(request_id.to_str().unwrap_or("")),
        None => refusal.error.into_response(request_id.to_str().unwrap_or("")),
    };
    if let Some(r) = &refusal.rate {
        crate::policy::rate_headers(resp.headers_mut(), r, true);
    }
    for (k, v) in refusal.headers {
        if let Some(k) = k {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}
