//! `/metrics` on the admin listener (issue 6): the Prometheus text format,
//! read back with a Prometheus text-format parser after known traffic.

mod common;

use common::{backend, client, gateway};
use prometheus_parse::{Sample, Scrape, Value as PValue};

async fn scrape(admin: std::net::SocketAddr) -> Scrape {
    let resp = client().get(format!("http://{admin}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text format")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> =
        scrape.samples.iter().filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).collect();
    assert_eq!(found.len(), 1, "one sample of {name} {labels:?}, found {found:?}");
    match &found[0].value {
        PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => *v,
        PValue::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        PValue::Summary(_) => panic!("no summaries here"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_known_traffic_by_route_and_status_class() {
    let b = backend().run().await;
    let failing = backend().status(503).run().await;
    let g = gateway(&format!(
        r#"
consumers:
  - {{ name: app, credentials: [{{ type: key-auth, key: k-app }}] }}
policies:
  - {{ name: keys, type: key-auth }}
  - {{ name: passwords, type: basic-auth }}
  - {{ name: two-a-day, type: rate-limit, config: {{ limits: [{{ window: 24h, limit: 2 }}], by: consumer }} }}
routes:
  - {{ name: open, path: /open, upstream: "{0}" }}
  - {{ name: guarded, path: /guarded, upstream: "{0}", policies: [keys, passwords, two-a-day] }}
compositions:
  - name: both
    path: /both
    calls:
      one: {{ url: "{0}/one" }}
      gone: {{ url: "{1}/gone", required: false }}
"#,
        b.url(),
        failing.url()
    ));
    let proxy = g.proxy_addr;
    for _ in 0..3 {
        assert_eq!(common::send("GET", &format!("http://{proxy}/open"), None, &[]).await.0, 200);
    }
    for status in [200, 200, 429] {
        assert_eq!(common::send("GET", &format!("http://{proxy}/guarded"), None, &[("apikey", "k-app")]).await.0, status);
    }
    // No credential at all, then a wrong key: the first is the chain's
    // (its last authentication policy), the second the key-auth policy's.
    assert_eq!(common::send("GET", &format!("http://{proxy}/guarded"), None, &[]).await.0, 401);
    assert_eq!(common::send("GET", &format!("http://{proxy}/guarded"), None, &[("apikey", "wrong")]).await.0, 401);
    assert_eq!(common::send("GET", &format!("http://{proxy}/both"), None, &[]).await.0, 200);
    // Unmatched paths are the client's choice: never a label.
    assert_eq!(common::send("GET", &format!("http://{proxy}/no/such/path-12345"), None, &[]).await.0, 404);

    let m = scrape(g.admin_addr).await;
    let requests = |route: &str, kind: &str, status: &str| {
        value(&m, "manifold_requests_total", &[("route", route), ("kind", kind), ("status", status)])
    };
    assert_eq!(requests("open", "route", "2xx"), 3.0);
    assert_eq!(requests("open", "route", "4xx"), 0.0);
    assert_eq!(requests("guarded", "route", "2xx"), 2.0);
    assert_eq!(requests("guarded", "route", "4xx"), 3.0);
    assert_eq!(requests("both", "composition", "2xx"), 1.0);
    // Refusals by the policy that refused and the error code.
    let refused = |policy: &str, code: &str| {
        value(&m, "manifold_policy_refusals_total", &[("route", "guarded"), ("kind", "route"), ("policy", policy), ("code", code)])
    };
    assert_eq!(refused("keys", "unauthorized"), 1.0, "a wrong key counts against key-auth");
    assert_eq!(refused("passwords", "unauthorized"), 1.0, "no credential counts against the last authentication policy");
    assert_eq!(refused("two-a-day", "rate_limited"), 1.0, "429s by the rate limit");
    // The latency histogram saw every answered request of the route.
    assert_eq!(value(&m, "manifold_request_duration_seconds", &[("route", "guarded")]), 5.0);
    // Consumers are no label unless switched on.
    assert!(
        !m.samples.iter().any(|s| s.labels.get("consumer").is_some() || s.metric.contains("consumer")),
        "no consumer labels by default"
    );
    assert!(!m.samples.iter().any(|s| s.labels.values().any(|v| v.contains("12345"))), "no raw paths in labels");
    // Each backend call of a composition: its duration, and its failures by kind.
    assert_eq!(value(&m, "manifold_backend_call_duration_seconds", &[("composition", "both"), ("call", "one")]), 1.0);
    assert_eq!(value(&m, "manifold_backend_call_duration_seconds", &[("composition", "both"), ("call", "gone")]), 1.0);
    assert_eq!(value(&m, "manifold_backend_call_failures_total", &[("composition", "both"), ("call", "gone"), ("kind", "status")]), 1.0);
    assert!(!m.samples.iter().any(|s| s.metric == "manifold_backend_call_failures_total" && s.labels.get("call") == Some("one")));

    assert_eq!(value(&m, "manifold_config_version", &[]), 1.0);
    assert_eq!(value(&m, "manifold_requests_in_flight", &[]), 0.0);
    assert!(value(&m, "manifold_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(value(&m, "manifold_config_last_reload_timestamp_seconds", &[]) > 1_700_000_000.0);

    // A config change shows up as a new version and a reload.
    let resp = client()
        .post(format!("http://{}/config", g.admin_addr))
        .body(format!("routes:\n  - {{ name: open, path: /open, upstream: \"{}\" }}\n", b.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let m = scrape(g.admin_addr).await;
    assert_eq!(value(&m, "manifold_config_version", &[]), 2.0);
    assert_eq!(value(&m, "manifold_config_reloads_total", &[]), 1.0);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_labels_when_switched_on() {
    let b = backend().run().await;
    let yaml = format!(
        r#"
consumers:
  - {{ name: app, credentials: [{{ type: key-auth, key: k-app }}] }}
  - {{ name: web, credentials: [{{ type: key-auth, key: k-web }}] }}
policies:
  - {{ name: keys, type: key-auth }}
routes:
  - {{ name: guarded, path: /guarded, upstream: "{0}", policies: [keys] }}
  - {{ name: gone, path: /gone, upstream: "http://127.0.0.1:9", policies: [keys] }}
"#,
        b.url()
    );
    let opts =
        manifold::gateway::GatewayOptions { metrics: manifold::metrics::MetricsOptions { consumer_labels: true }, ..Default::default() };
    let g = common::gateway_with(&yaml, opts);
    let proxy = g.proxy_addr;
    for (key, path, status) in [("k-app", "/guarded", 200), ("k-app", "/guarded", 200), ("k-web", "/guarded", 200), ("k-web", "/gone", 502)]
    {
        assert_eq!(common::send("GET", &format!("http://{proxy}{path}"), None, &[("apikey", key)]).await.0, status);
    }
    assert_eq!(common::send("GET", &format!("http://{proxy}/guarded"), None, &[]).await.0, 401);
    let m = scrape(g.admin_addr).await;
    let by = |consumer: &str, route: &str, status: &str| {
        value(&m, "manifold_consumer_requests_total", &[("consumer", consumer), ("route", route), ("kind", "route"), ("status", status)])
    };
    assert_eq!(by("app", "guarded", "2xx"), 2.0);
    assert_eq!(by("web", "guarded", "2xx"), 1.0);
    assert_eq!(by("web", "gone", "5xx"), 1.0);
    // A refused request has no consumer: it is in the route's counts only.
    let consumer_total: f64 = m
        .samples
        .iter()
        .filter(|s| s.metric == "manifold_consumer_requests_total")
        .map(|s| if let PValue::Counter(v) = s.value { v } else { 0.0 })
        .sum();
    assert_eq!(consumer_total, 4.0);
    g.shutdown();
}

/// A name ending in `_total` promises a counter (Prometheus' naming rules):
/// every such family is typed `counter`, whatever keeps its total.
#[tokio::test(flavor = "multi_thread")]
async fn every_total_is_a_counter() {
    let b = backend().run().await;
    let g = gateway(&format!("routes:\n  - {{ name: r, path: /r, upstream: \"{}\" }}\n", b.url()));
    assert_eq!(common::send("GET", &format!("http://{}/r", g.proxy_addr), None, &[]).await.0, 200);
    let text = client().get(format!("http://{}/metrics", g.admin_addr)).send().await.unwrap().text().await.unwrap();
    let types: Vec<(&str, &str)> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
    let totals: Vec<_> = types.iter().filter(|(name, _)| name.ends_with("_total")).collect();
    assert!(totals.len() >= 3, "the node's counters are there: {types:?}");
    let wrong: Vec<_> = totals.iter().filter(|(_, kind)| *kind != "counter").collect();
    assert!(wrong.is_empty(), "families named _total that are not counters: {wrong:?}");
    for name in ["manifold_config_reloads_total", "manifold_rate_limit_fallbacks_total", "manifold_requests_total"] {
        assert!(totals.iter().any(|(n, _)| *n == name), "{name} in {totals:?}");
    }
}
