//! `rate-limit` with `scope: cluster` (SPEC §2): one quota counted in Redis
//! by every node, exact under concurrency; a local fallback when Redis goes
//! away (`fault_tolerant: true`, the default) or a 503 (`false`); and a
//! config that asks for it refused where there is no Redis to ask.
//!
//! Every test names its own key `prefix`: the tests run in parallel against
//! one shared Redis, and two gateways are two nodes only when they share it.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{backend, gateway_with, Relay};
use manifold::config::load::config_from_text;
use manifold::config::Format;
use manifold::gateway::{Gateway, GatewayOptions, RedisOptions};
use reqwest::header::HeaderMap;
use serde_json::Value;

const REDIS: &str = "redis://127.0.0.1:6379";

fn unique_prefix() -> String {
    format!("test-{}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// A gateway node counting cluster limits in the Redis at `url`, under `prefix`.
fn node(yaml: &str, url: &str, prefix: &str) -> Gateway {
    let redis = RedisOptions { url: url.to_string(), prefix: prefix.to_string() };
    gateway_with(yaml, GatewayOptions { redis: Some(redis), ..Default::default() })
}

/// One GET, bounded: a gateway stuck on an unreachable Redis fails the test
/// instead of hanging it.
async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Value) {
    let sent = tokio::time::timeout(Duration::from_secs(10), common::send("GET", url, None, headers));
    let (status, headers, body) = sent.await.expect("the gateway answers within 10 s");
    (status.as_u16(), headers, body)
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// The window is a day: the sliding window weighs the previous period's
/// count as time passes, so a test crossing a period boundary would see
/// other numbers. With a day, a few seconds of test almost never do.
fn limited_route(limit: u64, extra: &str, upstream: &str) -> String {
    format!(
        r#"
policies:
  - {{ name: limited, type: rate-limit, config: {{ limit: {limit}, window: 24h, by: route, scope: cluster{extra} }} }}
routes:
  - {{ name: r, path: /r, upstream: "{upstream}", policies: [limited] }}
"#
    )
}

fn assert_rate_limited(status: u16, h: &HeaderMap, body: &Value) {
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    assert!(header(h, "retry-after").parse::<u64>().unwrap() >= 1, "Retry-After: {h:?}");
    assert_eq!(header(h, "ratelimit-remaining"), "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_one_exact_quota() {
    let b = backend().run().await;
    let yaml = limited_route(15, "", &b.url());
    let prefix = unique_prefix();
    let (g1, g2) = (node(&yaml, REDIS, &prefix), node(&yaml, REDIS, &prefix));
    let urls = [format!("http://{}/r", g1.proxy_addr), format!("http://{}/r", g2.proxy_addr)];

    // 40 at once, half to each node: the quota is 15 for the cluster.
    let tasks: Vec<_> = (0..40).map(|i| tokio::spawn(get_owned(urls[i % 2].clone()))).collect();
    let (mut remaining, mut refused) = (Vec::new(), 0);
    for t in tasks {
        let (s, h, body) = t.await.unwrap();
        match s {
            200 => {
                assert_eq!(header(&h, "ratelimit-limit"), "15");
                assert!(!header(&h, "ratelimit-reset").is_empty(), "RateLimit-Reset: {h:?}");
                remaining.push(header(&h, "ratelimit-remaining").parse::<u64>().unwrap());
            }
            _ => {
                assert_rate_limited(s, &h, &body);
                refused += 1;
            }
        }
    }
    assert_eq!((remaining.len(), refused), (15, 25), "exactly the quota passes, across both nodes");
    assert_eq!(b.hits.load(Ordering::SeqCst), 15);
    // Counted atomically: each admitted request saw its own count.
    remaining.sort_unstable();
    assert_eq!(remaining, (0..15).collect::<Vec<u64>>());
    // Both nodes are now refused; a node under another prefix is another cluster.
    assert_eq!(get(&urls[0], &[]).await.0, 429);
    assert_eq!(get(&urls[1], &[]).await.0, 429);
    let other = node(&yaml, REDIS, &unique_prefix());
    let (s, h, _) = get(&format!("http://{}/r", other.proxy_addr), &[]).await;
    assert_eq!((s, header(&h, "ratelimit-remaining")), (200, "14".to_string()));
    other.shutdown();
    g1.shutdown();
    g2.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_node_counts_in_redis_from_its_first_request() {
    let b = backend().run().await;
    let (yaml, prefix) = (limited_route(5, "", &b.url()), unique_prefix());
    // Each node is asked the moment it is started: no request of a node
    // whose Redis is up may be counted on its own.
    let mut remaining = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let g = node(&yaml, REDIS, &prefix);
        let (s, h, _) = get(&format!("http://{}/r", g.proxy_addr), &[]).await;
        assert_eq!(s, 200);
        remaining.push(header(&h, "ratelimit-remaining"));
        nodes.push(g);
    }
    assert_eq!(remaining, ["4", "3", "2"], "one count for the three nodes");
    for g in nodes {
        g.shutdown();
    }
}

async fn get_owned(url: String) -> (u16, HeaderMap, Value) {
    get(&url, &[]).await
}

fn relayed(relay: &Relay) -> String {
    format!("redis://{}", relay.addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_the_node_limits_locally_then_returns_to_redis() {
    let b = backend().run().await;
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap()).await;
    let g = node(&limited_route(5, "", &b.url()), &relayed(&relay), &unique_prefix());
    let url = format!("http://{}/r", g.proxy_addr);
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let (s, h, _) = get(&url, &[]).await;
        assert_eq!(s, 200);
        remaining.push(header(&h, "ratelimit-remaining"));
    }
    assert_eq!(remaining, ["4", "3", "2"], "counted in Redis");

    // Redis gone: still served, never a 500, limited in-process from zero
    // with the policy's own limit.
    relay.cut();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let (s, h, body) = get(&url, &[]).await;
        if s == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            assert!(h.contains_key("retry-after"));
        }
        statuses.push(s);
    }
    let expected: Vec<u16> = [200; 5].into_iter().chain([429; 15]).collect();
    assert_eq!(statuses, expected, "the local fallback allows the limit, then refuses");

    // Redis back: the quota left there (2 of 5) is spent, and no more. Until
    // the node reconnects, its exhausted local counter refuses.
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let (s, h, _) = get(&url, &[]).await;
        assert!(s == 200 || s == 429, "{s}");
        if s == 200 {
            break h;
        }
        assert!(Instant::now() < deadline, "the node never went back to Redis");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(header(&first, "ratelimit-remaining"), "1", "counted in Redis again");
    assert_eq!(get(&url, &[]).await.0, 200);
    let (s, h, body) = get(&url, &[]).await;
    assert_rate_limited(s, &h, &body);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn not_fault_tolerant_answers_503_while_redis_is_away() {
    let b = backend().run().await;
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap()).await;
    let g = node(&limited_route(100, ", fault_tolerant: false", &b.url()), &relayed(&relay), &unique_prefix());
    let url = format!("http://{}/r", g.proxy_addr);
    assert_eq!(get(&url, &[]).await.0, 200);

    relay.cut();
    for _ in 0..3 {
        let (s, _, body) = get(&url, &[]).await;
        assert_eq!((s, body["error"]["code"].as_str()), (503, Some("upstream_unavailable")), "{body}");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 1, "an unchecked request never reaches the backend");

    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _, body) = get(&url, &[]).await;
        if s == 200 {
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert!(Instant::now() < deadline, "the node never reconnected to Redis");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    g.shutdown();
}

#[test]
fn a_cluster_limit_needs_redis_to_start_or_validate() {
    let yaml = limited_route(10, "", "http://127.0.0.1:9");
    let config = config_from_text(&yaml, Format::Yaml).unwrap_or_else(|e| panic!("the config itself is valid:\n{e}"));
    let message = match Gateway::start(GatewayOptions::default(), config) {
        Ok(g) => {
            g.shutdown();
            panic!("a gateway without Redis started with a cluster limit");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(message.contains("scope"), "{message}");
    assert!(message.contains("MANIFOLD_REDIS_URL") || message.to_lowercase().contains("redis"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("limits.yaml"), &yaml).unwrap();
    let validate = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_manifold"));
        cmd.arg("validate").arg(dir.path());
        cmd
    };
    let out = validate().env_remove("MANIFOLD_REDIS_URL").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    // The error names the file and the field, like every config error.
    let file = dir.path().join("limits.yaml");
    let want = format!("{}: policies.limited.config.scope:", file.display());
    assert!(text.contains(&want), "want {want}\n{text}");
    // So does `serve` refusing to start with it.
    let out = Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config-dir"])
        .arg(dir.path())
        .env_remove("MANIFOLD_REDIS_URL")
        .env_remove("MANIFOLD_DATABASE_URL")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&want), "want {want}\n{text}");

    let out = validate().env("MANIFOLD_REDIS_URL", REDIS).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("ok: "), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_cannot_spread_over_buckets_with_forwarded_for() {
    let b = backend().run().await;
    let g = node(
        &format!(
            r#"
policies:
  - {{ name: per-ip, type: rate-limit, config: {{ limit: 3, window: 24h, by: ip, scope: cluster }} }}
  - {{ name: per-user, type: rate-limit, config: {{ limit: 1, window: 24h, by: "header:x-user", scope: cluster }} }}
routes:
  - {{ name: r, path: /r, upstream: "{u}", policies: [per-ip] }}
  - {{ name: u, path: /u, upstream: "{u}", policies: [per-user] }}
"#,
            u = b.url()
        ),
        REDIS,
        &unique_prefix(),
    );
    let base = format!("http://{}", g.proxy_addr);
    // The test client is not a trusted proxy: its X-Forwarded-For is ignored.
    let mut remaining = Vec::new();
    for xff in ["10.0.0.1", "10.0.0.2", "192.0.2.7, 10.0.0.3"] {
        let (s, h, _) = get(&format!("{base}/r"), &[("x-forwarded-for", xff)]).await;
        assert_eq!(s, 200);
        remaining.push(header(&h, "ratelimit-remaining"));
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let (s, h, body) = get(&format!("{base}/r"), &[("x-forwarded-for", "10.0.0.4")]).await;
    assert_rate_limited(s, &h, &body);

    // by a header: each value is a bucket of its own.
    assert_eq!(get(&format!("{base}/u"), &[("x-user", "ada")]).await.0, 200);
    assert_eq!(get(&format!("{base}/u"), &[("x-user", "ada")]).await.0, 429);
    assert_eq!(get(&format!("{base}/u"), &[("x-user", "grace")]).await.0, 200);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn windows_of_one_length_keep_their_own_counts() {
    let b = backend().run().await;
    let yaml = format!(
        "policies:\n  - {{ name: two, type: rate-limit, config: {{ limits: [{{ limit: 2, window: 24h }}, {{ limit: 5, window: 24h }}], by: route, scope: cluster }} }}\nroutes:\n  - {{ name: r, path: /r, upstream: \"{}\", policies: [two] }}\n",
        b.url()
    );
    let g = node(&yaml, REDIS, &unique_prefix());
    let url = format!("http://{}/r", g.proxy_addr);
    let statuses = [get(&url, &[]).await.0, get(&url, &[]).await.0, get(&url, &[]).await.0];
    assert_eq!(statuses, [200, 200, 429], "the tighter window allows exactly its limit");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_checks_of_one_bucket_count_one_by_one() {
    // Checks of one bucket that reach Redis in one batch are counted as a
    // group: the admitted ones must still see the counts they would have
    // seen one by one (remaining 4, 3, 2, 1, 0 of the tighter window), and
    // the rest be refused.
    let b = backend().run().await;
    let yaml = format!(
        "policies:\n  - {{ name: two, type: rate-limit, config: {{ limits: [{{ limit: 5, window: 24h }}, {{ limit: 50, window: 48h }}], by: route, scope: cluster }} }}\nroutes:\n  - {{ name: r, path: /r, upstream: \"{}\", policies: [two] }}\n",
        b.url()
    );
    let g = node(&yaml, REDIS, &unique_prefix());
    let url = format!("http://{}/r", g.proxy_addr);
    let answers = futures_util::future::join_all((0..24).map(|_| get_owned(url.clone()))).await;
    let mut remaining: Vec<String> = answers.iter().filter(|a| a.0 == 200).map(|a| header(&a.1, "ratelimit-remaining")).collect();
    remaining.sort();
    assert_eq!(remaining, ["0", "1", "2", "3", "4"], "each admitted check saw its own count");
    assert_eq!(answers.iter().filter(|a| a.0 == 429).count(), 19);
    assert!(answers.iter().all(|a| header(&a.1, "ratelimit-limit") == "5"), "the tighter window is reported");
    g.shutdown();
}
