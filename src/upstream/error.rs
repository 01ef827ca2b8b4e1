//! What failed on the way to a backend, and whose fault it was: the one
//! error type of the upstream layer, mapped to an answer in one place
//! ([`UpstreamError::gateway_error`]). pingora-error's `ErrorSource` is the
//! model: the source decides 400 against 502, and what counts against a
//! backend's health.

use std::fmt;

use crate::errors::{ErrorCode, GatewayError};

/// Who caused a failure (SPEC §6 "Whose fault").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client: a malformed, aborted, oversized or stalled request body.
    Downstream,
    /// The backend: unreachable, too slow, or an answer that breaks HTTP.
    Upstream,
    /// The gateway itself.
    Internal,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Downstream => "downstream",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        }
    }
}

/// What failed. The cause decides the fault, the answer and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No connection: refused, unreachable, DNS, or the connect timeout.
    Connect,
    /// The TLS handshake failed (certificate not trusted, wrong name...).
    Tls,
    /// No answer head within the request's deadline.
    Timeout,
    /// The answer breaks HTTP/1.1 framing (both Content-Length and
    /// Transfer-Encoding, differing lengths, a garbage status line...).
    Protocol,
    /// The connection closed or reset before the answer was whole.
    Closed,
    /// The answer's body paused longer than the body timeout.
    BodyTimeout,
    /// The client's body is not valid HTTP (bad chunks) or was cut off.
    ClientBody,
    /// The client stopped sending its body before the deadline.
    ClientStalled,
    /// The client's body is over the route's size limit.
    ClientBodyTooLarge,
    /// The request could not be built (an invalid URI or header).
    Request,
}

impl Cause {
    pub fn fault(self) -> Fault {
        match self {
            Cause::Connect | Cause::Tls | Cause::Timeout | Cause::Protocol | Cause::Closed | Cause::BodyTimeout => Fault::Upstream,
            Cause::ClientBody | Cause::ClientStalled | Cause::ClientBodyTooLarge => Fault::Downstream,
            Cause::Request => Fault::Internal,
        }
    }

    /// The `cause` label of `manifold_upstream_failures_total` and the
    /// span's `error.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Tls => "tls",
            Cause::Timeout => "timeout",
            Cause::Protocol => "protocol",
            Cause::Closed => "closed",
            Cause::BodyTimeout => "body_timeout",
            Cause::ClientBody => "client_body",
            Cause::ClientStalled => "client_stalled",
            Cause::ClientBodyTooLarge => "client_body_too_large",
            Cause::Request => "request",
        }
    }
}

/// A failed backend request. `detail` is for logs only: it may name
/// addresses and certificate problems, which never reach a client.
#[derive(Clone, Debug)]
pub struct UpstreamError {
    pub cause: Cause,
    pub detail: String,
    /// Nothing of the request reached the backend: safe to send again.
    pub unsent: bool,
}

impl UpstreamError {
    pub fn new(cause: Cause, detail: impl Into<String>) -> Self {
        UpstreamError { cause, detail: detail.into(), unsent: false }
    }

    pub fn unsent(mut self) -> Self {
        self.unsent = true;
        self
    }

    pub fn fault(&self) -> Fault {
        self.cause.fault()
    }

    /// Whether trying again (a composition call's `retries`) may help.
    pub fn retryable(&self) -> bool {
        matches!(self.cause, Cause::Connect | Cause::Closed | Cause::Protocol)
    }

    /// The answer the client gets, safe to show: no addresses, no
    /// certificate text, no backend words.
    pub fn gateway_error(&self) -> GatewayError {
        let (code, message) = match self.cause {
            Cause::Connect => (ErrorCode::UpstreamError, "the upstream could not be reached"),
            Cause::Tls => (ErrorCode::UpstreamError, "the upstream's TLS handshake failed"),
            Cause::Timeout => (ErrorCode::UpstreamTimeout, "the upstream did not answer in time"),
            Cause::Protocol => (ErrorCode::UpstreamError, "the upstream's answer is not valid HTTP"),
            Cause::Closed => (ErrorCode::UpstreamError, "the upstream connection failed"),
            Cause::BodyTimeout => (ErrorCode::UpstreamTimeout, "the upstream's answer stalled"),
            Cause::ClientBody => (ErrorCode::BadRequest, "the request body could not be read"),
            Cause::ClientStalled => (ErrorCode::RequestTimeout, "the request body did not arrive in time"),
            Cause::ClientBodyTooLarge => (ErrorCode::PayloadTooLarge, "the request body is over this route's size limit"),
            Cause::Request => (ErrorCode::Internal, "the upstream request could not be built"),
        };
        GatewayError::new(code, message)
    }

    /// After this answer the client's connection cannot be trusted to be at
    /// a message boundary: its body was not read to the end.
    pub fn closes_client(&self) -> bool {
        matches!(self.cause, Cause::ClientBody | Cause::ClientStalled | Cause::ClientBodyTooLarge)
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} fault): {}", self.cause.as_str(), self.fault().as_str(), self.detail)
    }
}

impl std::error::Error for UpstreamError {}

/// An error and everything it wraps, for a log line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
