//! The access log (issue 6): one JSON line per request on stdout, in the
//! operational logs' format, read back from a real `manifold serve`.

mod common;

use std::time::Duration;

use common::{backend, GatewayProcess};
use serde_json::Value;

fn access_lines(gw: &GatewayProcess) -> Vec<Value> {
    gw.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "manifold::access")
        .collect()
}

async fn wait_for_lines(gw: &GatewayProcess, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let lines = access_lines(gw);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    access_lines(gw)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_gets_one_json_line() {
    let b = backend().run().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        format!(
            r#"
consumers:
  - {{ name: app, credentials: [{{ type: key-auth, key: k-app }}] }}
policies:
  - {{ name: keys, type: key-auth }}
routes:
  - {{ name: guarded, path: /guarded, upstream: "{0}", policies: [keys] }}
compositions:
  - name: both
    path: /both
    calls:
      one: {{ url: "{0}/one" }}
"#,
            b.url()
        ),
    )
    .unwrap();
    let gw = GatewayProcess::start_with_env(dir.path(), &[], &[("MANIFOLD_LOG", "info")]);
    let base = format!("http://{}", gw.proxy);
    let (s, _, _) = common::send(
        "POST",
        &format!("{base}/guarded"),
        Some(serde_json::json!({"a": 1})),
        &[("apikey", "k-app"), ("x-request-id", "req-1")],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(common::send("GET", &format!("{base}/guarded"), None, &[("x-request-id", "req-2")]).await.0, 401);
    assert_eq!(common::send("GET", &format!("{base}/both"), None, &[("x-request-id", "req-3")]).await.0, 200);
    assert_eq!(common::send("GET", &format!("{base}/nowhere"), None, &[("x-request-id", "req-4")]).await.0, 404);

    let lines = wait_for_lines(&gw, 4).await;
    assert_eq!(lines.len(), 4, "one line per request: {lines:#?}");
    let by_id = |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap_or_else(|| panic!("no line for {id}: {lines:#?}"));
    let ok = by_id("req-1");
    assert_eq!((ok["route"].as_str(), ok["kind"].as_str(), ok["consumer"].as_str()), (Some("guarded"), Some("route"), Some("app")));
    assert_eq!((ok["method"].as_str(), ok["status"].as_u64(), ok["client"].as_str()), (Some("POST"), Some(200), Some("127.0.0.1")));
    assert_eq!(ok["bytes_in"].as_u64(), Some(7));
    assert!(ok["bytes_out"].as_u64().is_some_and(|n| n > 0), "{ok}");
    assert!(ok["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{ok}");
    assert!(ok["timestamp"].is_string(), "{ok}");
    let refused = by_id("req-2");
    assert_eq!((refused["status"].as_u64(), refused["consumer"].as_str()), (Some(401), None));
    let composed = by_id("req-3");
    assert_eq!(composed["kind"], "composition");
    assert!(composed["calls"].as_str().is_some_and(|c| c.contains("one;dur=")), "per-call durations: {composed}");
    let unmatched = by_id("req-4");
    assert_eq!((unmatched["status"].as_u64(), unmatched["route"].as_str()), (Some(404), None));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_knob_keeps_a_share_of_lines() {
    let b = backend().run().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), format!("routes:\n  - {{ name: r, path: /r, upstream: \"{}\" }}\n", b.url())).unwrap();
    let gw = GatewayProcess::start_with_env(dir.path(), &[], &[("MANIFOLD_LOG", "info"), ("MANIFOLD_ACCESS_LOG_SAMPLE", "0")]);
    for _ in 0..5 {
        assert_eq!(common::send("GET", &format!("http://{}/r", gw.proxy), None, &[]).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(access_lines(&gw).is_empty(), "a sample of 0 writes no access line");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_access_log_file_takes_the_lines_off_stdout() {
    let b = backend().run().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("logs").join("access.log");
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    // The file is appended to, never truncated.
    std::fs::write(&file, "an earlier line\n").unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("c.yaml"),
        format!(
            "routes:\n  - {{ name: r, path: /r, upstream: \"{}\" }}\n  - {{ name: gone, path: /gone, upstream: \"http://127.0.0.1:9\" }}\n",
            b.url()
        ),
    )
    .unwrap();
    let gw = GatewayProcess::start_with_env(&config, &["--access-log-file", file.to_str().unwrap()], &[("MANIFOLD_LOG", "info")]);
    let base = format!("http://{}", gw.proxy);
    assert_eq!(common::send("GET", &format!("{base}/r"), None, &[("x-request-id", "file-1")]).await.0, 200);
    assert_eq!(common::send("GET", &format!("{base}/gone"), None, &[("x-request-id", "file-2")]).await.0, 502);

    let mut lines = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&file).unwrap();
        lines = text.lines().map(str::to_string).collect::<Vec<_>>();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 3, "the earlier line and one per request: {lines:#?}");
    assert_eq!(lines[0], "an earlier line");
    let json: Vec<Value> = lines[1..].iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert!(json.iter().all(|l| l["target"] == "manifold::access"), "only access lines in the file: {json:#?}");
    assert_eq!((json[0]["request_id"].as_str(), json[0]["status"].as_u64()), (Some("file-1"), Some(200)));
    assert_eq!((json[1]["request_id"].as_str(), json[1]["status"].as_u64()), (Some("file-2"), Some(502)));

    // Stdout keeps the operational logs, and none of the access lines; the
    // upstream failure's warning names the request it belongs to.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(access_lines(&gw).is_empty(), "access lines left stdout");
    let log = gw.log.lock().unwrap().clone();
    let warning = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["level"] == "WARN" && v["route"] == "gone")
        .unwrap_or_else(|| panic!("a warning for the failed upstream: {log:#?}"));
    assert_eq!(warning["request_id"], "file-2", "{warning}");
}

