//! One request, from the wire to the answer: hygiene, routing, then the
//! route's target. Policies slot in between routing and the target.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use super::conn_io::{ConnActivity, Guarded};
use super::hygiene::{check_head, normalize_path};
use super::Shared;
use crate::body::Body;
use crate::compose::{
    self,
    context::{request_context, MAX_REQUEST_BODY},
};
use crate::errors::{ErrorCode, GatewayError};
use crate::ids::{request_id, TraceContext, REQUEST_ID_HEADER};
use crate::proxy::{self, Forwarding, HttpClient};
use crate::snapshot::{RouteMatch, Target};

/// What one worker thread owns: the shared state and its own client.
pub struct Worker {
    shared: Arc<Shared>,
    client: HttpClient,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Worker { shared, client: proxy::new_client() })
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
            let resp = handle(&worker, peer, req).await;
            Ok(resp.map(|body| Guarded::new(body, in_flight)))
        })
    }
}

/// A composition's request body: JSON when it is JSON, else null. A body
/// that claims to be JSON and is not is the client's error.
pub async fn read_json_body(headers: &http::HeaderMap, body: Incoming, limit: usize) -> Result<serde_json::Value, GatewayError> {
    use http_body_util::{BodyExt, Limited};
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::new(ErrorCode::PayloadTooLarge, "the request body is too large"))
        }
        Err(_) => return Err(GatewayError::new(ErrorCode::BadRequest, "the request body could not be read")),
    };
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    let says_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"));
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(v),
        Err(_) if says_json => Err(GatewayError::new(ErrorCode::BadRequest, "the request body is not valid JSON")),
        Err(_) => Ok(serde_json::Value::Null),
    }
}

/// The host a request is for: lower case, without port.
fn request_host<B>(req: &Request<B>) -> String {
    let raw =
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str())).unwrap_or("");
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
    } else {
        raw.split(':').next().unwrap_or("").to_string()
    };
    host.to_ascii_lowercase()
}

pub async fn handle(worker: &Worker, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let request_id = request_id(req.headers());
    let mut resp = match route_and_run(worker, peer, &request_id, req).await {
        Ok(resp) => resp,
        Err((e, close)) => {
            let mut resp = e.into_response(request_id.to_str().unwrap_or(""));
            if close {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    resp.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    resp
}

async fn route_and_run(
    worker: &Worker,
    peer: SocketAddr,
    request_id: &HeaderValue,
    req: Request<Incoming>,
) -> Result<Response<Body>, (GatewayError, bool)> {
    let shared = &worker.shared;
    check_head(&req, &shared.limits).map_err(|e| (e, true))?;
    // A Uri clone shares its bytes, so the normalized path borrows for free.
    let uri = req.uri().clone();
    let path = normalize_path(uri.path()).map_err(|e| (e, false))?;
    let host = request_host(&req);

    let (target, params, policies) = {
        let snap = shared.snapshot.load();
        match snap.router.find(&host, req.method(), &path) {
            RouteMatch::Found { target, params, policies } => (target.clone(), params, policies.clone()),
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

    // Policies, in phase order; they may refuse the request, name its
    // consumer, and take a credential out of the headers or query.
    let mut req = req;
    let (consumer, (rate, echo, correlation, body_limit)) = if policies.is_empty() {
        // Consumer headers only ever come from the gateway.
        req.headers_mut().remove(crate::policy::X_CONSUMER_NAME);
        req.headers_mut().remove(crate::policy::X_CONSUMER_GROUPS);
        (None, (None, None, None, None))
    } else {
        let (mut parts, body) = req.into_parts();
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
        let facts = crate::policy::RequestFacts { path: &path, trusted_peer };
        let admission = match policies.admit(facts, client_ip, &mut parts.headers, &mut query) {
            Ok(a) => a,
            Err(refusal) => {
                if let Some((status, location)) = refusal.redirect {
                    let mut resp = Response::new(Body::Empty);
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(header::LOCATION, location);
                    return Ok(resp);
                }
                let mut resp = refusal.error.into_response(request_id.to_str().unwrap_or(""));
                if let Some(r) = &refusal.rate {
                    crate::policy::rate_headers(resp.headers_mut(), r, true);
                }
                return Ok(resp);
            }
        };
        if query.as_deref() != parts.uri.query() {
            let pq = match &query {
                Some(q) => format!("{}?{q}", parts.uri.path()),
                None => parts.uri.path().to_string(),
            };
            let mut up = parts.uri.clone().into_parts();
            up.path_and_query = pq.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(up) {
                parts.uri = uri;
            }
        }
        req = Request::from_parts(parts, body);
        (admission.consumer, (admission.rate, admission.echo, admission.correlation, admission.body_limit))
    };

    let result = match target {
        Target::Proxy(route) => {
            let trace = TraceContext::from_headers(req.headers());
            let trusted_peer = shared.trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
            let fwd =
                Forwarding { client_ip: peer.ip(), trusted_peer, request_id, trace: &trace, path: &path, params: &params, body_limit };
            proxy::forward(&worker.client, &route, fwd, req).await.map_err(|e| (e, false))
        }
        Target::Composition(plan) => {
            let trace = TraceContext::from_headers(req.headers());
            let (parts, body) = req.into_parts();
            // The body counts against the composition's deadline: a client that
            // stops sending it cannot hold the connection.
            let limit = body_limit.map_or(MAX_REQUEST_BODY, |l| (l as usize).min(MAX_REQUEST_BODY));
            let body = match tokio::time::timeout(plan.deadline, read_json_body(&parts.headers, body, limit)).await {
                Ok(body) => body.map_err(|e| (e, false))?,
                Err(_) => return Err((GatewayError::new(ErrorCode::BadRequest, "the request body did not arrive in time"), true)),
            };
            let mut request = request_context(&parts.method, &params, parts.uri.query(), &parts.headers, body);
            if let (Some(c), serde_json::Value::Object(m)) = (&consumer, &mut request) {
                m.insert("consumer".into(), serde_json::json!({"name": c.name, "groups": c.groups}));
            }
            let ex = compose::Exchange {
                client: &worker.client,
                request_id,
                trace: &trace,
                client_headers: &parts.headers,
                record: false,
                correlation: correlation.clone(),
            };
            Ok(compose::run(ex, &plan, request).await.response)
        }
    };
    result.map(|mut resp| {
        if let Some(r) = &rate {
            crate::policy::rate_headers(resp.headers_mut(), r, false);
        }
        if let Some((name, value)) = echo {
            resp.headers_mut().insert(name, value);
        }
        resp
    })
}
