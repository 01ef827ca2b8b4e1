//! The edges of a node's life, as a real `manifold serve` process shows
//! them: a second gateway on a taken address is refused at start.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{backend, client, GatewayProcess};

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
