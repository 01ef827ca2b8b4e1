//! Connection timeouts hyper does not separate: a client gets `header_read`
//! to send a request head once its first byte arrived, and may stay idle
//! `idle` between requests (SPEC §2: 10 s and 60 s). hyper's own header
//! timer also runs while a connection is idle, which would make every idle
//! keep-alive connection close after 10 s, and a load balancer that keeps
//! connections longer than that then meets closed sockets.
//!
//! The same wrapper checks every HTTP/1 request head before hyper sees it
//! (head.rs): bytes are handed on only up to the end of the last head that
//! passed and of its body, and a refused head is answered here, after
//! hyper's answers to the requests before it, and the connection closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::head::{self, Checked, ChunkedBody, Framing};
use super::hygiene::Limits;

#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

/// What the service tells the connection: how many requests it has been
/// handed and how many are still being answered.
#[derive(Debug, Default)]
pub struct ConnActivity {
    dispatched: AtomicU64,
    in_flight: AtomicUsize,
    /// The connection task, when it waits on a read while a request is in
    /// flight: woken when the last request ends, so it arms its idle timer.
    waiting: Mutex<Option<Waker>>,
    /// A request was answered 101: the connection is a tunnel from then on.
    switched: AtomicBool,
}

impl ConnActivity {
    /// Marks a request as dispatched until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

pub struct InFlight(Arc<ConnActivity>);

impl InFlight {
    /// One more hold on the connection, for what outlives the answer (a
    /// WebSocket tunnel): while held, no idle or head timer runs.
    pub fn hold(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.0.clone())
    }

    /// The request is answered 101 Switching Protocols: what the client
    /// sends after its head is the tunnel's, not another request's.
    pub fn switching_protocols(&self) {
        self.0.switched.store(true, Ordering::Release);
    }
}

/// A response body that keeps its request counted as in flight until the
/// body has been sent (or dropped): a long stream is not an idle connection.
pub struct Guarded<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Guarded { inner, _in_flight: in_flight }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(waker) = self.0.waiting.lock().ok().and_then(|mut w| w.take()) {
                waker.wake();
            }
        }
    }
}

pub struct TimedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    timeouts: ConnTimeouts,
    /// Set by the worker when shutdown starts, before it asks hyper to
    /// close gracefully (which polls every connection once more).
    closing: Arc<AtomicBool>,
    last_activity: Instant,
    /// When the first byte of a request head arrived, and how many requests
    /// had been dispatched then (a change means the head was complete).
    head_started: Option<(Instant, u64)>,
    /// HTTP/2 connections carry frames between requests (PING, SETTINGS),
    /// so only the idle timer applies to them.
    http2: Option<bool>,
    timer: Pin<Box<Sleep>>,
    /// Where the byte stream stands for the head check.
    stage: Stage,
    /// Bytes read but not handed to hyper yet: the first `checked` of them
    /// passed; the rest wait for the end of their head. Empty (and not
    /// allocated) in the common case, where each read holds whole heads.
    held: BytesMut,
    checked: usize,
    /// Request heads handed to hyper.
    heads: u64,
    limits: Limits,
}

/// The connection's first bytes: HTTP/2 with prior knowledge starts with it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// For bench/head-check.sh only: a binary built with this variable set
/// hands every byte to hyper unchecked, so the check's cost can be
/// measured against an otherwise identical build. Never set it for a build
/// that serves anyone: the strict head check is what SPEC §2 promises.
pub(crate) const UNCHECKED_HEADS: bool = option_env!("MANIFOLD_BENCH_UNCHECKED_HEADS").is_some();

