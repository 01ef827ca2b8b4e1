//! The admin API in DB-less mode, and hot reload through `POST /config`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{backend, client, gateway, gateway_with};
use manifold::gateway::{Gateway, GatewayOptions};
use serde_json::{json, Value};

fn route_config(name: &str, upstream: &str) -> String {
    format!("routes:\n  - {{ name: {name}, path: \"/api/{{*rest}}\", upstream: \"{upstream}\" }}\n")
}

async fn post_config(g: &Gateway, body: &str, query: &str) -> (u16, Value) {
    let resp = client()
        .post(format!("http://{}/config{query}", g.admin_addr))
        .header("content-type", "application/yaml")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_under_load_loses_no_request() {
    let a = backend().run().await;
    let b = backend().run().await;
    let g = gateway(&route_config("api", &a.url()));
    let url = format!("http://{}/api/x", g.proxy_addr);
    let load = common::Load::start(&url, 8);
    for i in 0..20 {
        let (name, upstream) = if i % 2 == 0 { ("api-b", b.url()) } else { ("api-a", a.url()) };
        let (status, body) = post_config(&g, &route_config(name, &upstream), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"], i + 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during reloads");
    assert!(ok > 20);
    // Both configs really served traffic.
    assert!(a.hits.load(Ordering::SeqCst) > 0 && b.hits.load(Ordering::SeqCst) > 0);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_requests_finish_on_the_old_config() {
    let slow = backend().delay(Duration::from_millis(700)).run().await;
    let g = gateway(&route_config("api", &slow.url()));
    let url = format!("http://{}/api/x", g.proxy_addr);
    // Waiting for the backend is registered before the request goes out:
    // `notify_waiters` wakes only waiters that exist already.
    let arrived = slow.arrived.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let in_flight = tokio::spawn(async move { client().get(&url).send().await.unwrap().status().as_u16() });
    arrived.await;
    let (status, _) = post_config(&g, "routes: []\n", "").await;
    assert_eq!(status, 200);
    assert_eq!(in_flight.await.unwrap(), 200);
    let after = client().get(format!("http://{}/api/x", g.proxy_addr)).send().await.unwrap();
    assert_eq!(after.status(), 404);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_config_is_refused_whole_with_every_error() {
    let a = backend().run().await;
    let g = gateway(&route_config("api", &a.url()));
    let bad = "routes:\n  - { name: Bad, path: nope, upstream: \"ftp://x\" }\n  - { name: ok, path: /ok, upstream: \"http://127.0.0.1:1\", policies: [ghost] }\n";
    let (status, body) = post_config(&g, bad, "").await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "invalid config");
    let fields = body["fields"].as_object().unwrap();
    for key in ["routes.Bad.name", "routes.Bad.path", "routes.Bad.upstream", "routes.ok.policies[0]"] {
        assert!(fields.contains_key(key), "{key} missing in {body}");
    }
    // The old config still serves.
    assert_eq!(client().get(format!("http://{}/api/x", g.proxy_addr)).send().await.unwrap().status(), 200);
    let status: Value = client().get(format!("http://{}/status", g.admin_addr)).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["config_version"], 1);

    let (status, body) = post_config(&g, "routes: [unclosed", "").await;
    assert_eq!(status, 400);
    assert!(body["fields"]["(document)"].as_str().unwrap().starts_with("invalid YAML"), "{body}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_refuses_what_the_write_would_refuse_even_a_missing_tls_file() {
    let g = gateway("routes:\n  - { name: a, path: /a, upstream: \"http://127.0.0.1:1\" }\n");
    let next = "upstreams:\n  - { name: u, targets: [{ url: \"https://127.0.0.1:1\" }], tls: { ca_file: /nonexistent/ca.pem } }\nroutes:\n  - { name: a, path: /a, upstream: u }\n";
    for query in ["?dry_run=true", ""] {
        let (status, body) = post_config(&g, next, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = body["fields"]["upstreams.u.tls.ca_file"].as_str().unwrap_or_else(|| panic!("{query}: {body}"));
        assert!(message.contains("/nonexistent/ca.pem"), "{message}");
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_answers_the_diff_and_changes_nothing() {
    let g = gateway("routes:\n  - { name: a, path: /a, upstream: \"http://127.0.0.1:1\" }\n  - { name: b, path: /b, upstream: \"http://127.0.0.1:1\" }\n");
    let next = "routes:\n  - { name: a, path: /a, upstream: \"http://127.0.0.1:2\" }\n  - { name: c, path: /c, upstream: \"http://127.0.0.1:1\" }\n";
    let (status, body) = post_config(&g, next, "?dry_run=true").await;
    assert_eq!(status, 200);
    assert_eq!(body["changes"]["created"], json!([{"kind": "routes", "name": "c"}]));
    // An update names each field that changes, before and after.
    assert_eq!(
        body["changes"]["updated"],
        json!([{"kind": "routes", "name": "a", "fields": [{"path": "upstream", "before": "http://127.0.0.1:1", "after": "http://127.0.0.1:2"}]}])
    );
    assert_eq!(body["changes"]["deleted"], json!([{"kind": "routes", "name": "b"}]));
    let config: Value = client().get(format!("http://{}/config", g.admin_addr)).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["routes"][1]["name"], "b");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_status_and_read_only_entities() {
    let mut yaml = String::from("routes:\n");
    for i in 0..5 {
        yaml.push_str(&format!("  - {{ name: r{i}, path: /r{i}, upstream: \"http://127.0.0.1:1\", timeout: 1500ms }}\n"));
    }
    let g = gateway(&yaml);
    let admin = format!("http://{}", g.admin_addr);
    let c = client();

    let text = c.get(format!("{admin}/config")).header("accept", "application/yaml").send().await.unwrap().text().await.unwrap();
    assert!(text.contains("- name: r0") && text.contains("timeout: 1500ms"), "{text}");
    let json: Value = c.get(format!("{admin}/config")).send().await.unwrap().json().await.unwrap();
    assert_eq!(json["routes"].as_array().unwrap().len(), 5);
    // What GET /config answers is a config POST /config accepts.
    let (status, _) = post_config(&g, &text, "").await;
    assert_eq!(status, 200);

    let page: Value = c.get(format!("{admin}/routes?size=2&offset=2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect::<Vec<_>>(), ["r2", "r3"]);
    assert_eq!(page["next"], "/routes?size=2&offset=4");
    let last: Value = c.get(format!("{admin}/routes?size=2&offset=4")).send().await.unwrap().json().await.unwrap();
    assert_eq!(last["next"], Value::Null);

    let one = c.get(format!("{admin}/routes/r3")).send().await.unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap()["path"], "/r3");
    let missing = c.get(format!("{admin}/routes/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap(), json!({"message": "not found"}));

    for (method, path) in [("POST", "/routes"), ("PUT", "/routes/r1"), ("PATCH", "/routes/r1"), ("DELETE", "/routes/r1")] {
        let resp = c.request(method.parse().unwrap(), format!("{admin}{path}")).json(&json!({"name": "x"})).send().await.unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert!(resp.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("DB-less"));
    }

    let status: Value = c.get(format!("{admin}/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["mode"], "db-less");
    assert_eq!(status["config_version"], 2);
    assert!(status["node_id"].as_str().is_some_and(|id| id.len() == 36));
    assert_eq!(c.get(format!("{admin}/status/ready")).send().await.unwrap().status(), 200);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_guards_the_api() {
    let opts = GatewayOptions { admin_token: Some("s3cret".into()), ..GatewayOptions::default() };
    let g = gateway_with("routes: []", opts);
    let admin = format!("http://{}", g.admin_addr);
    let c = client();
    assert_eq!(c.get(format!("{admin}/config")).send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{admin}/config")).bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{admin}/config")).bearer_auth("s3cret").send().await.unwrap().status(), 200);
    // Probes need no token.
    assert_eq!(c.get(format!("{admin}/status/ready")).send().await.unwrap().status(), 200);
    g.shutdown();

    // A non-loopback admin listener without a token is refused.
    let opts = GatewayOptions { admin_listen: "0.0.0.0:0".parse().unwrap(), ..GatewayOptions::default() };
    let err = Gateway::start(opts, manifold::config::Config::default()).err().expect("refused").to_string();
    assert!(err.contains("without a token"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_describes_the_api_from_the_config_types() {
    let g = gateway("routes: []");
    let doc: Value = client().get(format!("http://{}/openapi.json", g.admin_addr)).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/routes",
        "/routes/{name}",
        "/compositions/{name}",
        "/config",
        "/audit",
        "/consumers/{name}/credentials",
        "/compositions/{name}/try",
        "/compositions/{name}/validate",
        "/compositions/{name}/yaml",
        "/upstreams",
        "/upstreams/{name}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let upstream = &doc["components"]["schemas"]["Upstream"];
    for field in
        ["name", "tags", "targets", "balance", "hash_on", "connect_timeout", "health", "retries", "circuit_breaker", "tls", "http2"]
    {
        assert!(upstream["properties"].get(field).is_some(), "Upstream.{field} missing: {upstream}");
    }
    assert!(doc["paths"]["/upstreams/{name}"]["delete"]["responses"].get("409").is_some());
    let item = &doc["paths"]["/routes/{name}"];
    for method in ["get", "put", "patch", "delete"] {
        assert!(item.get(method).is_some(), "{method} /routes/{{name}}");
    }
    assert!(item["put"]["responses"].get("412").is_some());
    // What try takes and answers, and the non-JSON endpoints.
    let try_op = &doc["paths"]["/compositions/{name}/try"]["post"];
    let try_body = &try_op["requestBody"]["content"]["application/json"]["schema"];
    for field in ["path", "method", "query", "headers", "body", "composition"] {
        assert!(try_body["properties"].get(field).is_some(), "try body {field} missing: {try_body}");
    }
    assert_eq!(try_body["required"], json!(["path"]));
    let answer = &try_op["responses"]["200"]["content"]["application/json"]["schema"];
    assert!(answer["properties"]["calls"]["items"]["properties"].get("duration_ms").is_some(), "{answer}");
    assert!(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"].get("text/plain").is_some());
    assert!(doc["paths"]["/ui"]["get"]["responses"]["200"]["content"].get("text/html").is_some());
    assert!(item["put"]["requestBody"]["content"].get("application/yaml").is_some(), "entity writes take YAML");
    // The schemas are the config types': every field of a route, durations as strings.
    let route = &doc["components"]["schemas"]["Route"];
    for field in ["name", "path", "upstream", "path_rewrite", "timeout", "preserve_host", "policies"] {
        assert!(route["properties"].get(field).is_some(), "Route.{field} missing: {route}");
    }
    assert!(route["required"].as_array().unwrap().contains(&json!("upstream")));
    let call = doc["components"]["schemas"].as_object().unwrap().get("Call").cloned().unwrap_or(Value::Null);
    assert!(call.to_string().contains("for_each"), "nested types are described too: {call}");
    // No reference points nowhere.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected ref {r}"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling reference {r}");
    }
    g.shutdown();
}

/// DB-less mode: upstreams come with `POST /config` like every entity, are
/// read at `/upstreams`, and are read-only there.
#[tokio::test(flavor = "multi_thread")]
async fn upstreams_through_post_config_and_read_only_reads() {
    let g = gateway("routes: []");
    let admin = format!("http://{}", g.admin_addr);
    let c = client();
    let yaml = "upstreams:\n  - name: users\n    tags: [team-a]\n    targets:\n      - { url: \"http://10.0.0.1:8080\", weight: 10 }\n      - { url: \"http://10.0.0.2:8080\" }\n  - { name: orders, targets: [{ url: \"https://orders.internal\" }], tls: { verify: false } }\n";
    let (status, body) = post_config(&g, yaml, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["created"], json!([{"kind": "upstreams", "name": "users"}, {"kind": "upstreams", "name": "orders"}]));

    let page: Value = c.get(format!("{admin}/upstreams")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect::<Vec<_>>(), ["users", "orders"]);
    let tagged: Value = c.get(format!("{admin}/upstreams?tags=team-a")).send().await.unwrap().json().await.unwrap();
    assert_eq!(tagged["data"].as_array().unwrap().len(), 1);
    let one: Value = c.get(format!("{admin}/upstreams/users")).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["targets"], json!([{"url": "http://10.0.0.1:8080", "weight": 10}, {"url": "http://10.0.0.2:8080"}]));
    let orders: Value = c.get(format!("{admin}/upstreams/orders")).send().await.unwrap().json().await.unwrap();
    assert_eq!(orders["tls"], json!({"verify": false}), "written out, as SPEC asks of verify: false");
    assert_eq!(c.get(format!("{admin}/upstreams/nope")).send().await.unwrap().status(), 404);
    for (method, path) in
        [("POST", "/upstreams"), ("PUT", "/upstreams/users"), ("PATCH", "/upstreams/users"), ("DELETE", "/upstreams/users")]
    {
        let resp = c.request(method.parse().unwrap(), format!("{admin}{path}")).json(&json!({"name": "x"})).send().await.unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
    }
    let status: Value = c.get(format!("{admin}/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["entities"]["upstreams"], 2);

    // What GET /config answers is a config POST /config accepts, upstreams included.
    let text = c.get(format!("{admin}/config")).header("accept", "application/yaml").send().await.unwrap().text().await.unwrap();
    assert!(text.contains("upstreams:") && text.contains("weight: 10"), "{text}");
    let (status, body) = post_config(&g, &text, "").await;
    assert_eq!((status, &body["changes"]["updated"]), (200, &json!([])), "{body}");

    // Every error of an invalid upstream, by field; the old config stays.
    let bad = "upstreams:\n  - { name: users, targets: [{ url: \"http://10.0.0.1:8080/x\", weight: 0 }], balance: least-requests, hash_on: path }\nroutes:\n  - { name: r, path: /r, upstream: ghost }\n";
    let (status, body) = post_config(&g, bad, "").await;
    assert_eq!(status, 400);
    for key in ["upstreams.users.targets[0].url", "upstreams.users.targets[0].weight", "upstreams.users.hash_on", "routes.r.upstream"] {
        assert!(body["fields"][key].is_string(), "{key} missing in {body}");
    }
    let page: Value = c.get(format!("{admin}/upstreams")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    g.shutdown();
}
