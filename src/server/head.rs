//! The strict request-head check (SPEC §2 "Request hygiene", RFC 9112).
//!
//! Every HTTP/1 request head is checked here before hyper parses it: the
//! connection's IO wrapper (conn_io.rs) hands hyper only the bytes of heads
//! that passed, and answers a refused one itself. hyper's parser is lenient
//! where a gateway must not be (it drops a `Content-Length` sent with
//! `Transfer-Encoding`, accepts any transfer coding before `chunked`, an
//! invalid `Host`, a request line of any length) and answers what it
//! cannot parse with a bare 400; here each refusal is a SPEC §4 code.
//!
//! [`check`] is a pure function over the bytes of one head, so it can be
//! unit-tested and fuzzed alone. It is on every HTTP/1 request's path:
//! one `httparse` pass over the head (as hyper makes again after it), then
//! O(1) work per header field, no allocation unless it refuses.
//! [`ChunkedBody`] follows a chunked body byte by byte (data skipped), so
//! the connection knows where the next pipelined head starts.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::StatusCode;

use super::hygiene::Limits;
use crate::errors::ErrorCode;

/// The field slots `httparse` parses into: `Limits::max_header_count`
/// above this is capped to it.
const FIELD_SLOTS: usize = 128;

/// How a request's body is framed, and so where the next head starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A head that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Its length in bytes, the final empty line included.
    pub len: usize,
    pub framing: Framing,
    /// An `Upgrade` request (HTTP/1.1) or `CONNECT`: what follows its body
    /// is a tunnel's bytes if the answer is 101, else the next head.
    pub upgrade: bool,
}

/// A head that did not pass: what the gateway answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: &'static str,
    /// Where the client's `X-Request-ID` value is in the head, when it has
    /// a valid one (SPEC §3).
    pub request_id: Option<Range<usize>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// No complete head yet, and nothing wrong so far.
    Partial,
    Head(Head),
    Refused(Refusal),
}

fn refuse(code: ErrorCode, message: &'static str) -> Checked {
    Checked::Refused(Refusal { code, message, request_id: None })
}

fn bad(message: &'static str) -> Checked {
    refuse(ErrorCode::BadRequest, message)
}

/// Where `part` (a slice of `buf`) starts in `buf`.
fn offset(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// Checks the request head at the start of `buf` (which may hold more: a
/// body, pipelined requests). A refusal carries where the client's request
/// ID is, looked for then (the common case never pays for it).
pub fn check(buf: &[u8], limits: &Limits) -> Checked {
    let mut checked = check_head(buf, limits);
    if let Checked::Refused(r) = &mut checked {
        if r.request_id.is_none() {
            r.request_id = find_request_id(buf);
        }
    }
    checked
}

fn check_head(buf: &[u8], limits: &Limits) -> Checked {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); FIELD_SLOTS];
    let slots = &mut slots[..limits.max_header_count.min(FIELD_SLOTS)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return partial(buf, limits),
        Err(e) => return parse_error(buf, limits, e),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return bad("the request head could not be parsed");
    };

    // Lines end with CRLF: httparse also takes a bare LF. Each field line
    // follows the end of the line before it; the head ends with two.
    let start = offset(buf, method.as_bytes());
    if !start.is_multiple_of(2) || !buf[..start].chunks(2).all(|pair| pair == b"\r\n") {
        return bad("a line of the request head does not end with CRLF");
    }
    let line_end = offset(buf, target.as_bytes()) + target.len() + " HTTP/1.1".len();
    if line_end - start > limits.max_uri_bytes {
        return refuse(ErrorCode::UriTooLong, "the request line is too long");
    }
    if !buf[..len].ends_with(b"\r\n\r\n") || req.headers.iter().any(|h| buf[offset(buf, h.name.as_bytes()) - 2] != b'\r') {
        return bad("a line of the request head does not end with CRLF");
    }
    if len - line_end - 4 > limits.max_header_bytes {
        return refuse(ErrorCode::HeadersTooLarge, "the request headers are too large");
    }
    if let Err(message) = check_target(target) {
        return bad(message);
    }

    let mut hosts = 0;
    let mut host: &[u8] = b"";
    let mut length: Option<u64> = None;
    let mut te = Codings::default();
    let mut upgrade = false;
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                host = field.value;
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade = true,
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let Some(n) = content_length(field.value) else {
                    return bad("Content-Length must be digits only");
                };
                if length.is_some_and(|l| l != n) {
                    return bad("the request has differing Content-Length headers");
                }
                length = Some(n);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => te.add(field.value),
            _ => {}
        }
    }
    if hosts > 1 {
        return bad("the request has more than one Host header");
    }
    if hosts == 0 && minor == 1 {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    if hosts == 1 && !valid_host(host) {
        return bad("the Host header is not a valid host[:port]");
    }
    let framing = if te.seen {
        if length.is_some() {
            return bad("a request cannot have both Content-Length and Transfer-Encoding");
        }
        if minor == 0 {
            return bad("an HTTP/1.0 request cannot have Transfer-Encoding");
        }
        if !te.chunked_last || te.chunked > 1 {
            return bad("the last Transfer-Encoding must be chunked, and only the last");
        }
        if te.others > 0 {
            return refuse(ErrorCode::NotImplemented, "transfer codings other than chunked are not implemented");
        }
        Framing::Chunked
    } else {
        match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    upgrade = (upgrade && minor == 1) || method == "CONNECT";
    Checked::Head(Head { len, framing, upgrade })
}

/// What the `Transfer-Encoding` fields say, all lines together.
#[derive(Default)]
struct Codings {
    seen: bool,
    chunked: usize,
    others: usize,
    chunked_last: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            if self.chunked_last {
                self.chunked += 1;
            } else {
                self.others += 1;
            }
        }
    }
}

