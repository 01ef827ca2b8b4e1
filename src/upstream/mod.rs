//! The one way the gateway sends a request to a backend, for plain routes
//! and every composition call alike: it stamps the request ID, the
//! `traceparent`, the correlation header and `Host`, applies the deadline
//! and the body timeout, opens the client span, counts failures, and
//! returns one error type that says what failed and whose fault it was.
//!
//! - `balance.rs`: an upstream compiled: its targets, its balancer, its
//!   connector, its retry policy and budget, its circuit breaker, and the
//!   in-flight guard they share
//! - `connect.rs`: TCP and TLS connections, the node's and an upstream's
//!   TLS settings
//! - `health.rs`: each target's health, kept across configs; the active
//!   checkers and passive ejection
//! - `tries.rs`: one request's tries: admission, the pick among usable
//!   targets, passive health, retries
//! - `dns.rs`: `resolve_every`: names resolved to every address, off the
//!   request path, into the targets of a plan
//! - `pool.rs`: one worker's idle connections, per connector and origin
//! - `h1.rs`: HTTP/1.1 on the request's own task, framing checks, the
//!   streamed answer body
//! - `error.rs`: [`UpstreamError`], its [`Fault`], and the answer it maps to

pub mod balance;
mod connect;
pub mod dns;
pub mod error;
mod h1;
mod h2;
pub mod health;
mod pool;
pub mod tries;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use tokio::time::Instant;

pub use balance::{idempotent, Balancer, HashOn, InFlight, Overloaded, PickInput, Picked, RetryPolicy, Target, TargetSet, UpstreamPlan};
pub use connect::{Connector, Stream, TlsOptions, UpstreamTlsOptions, DEFAULT_CONNECT_TIMEOUT};
pub use error::{Cause, Fault, UpstreamError};
pub use h1::{ResponseBody, Upgraded};
pub use h2::ResponseBody as H2ResponseBody;
pub use tries::{Labels, Refused, Tries};

use crate::body::Body;
use crate::ids::{TraceContext, REQUEST_ID_HEADER, TRACEPARENT};
use crate::metrics::Metrics;
use crate::otel::CallSpan;

/// How long a backend's answer body may pause between two reads unless a
/// route says otherwise.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// A worker's backend client: its own pools (idle HTTP/1.1 connections,
/// open HTTP/2 ones), the node's connector. Cheap to clone (three `Arc`s);
/// never used from another worker's runtime.
#[derive(Clone)]
pub struct Client {
    pool: Arc<pool::Pool>,
    h2: Arc<h2::Pool>,
    connector: Arc<Connector>,
}

/// Who sends a backend request and under which limits: what the upstream
/// layer needs besides the request itself.
pub struct Outbound<'a> {
    /// The route or composition, and the call (`None` for a plain route):
    /// the labels of logs, metrics and the span.
    pub route: &'a Arc<str>,
    pub call: Option<&'a Arc<str>>,
    pub request_id: &'a HeaderValue,
    pub trace: &'a TraceContext,
    /// A correlation-id policy's header, sent on as it is.
    pub correlation: Option<(&'a HeaderName, &'a HeaderValue)>,
    pub host: &'a HeaderValue,
    /// The upstream's own connector (its `tls` block); `None`: the node's.
    pub connector: Option<&'a Arc<Connector>>,
    /// The upstream's `connect_timeout`; `None`: the connector's own.
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 to the backend (the upstream's `http2: true`); else HTTP/1.1.
    pub http2: bool,
    /// The answer's head must have arrived by then.
    pub deadline: Instant,
    pub body_timeout: Duration,
    /// Keep every header of the answer; `false`: only `Content-Type` (a
    /// composition call whose headers nothing reads).
    pub keep_headers: bool,
    /// Where failures are counted (`None`: the `try` endpoint).
    pub metrics: Option<&'a Arc<Metrics>>,
}