/// Where a connection's byte stream stands.
enum Stage {
    /// The first bytes: an HTTP/2 preface, or a first HTTP/1 head.
    Start,
    Head,
    Body {
        left: BodyLeft,
        then_upgrade: bool,
    },
    /// An upgrade (or CONNECT) request was handed on: what follows is the
    /// tunnel's if it is answered 101, else the next head. Held until then.
    Upgrade,
    /// A head was refused: hyper gets an end of stream once it answered
    /// every request before it, and the answer is written when hyper shuts
    /// the connection down (after its own answers are flushed).
    Refused {
        answer: Vec<u8>,
        written: usize,
        ended: bool,
    },
    /// HTTP/2, or a tunnel: bytes pass unchecked.
    PassThrough,
    /// A chunked body that is not valid chunked coding: the read fails.
    Broken(&'static str),
}

enum BodyLeft {
    Length(u64),
    Chunked(ChunkedBody),
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>, timeouts: ConnTimeouts, closing: Arc<AtomicBool>) -> Self {
        let now = Instant::now();
        TimedIo {
            inner,
            activity,
            timeouts,
            closing,
            last_activity: now,
            head_started: None,
            http2: None,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.idle)),
            stage: Stage::Start,
            held: BytesMut::new(),
            checked: 0,
            heads: 0,
            // SPEC §2's defaults: the head limits are not configurable yet.
            limits: Limits::default(),
        }
    }

    fn on_read(&mut self, data: &[u8]) {
        let now = Instant::now();
        self.last_activity = now;
        if self.http2.is_none() {
            self.http2 = Some(data.starts_with(b"PRI * HTTP/2"));
        }
        if self.http2 == Some(false) && self.activity.in_flight.load(Ordering::Relaxed) == 0 {
            let dispatched = self.activity.dispatched.load(Ordering::Relaxed);
            if !matches!(self.head_started, Some((_, d)) if d == dispatched) {
                self.head_started = Some((now, dispatched));
            }
        }
    }

    /// Called when a read would block: arms the timer that applies now and
    /// reports whether it has run out.
    fn poll_timeouts(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            // A request is being answered: its own timeouts bound it. Be
            // woken when it ends, to start timing the idle connection.
            if let Ok(mut w) = self.activity.waiting.lock() {
                *w = Some(cx.waker().clone());
            }
            if self.activity.in_flight.load(Ordering::Acquire) > 0 {
                return Poll::Pending;
            }
        }
        let dispatched = self.activity.dispatched.load(Ordering::Relaxed);
        if dispatched == 0 && self.http2 != Some(true) && self.closing.load(Ordering::Acquire) {
            // Shutting down and no request ever reached the service: the
            // connection is idle or part-way through its first head. hyper's
            // graceful shutdown closes a keep-alive connection between
            // requests (a later head part-way included) but waits for a
            // first request, which may take the whole header timeout.
            // Only a read that would block gets here, so a head already
            // received in full is parsed and served first. HTTP/2 is left
            // to hyper's GOAWAY: frames read in one go may hold a request
            // the service has not been handed yet.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the gateway is shutting down")));
        }
        let head = self.head_started.filter(|(_, d)| *d == dispatched);
        let deadline = match head {
            Some((started, _)) => started + self.timeouts.header_read,
            None => self.last_activity + self.timeouts.idle,
        };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) if head.is_some() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head not received in time")))
            }
            // Idle too long: end the connection as a clean EOF.
            Poll::Ready(()) => Poll::Ready(Ok(())),
        }
    }
}

