//! Request hygiene (SPEC §2): one normalized path, unambiguous framing and
//! bounded request heads, checked before anything routes on the request.

use std::borrow::Cow;

use http::{header, HeaderMap, Request, Version};

use crate::errors::{ErrorCode, GatewayError};

/// Limits on a request head, with SPEC defaults.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_header_count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_uri_bytes: 8 << 10, max_header_bytes: 64 << 10, max_header_count: 100 }
    }
}

fn bad(message: &str) -> GatewayError {
    GatewayError::new(ErrorCode::BadRequest, message)
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Removes dot segments (also written `%2e`) and merges repeated slashes.
/// `%2F` stays encoded, so it never splits a segment. Borrows when the path
/// is already normal, which is almost always.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, GatewayError> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(bad("the request path must start with /"));
    }
    let mut needs_work = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => return Err(bad("a backslash is not allowed in the path")),
            b'%' => {
                let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex_val), b.get(i + 2).copied().and_then(hex_val)) else {
                    return Err(bad("the path holds an invalid percent-escape"));
                };
                if h == 0 && l == 0 {
                    return Err(bad("%00 is not allowed in the path"));
                }
                if h == 2 && l == 0xe {
                    needs_work = true;
                }
                i += 3;
                continue;
            }
            b'/' if matches!(b.get(i + 1), Some(b'/' | b'.')) => needs_work = true,
            _ => {}
        }
        i += 1;
    }
    if !needs_work {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = raw.replace("%2e", ".").replace("%2E", ".");
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (idx, seg) in segments.into_iter().enumerate() {
        match seg {
            "" => trailing_slash = idx == last,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

/// Framing and size checks hyper leaves to us. An error here also closes the
/// connection: a request whose framing is ambiguous cannot be trusted to end
/// where we think it does.
pub fn check_head<B>(req: &Request<B>, limits: &Limits) -> Result<(), GatewayError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > limits.max_uri_bytes {
        return Err(GatewayError::new(ErrorCode::UriTooLong, "the request URI is too long"));
    }
    let headers = req.headers();
    if headers.len() > limits.max_header_count {
        return Err(GatewayError::new(ErrorCode::HeadersTooLarge, "the request has too many header fields"));
    }
    let size: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if size > limits.max_header_bytes {
        return Err(GatewayError::new(ErrorCode::HeadersTooLarge, "the request headers are too large"));
    }
    check_framing(req.version(), headers)
}

fn check_framing(version: Version, headers: &HeaderMap) -> Result<(), GatewayError> {
    let te = headers.get_all(header::TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if has_te {
            return Err(bad("a request cannot have both Content-Length and Transfer-Encoding"));
        }
        if lengths.any(|other| other != first) {
            return Err(bad("the request has differing Content-Length headers"));
        }
    }
    if has_te {
        let last = te.iter().next_back().and_then(|v| v.to_str().ok()).and_then(|v| v.rsplit(',').next()).map(str::trim);
        if !last.is_some_and(|l| l.eq_ignore_ascii_case("chunked")) {
            return Err(bad("the last Transfer-Encoding must be chunked"));
        }
    }
    if version == Version::HTTP_11 {
        let mut hosts = headers.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(h), None) if !h.is_empty() => {}
            (None, _) => return Err(bad("an HTTP/1.1 request needs a Host header")),
            _ => return Err(bad("the request has more than one Host header")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/%2e%2E/c", "/c"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("//", "/"),
            ("/a%2Fb/c", "/a%2Fb/c"),
            ("/a/.hidden", "/a/.hidden"),
            ("/a/..b", "/a/..b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input).unwrap(), want, "{input}");
        }
        for bad in ["/a%00b", "/a\\b", "/a%zz", "/a%2", "x"] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }
}