/// Counts a failure the backend caused, once, and logs it: also used by an
/// answer body that fails after its head was passed on.
pub struct FailureCount {
    metrics: Option<Arc<Metrics>>,
    route: Arc<str>,
    call: Option<Arc<str>>,
    request_id: HeaderValue,
}

impl FailureCount {
    fn count(self, cause: Cause, detail: &str) {
        let call = self.call.as_deref().unwrap_or("");
        let request_id = self.request_id.to_str().unwrap_or("");
        match cause.fault() {
            Fault::Upstream => {
                if let Some(m) = &self.metrics {
                    m.upstream_failed(&self.route, call, cause.as_str());
                }
                tracing::warn!(request_id, route = %self.route, call, cause = cause.as_str(), fault = "upstream", "backend request failed: {detail}");
            }
            Fault::Downstream => {
                tracing::info!(request_id, route = %self.route, call, cause = cause.as_str(), fault = "downstream", "request failed by the client: {detail}")
            }
            Fault::Internal => {
                tracing::error!(request_id, route = %self.route, call, cause = cause.as_str(), fault = "internal", "backend request failed: {detail}")
            }
        }
    }
}

impl Client {
    pub fn new(connector: Arc<Connector>) -> Client {
        Client { pool: Arc::default(), h2: Arc::default(), connector }
    }

    /// Sends `req` (its URI absolute: scheme, authority, path) and returns
    /// the answer once its head arrived; the body streams after.
    pub async fn send(&self, out: Outbound<'_>, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let h = req.headers_mut();
        h.insert(header::HOST, out.host.clone());
        h.insert(REQUEST_ID_HEADER, out.request_id.clone());
        h.insert(TRACEPARENT, out.trace.child());
        if let Some((name, value)) = out.correlation {
            h.insert(name.clone(), value.clone());
        }
        let span_name = out.call.unwrap_or(out.route);
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let mut span = CallSpan::start(Some(out.trace), span_name, &method, &uri, req.headers_mut());
        let failures = || FailureCount {
            metrics: out.metrics.cloned(),
            route: out.route.clone(),
            call: out.call.cloned(),
            request_id: out.request_id.clone(),
        };
        let body_failures = out.metrics.is_some().then(failures);
        let connector = out.connector.unwrap_or(&self.connector);
        let connect_timeout = out.connect_timeout.unwrap_or(connector.connect_timeout);
        let result = if out.http2 {
            let to = h2::Target { connector, connect_timeout };
            h2::send(&self.h2, to, req, out.deadline, out.body_timeout, body_failures).await
        } else {
            h1::send(&self.pool, connector, connect_timeout, req, out.deadline, out.body_timeout, out.keep_headers, body_failures).await
        };
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                span.finish(Some(status), None);
                if status >= 500 {
                    if let Some(m) = out.metrics {
                        m.upstream_failed(out.route, out.call.map_or("", |c| &**c), "status_5xx");
                    }
                }
                Ok(resp)
            }
            Err(e) => {
                span.finish(None, Some(e.cause.as_str()));
                failures().count(e.cause, &e.detail);
                Err(e)
            }
        }
    }

    /// Sends `req` as it is: no stamped headers, no span, no counts, no
    /// logs (an active health check, which keeps its own).
    pub async fn send_plain(
        &self,
        req: Request<Body>,
        connector: Option<&Arc<Connector>>,
        connect_timeout: Option<Duration>,
        http2: bool,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamError> {
        let connector = connector.unwrap_or(&self.connector);
        let connect_timeout = connect_timeout.unwrap_or(connector.connect_timeout);
        if http2 {
            let to = h2::Target { connector, connect_timeout };
            h2::send(&self.h2, to, req, deadline, DEFAULT_BODY_TIMEOUT, None).await
        } else {
            h1::send(&self.pool, connector, connect_timeout, req, deadline, DEFAULT_BODY_TIMEOUT, false, None).await
        }
    }

    /// Idle connections in this client's pool.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}
