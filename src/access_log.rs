//! The access log: one JSON line per request (through `tracing`, target
//! `manifold::access`, in the same format as the operational logs), with
//! the request ID, route or composition, consumer, client address, method,
//! status, duration, bytes in and out, and each composition call's time
//! (the `Server-Timing` value). `MANIFOLD_ACCESS_LOG_SAMPLE` (0 to 1,
//! default 1) keeps that share of lines; `MANIFOLD_LOG` filters it like any
//! log (`manifold::access=off` turns it off). `--access-log-file`
//! (`MANIFOLD_ACCESS_LOG_FILE`) sends the lines to a file instead of stdout.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http::{header, Method, Request, Response};

use crate::body::Body;
use crate::ids::REQUEST_ID_HEADER;
use crate::metrics::RouteMetrics;

/// The tracing target of access log lines.
pub const TARGET: &str = "manifold::access";

fn sample_rate() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
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
}

impl Start {
    pub fn new<B>(req: &Request<B>, client: SocketAddr) -> Start {
        let bytes_in = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Start { method: req.method().clone(), client, bytes_in }
    }

    /// Writes the line once the answer's head is ready. `bytes_out` is the
    /// answer's declared length (absent for a streamed body).
    pub fn finish(self, resp: &Response<Body>, route: Option<&RouteMetrics>, consumer: Option<&str>, took: Duration) {
        let h = resp.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        let bytes_out: Option<u64> = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        tracing::info!(
            target: TARGET,
            request_id = text(REQUEST_ID_HEADER.as_str()),
            route = route.map(RouteMetrics::route),
            kind = route.map(RouteMetrics::kind),
            consumer,
            client = %self.client.ip(),
            method = %self.method,
            status = resp.status().as_u16(),
            duration_ms = took.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in,
            bytes_out,
            calls = h.get("server-timing").and_then(|v| v.to_str().ok()),
            "access"
        );
    }
}
