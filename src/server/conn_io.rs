//! Connection timeouts hyper does not separate: a client gets `header_read`
//! to send a request head once its first byte arrived, and may stay idle
//! `idle` between requests (SPEC §2: 10 s and 60 s). hyper's own header
//! timer also runs while a connection is idle, which would make every idle
//! keep-alive connection close after 10 s, and a load balancer that keeps
//! connections longer than that then meets closed sockets.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_read(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_timeouts(cx),
            other => other,
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
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
