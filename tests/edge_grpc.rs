//! gRPC through the gateway (SPEC §7, issue 14 item 6) with tonic's own
//! server and client (no codegen: the messages are prost structs written
//! by hand, the calls go through `tonic::server::Grpc` and
//! `tonic::client::Grpc` with `ProstCodec`). HTTP/2 end to end, statuses
//! in trailers passed through, `grpc-timeout` against the route's timeout,
//! and the gateway's own errors as gRPC statuses.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{gateway, within};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Status};

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
    /// How many replies a streaming call sends.
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    message: String,
}

type Seen = Arc<Mutex<Vec<tonic::metadata::MetadataMap>>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The unary method: echoes, or NOT_FOUND for "missing", or never answers
/// for "hang".
#[derive(Clone)]
struct Unary(Seen);

impl tower_service::Service<tonic::Request<EchoRequest>> for Unary {
    type Response = tonic::Response<EchoReply>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        self.0.lock().unwrap().push(req.metadata().clone());
        let message = req.into_inner().message;
        Box::pin(async move {
            match message.as_str() {
                "missing" => Err(Status::not_found("no such item: missing")),
                "hang" => std::future::pending().await,
                _ => Ok(tonic::Response::new(EchoReply { message })),
            }
        })
    }
}

/// The server-streaming method: `count` replies, then RESOURCE_EXHAUSTED
/// when the message is "overflow".
#[derive(Clone)]
struct ServerStream(Seen);

type Replies = futures_util::stream::Iter<std::vec::IntoIter<Result<EchoReply, Status>>>;

impl tower_service::Service<tonic::Request<EchoRequest>> for ServerStream {
    type Response = tonic::Response<Replies>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        self.0.lock().unwrap().push(req.metadata().clone());
        let req = req.into_inner();
        let mut replies: Vec<Result<EchoReply, Status>> =
            (0..req.count).map(|i| Ok(EchoReply { message: format!("{} #{i}", req.message) })).collect();
        if req.message == "overflow" {
            replies.push(Err(Status::resource_exhausted("enough replies")));
        }
        Box::pin(async move { Ok(tonic::Response::new(futures_util::stream::iter(replies))) })
    }
}

/// A gRPC server on hyper's HTTP/2 server (prior knowledge); what each
/// call's metadata was.
async fn grpc_backend() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let resp = match req.uri().path() {
                            "/echo.Echo/Unary" => {
                                let codec = tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default();
                                tonic::server::Grpc::new(codec).unary(Unary(s), req).await
                            }
                            "/echo.Echo/Stream" => {
                                let codec = tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default();
                                tonic::server::Grpc::new(codec).server_streaming(ServerStream(s), req).await
                            }
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, seen)
}

/// tonic's client over one hyper HTTP/2 connection (h2c) to the gateway.
struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<Result<Self::Response, hyper::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn grpc_client(gateway: SocketAddr) -> tonic::client::Grpc<Channel> {
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    tonic::client::Grpc::with_origin(Channel(sender), format!("http://{gateway}").parse().unwrap())
}

async fn unary(c: &mut tonic::client::Grpc<Channel>, req: tonic::Request<EchoRequest>) -> Result<EchoReply, Status> {
    c.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let call = c.unary(req, http::uri::PathAndQuery::from_static("/echo.Echo/Unary"), codec);
    within(15, "a unary call", call).await.map(tonic::Response::into_inner)
}

fn request(message: &str, count: u32) -> tonic::Request<EchoRequest> {
    tonic::Request::new(EchoRequest { message: message.into(), count })
}

