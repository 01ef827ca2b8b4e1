//! The one body type of the request path: a backend's or client's streamed
//! body, or bytes the gateway made itself. An enum, not a boxed trait object,
//! so the common cases cost no allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Default)]
pub enum Body {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Stream(Incoming),
    /// A client body that may not exceed `left` more bytes
    /// (request-size-limit); past that it fails with [`BodyTooLarge`].
    Capped {
        inner: Incoming,
        left: u64,
    },
    /// A body passed on while a copy is kept (response-cache); boxed, as
    /// it is the rare case.
    Tee(Box<Tee>),
    /// A body whose data bytes are counted as they go out (the access log
    /// of a streamed answer); boxed, like `Tee`.
    Counted(Box<Counted>),
    /// A backend's answer body still streaming from its connection (one
    /// that arrived whole with its head is `Full`).
    Upstream(Box<crate::upstream::ResponseBody>),
    /// A backend's HTTP/2 answer body (an upstream with `http2: true`).
    Upstream2(Box<crate::upstream::H2ResponseBody>),
    /// A streamed answer that holds its least-requests count until it
    /// ends, fails or is dropped; boxed, like `Tee`.
    Held(Box<Held>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Full(b) => f.debug_tuple("Full").field(b).finish(),
            Body::Stream(_) => f.write_str("Stream"),
            Body::Capped { left, .. } => f.debug_struct("Capped").field("left", left).finish_non_exhaustive(),
            Body::Tee(_) => f.write_str("Tee"),
            Body::Counted(_) => f.write_str("Counted"),
            Body::Upstream(_) => f.write_str("Upstream"),
            Body::Upstream2(_) => f.write_str("Upstream2"),
            Body::Held(_) => f.write_str("Held"),
        }
    }
}

/// What [`Body::Tee`] does with the copy once the body ended whole.
pub type TeeDone = Box<dyn FnOnce(Bytes) + Send + Sync>;

/// Streams `inner` through, keeping a copy of up to `cap` bytes; when the
/// body ends without error and within `cap`, `done` gets the copy.
pub struct Tee {
    inner: Body,
    copy: Option<bytes::BytesMut>,
    cap: usize,
    done: Option<TeeDone>,
}

impl Tee {
    fn finish(&mut self) {
        if let (Some(copy), Some(done)) = (self.copy.take(), self.done.take()) {
            done(copy.freeze());
        }
        self.done = None;
    }
}

/// What [`Body::Counted`] reports once: the data bytes that went out, and
/// whether the body ended whole (false: an error, or dropped before its end).
pub type CountDone = Box<dyn FnOnce(u64, bool) + Send + Sync>;

pub struct Counted {
    inner: Body,
    bytes: u64,
    done: Option<CountDone>,
}

impl Counted {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.bytes, complete);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A body and the request-in-flight guard it releases at its end.
pub struct Held {
    inner: Body,
    guard: Option<crate::upstream::InFlight>,
}

impl Body {
    /// `inner`, holding `guard` until it ends, fails or is dropped. A body
    /// that is already whole (or empty) has ended: the guard goes at once.
    pub fn held(inner: Body, guard: Option<crate::upstream::InFlight>) -> Body {
        match (inner, guard) {
            (inner @ (Body::Empty | Body::Full(_)), _) | (inner, None) => inner,
            (inner, guard) => Body::Held(Box::new(Held { inner, guard })),
        }
    }

    pub fn counted(inner: Body, done: CountDone) -> Body {
        Body::Counted(Box::new(Counted { inner, bytes: 0, done: Some(done) }))
    }

    pub fn tee(inner: Body, cap: usize, done: TeeDone) -> Body {
        Body::Tee(Box::new(Tee { inner, copy: Some(bytes::BytesMut::new()), cap, done: Some(done) }))
    }
}

/// A capped body went over its limit.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is over its size limit")
    }
}

impl std::error::Error for BodyTooLarge {}

/// Whether `e`, or anything it wraps, is a [`BodyTooLarge`].
pub fn is_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTooLarge>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Body::Stream(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Upstream(inner) => Pin::new(inner.as_mut()).poll_frame(cx),
            Body::Upstream2(inner) => Pin::new(inner.as_mut()).poll_frame(cx),
            Body::Capped { inner, left } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *left {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    *left -= len;
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other.map_err(Into::into),
            },
            Body::Tee(tee) => {
                let polled = Pin::new(&mut tee.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(copy), Some(data)) = (&mut tee.copy, frame.data_ref()) {
                            if copy.len() + data.len() > tee.cap {
                                tee.copy = None;
                            } else {
                                copy.extend_from_slice(data);
                            }
                        }
                        // hyper stops polling once a sized body is complete,
                        // so the end is seen here, not only as `None`.
                        if tee.inner.is_end_stream() {
                            tee.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => tee.copy = None,
                    Poll::Ready(None) => tee.finish(),
                    Poll::Pending => {}
                }
                polled
            }
            Body::Counted(c) => {
                let polled = Pin::new(&mut c.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        c.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                        // As for Tee: a sized body's end is seen here.
                        if c.inner.is_end_stream() {
                            c.finish(true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => c.finish(false),
                    Poll::Ready(None) => c.finish(true),
                    Poll::Pending => {}
                }
                polled
            }
            Body::Held(h) => {
                let polled = Pin::new(&mut h.inner).poll_frame(cx);
                match &polled {
                    // As for Tee: a sized body's end is seen here.
                    Poll::Ready(Some(Ok(_))) if h.inner.is_end_stream() => h.guard = None,
                    Poll::Ready(Some(Err(_)) | None) => h.guard = None,
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(bytes) => bytes.is_none(),
            Body::Stream(inner) | Body::Capped { inner, .. } => inner.is_end_stream(),
            // Not ended before the copy is handed over.
            Body::Tee(tee) => tee.done.is_none() && tee.inner.is_end_stream(),
            Body::Counted(c) => c.done.is_none() && c.inner.is_end_stream(),
            Body::Upstream(inner) => inner.is_end_stream(),
            Body::Upstream2(inner) => http_body::Body::is_end_stream(inner.as_ref()),
            Body::Held(h) => h.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(inner) | Body::Capped { inner, .. } => inner.size_hint(),
            Body::Tee(tee) => tee.inner.size_hint(),
            Body::Counted(c) => c.inner.size_hint(),
            Body::Upstream(inner) => inner.size_hint(),
            Body::Upstream2(inner) => http_body::Body::size_hint(inner.as_ref()),
            Body::Held(h) => h.inner.size_hint(),
        }
    }
}
