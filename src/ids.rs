//! Request IDs and W3C trace context (SPEC §3).

use http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

/// `bytes` as lower-case hex into `out` (twice their length).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 15) as usize];
    }
}

/// A random (version 4) UUID in its usual text form.
pub fn new_uuid() -> String {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, range) in [0..4, 4..6, 6..8, 8..10, 10..16].into_iter().enumerate() {
        if i > 0 {
            s.push('-');
        }
        push_hex(&mut s, &b[range]);
    }
    s
}

/// The client's ID when it is 1–128 visible ASCII characters, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID_HEADER) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    HeaderValue::from_str(&new_uuid()).expect("a uuid is a valid header value")
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The trace a request belongs to: the client's, when its `traceparent` is
/// valid, else a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Numbers, not text: every request makes one, and the header is written
/// only for backend calls.
pub struct TraceContext {
    pub trace_id: u128,
    /// The client's span: its `traceparent`'s parent-id, when it sent one.
    pub parent_id: Option<u64>,
    /// Only `sampled` (bit 0) is kept (W3C Trace Context level 1): other
    /// bits are not passed on.
    pub flags: u8,
    /// The gateway's own span for this request, when traces are exported
    /// ([`crate::otel`]): the parent of every backend call's span.
    pub span_id: Option<u64>,
}

impl TraceContext {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(Self::parse).unwrap_or_else(|| TraceContext {
            trace_id: fastrand::u128(1..),
            parent_id: None,
            flags: 1,
            span_id: None,
        })
    }

    fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let valid = version.len() == 2
            && is_lower_hex(version)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && trace.len() == 32
            && is_lower_hex(trace)
            && trace.bytes().any(|b| b != b'0')
            && parent.len() == 16
            && is_lower_hex(parent)
            && parent.bytes().any(|b| b != b'0')
            && flags.len() == 2
            && is_lower_hex(flags);
        if !valid {
            return None;
        }
        Some(TraceContext {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            parent_id: u64::from_str_radix(parent, 16).ok(),
            flags: u8::from_str_radix(flags, 16).ok()? & 1,
            span_id: None,
        })
    }

    /// A `traceparent` for one backend call: same trace, a new span ID.
    pub fn child(&self) -> HeaderValue {
        self.traceparent(fastrand::u64(1..))
    }

    /// A `traceparent` naming `span_id` as the parent: a backend call's own
    /// span, when traces are exported.
    pub fn traceparent(&self, span_id: u64) -> HeaderValue {
        // Written into one fixed buffer: every backend request carries one.
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&mut out[3..35], &self.trace_id.to_be_bytes());
        out[35] = b'-';
        hex_into(&mut out[36..52], &span_id.to_be_bytes());
        out[52] = b'-';
        hex_into(&mut out[53..55], &[self.flags]);
        HeaderValue::from_bytes(&out).expect("hex is a valid header value")
    }

    /// The flags as a byte.
    pub fn flag_bits(&self) -> u8 {
        self.flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(new_uuid(), id);
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).len(), 36);
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(request_id(&h).len(), 36);
    }

    #[test]
    fn traceparent() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.parent_id, Some(0x00f067aa0ba902b7));
        assert_eq!(t.traceparent(0xabc), "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01");
        // Flags other than `sampled` are not passed on.
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff"));
        assert_eq!(TraceContext::from_headers(&h).flags, 1);
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02"));
        assert_eq!(TraceContext::from_headers(&h).flags, 0);
        let child = t.child();
        let child = child.to_str().unwrap();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!child.contains("00f067aa0ba902b7"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Version 00 has exactly four parts; later versions may have more.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            assert_ne!(TraceContext::from_headers(&h).trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736, "{bad}");
        }
        h.insert(TRACEPARENT, HeaderValue::from_static("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert_eq!(TraceContext::from_headers(&h).trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    }
}
