//! HTTP/1.1 to a backend, on the request's own task: the task that sends
//! the request owns the connection (no dispatcher task, no channel hop),
//! writes the head in one buffer, parses the answer's head with `httparse`,
//! and gives the connection back to the worker's pool when the answer's
//! body ends. Framing follows RFC 9112 §6: an answer whose length cannot be
//! known for sure (Content-Length with Transfer-Encoding, differing
//! lengths) is refused, never relayed half-true.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

use super::connect::{Connector, Stream};
use super::error::{Cause, UpstreamError};
use super::pool::Pool;
use super::FailureCount;
use crate::body::Body;

/// The longest answer head read (nginx's default buffers hold 4-8 KiB;
/// hyper allows ~400 KiB): past it the answer is refused as invalid.
const MAX_HEAD: usize = 64 * 1024;
/// Headers in one answer head.
const MAX_HEADERS: usize = 128;
/// A request body at most this big is written with its head, in one write.
const INLINE_BODY: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// One pooled connection and its read buffer (kept with it between uses).
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    /// The [`Connector::id`] that opened it: the pool never hands it to a
    /// request of another connector.
    pub(super) connector: u64,
    pub(super) tls: bool,
    pub(super) authority: Authority,
}

impl Conn {
    pub fn is_reusable(&mut self) -> bool {
        self.buf.is_empty() && self.io.is_reusable()
    }
}

/// Where a request is, so a deadline that passes can be blamed right: on a
/// client that stopped sending its body, or on the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Connecting = 0,
    Writing = 1,
    /// Waiting for the next piece of the client's body.
    ClientBody = 2,
    /// The request is sent; waiting for the answer's head.
    Answer = 3,
}

