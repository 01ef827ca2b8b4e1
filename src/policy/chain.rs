//! The filters of one route or composition, in SPEC's phase order, and the
//! per-request state that travels between their phases ([`Admission`]).
//!
//! The handler calls, in order: [`PolicyChain::admit`] (the request phase;
//! the chain decides authentication across its methods),
//! [`PolicyChain::upstream_request`], [`PolicyChain::request_body`] (only
//! when [`PolicyChain::reads_request_body`]), the target,
//! [`PolicyChain::respond`], and [`finish`] on every answer the chain
//! admitted.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use ipnet::IpNet;
use serde_json::Value;

use super::compile::BoundPolicies;
use super::filter::{AuthState, BodyStop, Outgoing, Phase, RequestCx, ResponseCx, WholeBody};
use super::filters::AnyFilter;
use super::identity::{ConsumerInfo, X_CONSUMER_GROUPS, X_CONSUMER_NAME};
use super::RateInfo;
use crate::body::Body;
use crate::errors::{ErrorCode, GatewayError};

#[derive(Debug)]
struct Step {
    name: Arc<str>,
    phase: Phase,
    filter: Arc<AnyFilter>,
}

/// The policies of one route or composition, in phase order.
#[derive(Debug, Default)]
pub struct PolicyChain {
    steps: Vec<Step>,
    /// The route or composition this chain guards (`by: route` counts per name).
    entity: String,
    // What the chain's filters do, decided when it is built: the phases
    // no filter has are skipped whole.
    has_auth: bool,
    has_cors: bool,
    rewrites: bool,
    reads_body: bool,
    responds: bool,
}

/// What the policies need to know about a request besides its headers.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub method: &'a http::Method,
    /// The normalized path.
    pub path: &'a str,
    /// The peer is a trusted proxy (its X-Forwarded-Proto counts).
    pub trusted_peer: bool,
    /// The request came over the TLS listener (and what its handshake showed).
    pub tls: Option<&'a crate::server::tls::TlsConn>,
}

/// What the policies decided about an admitted request, carried from the
/// request phase to the answer.
#[derive(Debug, Default)]
pub struct Admission {
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// A verified JWT's claims (`request.consumer.claims`).
    pub claims: Option<Value>,
    /// Set when a rate limit applies: the response carries RateLimit-*.
    pub rate: Option<RateInfo>,
    /// A correlation-id policy's header and value, to echo on the answer.
    pub echo: Option<(HeaderName, HeaderValue)>,
    /// A correlation-id policy's header, which every backend call carries.
    pub correlation: Option<HeaderName>,
    /// request-size-limit: the most body bytes to accept (the body is cut,
    /// and the answer is 413, past it).
    pub body_limit: Option<u64>,
    /// Headers every answer gets (CORS).
    pub headers: HeaderMap,
    /// The document templates read (`{"request": ...}`), made when a
    /// filter first needs it.
    pub context: Option<Value>,
    /// What a filter keeps between its phases for this request (empty,
    /// and free, unless a filter stores something).
    pub state: http::Extensions,
    /// The wasm filters' per-request contexts (empty, and free, in a
    /// chain without one).
    pub wasm: super::filters::wasm::Contexts,
}

impl Admission {
    /// The document templates read, made from the request as it stands
    /// the first time it is asked for.
    pub fn template_context(&mut self, parts: &http::request::Parts, params: &[(Arc<str>, String)]) -> &Value {
        if self.context.is_none() {
            let mut request =
                crate::compose::context::request_context(&parts.method, params, parts.uri.query(), Some(&parts.headers), Value::Null);
            self.add_consumer(&mut request);
            self.context = Some(super::transform::context(request));
        }
        self.context.as_ref().expect("made above")
    }

    /// `request.consumer` (name, groups, and a JWT's claims) in a context.
    pub fn add_consumer(&self, request: &mut Value) {
        if let (Some(c), Value::Object(m)) = (&self.consumer, request) {
            let mut consumer = serde_json::json!({"name": c.name, "groups": c.groups});
            if let Some(claims) = &self.claims {
                consumer["claims"] = claims.clone();
            }
            m.insert("consumer".into(), consumer);
        }
    }
}

