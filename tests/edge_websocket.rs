//! WebSocket through the gateway (SPEC §7, issue 14 item 4), with a real
//! client and a real echo server (tokio-tungstenite on both ends): routes
//! with `websocket: true` tunnel after their policies admitted the
//! handshake and the backend answered 101; every other route refuses the
//! upgrade before the backend sees it; a quiet tunnel closes at its idle
//! timeout; a 101 the client did not ask for is a 502; HTTP/2 extended
//! CONNECT (RFC 8441) reaches the same HTTP/1.1 backend; a tunnelled
//! connection is out of the head and idle timers; a drain closes tunnels
//! last.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{backend, gateway, gateway_with, proxy_get, within};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket echo server: counts the TCP connections it accepted and
/// keeps the headers of each handshake.
struct EchoServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<http::HeaderMap>>>,
}

// tungstenite's handshake callback returns its (large) error response.
#[allow(clippy::result_large_err)]
async fn echo_server() -> EchoServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let handshakes: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let (a, h) = (accepts.clone(), handshakes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            a.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                let record = |req: &WsRequest, resp: WsResponse| {
                    h.lock().unwrap().push(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    EchoServer { addr, accepts, handshakes }
}

/// A WebSocket handshake over a new connection to the gateway.
async fn ws_connect(
    gateway: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{gateway}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let tcp = TcpStream::connect(gateway).await.unwrap();
    within(15, path, tokio_tungstenite::client_async(req, tcp)).await.map(|(ws, _)| ws)
}

/// The status of a refused handshake.
fn refused_status(e: tokio_tungstenite::tungstenite::Error) -> (u16, serde_json::Value) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp.body().as_ref().map(|b| serde_json::from_slice(b).unwrap_or_default()).unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_echo_passes_through_a_route_that_allows_it() {
    let echo = echo_server().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: ws, path: "/ws/{{*rest}}", upstream: "http://{addr}", path_rewrite: "/{{rest}}", websocket: true }}
"#,
        addr = echo.addr
    ));
    let mut ws = ws_connect(g.proxy_addr, "/ws/chat", &[("x-request-id", "ws-1")]).await.expect("the handshake succeeds");
    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = within(10, "echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(back.to_text().unwrap(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    let back = within(10, "binary echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();

    let seen = echo.handshakes.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["upgrade"], "websocket");
    assert_eq!(seen[0]["x-request-id"], "ws-1", "the handshake is stamped like any request");
    assert!(seen[0].contains_key("sec-websocket-key"));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_on_a_route_without_websocket_is_refused_before_the_backend() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: plain, path: "/plain/{{*rest}}", upstream: "{url}" }}
"#,
        url = b.url()
    ));
    let refused = ws_connect(g.proxy_addr, "/plain/chat", &[]).await.expect_err("no tunnel on a plain route");
    let (status, body) = refused_status(refused);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("upgrade"), "{body}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 0, "the backend never saw the upgrade request");

    // The same route still serves plain requests, and a client that only
    // offers h2c (curl --http2 over http) is served without it.
    let (status, echo) = proxy_get(&g, "/plain/x", &[("connection", "upgrade, http2-settings"), ("upgrade", "h2c")]).await;
    assert_eq!(status, 200);
    assert!(echo["headers"].get("upgrade").is_none(), "{echo}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_refuses_the_handshake_before_the_backend_sees_anything() {
    let echo = echo_server().await;
    let g = gateway(&format!(
        r#"
consumers:
  - name: app
    credentials: [{{ type: key-auth, key: ws-secret }}]
policies:
  - {{ name: keys, type: key-auth }}
routes:
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true, policies: [keys] }}
"#,
        addr = echo.addr
    ));
    let (status, body) = refused_status(ws_connect(g.proxy_addr, "/ws", &[]).await.expect_err("no key"));
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(echo.accepts.load(Ordering::SeqCst), 0, "no connection reached the backend");

    let mut ws = ws_connect(g.proxy_addr, "/ws", &[("apikey", "ws-secret")]).await.expect("admitted with the key");
    ws.send(Message::text("in")).await.unwrap();
    assert_eq!(within(10, "echo", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "in");
    let seen = echo.handshakes.lock().unwrap().clone();
    assert_eq!(seen[0]["x-consumer-name"], "app", "the handshake carries what the policies decided");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_tunnel_is_closed_at_its_idle_timeout() {
    let echo = echo_server().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true, websocket_idle_timeout: 300ms }}
"#,
        addr = echo.addr
    ));
    let mut ws = ws_connect(g.proxy_addr, "/ws", &[]).await.expect("the handshake succeeds");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(within(10, "echo", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "ping");
    // Nothing more is sent: the gateway ends the tunnel, which the client
    // sees as the end of its stream (no close frame: the gateway copies
    // bytes and never writes WebSocket frames of its own).
    let end = within(15, "the idle tunnel closes", ws.next()).await;
    assert!(matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))), "{end:?}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_101_the_client_did_not_ask_for_is_a_502() {
    // A backend that answers every request with a switch of protocols.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n").await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: plain, path: /plain, upstream: "http://{addr}" }}
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true }}
"#
    ));
    let (status, body) = proxy_get(&g, "/plain", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    // On a websocket route a plain request did not ask either.
    let (status, _) = proxy_get(&g, "/ws", &[]).await;
    assert_eq!(status, 502);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_refuses_the_handshake_is_answered_as_it_is() {
    let b = backend().status(403).run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: ws, path: /ws, upstream: "{url}", websocket: true }}