/// Sends `req` on a pooled connection (or a new one) and reads the answer's
/// head by `deadline`; the answer's body streams from the connection, each
/// pause at most `body_timeout`. Without `keep_headers` the answer carries
/// only its `Content-Type` (a composition call nothing reads headers of).
/// A new connection comes from `connector` within `connect_timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    pool: &Arc<Pool>,
    connector: &Connector,
    connect_timeout: Duration,
    req: Request<Body>,
    deadline: Instant,
    body_timeout: Duration,
    keep_headers: bool,
    failures: Option<FailureCount>,
) -> Result<Response<Body>, UpstreamError> {
    let phase = AtomicU8::new(Phase::Connecting as u8);
    match tokio::time::timeout_at(deadline, exchange(pool, connector, connect_timeout, req, body_timeout, keep_headers, failures, &phase))
        .await
    {
        Ok(result) => result,
        Err(_) if phase.load(Ordering::Relaxed) == Phase::ClientBody as u8 => {
            Err(UpstreamError::new(Cause::ClientStalled, "the client's body stopped arriving"))
        }
        Err(_) => Err(UpstreamError::new(Cause::Timeout, "no answer in time")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    pool: &Arc<Pool>,
    connector: &Connector,
    connect_timeout: Duration,
    req: Request<Body>,
    body_timeout: Duration,
    keep_headers: bool,
    failures: Option<FailureCount>,
    phase: &AtomicU8,
) -> Result<Response<Body>, UpstreamError> {
    let (parts, mut body) = req.into_parts();
    let tls = parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let authority = parts.uri.authority().cloned().ok_or_else(|| UpstreamError::new(Cause::Request, "the URI has no authority"))?;
    let head_only = parts.method == Method::HEAD;
    let (head, inline, upgrade) = request_head(&parts, &mut body);
    // Sent whole and unanswered, a request is sent again only when it is
    // idempotent (the backend may have acted on it before it closed, as Go's
    // transport reasons) and the gateway holds its body whole.
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE);
    let replayable = idempotent && (inline.is_some() || matches!(body, Body::Empty));
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only { None } else { pool.take(connector.id(), tls, &authority) };
        let reused = pooled.is_some();
        phase.store(Phase::Connecting as u8, Ordering::Relaxed);
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let io = connector.connect_within(tls, &authority, connect_timeout).await?;
                Conn { io, buf: BytesMut::with_capacity(READ_CHUNK), connector: connector.id(), tls, authority: authority.clone() }
            }
        };
        phase.store(Phase::Writing as u8, Ordering::Relaxed);
        match write_request(&mut conn, &head, inline.as_ref(), &mut body, phase).await {
            Ok(()) => {}
            // A pooled connection the backend closed while it sat idle is
            // never the answer's error: once more on a new connection.
            // (`unsent`: the head did not go out, so no body was read yet.)
            Err(e) if reused && e.unsent => {
                fresh_only = true;
                continue;
            }
            Err(e) => return Err(e),
        }
        phase.store(Phase::Answer as u8, Ordering::Relaxed);
        match read_head(&mut conn, head_only, keep_headers, upgrade).await {
            Ok((head, framing)) => return Ok(answer(conn, head, framing, pool, body_timeout, failures)),
            // Closed before a byte of the answer: the backend may have
            // dropped the idle connection as the request went out.
            Err(e) if reused && e.unsent && replayable => {
                fresh_only = true;
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The request head in one buffer, a small body the gateway holds whole
/// (sent in the same write), and whether the request asks for an upgrade
/// (only a WebSocket route's tunnel sends `Upgrade`: the proxy removes it
/// from every other request as hop-by-hop).
fn request_head(parts: &http::request::Parts, body: &mut Body) -> (Vec<u8>, Option<Bytes>, bool) {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(256 + parts.headers.len() * 32);
    let mut upgrade = false;
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(pq.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // Framing is the gateway's to write; an `Expect` was answered to
        // the client already (hyper sends its 100 Continue).
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::EXPECT {
            continue;
        }
        upgrade |= name == header::UPGRADE;
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let mut inline = None;
    match body {
        Body::Empty => {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        Body::Full(bytes) => {
            let b = bytes.take().unwrap_or_default();
            content_length(&mut head, b.len() as u64);
            *body = Body::Empty;
            inline = Some(b);
        }
        other => match other.size_hint().exact() {
            Some(n) => content_length(&mut head, n),
            None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        },
    }
    head.extend_from_slice(b"\r\n");
    (head, inline, upgrade)
}

/// A `content-length` line, written into the head without an allocation.
fn content_length(head: &mut Vec<u8>, n: u64) {
    use std::io::Write as _;
    let _ = write!(head, "content-length: {n}\r\n");
}

fn closed(e: std::io::Error, unsent: bool) -> UpstreamError {
    let e = UpstreamError::new(Cause::Closed, format!("writing the request: {e}"));
    if unsent {
        e.unsent()
    } else {
        e
    }
}

async fn write_request(
    conn: &mut Conn,
    head: &[u8],
    inline: Option<&Bytes>,
    body: &mut Body,
    phase: &AtomicU8,
) -> Result<(), UpstreamError> {
    match inline {
        Some(b) if b.len() <= INLINE_BODY => {
            let mut all = Vec::with_capacity(head.len() + b.len());
            all.extend_from_slice(head);
            all.extend_from_slice(b);
            conn.io.write_all(&all).await.map_err(|e| closed(e, true))?;
        }
        Some(b) => {
            conn.io.write_all(head).await.map_err(|e| closed(e, true))?;
            conn.io.write_all(b).await.map_err(|e| closed(e, false))?;
        }
        None => conn.io.write_all(head).await.map_err(|e| closed(e, true))?,
    }
    if !body.is_end_stream() {
        let chunked = body.size_hint().exact().is_none();
        loop {
            phase.store(Phase::ClientBody as u8, Ordering::Relaxed);
            let frame = body.frame().await;
            phase.store(Phase::Writing as u8, Ordering::Relaxed);
            match frame {
                None => break,
                Some(Err(e)) if crate::body::is_too_large(&*e) => {
                    return Err(UpstreamError::new(Cause::ClientBodyTooLarge, "the client's body is over the limit"))
                }
                Some(Err(e)) => {
                    return Err(UpstreamError::new(Cause::ClientBody, format!("the client's body: {}", super::error::chain(&*e))))
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        let size = format!("{:x}\r\n", data.len());
                        conn.io.write_all(size.as_bytes()).await.map_err(|e| closed(e, false))?;
                        conn.io.write_all(&data).await.map_err(|e| closed(e, false))?;
                        conn.io.write_all(b"\r\n").await.map_err(|e| closed(e, false))?;
                    } else {
                        conn.io.write_all(&data).await.map_err(|e| closed(e, false))?;
                    }
                }
            }
        }
        if chunked {
            conn.io.write_all(b"0\r\n\r\n").await.map_err(|e| closed(e, false))?;
        }
    }
    conn.io.flush().await.map_err(|e| closed(e, false))
}

/// How the answer's body is delimited.
#[derive(Clone, Copy, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection (never reused).
    Close,
    /// A 101 to a request that asked for it: the connection is no longer
    /// HTTP, and is handed over whole.
    Upgrade,
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
}

fn protocol(m: impl Into<String>) -> UpstreamError {
    UpstreamError::new(Cause::Protocol, m)
}

async fn read_more(conn: &mut Conn) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(READ_CHUNK);
    }
    conn.io.read_buf(&mut conn.buf).await
}

