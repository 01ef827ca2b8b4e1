//! Composition calls shared across requests (SPEC §8): `cache` with
//! stale-while-revalidate and stale-if-error, collapsing of identical calls
//! in flight, and the store's bound. By counts and causality, never timing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use manifold::gateway::GatewayOptions;
use serde_json::{json, Value};

/// One GET through the proxy: status, `Server-Timing`, body.
async fn get(g: &manifold::gateway::Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let url = format!("http://{}{path}", g.proxy_addr);
    let (status, h, body) = within(15, path, send("GET", &url, None, headers)).await;
    let timing = h.get("server-timing").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status.as_u16(), timing, body)
}

/// The `cache=` mark of `call` in a `Server-Timing` value.
fn mark<'a>(timing: &'a str, call: &str) -> Option<&'a str> {
    let entry = timing.split(", ").find(|e| e.starts_with(&format!("{call};")))?;
    entry.split(';').find_map(|p| p.strip_prefix("cache="))
}

/// A backend answering `{"v": n}`, n counting its answers from 1.
fn versioned() -> (BackendBuilder, Arc<AtomicUsize>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let a = answered.clone();
    (backend().respond(move |_| (200, json!({"v": a.fetch_add(1, Ordering::SeqCst) + 1}))), answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_requests_send_one_backend_request() {
    let b = backend().json(json!({"name": "lamp"})).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: product
    path: /p/{{id}}
    calls:
      product: {{ url: "{}/products/{{{{request.path.id}}}}", cache: {{ ttl: 60s }} }}
"#,
        b.url()
    ));
    let mut marks = Vec::new();
    for _ in 0..5 {
        let (status, timing, body) = get(&g, "/p/7", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(body["product"]["name"], "lamp");
        marks.push(mark(&timing, "product").map(str::to_string));
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 1, "one backend request for five client requests");
    assert_eq!(marks[0].as_deref(), Some("miss"));
    assert!(marks[1..].iter().all(|m| m.as_deref() == Some("hit")), "{marks:?}");
    // Another id is another URL: its own request.
    let (_, timing, _) = get(&g, "/p/8", &[]).await;
    assert_eq!(mark(&timing, "product"), Some("miss"));
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
    let labels = |r| [("composition", "product"), ("call", "product"), ("result", r)];
    assert_eq!(metric(g.admin_addr, "manifold_call_cache_total", &labels("hit")).await, 4.0);
    assert_eq!(metric(g.admin_addr, "manifold_call_cache_total", &labels("miss")).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_with_different_credentials_never_share_an_answer() {
    // The echo backend answers with the headers it got.
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: me
    path: /me
    calls:
      me: {{ url: "{}/me", forward_headers: [authorization], cache: {{ ttl: 60s }} }}
"#,
        b.url()
    ));
    for round in 0..2 {
        for who in ["Bearer alice", "Bearer bob"] {
            let (status, timing, body) = get(&g, "/me", &[("authorization", who)]).await;
            assert_eq!(status, 200);
            assert_eq!(body["me"]["headers"]["authorization"], json!([who]), "round {round}: {who} got another caller's answer");
            assert_eq!(mark(&timing, "me"), Some(if round == 0 { "miss" } else { "hit" }));
        }
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 2, "one backend request per caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_headers_are_part_of_the_key() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: t
    path: /t
    calls:
      t: {{ url: "{}/t", cache: {{ ttl: 60s, vary_headers: [accept-language] }} }}
"#,
        b.url()
    ));
    for lang in ["fr", "de", "fr", "de"] {
        let (status, _, _) = get(&g, "/t", &[("accept-language", lang)]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_comes_at_once_while_one_refresh_reaches_the_backend() {
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let (builder, _) = versioned();
    let b = builder.gate(gate.clone()).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: s
    path: /s
    calls:
      s: {{ url: "{}/s", cache: {{ ttl: 1s, stale_while_revalidate: 60s }} }}
"#,
        b.url()
    ));
    let (_, timing, body) = get(&g, "/s", &[]).await;
    assert_eq!((mark(&timing, "s"), &body["s"]["v"]), (Some("miss"), &json!(1)));
    // Fresh for a second (hits), then stale: answered with the old body
    // while the refresh is held by the backend's closed gate.
    within(10, "the entry goes stale", async {
        loop {
            let (status, timing, body) = get(&g, "/s", &[]).await;
            assert_eq!((status, &body["s"]["v"]), (200, &json!(1)));
            if mark(&timing, "s") == Some("stale") {
                break;
            }
            assert_eq!(mark(&timing, "s"), Some("hit"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The refresh reached the backend, which holds it; more requests are
    // still answered (stale) without another backend request.
    within(10, "the refresh arrives", async {
        while b.hits.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for _ in 0..5 {
        let (status, timing, body) = get(&g, "/s", &[]).await;
        assert_eq!((status, mark(&timing, "s"), &body["s"]["v"]), (200, Some("stale"), &json!(1)));
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 2, "exactly one refresh while it is held");
    gate.add_permits(1);
    within(10, "the refreshed answer is served", async {
        loop {
            let (_, timing, body) = get(&g, "/s", &[]).await;
            if body["s"]["v"] == 2 {
                assert_eq!(mark(&timing, "s"), Some("hit"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
    let stale = [("composition", "s"), ("call", "s"), ("result", "stale")];
    assert!(metric(g.admin_addr, "manifold_call_cache_total", &stale).await >= 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_stands_in_for_a_failing_backend() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let b = backend()
        .respond(move |_| match n2.fetch_add(1, Ordering::SeqCst) {
            0 => (200, json!({"v": 1})),
            _ => (503, json!({"error": "down"})),
        })
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: e
    path: /e
    calls:
      e: {{ url: "{}/e", cache: {{ ttl: 1s, stale_if_error: 60s }} }}
"#,
        b.url()
    ));
    let (_, timing, body) = get(&g, "/e", &[]).await;
    assert_eq!((mark(&timing, "e"), &body["e"]["v"]), (Some("miss"), &json!(1)));
    within(10, "the failing backend is answered for", async {
        loop {
            let (status, timing, body) = get(&g, "/e", &[]).await;
            assert_eq!((status, &body["e"]["v"]), (200, &json!(1)), "{timing}");
            if mark(&timing, "e") == Some("stale") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The backend was asked (and failed) for the stale answer.
    let (status, timing, body) = get(&g, "/e", &[]).await;
    assert_eq!((status, mark(&timing, "e"), &body["e"]["v"]), (200, Some("stale"), &json!(1)));
    assert!(b.seen.lock().unwrap().iter().filter(|r| r["path"] == "/e").count() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_no_store_answers_are_never_kept() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    // First a failure, then successes.
    let b = backend()
        .respond(move |_| match n2.fetch_add(1, Ordering::SeqCst) {
            0 => (500, json!({})),
            v => (200, json!({"v": v})),
        })
        .run()
        .await;
    let private = backend().json(json!({"mine": true})).header("cache-control", "private, max-age=60").run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: f
    path: /f
    calls:
      f: {{ url: "{}/f", cache: {{ ttl: 60s }}, required: false }}
  - name: p
    path: /p
    calls:
      p: {{ url: "{}/p", cache: {{ ttl: 60s }} }}
"#,
        b.url(),
        private.url()
    ));
    let marks: Vec<Option<String>> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let (_, timing, _) = get(&g, "/f", &[]).await;
            v.push(mark(&timing, "f").map(str::to_string));
        }
        v
    };
    // The failure was not stored; the first success was.
    assert_eq!(b.hits.load(Ordering::SeqCst), 2, "{marks:?}");
    assert_eq!(marks[2].as_deref(), Some("hit"));
    for _ in 0..3 {
        let (status, timing, _) = get(&g, "/p", &[]).await;
        assert_eq!((status, mark(&timing, "p")), (200, Some("miss")));
    }
    assert_eq!(private.hits.load(Ordering::SeqCst), 3, "a private answer is never kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_requests_at_once_share_one_backend_request() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let b = backend().json(json!({"ok": true})).gate(gate.clone()).run().await;
    let g = Arc::new(gateway(&format!(
        r#"
compositions:
  - name: c
    path: /c
    calls:
      c: {{ url: "{}/c", collapse: true }}
"#,
        b.url()
    )));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move { get(&g, "/c", &[]).await }));
    }
    // All twenty wait: one at the backend, nineteen on its request.
    metric_until(g.admin_addr, "manifold_call_collapsed_total", &[("call", "c")], |v| v == 19.0, "19 requests joined the first").await;
    // The first one's request may still be on its way to the backend (it
    // is counted when it arrives there): wait for it, then no more come.
    within(10, "the first request reaches the backend", async {
        while b.hits.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
    gate.add_permits(1);
    for t in tasks {
        let (status, timing, body) = t.await.unwrap();
        assert_eq!((status, &body["c"]), (200, &json!({"ok": true})));
        assert_eq!(mark(&timing, "c"), None, "collapse alone does not cache");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 1, "twenty client requests, one backend request");
    // Nothing was kept: the next request goes to the backend.
    gate.add_permits(1);
    get(&g, "/c", &[]).await;
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_failure_reaches_every_waiter_and_a_gone_leader_strands_none() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let b = backend().status(502).gate(gate.clone()).run().await;
    let g = Arc::new(gateway(&format!(
        r#"
compositions:
  - name: c
    path: /c
    calls:
      c: {{ url: "{}/c", collapse: true }}
"#,
        b.url()
    )));
    // The leader's client goes away once its request reached the backend.
    let leader = {
        let g = g.clone();
        tokio::spawn(async move { get(&g, "/c", &[]).await })
    };
    within(10, "the leader's request arrives", async {
        while b.hits.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move { get(&g, "/c", &[]).await }));
    }
    metric_until(g.admin_addr, "manifold_call_collapsed_total", &[("call", "c")], |v| v == 4.0, "4 requests joined the first").await;
    leader.abort();
    let _ = leader.await;
    gate.add_permits(1);
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 502, "{body}");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_stays_within_its_bound_under_many_large_answers() {
    let big = "x".repeat(20_000);
    let b = backend().respond(move |r| (200, json!({"path": r["path"], "pad": big}))).run().await;
    let max = 1u64 << 20;
    let opts = GatewayOptions { call_cache_max_bytes: max, ..GatewayOptions::default() };
    let g = Arc::new(gateway_with(
        &format!(
            r#"
compositions:
  - name: m
    path: /m/{{id}}
    calls:
      m: {{ url: "{}/m/{{{{request.path.id}}}}", cache: {{ ttl: 300s }} }}
"#,
            b.url()
        ),
        opts,
    ));
    use futures_util::StreamExt;
    let statuses: Vec<u16> = futures_util::stream::iter(0..2000)
        .map(|i| {
            let g = g.clone();
            async move { get(&g, &format!("/m/{i}"), &[]).await.0 }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(b.hits.load(Ordering::SeqCst), 2000);
    let bytes = metric(g.admin_addr, "manifold_call_cache_bytes", &[]).await;
    let entries = metric(g.admin_addr, "manifold_call_cache_entries", &[]).await;
    assert!(bytes > 0.0 && bytes <= max as f64, "{bytes} bytes held, bound {max}");
    assert!(entries > 10.0 && entries < 100.0, "{entries} entries of 20 kB in 1 MiB");
}

fn cluster_node(yaml: &str, redis_url: &str, prefix: &str) -> manifold::gateway::Gateway {
    let redis = manifold::gateway::RedisOptions { url: redis_url.to_string(), prefix: prefix.to_string() };
    gateway_with(yaml, GatewayOptions { redis: Some(redis), ..GatewayOptions::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cache_warms_once_for_every_node() {
    let b = backend().json(json!({"name": "lamp"})).run().await;
    let yaml = format!(
        r#"
compositions:
  - name: product
    path: /p/{{id}}
    calls:
      product: {{ url: "{}/products/{{{{request.path.id}}}}", cache: {{ ttl: 60s, scope: cluster }} }}
"#,
        b.url()
    );
    let prefix = format!("test-{}-{:016x}", std::process::id(), fastrand::u64(..));
    let a = cluster_node(&yaml, "redis://127.0.0.1:6379", &prefix);
    let other = cluster_node(&yaml, "redis://127.0.0.1:6379", &prefix);
    let (status, timing, body) = get(&a, "/p/1", &[]).await;
    assert_eq!((status, mark(&timing, "product"), &body["product"]["name"]), (200, Some("miss"), &json!("lamp")));
    // The other node finds it in Redis: no backend request.
    let (status, timing, body) = get(&other, "/p/1", &[]).await;
    assert_eq!((status, mark(&timing, "product"), &body["product"]["name"]), (200, Some("hit"), &json!("lamp")));
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
    // A node under another prefix is another cluster.
    let apart = cluster_node(&yaml, "redis://127.0.0.1:6379", &format!("{prefix}-apart"));
    let (_, timing, _) = get(&apart, "/p/1", &[]).await;
    assert_eq!(mark(&timing, "product"), Some("miss"));
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cache_without_redis_answering_is_node_local() {
    let b = backend().json(json!({"name": "lamp"})).run().await;
    // Nothing listens there: every Redis command fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let g = cluster_node(
        &format!(
            r#"
compositions:
  - name: product
    path: /p
    calls:
      product: {{ url: "{}/products", cache: {{ ttl: 60s, scope: cluster }} }}
"#,
            b.url()
        ),
        &url,
        "away",
    );
    let mut marks = Vec::new();
    for _ in 0..3 {
        let (status, timing, _) = get(&g, "/p", &[]).await;
        assert_eq!(status, 200);
        marks.push(mark(&timing, "product").map(str::to_string));
    }
    assert_eq!(marks, [Some("miss".to_string()), Some("hit".to_string()), Some("hit".to_string())]);
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_cluster_cache_on_a_node_without_redis_is_an_error_at_its_field() {
    let yaml = r#"
compositions:
  - name: c
    path: /c
    calls:
      shared: { url: "http://127.0.0.1:9/s", cache: { ttl: 1s, scope: cluster } }
      local: { url: "http://127.0.0.1:9/l", cache: { ttl: 1s, scope: local } }
"#;
    let config = manifold::config::load::config_from_text(yaml, manifold::config::Format::Yaml).unwrap();
    let errors = match manifold::snapshot::compile(config, 1, &manifold::policy::Services::new(None)) {
        Ok(_) => panic!("compiled without Redis"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    };
    assert_eq!(
        errors,
        ["compositions.c.calls.shared.cache.scope: scope: cluster needs Redis: set MANIFOLD_REDIS_URL (or use scope: local)"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_is_revalidated_with_its_etag() {
    // The backend answers 304 to a request that names the ETag it gave.
    let b = backend()
        .header("etag", "\"v1\"")
        .respond(|req| match req["headers"]["if-none-match"][0].as_str() {
            Some("\"v1\"") => (304, Value::Null),
            _ => (200, json!({"name": "lamp"})),
        })
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: product
    path: /p/{{id}}
    calls:
      product: {{ url: "{}/products/{{{{request.path.id}}}}", cache: {{ ttl: 1s, stale_if_error: 60s }} }}
"#,
        b.url()
    ));
    let (status, timing, body) = get(&g, "/p/7", &[]).await;
    assert_eq!((status, mark(&timing, "product")), (200, Some("miss")));
    assert_eq!(body["product"]["name"], "lamp");
    // Past the ttl the entry is kept (stale_if_error), so the next request
    // asks the backend whether it changed instead of fetching it again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, timing, body) = get(&g, "/p/7", &[]).await;
    assert_eq!((status, mark(&timing, "product")), (200, Some("revalidated")), "{timing}");
    assert_eq!(body["product"]["name"], "lamp", "the stored body answers a 304");
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
    assert_eq!(b.seen.lock().unwrap()[1]["headers"]["if-none-match"][0], "\"v1\"");
    // The 304 made the entry fresh again.
    let (_, timing, _) = get(&g, "/p/7", &[]).await;
    assert_eq!(mark(&timing, "product"), Some("hit"));
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
}