fn config(backend: SocketAddr, extra_route: &str) -> String {
    format!(
        r#"
consumers:
  - name: app
    credentials: [{{ type: key-auth, key: grpc-secret }}]
policies:
  - {{ name: keys, type: key-auth }}
  - {{ name: admins-only, type: acl, config: {{ allow: [admins] }} }}
  - {{ name: one-a-minute, type: rate-limit, config: {{ limits: [{{ limit: 1, window: 1m }}] }} }}
upstreams:
  - name: echo
    targets: [{{ url: "http://{backend}" }}]
    http2: true
  - name: gone
    targets: [{{ url: "http://127.0.0.1:1" }}]
    http2: true
routes:
  - {{ name: echo, path: "/echo.Echo/{{method}}", upstream: echo }}
  - {{ name: keyed, path: "/keyed/echo.Echo/{{method}}", upstream: echo, path_rewrite: "/echo.Echo/{{method}}", policies: [keys] }}
  - {{ name: admins, path: "/admins/echo.Echo/{{method}}", upstream: echo, path_rewrite: "/echo.Echo/{{method}}", policies: [keys, admins-only] }}
  - {{ name: limited, path: "/limited/echo.Echo/{{method}}", upstream: echo, path_rewrite: "/echo.Echo/{{method}}", policies: [one-a-minute] }}
  - {{ name: down, path: "/down/echo.Echo/{{method}}", upstream: gone, path_rewrite: "/echo.Echo/{{method}}" }}
{extra_route}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn unary_and_server_streaming_calls_pass_with_their_statuses() {
    let (addr, seen) = grpc_backend().await;
    let g = gateway(&config(addr, ""));
    let mut c = grpc_client(g.proxy_addr).await;

    assert_eq!(unary(&mut c, request("hello", 0)).await.unwrap().message, "hello");
    let meta = seen.lock().unwrap()[0].clone();
    assert!(meta.get("x-request-id").is_some(), "the call is stamped like any request");
    assert_eq!(meta.get("te").map(|v| v.to_str().unwrap()), Some("trailers"));

    // The backend's status, in a trailers-only answer, with its message.
    let e = unary(&mut c, request("missing", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "no such item: missing");

    // Server streaming: every reply, then the status in the trailers.
    c.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Stream");
    let mut stream = within(15, "stream", c.server_streaming(request("tick", 3), path.clone(), codec)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = within(15, "a reply", stream.message()).await.unwrap() {
        got.push(reply.message);
    }
    assert_eq!(got, ["tick #0", "tick #1", "tick #2"]);

    // A status after data: it can only come in the trailers.
    c.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let mut stream = within(15, "stream", c.server_streaming(request("overflow", 2), path, codec)).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "overflow #0");
    assert_eq!(stream.message().await.unwrap().unwrap().message, "overflow #1");
    let e = within(15, "the trailers", stream.message()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(e.message(), "enough replies");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateways_own_errors_are_grpc_statuses() {
    let (addr, seen) = grpc_backend().await;
    let g = gateway(&config(addr, ""));
    let mut c = grpc_client(g.proxy_addr).await;

    // The backend cannot be reached: 502 becomes UNAVAILABLE.
    let e = unary_at(&mut c, "/down/echo.Echo/Unary", request("hello", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().is_empty());
    // Counted as the 502 it stands for, not as the HTTP 200 it travels in.
    let labels = [("route", "down"), ("status", "5xx")];
    common::metric_until(g.admin_addr, "manifold_requests_total", &labels, |n| n == 1.0, "the 502 counted").await;

    // key-auth refuses: UNAUTHENTICATED, and the backend saw nothing.
    let e = unary_at(&mut c, "/keyed/echo.Echo/Unary", request("hello", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(seen.lock().unwrap().is_empty());
    let mut keyed = request("hello", 0);
    keyed.metadata_mut().insert("apikey", "grpc-secret".parse().unwrap());
    assert_eq!(unary_at(&mut c, "/keyed/echo.Echo/Unary", keyed).await.unwrap().message, "hello");
    assert_eq!(seen.lock().unwrap()[0].get("x-consumer-name").unwrap(), "app");

    // acl: a consumer outside the allowed groups is PERMISSION_DENIED.
    let mut keyed = request("hello", 0);
    keyed.metadata_mut().insert("apikey", "grpc-secret".parse().unwrap());
    let e = unary_at(&mut c, "/admins/echo.Echo/Unary", keyed).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // rate-limit: the second call in the window is RESOURCE_EXHAUSTED.
    assert_eq!(unary_at(&mut c, "/limited/echo.Echo/Unary", request("first", 0)).await.unwrap().message, "first");
    let e = unary_at(&mut c, "/limited/echo.Echo/Unary", request("second", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(seen.lock().unwrap().len(), 2, "refused calls never reached the backend");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_timeout_and_the_route_timeout_the_smaller_wins() {
    let (addr, seen) = grpc_backend().await;
    let slow =
        r#"  - { name: short, path: "/short/echo.Echo/{method}", upstream: echo, path_rewrite: "/echo.Echo/{method}", timeout: 300ms }"#;
    let g = gateway(&config(addr, slow));
    let mut c = grpc_client(g.proxy_addr).await;

    // The client's deadline is the smaller: the backend never answers, the
    // gateway ends the call at the client's deadline, and told the backend.
    let mut asked = request("hang", 0);
    asked.set_timeout(Duration::from_millis(300));
    let e = unary(&mut c, asked).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let sent = seen.lock().unwrap()[0].get("grpc-timeout").unwrap().to_str().unwrap().to_string();
    assert_eq!(sent, "300m");

    // The route's timeout is the smaller: it wins, and the backend is told.
    let mut asked = request("hang", 0);
    asked.set_timeout(Duration::from_secs(600));
    let e = unary_at(&mut c, "/short/echo.Echo/Unary", asked).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let sent = seen.lock().unwrap()[1].get("grpc-timeout").unwrap().to_str().unwrap().to_string();
    assert_eq!(sent, "300m");
    g.shutdown();
}

async fn unary_at(c: &mut tonic::client::Grpc<Channel>, path: &'static str, req: tonic::Request<EchoRequest>) -> Result<EchoReply, Status> {
    c.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let call = c.unary(req, http::uri::PathAndQuery::from_static(path), codec);
    within(15, path, call).await.map(tonic::Response::into_inner)
}
