//! HTTP/2 to a backend whose upstream says `http2: true`: prior knowledge
//! over `http://`, ALPN `h2` over `https://`. One connection per origin and
//! worker carries every request to it at once (multiplexed); it is hyper's
//! HTTP/2 client, whose connection task runs on the worker's own runtime.
//! A connection that went away is dropped from the worker's list and the
//! request, not sent yet, goes on a new one; one unused for 60 s is let go.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::{Instant, Sleep};

use super::connect::Connector;
use super::error::{Cause, UpstreamError};
use super::FailureCount;
use crate::body::{Body, BoxError};

/// One worker's HTTP/2 connections, one per origin and connector. While
/// one is being opened, the requests that want it wait for that one
/// connect instead of each opening its own.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<Vec<(Key, Slot)>>,
}

type Connecting = Shared<Pin<Box<dyn Future<Output = Result<SendRequest<Body>, UpstreamError>> + Send>>>;

enum Slot {
    /// An open connection and when a request last took it.
    Open(SendRequest<Body>, Instant),
    Connecting(Connecting),
}

/// An open connection no request took for this long is let go (as the
/// HTTP/1.1 pool's idle limit): a target dropped from the config does not
/// keep its connection.
const IDLE_TIMEOUT: Duration = super::pool::IDLE_TIMEOUT;

#[derive(Clone, PartialEq, Eq)]
struct Key {
    tls: bool,
    authority: Authority,
    connector: u64,
}

impl Pool {
    /// A sender for `key`, and whether its connection was opened for this
    /// request (`false`: it was open already, and may have died since).
    async fn sender(&self, to: &Target<'_>, key: &Key, fresh_only: bool) -> Result<(SendRequest<Body>, bool), UpstreamError> {
        let connecting = {
            let now = Instant::now();
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(
                |(k, slot)| !matches!(slot, Slot::Open(s, used) if s.is_closed() || now - *used > IDLE_TIMEOUT || (fresh_only && k == key)),
            );
            match conns.iter_mut().find(|(k, _)| k == key) {
                Some((_, Slot::Open(s, used))) => {
                    *used = now;
                    return Ok((s.clone(), false));
                }
                Some((_, Slot::Connecting(c))) => c.clone(),
                None => {
                    let c = connect(to.connector.clone(), key.clone(), to.connect_timeout).boxed().shared();
                    conns.push((key.clone(), Slot::Connecting(c.clone())));
                    c
                }
            }
        };
        let result = connecting.clone().await;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        // The first waiter to see the connect end settles the slot.
        if let Some(i) = conns.iter().position(|(k, slot)| k == key && matches!(slot, Slot::Connecting(c) if c.ptr_eq(&connecting))) {
            match &result {
                Ok(s) => conns[i].1 = Slot::Open(s.clone(), Instant::now()),
                Err(_) => {
                    conns.remove(i);
                }
            }
        }
        result.map(|s| (s, true))
    }
}

async fn connect(connector: Arc<Connector>, key: Key, connect_timeout: Duration) -> Result<SendRequest<Body>, UpstreamError> {
    let io = connector.connect_h2(key.tls, &key.authority, connect_timeout).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A peer that went away while requests are in flight is noticed.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::new(Cause::Protocol, format!("HTTP/2 with {}: {}", key.authority, super::error::chain(&e))).unsent())?;
    let authority = key.authority;
    // Runs on this worker's runtime, as long as the connection lives.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %authority, error = %e, "HTTP/2 connection to a backend ended");
        }
    });
    Ok(sender)
}

fn cause_of(e: &hyper::Error) -> Cause {
    if e.is_timeout() {
        Cause::Timeout
    } else if e.is_parse() {
        Cause::Protocol
    } else if e.is_body_write_aborted() {
        Cause::ClientBody
    } else if e.is_user() {
        Cause::Request
    } else {
        Cause::Closed
    }
}

/// Sends `req` (its URI absolute) over HTTP/2 and returns the answer once
/// its head arrived. `host` becomes `:authority`.
/// Where an HTTP/2 request goes out: the connector and its timeout.
pub struct Target<'a> {
    pub connector: &'a Arc<Connector>,
    pub connect_timeout: Duration,
}

