//! The edges of a node's life, as a real `manifold serve` process shows
//! them: a second gateway on a taken address is refused at start, and on
//! SIGTERM connections with no request in flight close at once while
//! in-flight requests drain.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{backend, client, metric_until, GatewayProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    dir
}

/// Runs `manifold serve` on the given addresses; it must exit within 30 s.
/// Returns its exit code and everything it printed.
fn serve_must_exit(dir: &std::path::Path, proxy: &str, admin: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(["serve", "--proxy-listen", proxy, "--admin-listen", admin, "--config-dir"])
        .arg(dir)
        .env_remove("MANIFOLD_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("manifold starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second gateway on {proxy} / {admin} is still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    (status.code(), out)
}

async fn serves_route(proxy: SocketAddr) {
    for _ in 0..8 {
        let resp = client().get(format!("http://{proxy}/r")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "the first gateway still serves its config");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_gateway_on_the_proxy_address_is_refused_naming_it() {
    let b = backend().run().await;
    let dir = config_dir(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()));
    let first = GatewayProcess::start(dir.path(), &[]);
    // The second one's config has no route: were the port shared, some of
    // the first one's requests would get its 404.
    let other = config_dir("routes: []");
    let proxy = first.proxy.to_string();
    let (code, out) = tokio::task::spawn_blocking(move || serve_must_exit(other.path(), &proxy, "127.0.0.1:0")).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    let expected = format!("cannot listen on {} for the proxy: the address is in use by another process", first.proxy);
    assert!(out.contains(&expected), "names the address:\n{out}");
    serves_route(first.proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_gateway_on_the_admin_address_is_refused_naming_it() {
    let b = backend().run().await;
    let dir = config_dir(&format!("routes: [{{ name: r, path: /r, upstream: \"{}\" }}]", b.url()));
    let first = GatewayProcess::start(dir.path(), &[]);
    let other = config_dir("routes: []");
    let admin = first.admin.to_string();
    let (code, out) = tokio::task::spawn_blocking(move || serve_must_exit(other.path(), "127.0.0.1:0", &admin)).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    let expected = format!("cannot listen on {} for the admin API: the address is in use by another process", first.admin);
    assert!(out.contains(&expected), "names the address:\n{out}");
    serves_route(first.proxy).await;
    let resp = client().get(format!("http://{}/metrics", first.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the first gateway's admin API still answers");
}

/// Reads one response with a `content-length` body; returns its head.
async fn read_response(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed mid-response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).expect("a content-length");
            if buf.len() >= end + 4 + len {
                return head;
            }
        }
    }
}

/// Waits (at most 5 s) for the gateway to close `conn`: EOF or a reset.
async fn closed_by_gateway(conn: &mut TcpStream, what: &str) {
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: the gateway sent {:?} instead of closing", String::from_utf8_lossy(&chunk[..n])),
        Err(_) => panic!("{what}: still open 5 s after SIGTERM"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_connections_without_a_request_in_flight_and_drains_the_rest() {
    let slow = backend().delay(Duration::from_secs(2)).run().await;
    let fast = backend().run().await;
    let dir = config_dir(&format!(
        "routes:\n  - {{ name: slow, path: /slow, upstream: \"{}\" }}\n  - {{ name: fast, path: /fast, upstream: \"{}\" }}\n",
        slow.url(),
        fast.url()
    ));
    // The header timeout (10 s) and the idle timeout (60 s) are far beyond
    // the 5 s this test waits for a connection to close.
    let mut gw = GatewayProcess::start(dir.path(), &["--drain-timeout", "20s"]);

    // Half a head, on a connection that never completed a request.
    let mut half_head = TcpStream::connect(gw.proxy).await.unwrap();
    half_head.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Connected, nothing sent.
    let mut fresh = TcpStream::connect(gw.proxy).await.unwrap();
    // One request answered, then idle on keep-alive.
    let mut keep_alive = TcpStream::connect(gw.proxy).await.unwrap();
    keep_alive.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let head = read_response(&mut keep_alive).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Half a head after a request, on another keep-alive connection.
    let mut half_second_head = TcpStream::connect(gw.proxy).await.unwrap();
    half_second_head.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_response(&mut half_second_head).await;
    half_second_head.write_all(b"GET /fast HTTP/1.1\r\nHo").await.unwrap();

    let url = format!("http://{}/slow", gw.proxy);
    let arrived = slow.arrived.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let in_flight = tokio::spawn(async move {
        let resp = client().get(&url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    arrived.await;
    // Every connection above has been accepted (one in flight, four not):
    // closing them is the gateway's doing, not a dropped backlog's.
    metric_until(gw.admin, "manifold_open_connections", &[], |v| v >= 5.0, "five open connections").await;

    gw.signal("TERM");
    closed_by_gateway(&mut half_head, "a first head part-way").await;
    closed_by_gateway(&mut fresh, "a connection that sent nothing").await;
    closed_by_gateway(&mut keep_alive, "an idle keep-alive connection").await;
    closed_by_gateway(&mut half_second_head, "a second head part-way").await;
    assert!(!in_flight.is_finished(), "the idle connections closed before the in-flight request ended, not after");

    let (status, body) = common::within(20, "the in-flight request", in_flight).await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished: {body}");
    assert_eq!(gw.exit_code(Duration::from_secs(20)).await, Some(0), "exits 0 after draining");
}