/// `Content-Length`: 1 to 19 digits, nothing else (no sign, no list).
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// SPEC §3: 1–128 visible ASCII characters.
fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(u8::is_ascii_graphic)
}

/// `Host = uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2): an
/// IPv6 literal in brackets, or a reg-name (which covers IPv4) of
/// unreserved characters, percent-escapes and sub-delims; the port digits
/// only. No user info, no empty host.
fn valid_host(value: &[u8]) -> bool {
    let (port, name_ok) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = std::str::from_utf8(&rest[..end]).ok().and_then(|s| s.parse::<std::net::Ipv6Addr>().ok());
        match &rest[end + 1..] {
            [] => (None, literal.is_some()),
            [b':', port @ ..] => (Some(port), literal.is_some()),
            _ => return false,
        }
    } else {
        let (name, port) = match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        (port, !name.is_empty() && reg_name(name))
    };
    name_ok && port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit) && (p.is_empty() || p.len() < 5 || p <= &b"65535"[..]))
}

/// RFC 3986 reg-name characters but `%`: unreserved and sub-delims.
const fn host_map() -> [bool; 256] {
    let mut map = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        map[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=');
        b += 1;
    }
    map
}

static HOST_CHARS: [bool; 256] = host_map();

fn reg_name(name: &[u8]) -> bool {
    if name.iter().all(|&b| HOST_CHARS[b as usize]) {
        return true;
    }
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                if !(name.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && name.get(i + 2).is_some_and(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if HOST_CHARS[b as usize] => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The characters an origin-form target is made of in practice (RFC 3986
/// pchar, `/`, `?`, `%`): such a target needs no further check.
const fn target_map() -> [bool; 256] {
    let mut map = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        map[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')')
            || matches!(c, b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'/' | b'?' | b'%');
        b += 1;
    }
    map
}

static TARGET_CHARS: [bool; 256] = target_map();

/// A request target hyper will accept: the common case is checked by a
/// table; anything else (absolute form, `*`, other characters) by the
/// `http` crate's own parser, which hyper uses next, so its bare 400 is
/// never reached.
fn check_target(target: &str) -> Result<(), &'static str> {
    let bytes = target.as_bytes();
    if bytes.first() == Some(&b'/') && bytes.iter().all(|&b| TARGET_CHARS[b as usize]) {
        return Ok(());
    }
    if bytes.contains(&b'#') {
        return Err("the request target must not hold a fragment");
    }
    match http::Uri::try_from(target) {
        Ok(_) => Ok(()),
        Err(_) => Err("the request target is not a valid URI"),
    }
}

/// A head httparse has not seen the end of: within the limits so far?
fn partial(buf: &[u8], limits: &Limits) -> Checked {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    match rest.iter().position(|&b| b == b'\n') {
        None if rest.len() > limits.max_uri_bytes + 1 => refuse(ErrorCode::UriTooLong, "the request line is too long"),
        None => Checked::Partial,
        Some(end) if end.saturating_sub(1) > limits.max_uri_bytes => refuse(ErrorCode::UriTooLong, "the request line is too long"),
        Some(end) if rest.len() - end - 1 > limits.max_header_bytes + 2 => {
            refuse(ErrorCode::HeadersTooLarge, "the request headers are too large")
        }
        Some(_) => Checked::Partial,
    }
}

/// Names what httparse refused, for the answer's message.
fn parse_error(buf: &[u8], limits: &Limits, e: httparse::Error) -> Checked {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = rest[..line_end].strip_suffix(b"\r").unwrap_or(&rest[..line_end]);
    if line.len() > limits.max_uri_bytes {
        return refuse(ErrorCode::UriTooLong, "the request line is too long");
    }
    let after_line = rest.get(line_end + 1..).unwrap_or_default();
    match e {
        httparse::Error::TooManyHeaders => refuse(ErrorCode::HeadersTooLarge, "the request has too many header fields"),
        _ if line.contains(&0) || after_line.contains(&0) => bad("the request head holds a NUL byte"),
        _ if line.contains(&b'\r') || (line_end < rest.len() && !rest[..line_end].ends_with(b"\r")) => {
            bad("a line of the request head does not end with CRLF")
        }
        httparse::Error::Version | httparse::Error::Token => {
            let parts = line.split(|&b| b == b' ').count();
            let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
            if parts == 2 || parts == 1 {
                bad("HTTP/0.9 requests are not served")
            } else if version.starts_with(b"HTTP/") && parts == 3 && !matches!(version, b"HTTP/1.0" | b"HTTP/1.1") {
                bad("only HTTP/1.0 and HTTP/1.1 are served on an HTTP/1 connection")
            } else if e == httparse::Error::Token {
                bad("the request line is malformed")
            } else {
                bad("the HTTP version is not valid")
            }
        }
        httparse::Error::HeaderName if after_line.windows(2).any(|w| w[0] == b'\n' && (w[1] == b' ' || w[1] == b'\t')) => {
            bad("obs-folded header lines are not allowed")
        }
        httparse::Error::HeaderName if matches!(after_line.first(), Some(b' ' | b'\t')) => bad("obs-folded header lines are not allowed"),
        httparse::Error::HeaderName => bad("a header name is not a token"),
        httparse::Error::HeaderValue => bad("a header value holds a forbidden character"),
        httparse::Error::NewLine => bad("a line of the request head does not end with CRLF"),
        _ => bad("the request head could not be parsed"),
    }
}

/// The client's `X-Request-ID`, looked for line by line in a head that
/// did not parse: its answer should still carry it.
fn find_request_id(buf: &[u8]) -> Option<Range<usize>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(buf.len());
    let mut at = 0;
    for line in buf[..end].split(|&b| b == b'\n') {
        let line_at = at;
        at += line.len() + 1;
        let Some(value) = line.get(..13).filter(|n| n.eq_ignore_ascii_case(b"x-request-id:")).map(|_| &line[13..]) else {
            continue;
        };
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        let trimmed = value.trim_ascii();
        if valid_request_id(trimmed) {
            let from = line_at + 13 + offset(value, trimmed);
            return Some(from..from + trimmed.len());
        }
        return None;
    }
    None
}

/// The whole answer to a refused head: status line, headers, SPEC §4 body.
/// The connection is closed after it.
pub fn answer(refusal: &Refusal, buf: &[u8]) -> Vec<u8> {
    let id = refusal
        .request_id
        .clone()
        .and_then(|r| buf.get(r))
        .and_then(|b| std::str::from_utf8(b).ok())
        .map_or_else(crate::ids::new_uuid, str::to_string);
    let body = crate::errors::error_json(refusal.code, refusal.message, &id);
    let status: StatusCode = refusal.code.status();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// Where a chunked request body stands (RFC 9112 §7.1). Chunk data is
/// skipped, never copied; size lines, extensions and trailers are checked
/// as they pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedBody {
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or the line's end.
    SizeSpace {
        value: u64,
    },
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        ChunkedBody::Size { value: 0, digits: 0 }
    }
}