pub async fn send(
    pool: &Pool,
    to: Target<'_>,
    mut req: Request<Body>,
    deadline: Instant,
    body_timeout: Duration,
    failures: Option<FailureCount>,
) -> Result<Response<Body>, UpstreamError> {
    let uri = req.uri().clone();
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    let authority = uri.authority().cloned().ok_or_else(|| UpstreamError::new(Cause::Request, "the URI has no authority"))?;
    let key = Key { tls, authority, connector: to.connector.id() };
    // The Host the layer stamped is the request's `:authority`; HTTP/2 has
    // no connection-specific headers (RFC 9113 §8.2.2).
    let host = req.headers_mut().remove(header::HOST);
    let target_authority = host.as_ref().and_then(|h| Authority::try_from(h.as_bytes()).ok()).unwrap_or_else(|| key.authority.clone());
    let mut parts = uri.into_parts();
    parts.authority = Some(target_authority);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| UpstreamError::new(Cause::Request, format!("the URI: {e}")))?;
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, HeaderName::from_static("keep-alive")] {
        req.headers_mut().remove(name);
    }
    if req.headers().get(header::TE).is_some_and(|v| v != HeaderValue::from_static("trailers")) {
        req.headers_mut().remove(header::TE);
    }
    *req.version_mut() = Version::HTTP_2;

    let exchange = async {
        let mut fresh_only = false;
        let mut req = req;
        loop {
            let (mut sender, fresh) = pool.sender(&to, &key, fresh_only).await?;
            if let Err(e) = sender.ready().await {
                // An open connection that died since: once more, on a new one.
                if !fresh {
                    fresh_only = true;
                    continue;
                }
                let cause = match cause_of(&e) {
                    Cause::Closed => Cause::Protocol,
                    c => c,
                };
                return Err(UpstreamError::new(cause, format!("HTTP/2: {}", super::error::chain(&e))));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                // The connection went away before the request left: once
                // more, on a new connection.
                Err(mut e) if !fresh && e.message().is_some() => {
                    req = e.take_message().expect("checked");
                    fresh_only = true;
                }
                Err(e) => {
                    let e = e.into_error();
                    // On a connection opened for this request, a failure before
                    // any answer (other than time running out) means the
                    // target does not speak HTTP/2: an HTTP/1.1 server answers
                    // the preface with bytes that are no HTTP/2 frame.
                    let cause = match cause_of(&e) {
                        Cause::Closed if fresh => Cause::Protocol,
                        c => c,
                    };
                    return Err(UpstreamError::new(cause, format!("HTTP/2: {}", super::error::chain(&e))));
                }
            }
        }
    };
    let resp = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(UpstreamError::new(Cause::Timeout, "no answer in time")),
    };
    let (mut parts, body) = resp.into_parts();
    // Passed on to HTTP/1.1 clients as well: the version is the server's.
    parts.version = Version::HTTP_11;
    let body = if http_body::Body::is_end_stream(&body) {
        Body::Empty
    } else {
        Body::Upstream2(Box::new(ResponseBody { inner: body, body_timeout, idle: None, waiting: false, failures }))
    };
    Ok(Response::from_parts(parts, body))
}

/// An HTTP/2 answer body as it streams, each pause at most `body_timeout`.
pub struct ResponseBody {
    inner: Incoming,
    body_timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    failures: Option<FailureCount>,
}

impl ResponseBody {
    fn fail(&mut self, cause: Cause, detail: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.failures.take() {
            f.count(cause, &detail);
        }
        Poll::Ready(Some(Err(Box::new(UpstreamError::new(cause, detail)))))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(Cause::Closed, format!("reading the body: {}", super::error::chain(&e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.body_timeout;
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !this.waiting {
                    idle.as_mut().reset(Instant::now() + timeout);
                    this.waiting = true;
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return this.fail(Cause::BodyTimeout, format!("the body paused over {timeout:?}"));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
