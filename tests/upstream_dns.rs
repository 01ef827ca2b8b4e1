//! An upstream's `resolve_every` (SPEC §6): a target whose host is a name
//! stands for every address the name has, looked up in the node's hosts
//! file first and re-read on the period; addresses join and leave the
//! pool without a config change, each sent the name as `Host`, and a
//! failed resolution keeps the last addresses. Every 127/8 address is
//! local on Linux, so two backends on one port at 127.0.0.2 and 127.0.0.3
//! are one name's two addresses. No timing assertions: the tests poll the
//! health report until the pool is what the file says.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{backend, gateway, gateway_with, health_until, upstream_health, Backend};
use manifold::gateway::{Gateway, GatewayOptions};
use serde_json::{json, Value};

async fn get(g: &Gateway, path: &str) -> (u16, Value) {
    common::proxy_get(g, path, &[]).await
}

/// Two listeners on the same port, at 127.0.0.2 and 127.0.0.3.
async fn twin_listeners() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        if let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.3", port)).await {
            return (first, second);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Two backends on the same port, at 127.0.0.2 and 127.0.0.3.
async fn twins() -> (Backend, Backend) {
    let (first, second) = twin_listeners().await;
    (backend().serve(first), backend().serve(second))
}

/// Replaces the hosts file at once (a rename), so a resolution never
/// reads half of it.
fn write_hosts(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn labels(report: &Value) -> Vec<String> {
    report["targets"].as_array().unwrap().iter().map(|t| t["target"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_is_re_resolved_through_the_hosts_file() {
    let (two, three) = twins().await;
    let port = two.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, "# test hosts\n127.0.0.1 localhost\n127.0.0.2 svc.test\n");
    let g = gateway_with(
        &format!(
            "upstreams:\n  - name: svc\n    targets: [{{ url: \"http://svc.test:{port}\", weight: 50 }}]\n    resolve_every: 1s\nroutes:\n  - {{ name: r, path: /r, upstream: svc }}\n"
        ),
        GatewayOptions { hosts_file: Some(hosts.clone()), ..Default::default() },
    );
    let name = format!("http://svc.test:{port}");
    let label = |ip: &str| format!("{name} ({ip})");

    let report = health_until(g.admin_addr, "svc", 15, "svc.test resolved to 127.0.0.2", |r| labels(r) == [label("127.0.0.2")]).await;
    assert_eq!(report["targets"][0]["weight"], 50, "each address has the name's weight: {report}");
    for _ in 0..6 {
        let (status, body) = get(&g, "/r").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["headers"]["host"], json!([format!("svc.test:{port}")]), "the name is the Host: {body}");
    }
    assert_eq!((two.hits.load(Ordering::SeqCst), three.hits.load(Ordering::SeqCst)), (6, 0));

    // Both addresses: both take traffic, no config change.
    write_hosts(&hosts, "127.0.0.1 localhost\n127.0.0.2 svc.test\n127.0.0.3 other.test svc.test\n");
    health_until(g.admin_addr, "svc", 15, "svc.test resolved to both", |r| labels(r) == [label("127.0.0.2"), label("127.0.0.3")]).await;
    let (h2, h3) = (two.hits.load(Ordering::SeqCst), three.hits.load(Ordering::SeqCst));
    for _ in 0..10 {
        let (status, body) = get(&g, "/r").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["headers"]["host"], json!([format!("svc.test:{port}")]), "{body}");
    }
    assert_eq!((two.hits.load(Ordering::SeqCst) - h2, three.hits.load(Ordering::SeqCst) - h3), (5, 5));

    // Only 127.0.0.3.
    write_hosts(&hosts, "127.0.0.3 SVC.test\n");
    let report = health_until(g.admin_addr, "svc", 15, "svc.test resolved to 127.0.0.3", |r| labels(r) == [label("127.0.0.3")]).await;
    assert_eq!(report["usable"], 1);
    let (h2, h3) = (two.hits.load(Ordering::SeqCst), three.hits.load(Ordering::SeqCst));
    for _ in 0..6 {
        assert_eq!(get(&g, "/r").await.0, 200);
    }
    assert_eq!((two.hits.load(Ordering::SeqCst) - h2, three.hits.load(Ordering::SeqCst) - h3), (0, 6));

    // The name is gone from the file, and the system resolver knows no
    // svc.test: the last addresses are kept. Two periods and more pass.
    write_hosts(&hosts, "127.0.0.1 localhost\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = upstream_health(g.admin_addr, "svc").await;
    assert_eq!(labels(&report), [label("127.0.0.3")], "{report}");
    for _ in 0..6 {
        let (status, body) = get(&g, "/r").await;
        assert_eq!(status, 200, "a failed resolution keeps the last addresses: {body}");
    }
    assert_eq!(three.hits.load(Ordering::SeqCst) - h3, 12);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_address_is_replaced_when_the_hosts_file_changes() {
    // 127.0.0.2 is listed but nothing listens there; once the file lists
    // 127.0.0.3 instead, the pool follows, and requests succeed again.
    let (two, three) = twin_listeners().await;
    let port = two.local_addr().unwrap().port();
    drop(two);
    let three = backend().serve(three);
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, "127.0.0.2 svc.test\n");
    let g = gateway_with(
        &format!(
            "upstreams:\n  - name: svc\n    targets: [{{ url: \"http://svc.test:{port}\" }}, {{ url: \"http://127.0.0.3:{port}\" }}]\n    resolve_every: 1s\nroutes:\n  - {{ name: r, path: /r, upstream: svc }}\n"
        ),
        GatewayOptions { hosts_file: Some(hosts.clone()), ..Default::default() },
    );
    // An IP target stays as written, next to the name's addresses.
    health_until(g.admin_addr, "svc", 15, "svc.test resolved", |r| {
        labels(r) == [format!("http://svc.test:{port} (127.0.0.2)"), format!("http://127.0.0.3:{port}")]
    })
    .await;
    write_hosts(&hosts, "127.0.0.3 svc.test\n");
    health_until(g.admin_addr, "svc", 15, "svc.test resolved again", |r| {
        labels(r) == [format!("http://svc.test:{port} (127.0.0.3)"), format!("http://127.0.0.3:{port}")]
    })
    .await;
    for _ in 0..6 {
        assert_eq!(get(&g, "/r").await.0, 200);
    }
    assert!(three.hits.load(Ordering::SeqCst) >= 6);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_without_resolve_every_is_one_target() {
    let b = backend().run().await;
    let port = b.addr.port();
    let g = gateway(&format!(
        "upstreams:\n  - name: local\n    targets: [{{ url: \"http://localhost:{port}\" }}]\n    health:\n      passive: {{ failures: 5 }}\nroutes:\n  - {{ name: r, path: /r, upstream: local }}\n"
    ));
    let report = upstream_health(g.admin_addr, "local").await;
    assert_eq!(labels(&report), [format!("http://localhost:{port}")], "{report}");
    for _ in 0..4 {
        let (status, body) = get(&g, "/r").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["headers"]["host"], json!([format!("localhost:{port}")]), "{body}");
    }
    // Still one target later on: nothing re-resolves it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(labels(&upstream_health(g.admin_addr, "local").await), [format!("http://localhost:{port}")]);
    g.shutdown();
}

/// Right after the gateway starts, before its resolver task first ran, a
/// name of an upstream with `resolve_every` already has the hosts file's
/// addresses (read when the config compiles): a name only the hosts file
/// knows is never sent to the system's resolver.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_request_after_start_already_uses_the_hosts_file() {
    let b = backend().run().await;
    let port = b.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, "127.0.0.1 first.test\n");
    let g = gateway_with(
        &format!(
            "upstreams:\n  - name: svc\n    targets: [{{ url: \"http://first.test:{port}\" }}]\n    resolve_every: 1s\nroutes:\n  - {{ name: r, path: /r, upstream: svc }}\n"
        ),
        GatewayOptions { hosts_file: Some(hosts.clone()), ..Default::default() },
    );
    let report = upstream_health(g.admin_addr, "svc").await;
    let (status, body) = get(&g, "/r").await;
    assert_eq!(status, 200, "the first request: {body} (the pool then: {report})");
    g.shutdown();
}

/// A hosts file that cannot be read is an error when the node starts,
/// naming the file: never names that silently do not resolve.
#[test]
fn an_unreadable_hosts_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-hosts");
    let config = manifold::config::load::config_from_text(
        "upstreams:\n  - { name: svc, targets: [{ url: \"http://svc.test:1\" }], resolve_every: 1s }\nroutes:\n  - { name: r, path: /r, upstream: svc }\n",
        manifold::config::Format::Yaml,
    )
    .unwrap();
    let opts = GatewayOptions { hosts_file: Some(missing.clone()), ..Default::default() };
    let err = match Gateway::start(opts, config) {
        Ok(g) => {
            g.shutdown();
            panic!("a gateway started with a hosts file that does not exist");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot read the hosts file") && err.contains("no-such-hosts"), "{err}");
}