impl<T> TimedIo<T> {
    /// Follows `data`, the stream's next unchecked bytes, through heads and
    /// bodies: how many of them may be handed to hyper.
    fn scan(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            match &mut self.stage {
                Stage::PassThrough => return data.len(),
                Stage::Upgrade | Stage::Refused { .. } | Stage::Broken(_) => return pos,
                Stage::Start => {
                    if rest.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(rest) {
                        return pos;
                    }
                    self.stage = if rest.starts_with(H2_PREFACE) || UNCHECKED_HEADS { Stage::PassThrough } else { Stage::Head };
                }
                Stage::Head if rest.is_empty() => return pos,
                Stage::Head => match head::check(rest, &self.limits) {
                    Checked::Partial => return pos,
                    Checked::Head(h) => {
                        pos += h.len;
                        self.heads += 1;
                        self.stage = match h.framing {
                            Framing::None if h.upgrade => Stage::Upgrade,
                            Framing::None => Stage::Head,
                            Framing::Length(n) => Stage::Body { left: BodyLeft::Length(n), then_upgrade: h.upgrade },
                            Framing::Chunked => Stage::Body { left: BodyLeft::Chunked(ChunkedBody::default()), then_upgrade: h.upgrade },
                        };
                    }
                    Checked::Refused(refusal) => {
                        tracing::debug!(code = refusal.code.as_str(), message = refusal.message, "request head refused");
                        self.stage = Stage::Refused { answer: head::answer(&refusal, rest), written: 0, ended: false };
                        return pos;
                    }
                },
                Stage::Body { .. } if rest.is_empty() => return pos,
                Stage::Body { left, then_upgrade } => {
                    let ended = match left {
                        BodyLeft::Length(n) => {
                            let take = (*n).min(rest.len() as u64);
                            *n -= take;
                            pos += take as usize;
                            *n == 0
                        }
                        BodyLeft::Chunked(body) => match body.feed(rest) {
                            Ok((used, ended)) => {
                                pos += used;
                                ended
                            }
                            Err(e) => {
                                tracing::debug!(error = e, "request body refused");
                                self.stage = Stage::Broken(e);
                                return pos;
                            }
                        },
                    };
                    if ended {
                        self.stage = if *then_upgrade { Stage::Upgrade } else { Stage::Head };
                    }
                }
            }
        }
    }

    /// Whether a request handed to hyper is still being answered; if so,
    /// the task is woken when the last one ends.
    fn answering(&self, cx: &Context<'_>) -> bool {
        if self.activity.in_flight.load(Ordering::Acquire) == 0 {
            return false;
        }
        if let Ok(mut w) = self.activity.waiting.lock() {
            *w = Some(cx.waker().clone());
        }
        self.activity.in_flight.load(Ordering::Acquire) > 0
    }

    /// Every head handed to hyper has been answered in full.
    fn all_answered(&self) -> bool {
        self.activity.in_flight.load(Ordering::Acquire) == 0 && self.activity.dispatched.load(Ordering::Acquire) >= self.heads
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Checked bytes held back from an earlier read go first.
            if this.checked > 0 {
                let n = this.checked.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.advance(n);
                this.checked -= n;
                if this.held.is_empty() {
                    this.held = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            match &this.stage {
                Stage::Refused { .. } => {
                    if this.answering(cx) {
                        return Poll::Pending;
                    }
                    if !this.all_answered() {
                        return this.poll_timeouts(cx);
                    }
                    // hyper answered everything before the refused head:
                    // an end of stream makes it flush and shut down.
                    if let Stage::Refused { ended, .. } = &mut this.stage {
                        *ended = true;
                    }
                    this.held = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Stage::Upgrade => {
                    if this.activity.switched.load(Ordering::Acquire) {
                        this.stage = Stage::PassThrough;
                        this.checked = this.held.len();
                        continue;
                    }
                    if this.answering(cx) {
                        return Poll::Pending;
                    }
                    if !this.all_answered() {
                        return this.poll_timeouts(cx);
                    }
                    // Not upgraded: what follows is the next request.
                    this.stage = Stage::Head;
                    let held = std::mem::take(&mut this.held);
                    this.checked = this.scan(&held);
                    this.held = held;
                    if this.checked > 0 || matches!(this.stage, Stage::Refused { .. } | Stage::Broken(_)) {
                        continue;
                    }
                }
                Stage::Broken(e) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, *e))),
                _ => {}
            }
            if this.held.is_empty() && !matches!(this.stage, Stage::Start) {
                // The common case: read straight into hyper's buffer, and
                // hold back only what follows the last whole head.
                let before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        let read = buf.filled().len() - before;
                        if read == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        this.on_read(&buf.filled()[before..]);
                        let passed = this.scan(&buf.filled()[before..]);
                        if passed < read {
                            if !matches!(this.stage, Stage::Refused { .. }) {
                                this.held.extend_from_slice(&buf.filled()[before + passed..]);
                            }
                            buf.set_filled(before + passed);
                        }
                        if passed > 0 {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    Poll::Pending => return this.poll_timeouts(cx),
                    other => return other,
                }
            }
            // A head split across reads (and every connection's first, which
            // hyper reads 24 bytes at a time to look for HTTP/2): gather it.
            let before = this.held.len();
            this.held.reserve(8 << 10);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.held) {
                Poll::Ready(Ok(0)) => {
                    // The client ended part-way through a head.
                    this.held = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {
                    let held = std::mem::take(&mut this.held);
                    this.on_read(&held[before..]);
                    // Re-checking a growing head at every read would cost its
                    // length each time: only once a line ends, or the head
                    // crossed a limit.
                    let line = this.limits.max_uri_bytes + 2;
                    let whole = line + this.limits.max_header_bytes + 2;
                    let crossed = |limit: usize| before <= limit && held.len() > limit;
                    let worth = !matches!(this.stage, Stage::Head) || held[before..].contains(&b'\n') || crossed(line) || crossed(whole);
                    if worth {
                        this.checked = this.scan(&held);
                    }
                    this.held = held;
                    if matches!(this.stage, Stage::Refused { .. }) {
                        this.held.truncate(this.checked);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return this.poll_timeouts(cx),
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        result
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A refused head's answer, after everything hyper wrote before it.
        if let Stage::Refused { answer, written, ended: true } = &mut this.stage {
            while *written < answer.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => *written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
