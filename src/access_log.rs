//! The access log: one JSON line per request (through `tracing`, target
//! `manifold::access`, in the same format as the operational logs), with
//! the request ID, route or composition, consumer, client address, method,
//! status, duration, bytes in (as declared) and out (as sent), and each
//! composition call's time (the `Server-Timing` value). A streamed answer's
//! line is written when its last byte has gone out. `MANIFOLD_ACCESS_LOG_SAMPLE` (0 to 1,
//! default 1) keeps that share of lines; `MANIFOLD_LOG` filters it like any
//! log (`manifold::access=off` turns it off). `--access-log-file`
//! (`MANIFOLD_ACCESS_LOG_FILE`) sends the lines to a file instead of stdout.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use http::{header, Method, Request, Response};

use crate::body::Body;
use crate::ids::REQUEST_ID_HEADER;
use crate::metrics::RouteMetrics;

/// The tracing target of access log lines.
pub const TARGET: &str = "manifold::access";

static RATE: OnceLock<f64> = OnceLock::new();

/// Sets the share of requests logged (`--access-log-sample`), before the
/// first request; without it `MANIFOLD_ACCESS_LOG_SAMPLE` is read.
pub fn set_sample_rate(rate: f64) {
    let _ = RATE.set(rate.clamp(0.0, 1.0));
}

fn sample_rate() -> f64 {
    *RATE.get_or_init(|| {
        std::env::var("MANIFOLD_ACCESS_LOG_SAMPLE").ok().and_then(|v| v.trim().parse::<f64>().ok()).map_or(1.0, |r| r.clamp(0.0, 1.0))
    })
}

/// Whether this request gets a line: the log level lets it through and
/// the sample picks it.
pub fn wanted() -> bool {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return false;
    }
    let rate = sample_rate();
    rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
}

/// What is known of a request before it is served.
pub struct Start {
    method: Method,
    client: SocketAddr,
    bytes_in: Option<u64>,
    started: Instant,
}

/// A line with everything but how the body ended.
struct Line {
    method: Method,
    client: SocketAddr,
    bytes_in: Option<u64>,
    started: Instant,
    request_id: String,
    route: Option<String>,
    kind: Option<&'static str>,
    consumer: Option<String>,
    status: u16,
    /// A gRPC answer's status when its head carries one (a trailers-only
    /// answer: every error the gateway makes, and a backend's without a
    /// body); its HTTP status is 200 whatever the outcome.
    grpc_status: Option<u16>,
    calls: Option<String>,
}

impl Line {
    fn write(&self, bytes_out: Option<u64>, aborted: bool) {
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            route = self.route,
            kind = self.kind,
            consumer = self.consumer,
            client = %self.client.ip(),
            method = %self.method,
            status = self.status,
            grpc_status = self.grpc_status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in,
            bytes_out,
            calls = self.calls,
            aborted = aborted.then_some(true),
            "access"
        );
    }
}

impl Start {
    pub fn new<B>(req: &Request<B>, client: SocketAddr, started: Instant) -> Start {
        let bytes_in = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Start { method: req.method().clone(), client, bytes_in, started }
    }

    /// Writes the line for `resp`. An answer the gateway holds whole (or
    /// one without a body) is logged now; a streamed one when its last byte
    /// has gone out, with the bytes counted and the time until then, or
    /// `aborted` when it did not end (the client left, the backend failed).
    pub fn finish(self, resp: &mut Response<Body>, route: Option<&RouteMetrics>, consumer: Option<&str>) {
        let h = resp.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let line = Line {
            request_id: text(REQUEST_ID_HEADER.as_str()).unwrap_or("").to_string(),
            route: route.map(|r| r.route().to_string()),
            kind: route.map(RouteMetrics::kind),
            consumer: consumer.map(str::to_string),
            status: resp.status().as_u16(),
            grpc_status: text("grpc-status").and_then(|s| s.parse().ok()),
            calls: text("server-timing").map(str::to_string),
            method: self.method,
            client: self.client,
            bytes_in: self.bytes_in,
            started: self.started,
        };
        let status = resp.status();
        let no_body = line.method == Method::HEAD
            || status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        match resp.body() {
            _ if no_body => line.write(Some(0), false),
            Body::Empty => line.write(Some(0), false),
            Body::Full(b) => line.write(Some(b.as_ref().map_or(0, |b| b.len() as u64)), false),
            _ => {
                let body = std::mem::take(resp.body_mut());
                *resp.body_mut() = Body::counted(body, Box::new(move |bytes, complete| line.write(Some(bytes), !complete)));
            }
        }
    }
}