/// Reads the answer's head, skipping interim (1xx) answers. A 101 ends
/// the exchange when the request asked for an `upgrade`; unasked, it is an
/// answer the gateway cannot relay.
async fn read_head(conn: &mut Conn, head_only: bool, keep_headers: bool, upgrade: bool) -> Result<(Head, Framing), UpstreamError> {
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            received = true;
            if let Some((parsed, len)) = parse_head(&conn.buf, head_only, keep_headers)? {
                // The values are slices of the head's own bytes: no copy.
                let bytes = conn.buf.split_to(len).freeze();
                let mut headers = HeaderMap::with_capacity(parsed.fields.len());
                for (name, start, end) in parsed.fields {
                    let value = HeaderValue::from_maybe_shared(bytes.slice(start as usize..end as usize))
                        .map_err(|_| protocol("invalid header value"))?;
                    headers.append(name, value);
                }
                let head = Head { status: parsed.status, version: parsed.version, headers, keep_alive: parsed.keep_alive };
                match head.status.as_u16() {
                    101 if upgrade => return Ok((head, Framing::Upgrade)),
                    101 => return Err(protocol("the backend switched protocols unasked")),
                    100..=199 => continue,
                    _ => return Ok((head, parsed.framing)),
                }
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(protocol(format!("the answer's head is over {MAX_HEAD} bytes")));
            }
        }
        match read_more(conn).await {
            Ok(0) if !received => return Err(UpstreamError::new(Cause::Closed, "closed before answering").unsent()),
            Ok(0) => return Err(UpstreamError::new(Cause::Closed, "closed in the middle of the answer's head")),
            Ok(_) => {}
            Err(e) if !received => return Err(UpstreamError::new(Cause::Closed, format!("reading the answer: {e}")).unsent()),
            Err(e) => return Err(UpstreamError::new(Cause::Closed, format!("reading the answer: {e}"))),
        }
    }
}

/// An answer head as parsed: its header values as byte ranges of the head.
struct Parsed {
    status: StatusCode,
    version: Version,
    framing: Framing,
    keep_alive: bool,
    fields: Vec<(HeaderName, u32, u32)>,
}

/// `Some((head, head length))` once the buffer holds a whole head. The
/// framing headers are always read; the others are kept only when
/// `keep_headers` (`Content-Type` always is).
fn parse_head(buf: &[u8], head_only: bool, keep_headers: bool) -> Result<Option<(Parsed, usize)>, UpstreamError> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(format!("invalid answer head: {e}"))),
    };
    let status = resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or_else(|| protocol("invalid status code"))?;
    let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut fields = Vec::with_capacity(if keep_headers { resp.headers.len() } else { 1 });
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = version == Version::HTTP_10;
    let base = buf.as_ptr() as usize;
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            for part in h.value.split(|b| *b == b',') {
                let n = std::str::from_utf8(part.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| protocol("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(protocol("differing Content-Length values"));
                }
                length = Some(n);
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding decides (RFC 9112 §6.3).
            chunked = h.value.split(|b| *b == b',').next_back().is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if n.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        } else if !keep_headers && !n.eq_ignore_ascii_case(b"content-type") {
            continue;
        }
        let name = HeaderName::from_bytes(n).map_err(|_| protocol("invalid header name"))?;
        // httparse's values borrow `buf`: their place in it.
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start as u32, (start + h.value.len()) as u32));
    }
    if transfer_encoding && length.is_some() {
        return Err(protocol("both Content-Length and Transfer-Encoding"));
    }
    let bodiless = head_only || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::None
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if matches!(framing, Framing::Close) {
        close = true;
    }
    Ok(Some((Parsed { status, version, framing, keep_alive: !close, fields }, len)))
}