/// Why a request was not admitted; `rate` still goes on the answer.
#[derive(Debug)]
pub struct Refusal {
    pub error: GatewayError,
    pub rate: Option<RateInfo>,
    /// Answer this status, with `headers` and no body, instead of the
    /// error (an https redirect, a CORS preflight).
    pub reply: Option<StatusCode>,
    /// Headers the answer carries (Location, CORS, WWW-Authenticate).
    pub headers: HeaderMap,
    /// The body of a `reply` (a filter's own answer); none by default.
    pub body: Option<bytes::Bytes>,
    /// The policy that refused, set by [`PolicyChain::admit`]. A 401 goes
    /// to the first authentication policy that was shown a credential and
    /// refused it, or, when none was shown one, to the last in the chain.
    pub policy: Option<Arc<str>>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Refusal { error, rate: None, reply: None, headers: HeaderMap::new(), body: None, policy: None }
    }
}

/// `RateLimit-*` headers, and `Retry-After` on a 429.
pub fn rate_headers(headers: &mut HeaderMap, rate: &RateInfo, refused: bool) {
    headers.insert(HeaderName::from_static("ratelimit-limit"), HeaderValue::from(rate.limit));
    headers.insert(HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(rate.remaining));
    headers.insert(HeaderName::from_static("ratelimit-reset"), HeaderValue::from(rate.reset_secs));
    if refused {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(rate.reset_secs));
    }
}