"#,
        url = b.url()
    ));
    let (status, _) = refused_status(ws_connect(g.proxy_addr, "/ws", &[]).await.expect_err("the backend refused"));
    assert_eq!(status, 403);
    let seen = b.seen.lock().unwrap().clone();
    assert_eq!(seen[0]["headers"]["upgrade"][0], "websocket");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_extended_connect_reaches_an_http1_websocket_backend() {
    let echo = echo_server().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true }}
"#,
        addr = echo.addr
    ));
    let tcp = TcpStream::connect(g.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}/ws", g.proxy_addr))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = within(10, "extended CONNECT", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let upgraded = within(10, "the stream upgrades", hyper::upgrade::on(&mut resp)).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(within(10, "echo", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "over h2");
    let seen = echo.handshakes.lock().unwrap().clone();
    assert_eq!(seen[0]["upgrade"], "websocket", "the backend got an HTTP/1.1 handshake");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_closes_open_tunnels_last() {
    let echo = echo_server().await;
    // A backend that holds its answer until the test joins the barrier.
    let release = Arc::new(tokio::sync::Barrier::new(2));
    let slow = backend().barrier(release.clone()).run().await;
    let g = gateway(&format!(
        r#"
routes:
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true }}
  - {{ name: slow, path: /slow, upstream: "{slow}" }}
"#,
        addr = echo.addr,
        slow = slow.url()
    ));
    let proxy = g.proxy_addr;
    let mut ws = ws_connect(proxy, "/ws", &[]).await.expect("the handshake succeeds");
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(within(10, "echo", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "before");
    let url = format!("http://{proxy}/slow");
    let request = tokio::spawn(async move { common::send("GET", &url, None, &[]).await });
    within(10, "the slow request arrives", async {
        while slow.hits.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;

    let stopped = tokio::task::spawn_blocking(move || g.shutdown());
    within(10, "the listener closes", async {
        while TcpStream::connect(proxy).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    // Draining, with a request in flight: the tunnel still carries data.
    ws.send(Message::text("during the drain")).await.unwrap();
    assert_eq!(within(10, "echo", ws.next()).await.unwrap().unwrap().to_text().unwrap(), "during the drain");
    release.wait().await;
    let (status, _, _) = within(10, "the slow request", request).await.unwrap();
    assert_eq!(status, 200, "the request in flight finished");
    // Then the tunnel is closed, and the drain ends.
    let closed = within(30, "the tunnel closes on drain", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed);
    within(30, "the drain ends", stopped).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_is_out_of_the_connections_head_and_idle_timers() {
    let echo = echo_server().await;
    let mut opts = manifold::gateway::GatewayOptions::default();
    opts.server.header_read_timeout = std::time::Duration::from_millis(100);
    opts.server.idle_timeout = std::time::Duration::from_millis(100);
    let g = common::gateway_with(
        &format!(
            r#"
routes:
  - {{ name: ws, path: /ws, upstream: "http://{addr}", websocket: true }}
"#,
            addr = echo.addr
        ),
        opts,
    );
    let mut ws = ws_connect(g.proxy_addr, "/ws", &[]).await.expect("the handshake succeeds");
    // Quiet for many times the connection's idle and head timeouts, and
    // half a frame sent (a head part-way, to a timer that still ran): the
    // tunnel still carries both ways.
    let frame = client_frame(b"after a pause");
    ws.get_mut().write_all(&frame[..3]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    ws.get_mut().write_all(&frame[3..]).await.unwrap();
    let back = within(10, "echo after the pause", ws.next()).await.unwrap().unwrap();
    assert_eq!(back.to_text().unwrap(), "after a pause");
    g.shutdown();
}

/// A masked client text frame (RFC 6455 §5.2), written by hand so a test
/// can send part of one.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_echo_passes_through_the_tls_listener() {
    use tokio_rustls::rustls;
    let echo = echo_server().await;
    let ca = tls::ca("ws tls ca");
    let leaf = tls::leaf(&ca, "ws.test", &["ws.test"], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let mut opts = manifold::gateway::GatewayOptions::default();
    opts.server.tls_listen = Some(([127, 0, 0, 1], 0).into());
    opts.server.default_certificate =
        Some(manifold::server::DefaultCertificate { cert_pem: leaf.cert_pem.clone(), key_pem: leaf.key_pem.clone() });
    let g = gateway_with(
        &format!(
            r#"
routes:
  - {{ name: ws, path: "/ws/{{*rest}}", upstream: "http://{addr}", path_rewrite: "/{{rest}}", websocket: true }}
"#,
            addr = echo.addr
        ),
        opts,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(g.tls_addr.expect("the TLS listener listens")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("ws.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = "wss://ws.test/ws/chat".into_client_request().unwrap();
    let (mut ws, _) = within(15, "handshake over TLS", tokio_tungstenite::client_async(req, stream)).await.expect("the handshake succeeds");
    ws.send(Message::text("over tls")).await.unwrap();
    let back = within(10, "echo over TLS", ws.next()).await.unwrap().unwrap();
    assert_eq!(back.to_text().unwrap(), "over tls");
    assert_eq!(echo.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(echo.handshakes.lock().unwrap()[0]["x-forwarded-proto"], "https");
}