/// The answer, its body read from `conn`. A body already in the buffer
/// whole (most JSON answers) is handed over as bytes and the connection
/// goes back to the pool at once.
fn answer(
    mut conn: Conn,
    head: Head,
    framing: Framing,
    pool: &Arc<Pool>,
    body_timeout: Duration,
    failures: Option<FailureCount>,
) -> Response<Body> {
    let mut upgraded = None;
    let body = match framing {
        Framing::Upgrade => {
            let rest = conn.buf.split().freeze();
            upgraded = Some(Upgraded(Arc::new(std::sync::Mutex::new(Some((conn.io, rest))))));
            Body::Empty
        }
        Framing::None => {
            if head.keep_alive && conn.buf.is_empty() {
                pool.put(conn);
            }
            Body::Empty
        }
        Framing::Length(n) if conn.buf.len() as u64 >= n => {
            let bytes = conn.buf.split_to(n as usize).freeze();
            if head.keep_alive && conn.buf.is_empty() {
                pool.put(conn);
            }
            Body::full(bytes)
        }
        framing => Body::Upstream(Box::new(ResponseBody {
            conn: Some(conn),
            state: match framing {
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::ChunkSize,
                _ => State::Close,
            },
            keep_alive: head.keep_alive,
            pool: pool.clone(),
            body_timeout,
            idle: None,
            waiting: false,
            fresh_data: false,
            deferred: None,
            failures,
        })),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if let Some(upgraded) = upgraded {
        resp.extensions_mut().insert(upgraded);
    }
    resp
}

/// A backend connection that switched protocols (a 101 to a request that
/// asked for one), in the answer's extensions: its stream and the bytes
/// the backend sent past the head. Never pooled; taken once by the tunnel.
#[derive(Clone)]
pub struct Upgraded(Arc<std::sync::Mutex<Option<(Stream, Bytes)>>>);

impl Upgraded {
    pub fn take(&self) -> Option<(Stream, Bytes)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk, up to the empty line.
    Trailers,
    Close,
    Done,
}

/// A backend answer's body streaming from its connection.
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: Arc<Pool>,
    body_timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
    /// The last read found nothing: the pause timer runs.
    waiting: bool,
    /// Data went out since the last `Pending`.
    fresh_data: bool,
    /// A failure held back one poll (see `fail`).
    deferred: Option<(Cause, String)>,
    failures: Option<FailureCount>,
}

type BoxError = crate::body::BoxError;

impl ResponseBody {
    fn done(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.put(conn);
            }
        }
    }

    fn fail(&mut self, cause: Cause, detail: String, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        // Data handed over in this same wake-up may still sit in the
        // server's write buffer, with the head: an error now would drop
        // them unsent. Report it on the next poll, after they are flushed.
        if self.fresh_data {
            self.fresh_data = false;
            self.deferred = Some((cause, detail));
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.state = State::Done;
        if let Some(f) = self.failures.take() {
            f.count(cause, &detail);
        }
        Poll::Ready(Some(Err(Box::new(UpstreamError::new(cause, detail)))))
    }

    /// Decodes what the buffer holds: `Some(data)`, or `None` when more must
    /// be read (or the body ended: see `state`).
    fn decode(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(conn) = self.conn.as_mut() else { return Ok(None) };
        let buf = &mut conn.buf;
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                State::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = if left == n { State::Done } else { State::Length(left - n) };
                    return Ok(Some(data));
                }
                State::ChunkSize => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > 1024 {
                            return Err(protocol("a chunk size line is too long"));
                        }
                        return Ok(None);
                    };
                    let line = &buf[..end];
                    let hex = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 15)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| protocol("invalid chunk size"))?;
                    buf.advance(end + 2);
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = if left == n { State::ChunkEnd } else { State::ChunkData(left - n) };
                    return Ok(Some(data));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(protocol("a chunk does not end with CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_HEAD {
                            return Err(protocol("trailers too long"));
                        }
                        return Ok(None);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        // Trailers are not passed on; the body is whole.
                        self.state = State::Done;
                        return Ok(None);
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some((cause, detail)) = this.deferred.take() {
            return this.fail(cause, detail, cx);
        }
        loop {
            match this.decode() {
                Ok(Some(data)) => {
                    if this.state == State::Done {
                        this.done();
                    }
                    this.fresh_data = true;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.state == State::Done => {
                    this.done();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => return this.fail(e.cause, e.detail, cx),
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            let polled = tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf);
            match polled {
                Poll::Ready(Ok(0)) => {
                    if this.state == State::Close {
                        this.state = State::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(Cause::Closed, "the backend closed the connection before the body's end".into(), cx);
                }
                Poll::Ready(Ok(_)) => this.waiting = false,
                Poll::Ready(Err(e)) => return this.fail(Cause::Closed, format!("reading the body: {e}"), cx),
                Poll::Pending => {
                    // The pause is timed from the first read that found
                    // nothing: a client that reads slowly (and so polls
                    // late) is not the backend's pause.
                    let timeout = this.body_timeout;
                    let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    this.fresh_data = false;
                    if !this.waiting {
                        idle.as_mut().reset(Instant::now() + timeout);
                        this.waiting = true;
                    }
                    if idle.as_mut().poll(cx).is_ready() {
                        return this.fail(Cause::BodyTimeout, format!("the body paused over {timeout:?}"), cx);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
