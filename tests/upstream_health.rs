//! An upstream's `health` (SPEC §6) on real sockets: active checks take a
//! target out and bring it back, passive ejection takes a failing target
//! out for `eject_for` within `max_ejected`, picks skip what is out (503
//! `upstream_unavailable` when nothing is left), a target killed under load
//! costs no request with retries on, a client's broken upload never counts
//! against a target, health survives config swaps that leave the upstream
//! alone, and consistent hashing moves only the keys of an ejected target.
//! No timing assertions: each test polls the admin API's health report
//! until the state it waits for (with a generous bound).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, client, gateway, health_until, metric, target_report, upstream_health, within, Backend};
use manifold::gateway::Gateway;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEALTHY: &str = "manifold_upstream_target_healthy";
const EJECTIONS: &str = "manifold_upstream_ejections_total";
const CHECKS: &str = "manifold_upstream_health_checks_total";
const UNAVAILABLE: &str = "manifold_upstream_unavailable_total";
const FAILURES: &str = "manifold_upstream_failures_total";
const RETRIES: &str = "manifold_upstream_retries_total";

use common::proxy_get as get;

/// Requests a backend saw whose path starts with `prefix` (its health
/// checks apart).
fn served(b: &Backend, prefix: &str) -> usize {
    b.seen.lock().unwrap().iter().filter(|e| e["path"].as_str().is_some_and(|p| p.starts_with(prefix))).count()
}

/// A backend whose `/health` answers 200 while `up` holds, else 503, and
/// whose other paths answer 200 with the echo document.
async fn switchable(up: Arc<AtomicBool>) -> Backend {
    backend()
        .respond(move |echo| {
            if echo["path"] == "/health" {
                (if up.load(Ordering::SeqCst) { 200 } else { 503 }, json!({}))
            } else {
                (200, echo.clone())
            }
        })
        .run()
        .await
}

/// A backend answering 500 while `failing` holds, else 200 with the echo.
async fn failing_when(failing: Arc<AtomicBool>) -> Backend {
    backend().respond(move |echo| (if failing.load(Ordering::SeqCst) { 500 } else { 200 }, echo.clone())).run().await
}

fn state<'a>(report: &'a Value, target: &str) -> &'a str {
    target_report(report, target)["state"].as_str().unwrap()
}

// ---------------------------------------------------------------------------
// 1. active checks