/// What the policies add to every answer they admitted (a cached one, a
/// websocket handshake's too): `RateLimit-*`, the correlation id, CORS.
pub fn finish(mut resp: Response<Body>, admission: &Admission) -> Response<Body> {
    if let Some(r) = &admission.rate {
        rate_headers(resp.headers_mut(), r, false);
    }
    if let Some((name, value)) = &admission.echo {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    for (k, v) in &admission.headers {
        // Vary adds to what the target said; the rest replace it.
        if k == http::header::VARY {
            resp.headers_mut().append(k.clone(), v.clone());
        } else {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
    }
    resp
}

fn unauthorized(basic: bool) -> Refusal {
    let mut r = Refusal::from(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid"));
    if basic {
        r.headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"manifold\""));
    }
    r
}

/// A refusal carries the headers every answer gets (CORS), once known.
fn with_answer_headers(mut r: Refusal, extra: &HeaderMap) -> Refusal {
    for (k, v) in extra {
        r.headers.insert(k.clone(), v.clone());
    }
    r
}

impl PolicyChain {
    /// The chain for an entity with these attached policies, plus the
    /// global ones, from a config's compiled and bound policies. The
    /// config is valid, so every name resolves.
    pub fn build(policies: &BoundPolicies, entity: &str, attached: &[String]) -> PolicyChain {
        let mut steps: Vec<Step> = policies
            .iter()
            .filter(|p| p.global || attached.contains(&p.name))
            .map(|p| Step { name: Arc::from(p.name.as_str()), phase: p.filter.phase(), filter: p.filter.clone() })
            .collect();
        // Stable: within a phase (authentication), the order they are listed in.
        steps.sort_by_key(|s| s.phase);
        PolicyChain {
            has_auth: steps.iter().any(|s| s.phase == Phase::Authentication),
            has_cors: steps.iter().any(|s| s.phase == Phase::Cors),
            rewrites: steps.iter().any(|s| s.filter.rewrites_request()),
            reads_body: steps.iter().any(|s| s.filter.reads_request_body()),
            responds: steps.iter().any(|s| s.filter.has_response_phase()),
            steps,
            entity: entity.to_string(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The route or composition this chain guards.
    pub fn entity(&self) -> &str {
        &self.entity
    }

    /// Whether a CORS policy answers this chain's preflights.
    pub fn has_cors(&self) -> bool {
        self.has_cors
    }

    /// Whether some filter reads the request body whole.
    pub fn reads_request_body(&self) -> bool {
        self.reads_body
    }

    /// Runs the request phases. On success, the consumer (if any) has been
    /// stamped on the headers as `X-Consumer-*`; the client's own were
    /// removed first. `query` may lose a key the credential came in.
    pub async fn admit(
        &self,
        request: RequestFacts<'_>,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
    ) -> Result<Admission, Refusal> {
        let mut at = 0;
        self.run_steps(request, client_ip, headers, query, &mut at).await.map_err(|mut r| {
            r.policy = self.steps.get(at).map(|s| s.name.clone());
            r
        })
    }

    /// [`admit`](Self::admit)'s work; `at` follows the step being run, so a
    /// refusal can name its policy.
    async fn run_steps(
        &self,
        request: RequestFacts<'_>,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
        at: &mut usize,
    ) -> Result<Admission, Refusal> {
        headers.remove(X_CONSUMER_NAME);
        headers.remove(X_CONSUMER_GROUPS);
        let mut auth = AuthState::default();
        let mut auth_done = !self.has_auth;
        let mut out = Admission::default();
        for (i, step) in self.steps.iter().enumerate() {
            if step.phase > Phase::Authentication && !auth_done {
                // Leaving the authentication phase: someone must have been
                // accepted (`at` is still the last authentication policy).
                auth.consumer = auth.consumer.take().or(auth.anonymous.take());
                if auth.consumer.is_none() {
                    *at = auth.blame.unwrap_or(*at);
                    return Err(with_answer_headers(unauthorized(auth.basic_offered), &out.headers));
                }
                auth_done = true;
            }
            *at = i;
            auth.current = i;
            let mut cx = RequestCx {
                facts: request,
                client_ip,
                headers: &mut *headers,
                query: &mut *query,
                entity: &self.entity,
                out: &mut out,
                auth: &mut auth,
                policy: &step.name,
            };
            if let Err(r) = step.filter.request(&mut cx).await {
                return Err(with_answer_headers(r, &out.headers));
            }
        }
        if !auth_done {
            auth.consumer = auth.consumer.take().or(auth.anonymous.take());
            if auth.consumer.is_none() {
                *at = auth.blame.unwrap_or(*at);
                return Err(with_answer_headers(unauthorized(auth.basic_offered), &out.headers));
            }
        }
        if let Some(c) = &auth.consumer {
            if let Some(v) = &c.name_header {
                headers.insert(X_CONSUMER_NAME, v.clone());
            }
            if let Some(v) = &c.groups_header {
                headers.insert(X_CONSUMER_GROUPS, v.clone());
            }
        }
        out.consumer = auth.consumer;
        Ok(out)
    }

    /// After admission: the filters change what goes on, in phase order; an
    /// answer (`Some`: a cached one) replaces the target's.
    pub fn upstream_request(&self, ex: &mut Admission, req: &mut Outgoing<'_>) -> Option<Response<Body>> {
        if !self.rewrites {
            return None;
        }
        self.steps.iter().find_map(|s| s.filter.upstream_request(ex, req))
    }

    /// The whole request body through the filters that read it.
    pub fn request_body(&self, ex: &mut Admission, req: &Outgoing<'_>, body: &mut WholeBody) -> Result<(), BodyStop> {
        for s in self.steps.iter().filter(|s| s.filter.reads_request_body()) {
            s.filter.request_body(ex, req, body)?;
        }
        Ok(())
    }

    /// The target's answer through the response phase, in phase order
    /// (response-transform, then response-cache).
    pub async fn respond(&self, ex: &mut Admission, cx: &ResponseCx<'_>, mut resp: Response<Body>) -> Response<Body> {
        if !self.responds {
            return resp;
        }
        for s in self.steps.iter().filter(|s| s.filter.has_response_phase()) {
            resp = s.filter.response(ex, cx, resp).await;
        }
        resp
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let peer = unmap(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| {
            let s = s.trim();
            s.parse::<IpAddr>().ok().or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        })
        .collect();
    for hop in hops.into_iter().rev() {
        // A hop that does not parse ends the walk: what lies beyond it was
        // not vouched for by anyone we trust.
        let Some(hop) = hop else { break };
        let hop = unmap(hop);
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    // An IPv4 address seen as IPv4-mapped IPv6 is the same client.
    unmap(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_comes_through_trusted_proxies_only() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, 198.51.100.7, 10.1.1.1"));
        let proxy: IpAddr = "10.9.9.9".parse().unwrap();
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(proxy, &h, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(mapped, &HeaderMap::new(), &trusted), stranger);
        // A hop that does not parse ends the walk at the last trusted one.
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, unknown, 10.1.1.1"));
        assert_eq!(client_ip(proxy, &h, &trusted), "10.1.1.1".parse::<IpAddr>().unwrap());
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.5, 198.51.100.7:4711"));
        assert_eq!(client_ip(proxy, &h, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
    }
}
