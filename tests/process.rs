//! What only a real `manifold serve` process shows: flat memory under a
//! streamed upload, graceful shutdown on SIGTERM, and the demo.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{backend, client, GatewayProcess};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn proxy_variables_are_ignored_and_redirects_passed_on() {
    let moved = backend().status(302).json(serde_json::json!({"moved": true})).run().await;
    let dir = config_dir(&format!("routes: [{{ name: moved, path: /moved, upstream: \"{}\" }}]", moved.url()));
    // A proxy that does not exist: were it used, every request would fail.
    let gw = GatewayProcess::start_with_env(
        dir.path(),
        &[],
        &[("HTTP_PROXY", "http://127.0.0.1:1"), ("http_proxy", "http://127.0.0.1:1"), ("ALL_PROXY", "http://127.0.0.1:1")],
    );
    let resp = client().get(format!("http://{}/moved", gw.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 302, "the redirect is the client's to follow");
    assert_eq!(moved.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_upload_streams_through_with_flat_memory() {
    let b = backend().run().await;
    let dir = config_dir(&format!("routes: [{{ name: up, path: /up, upstream: \"{}\" }}]", b.url()));
    let gw = GatewayProcess::start(dir.path(), &[]);
    // Warm up, then take the baseline.
    client().post(format!("http://{}/up", gw.proxy)).body("x").send().await.unwrap();
    let baseline = gw.peak_rss_kib();

    const CHUNK: usize = 256 << 10;
    const TOTAL: u64 = 1 << 30;
    let chunk = Bytes::from(vec![b'm'; CHUNK]);
    let chunks = (TOTAL / CHUNK as u64) as usize;
    let stream = futures_util::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = client().post(format!("http://{}/up", gw.proxy)).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["body_bytes"], TOTAL, "every byte reached the backend");

    let peak = gw.peak_rss_kib();
    eprintln!("gateway peak RSS: {baseline} KiB before, {peak} KiB after a 1 GiB upload");
    // Buffering even a small part of the body would show here: the bound is
    // 32 MiB of growth for 1024 MiB sent.
    assert!(peak < baseline + 32 * 1024, "RSS grew from {baseline} KiB to {peak} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let slow = backend().delay(Duration::from_millis(1500)).run().await;
    let dir = config_dir(&format!("routes: [{{ name: slow, path: /slow, upstream: \"{}\" }}]", slow.url()));
    let mut gw = GatewayProcess::start(dir.path(), &["--drain-timeout", "10s"]);
    let url = format!("http://{}/slow", gw.proxy);
    // Waiting for the backend is registered before the request goes out:
    // `notify_waiters` wakes only waiters that exist already.
    let arrived = slow.arrived.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let in_flight = tokio::spawn(async move {
        let resp = client().get(&url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    arrived.await;
    gw.signal("TERM");
    // New connections are refused once the listeners close.
    let proxy = gw.proxy;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if std::net::TcpStream::connect(proxy).is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished: {body}");
    assert_eq!(gw.exit_code(Duration::from_secs(10)).await, Some(0), "exits 0 after draining");
    let log = gw.log.lock().unwrap().join("\n");
    assert!(log.contains("shutting down") && log.contains("SIGTERM"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_serves_the_shipped_config() {
    let gw = GatewayProcess::start(std::path::Path::new("compositions"), &["--demo"]);
    let resp = client().get(format!("http://{}/api/users/1", gw.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let user: Value = resp.json().await.unwrap();
    assert_eq!(user["name"], "Ada Lovelace");

    let resp = client().get(format!("http://{}/api/users/999", gw.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 404, "the users service's own 404 passes through");

    // The dashboard composition: three demo services, one reshaped answer.
    let resp = client().get(format!("http://{}/v1/users/1/dashboard", gw.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["server-timing"].to_str().unwrap().contains("total;dur="));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["name"], "Ada Lovelace");
    assert_eq!(body["orders"].as_array().unwrap().len(), 3);
    assert_eq!(body["rating"], 4.5);
    let resp = client().get(format!("http://{}/v1/users/999/dashboard", gw.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 404, "the required user call's 404 passes through");
}

fn manifold(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifold")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// What a new user reads first: every setting's variable is in `--help`.
#[test]
fn help_names_every_variable_a_command_reads() {
    let (_, serve, _) = manifold(&["serve", "--help"]);
    for var in ["MANIFOLD_ACCESS_LOG_SAMPLE", "MANIFOLD_ACCESS_LOG_FILE", "MANIFOLD_ADMIN_TOKEN", "MANIFOLD_CONFIG_DIR"] {
        assert!(serve.contains(var), "serve --help names {var}:\n{serve}");
    }
    for cmd in ["export", "sync"] {
        let (_, help, _) = manifold(&[cmd, "--help"]);
        assert!(help.contains("MANIFOLD_ADMIN_TOKEN"), "{cmd} --help names the admin token variable:\n{help}");
    }
    let (code, _, err) = manifold(&["serve", "--access-log-sample", "2"]);
    assert_eq!(code, Some(2), "a share over 1 is refused: {err}");
}

/// A config error at start-up is printed once, naming file and field.
#[test]
fn serve_prints_a_config_error_once() {
    let dir = config_dir("routes:\n  - { name: r, path: /r, upstream: \"http://127.0.0.1:9\", timeout: 5 parsecs }\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(["serve", "--config-dir", dir.path().to_str().unwrap(), "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(all.matches("routes.r.timeout").count(), 1, "the error once:\n{all}");
    assert!(all.contains("gateway.yaml"), "{all}");
}