#[tokio::test(flavor = "multi_thread")]
async fn active_checks_take_a_target_out_and_bring_it_back() {
    let up = Arc::new(AtomicBool::new(true));
    let (a, b) = (switchable(up.clone()).await, switchable(Arc::new(AtomicBool::new(true))).await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      active: {{ path: /health, interval: 100ms, timeout: 2s, unhealthy_after: 2, healthy_after: 2 }}\nroutes:\n  - {{ name: r, path: \"/r/{{*rest}}\", upstream: pool }}\n",
        a.url(),
        b.url()
    ));
    let report = health_until(g.admin_addr, "pool", 15, "both checked and passing", |r| {
        r["targets"].as_array().unwrap().iter().all(|t| t["active"]["checks_passed"].as_u64().unwrap_or(0) >= 1)
    })
    .await;
    assert_eq!(report["upstream"], "pool");
    assert_eq!(report["checks"], json!({"active": true, "passive": false}));
    assert_eq!(report["usable"], 2);
    let ta = target_report(&report, &a.url());
    assert_eq!((ta["state"].as_str(), ta["weight"].as_u64()), (Some("healthy"), Some(100)), "{report}");
    assert!(ta["passive"].is_null(), "{report}");
    assert_eq!(ta["active"]["last_check"]["status"], 200, "{report}");
    // The checks are GETs of the path, with their own User-Agent.
    {
        let seen = a.seen.lock().unwrap();
        let check = seen.iter().find(|e| e["path"] == "/health").expect("a health check reached a");
        assert_eq!(check["method"], "GET");
        assert_eq!(check["headers"]["user-agent"], json!(["manifold-health-check"]), "{check}");
    }

    // a goes bad: out after 2 failed checks in a row.
    up.store(false, Ordering::SeqCst);
    let report = health_until(g.admin_addr, "pool", 15, "a unhealthy", |r| state(r, &a.url()) == "unhealthy").await;
    assert_eq!(report["usable"], 1, "{report}");
    let ta = target_report(&report, &a.url());
    assert!(ta["active"]["failed_in_a_row"].as_u64().unwrap() >= 2, "{report}");
    assert!(ta["active"]["checks_failed"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(ta["active"]["passed_in_a_row"], 0, "{report}");
    assert_eq!(state(&report, &b.url()), "healthy");

    let (a0, b0) = (served(&a, "/r/"), served(&b, "/r/"));
    for i in 0..20 {
        let (status, body) = get(&g, &format!("/r/x/{i}"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(served(&a, "/r/") - a0, 0, "an unhealthy target gets no traffic");
    assert_eq!(served(&b, "/r/") - b0, 20);

    let a_url = a.url();
    let a_labels = [("upstream", "pool"), ("target", a_url.as_str())];
    assert_eq!(metric(g.admin_addr, HEALTHY, &a_labels).await, 0.0);
    assert_eq!(metric(g.admin_addr, HEALTHY, &[a_labels[0], a_labels[1], ("state", "unhealthy")]).await, 0.0);
    assert_eq!(metric(g.admin_addr, HEALTHY, &[("upstream", "pool"), ("target", &b.url()), ("state", "healthy")]).await, 1.0);
    let scraped = common::scrape(g.admin_addr).await;
    assert!(
        scraped
            .samples
            .iter()
            .any(|s| s.metric == HEALTHY && s.labels.get("target") == Some(&a.url()) && s.labels.get("state") == Some("unhealthy")),
        "a's gauge says unhealthy"
    );
    assert!(metric(g.admin_addr, CHECKS, &[a_labels[0], a_labels[1], ("result", "failed")]).await >= 2.0);
    assert!(metric(g.admin_addr, CHECKS, &[a_labels[0], a_labels[1], ("result", "passed")]).await >= 1.0);
    assert_eq!(metric(g.admin_addr, CHECKS, &[("upstream", "pool"), ("target", &b.url()), ("result", "failed")]).await, 0.0);

    // a is good again: back after 2 passed checks in a row, and it takes
    // its share again (equal weights alternate).
    up.store(true, Ordering::SeqCst);
    let report = health_until(g.admin_addr, "pool", 15, "a healthy again", |r| state(r, &a.url()) == "healthy").await;
    assert_eq!(report["usable"], 2, "{report}");
    assert!(target_report(&report, &a.url())["active"]["passed_in_a_row"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(metric(g.admin_addr, HEALTHY, &a_labels).await, 1.0);
    let (a0, b0) = (served(&a, "/r/"), served(&b, "/r/"));
    for i in 0..20 {
        let (status, body) = get(&g, &format!("/r/y/{i}"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!((served(&a, "/r/") - a0, served(&b, "/r/") - b0), (10, 10));
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 2. nothing usable

#[tokio::test(flavor = "multi_thread")]
async fn no_healthy_target_is_503_upstream_unavailable_for_routes_and_calls() {
    let down = Arc::new(AtomicBool::new(false));
    let (a, b) = (switchable(down.clone()).await, switchable(down.clone()).await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      active: {{ path: /health, interval: 100ms, unhealthy_after: 1 }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\ncompositions:\n  - {{ name: c, path: /c, calls: {{ me: {{ upstream: pool, path: /me }} }} }}\n",
        a.url(),
        b.url()
    ));
    health_until(g.admin_addr, "pool", 15, "every target unhealthy", |r| r["usable"] == 0).await;

    let (status, body) = get(&g, "/r", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    assert_eq!(body["error"]["message"], "no target of the upstream is healthy", "{body}");
    assert!(body["error"]["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{body}");
    assert_eq!(metric(g.admin_addr, UNAVAILABLE, &[("upstream", "pool"), ("route", "r"), ("call", "")]).await, 1.0);

    // A composition call naming the upstream fails as `unavailable`: 503
    // for a required call.
    let (status, body) = get(&g, "/c", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    assert!(body["error"]["request_id"].is_string(), "{body}");
    assert_eq!(metric(g.admin_addr, UNAVAILABLE, &[("upstream", "pool"), ("route", "c"), ("call", "me")]).await, 1.0);
    assert_eq!(
        metric(g.admin_addr, "manifold_backend_call_failures_total", &[("composition", "c"), ("call", "me"), ("kind", "unavailable")])
            .await,
        1.0
    );
    assert_eq!((served(&a, "/r") + served(&a, "/me"), served(&b, "/r") + served(&b, "/me")), (0, 0), "nothing was sent");

    // Back up: served again.
    down.store(true, Ordering::SeqCst);
    health_until(g.admin_addr, "pool", 15, "targets healthy again", |r| r["usable"] == 2).await;
    assert_eq!(get(&g, "/r", &[]).await.0, 200);
    assert_eq!(get(&g, "/c", &[]).await.0, 200);
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 3. passive ejection

#[tokio::test(flavor = "multi_thread")]
async fn passive_failures_eject_a_target_for_eject_for() {
    let (good, bad) = (backend().run().await, backend().status(500).run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 3, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        good.url(),
        bad.url()
    ));
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(report["checks"], json!({"active": false, "passive": true}));
    assert_eq!(target_report(&report, &bad.url())["passive"], json!({"failures_in_window": 0, "ejections": 0, "ejected_for_ms": 0}));
    assert!(target_report(&report, &bad.url())["active"].is_null());

    // Sequential requests alternate: the bad target's third 500 ejects it.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(&g, "/r", &[]).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 500, 500, 500]);
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(state(&report, &bad.url()), "ejected", "{report}");
    assert_eq!(report["usable"], 1);
    let passive = &target_report(&report, &bad.url())["passive"];
    assert_eq!(passive["ejections"], 1, "{report}");
    let left = passive["ejected_for_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 60_000, "{report}");
    assert_eq!(state(&report, &good.url()), "healthy");
    assert_eq!(metric(g.admin_addr, EJECTIONS, &[("upstream", "pool"), ("target", &bad.url())]).await, 1.0);
    assert_eq!(metric(g.admin_addr, HEALTHY, &[("upstream", "pool"), ("target", &bad.url()), ("state", "ejected")]).await, 0.0);
    assert_eq!(metric(g.admin_addr, HEALTHY, &[("upstream", "pool"), ("target", &good.url()), ("state", "healthy")]).await, 1.0);

    for _ in 0..20 {
        assert_eq!(get(&g, "/r", &[]).await.0, 200);
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), 3, "an ejected target gets no traffic");
    assert_eq!(good.hits.load(Ordering::SeqCst), 23);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn max_ejected_caps_the_share_of_the_pool_ejected() {
    let (good, bad1, bad2) = (backend().run().await, backend().status(500).run().await, backend().status(500).run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 3, window: 10s, eject_for: 60s, max_ejected: 50% }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        good.url(),
        bad1.url(),
        bad2.url()
    ));
    // floor(50% × 3) = 1: one of the two failing targets is ejected, the
    // other keeps its traffic (and its 500s).
    for _ in 0..30 {
        let status = get(&g, "/r", &[]).await.0;
        assert!(status == 200 || status == 500, "{status}");
    }
    let report = upstream_health(g.admin_addr, "pool").await;
    let states: Vec<&str> = [&good, &bad1, &bad2].iter().map(|b| state(&report, &b.url())).collect();
    assert_eq!(states[0], "healthy", "{report}");
    let mut bad_states = states[1..].to_vec();
    bad_states.sort();
    assert_eq!(bad_states, ["ejected", "healthy"], "{report}");
    assert_eq!(report["usable"], 2);
    assert_eq!(metric(g.admin_addr, EJECTIONS, &[("upstream", "pool")]).await, 1.0);
    let kept = if states[1] == "healthy" { &bad1 } else { &bad2 };
    let before = kept.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        get(&g, "/r", &[]).await;
    }
    assert_eq!(kept.hits.load(Ordering::SeqCst) - before, 5, "the failing target over max_ejected keeps its share");
    assert_eq!(metric(g.admin_addr, EJECTIONS, &[("upstream", "pool")]).await, 1.0);
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 4. a target killed under load

/// Not a test: the body of a backend process for `kill_one_under_load`,
/// which runs this binary again with `HEALTH_BACKEND_PROCESS=1`. Binds
/// 127.0.0.1:0, prints `PORT <n>`, and serves HTTP/1.1 keep-alive until
/// killed, answering after `HEALTH_BACKEND_DELAY_MS`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a backend process, run by kill_one_under_load"]
async fn backend_process() {
    if std::env::var_os("HEALTH_BACKEND_PROCESS").is_none() {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let delay = Duration::from_millis(std::env::var("HEALTH_BACKEND_DELAY_MS").ok().and_then(|d| d.parse().ok()).unwrap_or(0));
    println!("PORT {port}");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                tokio::time::sleep(delay).await;
                let body = json!({ "port": port }).to_string();
                let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                Ok::<_, std::convert::Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A backend in its own process (this test binary run again).
struct BackendProcess {
    child: Child,
    port: u16,
}

impl BackendProcess {
    fn start(delay_ms: u64) -> BackendProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["backend_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("HEALTH_BACKEND_PROCESS", "1")
            .env("HEALTH_BACKEND_DELAY_MS", delay_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the backend process starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness prints `test backend_process ... ` first.
                if let Some((_, p)) = line.split_once("PORT ") {
                    let _ = tx.send(p.trim().parse::<u16>().unwrap());
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("the backend process reports its port");
        BackendProcess { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: its connections die with it, pooled ones included.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What killing one of three backend processes under load cost.
struct KillOutcome {
    ok: usize,
    /// Requests that did not get a 200.
    failed: usize,
    /// Tries that failed because a connection to the killed target broke
    /// after the request was sent (`cause="closed"`).
    closed: f64,
}

/// Three backend processes (answering after `delay_ms`), six clients,
/// one backend SIGKILLed mid-load; the load goes on until the health
/// report says it is ejected and for a while after. Checks what holds
/// whatever the timing: the ejection, once, within `failures` plus one
/// failure per client, the retries, the others healthy.
async fn kill_one_under_load(delay_ms: u64) -> KillOutcome {
    let mut procs: Vec<BackendProcess> = (0..3).map(|_| BackendProcess::start(delay_ms)).collect();
    let list = procs.iter().map(|p| format!("{{ url: \"{}\" }}", p.url())).collect::<Vec<_>>().join(", ");
    // The default budget (20%): refused connections are retried outside
    // it, and the few requests the killed process held (at most two of six
    // clients' at once) are within its floor of 3.
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{list}]\n    retries: {{ max: 2 }}\n    health:\n      passive: {{ failures: 3, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n"
    ));
    // Every backend answers before the load starts.
    for _ in 0..3 {
        assert_eq!(get(&g, "/r", &[]).await.0, 200);
    }
    const CLIENTS: usize = 6;
    let load = common::Load::start(&format!("http://{}/r", g.proxy_addr), CLIENTS);
    within(60, "load running", async {
        while load.ok() < 300 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let killed = procs[1].url();
    procs[1].kill();
    let report = health_until(g.admin_addr, "pool", 15, "the killed target ejected", |r| state(r, &killed) == "ejected").await;
    assert_eq!(target_report(&report, &killed)["passive"]["ejections"], 1, "{report}");
    // More load once it is out.
    let after_ejection = load.ok();
    within(60, "load after the ejection", async {
        while load.ok() < after_ejection + 300 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (ok, failed) = load.stop().await;
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(state(&report, &killed), "ejected", "{report}");
    assert_eq!(target_report(&report, &killed)["passive"]["ejections"], 1, "{report}");
    assert_eq!(report["usable"], 2, "{report}");
    for p in [&procs[0], &procs[2]] {
        assert_eq!(state(&report, &p.url()), "healthy", "{report}");
    }
    // Every failed try was the killed target's: `failures` to eject it,
    // plus at most one per client for requests picked before the ejection
    // took effect.
    let failed_tries = metric(g.admin_addr, FAILURES, &[("route", "r")]).await;
    assert!(failed_tries >= 3.0, "{failed_tries}");
    assert!(failed_tries <= (3 + CLIENTS) as f64, "{failed_tries} tries failed: the ejection came late");
    // Every refused connection and every connection the kill broke under
    // a request was sent again (reasons `connect` and `closed`).
    let retried = metric(g.admin_addr, RETRIES, &[("upstream", "pool"), ("route", "r")]).await;
    let connect = metric(g.admin_addr, FAILURES, &[("route", "r"), ("cause", "connect")]).await;
    let broken = metric(g.admin_addr, FAILURES, &[("route", "r"), ("cause", "closed")]).await;
    assert_eq!(retried, connect + broken, "every failed try was retried");
    assert_eq!(metric(g.admin_addr, "manifold_upstream_retries_refused_total", &[("upstream", "pool")]).await, 0.0);
    assert_eq!(metric(g.admin_addr, EJECTIONS, &[("upstream", "pool"), ("target", &killed)]).await, 1.0);
    let closed = metric(g.admin_addr, FAILURES, &[("route", "r"), ("cause", "closed")]).await;
    g.shutdown();
    KillOutcome { ok, failed, closed }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_killed_under_load_is_ejected_and_its_refused_connections_retried() {
    let out = kill_one_under_load(0).await;
    assert!(out.ok >= 600, "{}", out.ok);
    // Every failure was retried on a live target: refused connections and
    // requests the killed process had already taken (its connection reset,
    // `closed`) alike. The client sees none.
    assert_eq!(out.failed, 0, "{} requests failed ({} tries on connections the kill broke)", out.failed, out.closed);
}

// ---------------------------------------------------------------------------
// 5. a POST over a pool whose target dies mid-request

#[tokio::test(flavor = "multi_thread")]
async fn a_post_to_a_target_that_hangs_up_is_sent_once() {
    // `fault`: reads the request, then hangs up without an answer.
    let (dying, good) = (backend().fault().run().await, backend().run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    retries: {{ max: 2, on: [connect, timeout, \"502\", \"503\"] }}\n    health:\n      passive: {{ failures: 100 }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        dying.url(),
        good.url()
    ));
    let mut statuses = Vec::new();
    for i in 0..6 {
        let (status, _, body) =
            within(15, "POST /r", common::send("POST", &format!("http://{}/r", g.proxy_addr), Some(json!({ "i": i })), &[])).await;
        if status == 502 {
            assert_eq!(body["error"]["code"], "upstream_error", "{body}");
        }
        statuses.push(status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 502, 502, 502], "round-robin: half the POSTs met the dying target");
    assert_eq!(dying.hits.load(Ordering::SeqCst), 3, "each POST reached the dying target once");
    assert_eq!(good.hits.load(Ordering::SeqCst), 3, "no POST was sent again to the other target");
    assert_eq!(metric(g.admin_addr, RETRIES, &[("upstream", "pool")]).await, 0.0);
    // The hang-ups counted against the target (passive health saw them).
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(target_report(&report, &dying.url())["passive"]["failures_in_window"], 3, "{report}");
    g.shutdown();
}

/// A GET whose target reads it and hangs up without an answer (what a
/// target killed with requests in flight does) is sent again to the live
/// target: `connect` in `on` covers a connection closed before the
/// answer's head, as nginx's `error` does. An idempotent request with its
/// body held whole is safe to send again.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_whose_target_hangs_up_is_retried_on_another_target() {
    let (dying, good) = (backend().fault().run().await, backend().run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    retries: {{ max: 2 }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        dying.url(),
        good.url()
    ));
    for i in 0..4 {
        let (status, body) = get(&g, "/r", &[]).await;
        assert_eq!(status, 200, "GET {i}: {body}");
    }
    assert_eq!((dying.hits.load(Ordering::SeqCst), good.hits.load(Ordering::SeqCst)), (2, 4));
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 6. a client's faults

/// Sends `bytes` on a new connection and returns the answer's status (the
/// gateway closes the connection after a 400 for a broken body).
async fn raw_status(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    within(15, "raw request", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let len: usize =
                    head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
                    return (status, text);
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!("the connection ended before an answer: {text:?}"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_broken_upload_never_ejects_a_target() {
    let b = backend().respond(|echo| (if echo["path"] == "/fail" { 500 } else { 200 }, echo.clone())).run().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 3, window: 60s, eject_for: 60s, max_ejected: 100% }}\nroutes:\n  - {{ name: r, path: \"/{{*rest}}\", upstream: pool }}\n",
        b.url()
    ));
    // Malformed at once, and after a good first chunk (the backend has the
    // request by then): each more times than `failures`.
    let bad_first: &[u8] = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let bad_second: &[u8] = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n";
    for request in [bad_first, bad_second] {
        for _ in 0..5 {
            let (status, answer) = raw_status(g.proxy_addr, request).await;
            assert_eq!(status, 400, "{answer}");
            assert!(answer.contains("\"bad_request\""), "{answer}");
        }
    }
    let report = upstream_health(g.admin_addr, "pool").await;
    let t = target_report(&report, &b.url());
    assert_eq!((t["state"].as_str(), &t["passive"]["failures_in_window"]), (Some("healthy"), &json!(0)), "{report}");
    assert_eq!(t["passive"]["ejections"], 0, "{report}");

    // What the backend does get wrong counts (so the 0 above could move).
    assert_eq!(get(&g, "/fail", &[]).await.0, 500);
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(target_report(&report, &b.url())["passive"]["failures_in_window"], 1, "{report}");
    assert_eq!(get(&g, "/ok", &[]).await.0, 200);
    assert_eq!(metric(g.admin_addr, EJECTIONS, &[("upstream", "pool")]).await, 0.0);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_stalled_upload_never_counts_against_a_target() {
    let b = backend().run().await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 2, window: 60s, eject_for: 60s, max_ejected: 100% }}\nroutes:\n  - {{ name: r, path: \"/{{*rest}}\", upstream: pool, timeout: 1s }}\n",
        b.url()
    ));
    // 10 of 100 promised bytes, then silence: 408, three at once.
    let stalled = (0..3).map(|_| raw_status(g.proxy_addr, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"));
    for (status, answer) in futures_util::future::join_all(stalled).await {
        assert_eq!(status, 408, "{answer}");
    }
    let report = upstream_health(g.admin_addr, "pool").await;
    let t = target_report(&report, &b.url());
    assert_eq!((t["state"].as_str(), &t["passive"]["failures_in_window"]), (Some("healthy"), &json!(0)), "{report}");
    assert_eq!(get(&g, "/ok", &[]).await.0, 200);
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 7. config swaps

async fn post_config(g: &Gateway, yaml: &str) {
    let resp = client()
        .post(format!("http://{}/config", g.admin_addr))
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "POST /config: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ejection_survives_a_config_swap_that_leaves_the_upstream_alone() {
    let (good, bad, other) = (backend().run().await, backend().status(500).run().await, backend().run().await);
    let config = |targets: &[&Backend], extra_route: bool| {
        let list = targets.iter().map(|b| format!("{{ url: \"{}\" }}", b.url())).collect::<Vec<_>>().join(", ");
        let extra =
            if extra_route { format!("  - {{ name: extra, path: /extra, upstream: \"{}\" }}\n", other.url()) } else { String::new() };
        format!(
            "upstreams:\n  - name: pool\n    targets: [{list}]\n    health:\n      passive: {{ failures: 2, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n{extra}"
        )
    };
    let g = gateway(&config(&[&good, &bad], false));
    for _ in 0..4 {
        get(&g, "/r", &[]).await;
    }
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(state(&report, &bad.url()), "ejected", "{report}");
    let before_ms = target_report(&report, &bad.url())["passive"]["ejected_for_ms"].as_u64().unwrap();

    // An unrelated route added: the upstream is as it was, so is its health.
    post_config(&g, &config(&[&good, &bad], true)).await;
    assert_eq!(get(&g, "/extra", &[]).await.0, 200, "the new config runs");
    let report = upstream_health(g.admin_addr, "pool").await;
    let t = target_report(&report, &bad.url());
    assert_eq!(t["state"], "ejected", "{report}");
    assert_eq!(t["passive"]["ejections"], 1, "{report}");
    let after_ms = t["passive"]["ejected_for_ms"].as_u64().unwrap();
    assert!(after_ms > 0 && after_ms <= before_ms, "the ejection goes on, not afresh: {before_ms} then {after_ms}");
    let bad_hits = bad.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(get(&g, "/r", &[]).await.0, 200);
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), bad_hits, "still ejected after the swap");

    // The bad target leaves the upstream: its state goes with it. When it
    // comes back it starts afresh (healthy, no ejections).
    post_config(&g, &config(&[&good, &other], true)).await;
    let report = upstream_health(g.admin_addr, "pool").await;
    let labels: Vec<&str> = report["targets"].as_array().unwrap().iter().map(|t| t["target"].as_str().unwrap()).collect();
    assert_eq!(labels, [good.url(), other.url()], "{report}");
    assert_eq!(report["usable"], 2);
    post_config(&g, &config(&[&good, &bad], true)).await;
    let report = upstream_health(g.admin_addr, "pool").await;
    let t = target_report(&report, &bad.url());
    assert_eq!(t["state"], "healthy", "a removed target's state was dropped: {report}");
    assert_eq!(t["passive"]["ejections"], 0, "{report}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swap_that_changes_the_health_settings_starts_afresh() {
    let (good, bad) = (backend().run().await, backend().status(500).run().await);
    let config = |failures: u32| {
        format!(
            "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: {failures}, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
            good.url(),
            bad.url()
        )
    };
    let g = gateway(&config(2));
    for _ in 0..4 {
        get(&g, "/r", &[]).await;
    }
    assert_eq!(state(&upstream_health(g.admin_addr, "pool").await, &bad.url()), "ejected");
    post_config(&g, &config(4)).await;
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(state(&report, &bad.url()), "healthy", "other health settings, another state: {report}");
    assert_eq!(target_report(&report, &bad.url())["passive"]["ejections"], 0, "{report}");
    g.shutdown();
}

// ---------------------------------------------------------------------------
// 8. consistent hashing

/// The host each key's request reached, sent all at once.
async fn place(g: &Gateway, keys: &[String]) -> Vec<String> {
    let reqs = keys.iter().map(|k| async move {
        let (status, body) = get(g, "/r", &[("x-user", k)]).await;
        assert_eq!(status, 200, "{k}: {body}");
        body["headers"]["host"][0].as_str().unwrap().to_string()
    });
    futures_util::future::join_all(reqs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_moves_only_the_keys_of_an_ejected_target() {
    let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let a = failing_when(flags[0].clone()).await;
    let b = failing_when(flags[1].clone()).await;
    let c = failing_when(flags[2].clone()).await;
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    balance: consistent-hash\n    hash_on: \"header:x-user\"\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 1, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        a.url(),
        b.url(),
        c.url()
    ));
    let host = |b: &Backend| format!("127.0.0.1:{}", b.addr.port());
    let keys: Vec<String> = (0..150).map(|i| format!("user-{i}")).collect();
    let first = place(&g, &keys).await;
    assert_eq!(place(&g, &keys).await, first, "sticky");
    let on_c = keys.iter().zip(&first).find(|(_, h)| **h == host(&c)).map(|(k, _)| k.clone()).expect("a key on c");

    // c fails once: ejected (failures: 1).
    flags[2].store(true, Ordering::SeqCst);
    assert_eq!(get(&g, "/r", &[("x-user", &on_c)]).await.0, 500);
    flags[2].store(false, Ordering::SeqCst);
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(state(&report, &c.url()), "ejected", "{report}");

    let c_hits = c.hits.load(Ordering::SeqCst);
    let after = place(&g, &keys).await;
    assert_eq!(c.hits.load(Ordering::SeqCst), c_hits, "no key reaches the ejected target");
    let (mut stayed, mut moved_to) = (0, std::collections::BTreeMap::new());
    for (k, (before, now)) in keys.iter().zip(first.iter().zip(&after)) {
        if *before == host(&c) {
            assert_ne!(*now, host(&c));
            *moved_to.entry(now.clone()).or_insert(0) += 1;
        } else {
            assert_eq!(before, now, "{k} moved off a target that is still usable");
            stayed += 1;
        }
    }
    assert!(stayed > 0);
    // c's keys walk the ring to the next usable point: both others get some.
    assert_eq!(moved_to.len(), 2, "{moved_to:?}");
    assert_eq!(place(&g, &keys).await, after, "sticky while c is out");
    g.shutdown();
}

// ---------------------------------------------------------------------------
// least-requests skips what is out too

#[tokio::test(flavor = "multi_thread")]
async fn least_requests_skips_an_ejected_target() {
    let (good, bad) = (backend().run().await, backend().status(502).run().await);
    let g = gateway(&format!(
        "upstreams:\n  - name: pool\n    balance: least-requests\n    targets: [{{ url: \"{}\" }}, {{ url: \"{}\" }}]\n    health:\n      passive: {{ failures: 2, window: 10s, eject_for: 60s }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
        good.url(),
        bad.url()
    ));
    let fails = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        if get(&g, "/r", &[]).await.0 == 502 {
            fails.fetch_add(1, Ordering::SeqCst);
        }
    }
    assert_eq!(fails.load(Ordering::SeqCst), 2, "two 502s, then the target is out");
    assert_eq!(bad.hits.load(Ordering::SeqCst), 2);
    assert_eq!(state(&upstream_health(g.admin_addr, "pool").await, &bad.url()), "ejected");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_upstreams_health_is_404() {
    let g = gateway(
        "upstreams:\n  - { name: pool, targets: [{ url: \"http://127.0.0.1:9\" }] }\nroutes:\n  - { name: r, path: /r, upstream: pool }\n",
    );
    let resp = client().get(format!("http://{}/upstreams/ghost/health", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"].as_str().is_some_and(|m| m.contains("ghost")), "{body}");
    // An upstream without health: one target, usable, no checks.
    let report = upstream_health(g.admin_addr, "pool").await;
    assert_eq!(report["checks"], json!({"active": false, "passive": false}));
    assert_eq!(report["usable"], 1);
    assert_eq!(report["targets"][0]["state"], "healthy");
    assert!(report["targets"][0]["active"].is_null() && report["targets"][0]["passive"].is_null());
    g.shutdown();
}

// ---------------------------------------------------------------------------
// checkers stop with their targets, in a `manifold serve` process

/// A `manifold serve` process whose config changes (the active check's
/// interval, then the upstream gone) sends no more checks on the old
/// interval: the checkers of targets in no running config stop. (The
/// process once held its first config for its whole life, so the first
/// config's checkers ran on beside every later one's.)
#[tokio::test(flavor = "multi_thread")]
async fn a_serve_process_stops_the_checkers_of_a_config_it_left() {
    let b = backend().run().await;
    let dir = tempfile::tempdir().unwrap();
    let config = |interval: &str| {
        format!(
            "upstreams:\n  - name: pool\n    targets: [{{ url: \"{}\" }}]\n    health: {{ active: {{ path: /health, interval: {interval} }} }}\nroutes:\n  - {{ name: r, path: /r, upstream: pool }}\n",
            b.url()
        )
    };
    std::fs::write(dir.path().join("gw.yaml"), config("50ms")).unwrap();
    let gw = common::GatewayProcess::start(dir.path(), &[]);
    let checks = || b.seen.lock().unwrap().iter().filter(|e| e["path"] == "/health").count();
    within(15, "the first checks", async {
        while checks() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let post = |yaml: String| async move {
        let resp = client()
            .post(format!("http://{}/config", gw.admin))
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    };
    // A new interval is a new health block: its checker replaces the old.
    post(config("1h")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = checks();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The 50 ms checker would have sent about 12 more.
    assert!(checks() <= before + 1, "{} checks in 600 ms after the interval became 1h", checks() - before);
    // The upstream gone: no checker at all.
    post(format!("routes:\n  - {{ name: r, path: /r, upstream: \"{}\" }}\n", b.url())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = checks();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(checks(), before, "checks went on with no upstream configured");
    drop(gw);
}