#[test]
fn an_access_log_file_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config-dir"])
        .arg(dir.path())
        .args(["--access-log-file", "/nonexistent-dir/access.log"])
        .env_remove("MANIFOLD_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the access log file /nonexistent-dir/access.log"), "{stderr}");
}

/// A backend that answers every request with a chunked body, "hello world"
/// in two chunks, or, on /cut, one chunk and then a closed connection; on
/// /grpc, a trailers-only gRPC error (grpc-status 14).
async fn chunked_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if String::from_utf8_lossy(&head).starts_with("GET /grpc") {
                    // A gRPC error without a body: its status in the head.
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 14\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let cut = String::from_utf8_lossy(&head).starts_with("GET /cut");
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                    .await;
                if cut {
                    return; // the connection closes mid-body
                }
                let _ = conn.write_all(b"6\r\n world\r\n0\r\n\r\n").await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_answer_is_logged_with_the_bytes_sent_once_it_ends() {
    let addr = chunked_backend().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        format!("routes:\n  - {{ name: stream, path: \"/{{*rest}}\", upstream: \"http://{addr}\" }}\n"),
    )
    .unwrap();
    let gw = GatewayProcess::start_with_env(dir.path(), &[], &[("MANIFOLD_LOG", "info")]);
    let resp = reqwest::Client::new().get(format!("http://{}/whole", gw.proxy)).header("x-request-id", "s-1").send().await.unwrap();
    assert!(resp.headers().get("content-length").is_none(), "the answer is streamed");
    assert_eq!(resp.text().await.unwrap(), "hello world");
    // The backend fails mid-body: the client sees an error, the line says so.
    let cut = reqwest::Client::new().get(format!("http://{}/cut", gw.proxy)).header("x-request-id", "s-2").send().await.unwrap();
    assert!(cut.text().await.is_err(), "a body cut short is an error for the client");

    // A gRPC answer's status is its own field (the HTTP status is 200).
    let grpc = reqwest::Client::new().get(format!("http://{}/grpc", gw.proxy)).header("x-request-id", "s-3").send().await.unwrap();
    assert_eq!(grpc.headers()["grpc-status"], "14");

    let lines = wait_for_lines(&gw, 3).await;
    let by_id = |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap_or_else(|| panic!("no line for {id}: {lines:#?}")).clone();
    let whole = by_id("s-1");
    assert_eq!((whole["status"].as_u64(), whole["bytes_out"].as_u64()), (Some(200), Some(11)), "{whole}");
    assert!(whole.get("aborted").is_none_or(Value::is_null), "{whole}");
    let cut = by_id("s-2");
    assert_eq!((cut["bytes_out"].as_u64(), cut["aborted"].as_bool()), (Some(5), Some(true)), "{cut}");
    let grpc = by_id("s-3");
    assert_eq!((grpc["status"].as_u64(), grpc["grpc_status"].as_u64()), (Some(200), Some(14)), "{grpc}");
    assert!(whole.get("grpc_status").is_none_or(Value::is_null), "{whole}");
}