fn field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl ChunkedBody {
    /// Follows the body's bytes at the start of `data`: how many belong to
    /// it, and whether it ended there.
    pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        use ChunkedBody::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            *self = match *self {
                Data(left) => {
                    let take = left.min((data.len() - i) as u64);
                    i += take as usize;
                    *self = if take == left { DataCr } else { Data(left - take) };
                    continue;
                }
                Size { value, digits } => match (b as char).to_digit(16) {
                    Some(_) if digits == 16 => return Err("a chunk size is too large"),
                    Some(d) => Size { value: value << 4 | u64::from(d), digits: digits + 1 },
                    None if digits == 0 => return Err("a chunk size is not hexadecimal"),
                    None => match b {
                        b'\r' => SizeLf { value },
                        b';' => Extension { value },
                        b' ' | b'\t' => SizeSpace { value },
                        _ => return Err("a chunk size is not hexadecimal"),
                    },
                },
                SizeSpace { value } => match b {
                    b' ' | b'\t' => SizeSpace { value },
                    b';' => Extension { value },
                    b'\r' => SizeLf { value },
                    _ => return Err("a chunk size line is malformed"),
                },
                Extension { value } => match b {
                    b'\r' => SizeLf { value },
                    b if field_byte(b) => Extension { value },
                    _ => return Err("a chunk extension holds a forbidden character"),
                },
                SizeLf { value } if b == b'\n' => {
                    if value == 0 {
                        TrailerStart
                    } else {
                        Data(value)
                    }
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size { value: 0, digits: 0 },
                DataCr | DataLf => return Err("a chunk is longer than its size"),
                TrailerStart => match b {
                    b'\r' => EndLf,
                    b if httparse_token(b) => Trailer,
                    _ => return Err("a trailer field is malformed"),
                },
                Trailer => match b {
                    b'\r' => TrailerLf,
                    b if field_byte(b) => Trailer,
                    _ => return Err("a trailer field holds a forbidden character"),
                },
                TrailerLf if b == b'\n' => TrailerStart,
                EndLf if b == b'\n' => return Ok((i + 1, true)),
                SizeLf { .. } | TrailerLf | EndLf => return Err("a line of the chunked body does not end with CRLF"),
            };
            i += 1;
        }
        Ok((i, false))
    }
}

