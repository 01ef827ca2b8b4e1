//! The JSON errors the gateway answers itself (SPEC §4). Every one carries
//! the request ID and nothing about the gateway's internals or backends.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    NotFound,
    MethodNotAllowed,
    BadRequest,
    UriTooLong,
    HeadersTooLarge,
    Unauthorized,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    RateLimited,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
    /// A request the gateway understood but does not serve: a transfer
    /// coding other than `chunked` (RFC 9112 §6.1).
    NotImplemented,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::NotImplemented => "not_implemented",
        }
    }
}

/// An error answer: a code and a message safe to show a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: String,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        GatewayError { code, message: message.into() }
    }

    pub fn into_response(self, request_id: &str) -> Response<Body> {
        error_response(self.code, &self.message, request_id)
    }

    /// The answer on a gRPC call: [`grpc_error_response`].
    pub fn into_grpc_response(self, request_id: &str) -> Response<Body> {
        grpc_error_response(self.code, &self.message, request_id)
    }
}

/// The SPEC §4 body: `{"error": {"code", "message", "request_id"}}`.
pub fn error_json(code: ErrorCode, message: &str, request_id: &str) -> String {
    serde_json::json!({
        "error": { "code": code.as_str(), "message": message, "request_id": request_id }
    })
    .to_string()
}

pub fn error_response(code: ErrorCode, message: &str, request_id: &str) -> Response<Body> {
    let body = error_json(code, message, request_id);
    let mut resp = Response::new(Body::full(Bytes::from(body)));
    *resp.status_mut() = code.status();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(crate::ids::REQUEST_ID_HEADER, v);
    }
    resp
}

impl ErrorCode {
    /// The gRPC status a gateway-made error is on a gRPC route (docs/errors.md).
    pub fn grpc_status(self) -> u8 {
        match self {
            ErrorCode::BadRequest | ErrorCode::UriTooLong | ErrorCode::HeadersTooLarge => 3, // INVALID_ARGUMENT
            ErrorCode::UpstreamTimeout | ErrorCode::RequestTimeout => 4,                     // DEADLINE_EXCEEDED
            ErrorCode::Forbidden => 7,                                                       // PERMISSION_DENIED
            ErrorCode::RateLimited | ErrorCode::PayloadTooLarge => 8,                        // RESOURCE_EXHAUSTED
            ErrorCode::NotFound | ErrorCode::MethodNotAllowed | ErrorCode::NotImplemented => 12, // UNIMPLEMENTED
            ErrorCode::Internal => 13,                                                       // INTERNAL
            ErrorCode::UpstreamError | ErrorCode::UpstreamUnavailable => 14,                 // UNAVAILABLE
            ErrorCode::Unauthorized => 16,                                                   // UNAUTHENTICATED
        }
    }
}

/// A gateway-made error on a gRPC call: a trailers-only answer (HTTP 200,
/// no body, `grpc-status` and `grpc-message` in the head), as gRPC clients
/// expect instead of a JSON body.
pub fn grpc_error_response(code: ErrorCode, message: &str, request_id: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    resp.extensions_mut().insert(ErrorStatus(code.status()));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(u16::from(code.grpc_status())));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(crate::ids::REQUEST_ID_HEADER, v);
    }
    resp
}

/// The HTTP status a gRPC error answer (itself a 200) stands for: what
/// metrics and the trace span count.
#[derive(Clone, Copy, Debug)]
pub struct ErrorStatus(pub StatusCode);

/// `grpc-message` encoding: printable ASCII but `%` as is, the rest `%XX`.
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