/// RFC 9110 tchar.
fn httparse_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(head: &str) -> Checked {
        check(head.as_bytes(), &Limits::default())
    }

    fn refused(head: &str) -> (u16, &'static str) {
        match run(head) {
            Checked::Refused(r) => (r.code.status().as_u16(), r.message),
            other => panic!("{head:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn heads_that_pass() {
        let cases: &[(&str, Framing, bool)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None, false),
            ("GET /a?b=c HTTP/1.0\r\n\r\n", Framing::None, false),
            ("\r\nGET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n", Framing::None, false),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", Framing::Length(5), false),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n", Framing::Length(5), false),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", Framing::None, false),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Framing::Chunked, false),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,Chunked\r\n\r\n", Framing::Chunked, false),
            ("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", Framing::None, true),
            ("GET /ws HTTP/1.0\r\nUpgrade: websocket\r\n\r\n", Framing::None, false),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", Framing::None, true),
            ("GET http://b.example/x HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None, false),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None, false),
            ("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", Framing::None, false),
            ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", Framing::None, false),
            ("GET / HTTP/1.1\r\nHost: a:\r\n\r\n", Framing::None, false),
            ("GET /{x}|y HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None, false),
            // Raw UTF-8 in a path: not RFC 3986, but hyper and the router take it.
            ("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n", Framing::None, false),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Obs: caf\u{e9}\r\n\r\n", Framing::None, false),
        ];
        for (head, framing, upgrade) in cases {
            let want = Head { len: head.len(), framing: *framing, upgrade: *upgrade };
            assert_eq!(run(head), Checked::Head(want), "{head:?}");
        }
        // A head followed by its body and the next request: only the head.
        let head = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        let two = format!("{head}hiGET / HTTP/1.1\r\n");
        assert_eq!(run(&two), Checked::Head(Head { len: head.len(), framing: Framing::Length(2), upgrade: false }));
    }

    #[test]
    fn heads_that_wait() {
        for head in ["", "GE", "GET / HTTP/1.1\r\n", "GET / HTTP/1.1\r\nHost: a\r\n", "GET / HTTP/1.1\r\nHost: a\r\n\r"] {
            assert_eq!(run(head), Checked::Partial, "{head:?}");
        }
    }

    #[test]
    fn heads_that_are_refused() {
        let long_method = format!("{} / HTTP/1.1\r\nHost: a\r\n\r\n", "A".repeat(9000));
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8200));
        let unfinished_line = format!("GET /{}", "a".repeat(9000));
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..100 {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n", "v".repeat(66_000));
        let unfinished_big = format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {}", "v".repeat(66_000));
        let cases: &[(&str, u16)] = &[
            (&long_method, 414),
            (&long_target, 414),
            (&unfinished_line, 414),
            (&many, 431),
            (&big, 431),
            (&unfinished_big, 431),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
            ("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nX(y): a\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n: a\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: user:pw@x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x:abc\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x:70000\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET /\r\n", 400),
            ("GET /\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
            ("GET / http/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ];
        for (head, status) in cases {
            let (got, message) = refused(head);
            assert_eq!(got, *status, "{head:?}: {message}");
        }
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n").1, "obs-folded header lines are not allowed");
        assert_eq!(refused("GET /\r\n").1, "HTTP/0.9 requests are not served");
        assert_eq!(refused("GET / HTTP/2.0\r\nHost: a\r\n\r\n").1, "only HTTP/1.0 and HTTP/1.1 are served on an HTTP/1 connection");
    }

    #[test]
    fn limits_are_inclusive() {
        let limits = Limits::default();
        // A request line of exactly 8 KiB, the method included.
        let target = "a".repeat(limits.max_uri_bytes - "GET / HTTP/1.1".len());
        let head = format!("GET /{target} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(matches!(run(&head), Checked::Head(_)), "{:?}", run(&head));
        let head = format!("GET /{target}a HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(refused(&head).0, 414);
        // Exactly 100 fields pass, 101 do not.
        let mut head = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..99 {
            head.push_str(&format!("x-{i}: v\r\n"));
        }
        assert!(matches!(run(&format!("{head}\r\n")), Checked::Head(_)));
        assert_eq!(refused(&format!("{head}x-last: v\r\n\r\n")).0, 431);
        // Header lines of exactly 64 KiB pass.
        let line = "x-big: ";
        let value = "v".repeat(limits.max_header_bytes - "Host: a\r\n".len() - line.len() - 2);
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{line}{value}\r\n\r\n");
        assert!(matches!(run(&head), Checked::Head(_)), "{:?}", run(&head));
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{line}{value}v\r\n\r\n");
        assert_eq!(refused(&head).0, 431);
    }

    #[test]
    fn a_refusal_carries_the_clients_request_id() {
        for head in [
            "GET / HTTP/1.1\r\nX-Request-ID: abc-1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nx-request-id:  abc-1 \r\nX: a\0\r\n\r\n",
            "GET / HTTP/2.0\r\nX-Request-Id: abc-1\r\n\r\n",
        ] {
            let Checked::Refused(r) = run(head) else { panic!("{head:?} passed") };
            let answer = String::from_utf8(answer(&r, head.as_bytes())).unwrap();
            assert!(answer.contains("\r\nx-request-id: abc-1\r\n"), "{answer}");
            assert!(answer.ends_with(r#""request_id":"abc-1"}}"#), "{answer}");
        }
        let head = "GET / HTTP/1.1\r\nX-Request-ID: a b\r\n\r\n";
        let Checked::Refused(r) = run(head) else { panic!("passed") };
        assert_eq!(r.request_id, None);
        let answer = String::from_utf8(answer(&r, head.as_bytes())).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "bad_request");
        assert_eq!(body["error"]["request_id"].as_str().unwrap().len(), 36);
    }

    fn chunked(body: &[u8]) -> Result<(usize, bool), &'static str> {
        ChunkedBody::default().feed(body)
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(chunked(b"3\r\nabc\r\n0\r\n\r\nGET"), Ok((13, true)));
        for body in [&b"3;x=y\r\nabc\r\n0\r\nx-t: v\r\n\r\n"[..], b"A \t;ext\r\n0123456789\r\n0\r\n\r\n", b"0\r\n\r\n"] {
            assert_eq!(chunked(body), Ok((body.len(), true)), "{:?}", String::from_utf8_lossy(body));
        }
        assert_eq!(chunked(b"3\r\nab"), Ok((5, false)));
        for bad in [&b"x\r\n"[..], b"3\nabc", b"3\r\nabcd\r\n", b"3\r\nabc\n", b"11111111111111111\r\n", b"0\r\n\n", b"0\r\nx\0\r\n\r\n"] {
            assert!(chunked(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Fed a byte at a time, the same answer.
        let body = b"5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";
        let mut state = ChunkedBody::default();
        for (i, b) in body.iter().enumerate() {
            let (used, done) = state.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!((used, done), (1, i == body.len() - 1), "byte {i}");
        }
    }
}
