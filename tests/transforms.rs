//! The policies that reshape traffic rather than refuse it (SPEC §2):
//! `request-transform` and `response-transform` (remove, rename, replace,
//! add, in that order, as Kong's transformers), `cors` (preflights answered
//! by the gateway, before authentication) and `response-cache` (RFC 9211
//! `Cache-Status`), each checked through what a real backend saw or a real
//! client got.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, client, gateway};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONSUMERS: &str = r#"
consumers:
  - name: app
    credentials: [{ type: key-auth, key: k-app }]
"#;

fn header(h: &HeaderMap, name: &str) -> String {
    h.get_all(name).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>().join(", ")
}

/// The query string a backend saw, decoded and sorted.
fn query_pairs(echo: &Value) -> Vec<(String, String)> {
    let raw = echo["query"].as_str().unwrap_or("");
    let url = reqwest::Url::parse(&format!("http://x/?{raw}")).unwrap();
    let mut pairs: Vec<_> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    pairs.sort();
    pairs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    v.sort();
    v
}

/// A backend answering a fixed head and body: the echo backend cannot set
/// response headers of one's choosing.
async fn canned_backend(head: &'static str, body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let hits = h.clone();
            tokio::spawn(async move {
                let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let answer = format!("HTTP/1.1 200 OK\r\n{head}content-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), hits)
}

/// Status, headers and body bytes, with the body's length checked against
/// its `Content-Length`.
async fn fetch(req: reqwest::RequestBuilder) -> (u16, HeaderMap, bytes::Bytes) {
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let bytes = resp.bytes().await.unwrap();
    if let Some(len) = headers.get("content-length") {
        assert_eq!(len.to_str().unwrap().parse::<usize>().unwrap(), bytes.len(), "Content-Length matches the body");
    }
    (status, headers, bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn request_transform_removes_renames_replaces_then_adds() {
    let b = backend().run().await;
    let g = gateway(
        &r#"
policies:
  - name: t
    type: request-transform
    config:
      remove:  { headers: [X-Drop], query: [drop], body: [password] }
      # Each later step sees the earlier ones: a removed field is not renamed,
      # a renamed one is replaced, what replace found absent is added.
      rename:  { headers: { X-Old: x-new, x-drop: x-dropped }, query: { old: new }, body: { user: username, password: pass } }
      replace: { headers: { x-new: from-replace, x-mode: replaced, x-absent: nope }, query: { mode: replaced, absent: nope }, body: { role: user, absent: nope } }
      add:     { headers: { x-mode: not-added, x-absent: added, x-tenant-copy: "{{request.headers.x-tenant}}" }, query: { mode: not-added, added: "yes" }, body: { role: not-added, absent: added, source: gateway, tags: [a, b] } }
routes:
  - { name: r, path: "/r/{id}", upstream: "BACKEND", policies: [t] }
"#
        .replace("BACKEND", &b.url()),
    );
    let url = format!("http://{}/r/42?keep=1&drop=x&old=o&mode=orig", g.proxy_addr);
    let body = json!({"user": "ada", "password": "pw", "role": "admin", "keep": true});
    let headers = [("x-drop", "1"), ("x-old", "o"), ("x-mode", "orig"), ("x-tenant", "acme")];
    let (s, _, echo) = common::send("POST", &url, Some(body), &headers).await;
    assert_eq!(s, 200, "{echo}");

    let h = &echo["headers"];
    for gone in ["x-drop", "x-dropped", "x-old"] {
        assert!(h.get(gone).is_none(), "{gone} in {h}");
    }
    assert_eq!(h["x-new"], json!(["from-replace"]));
    assert_eq!(h["x-mode"], json!(["replaced"]));
    assert_eq!(h["x-absent"], json!(["added"]));
    assert_eq!(h["x-tenant-copy"], json!(["acme"]), "a template value");
    assert_eq!(h["x-tenant"], json!(["acme"]));

    let want = pairs(&[("keep", "1"), ("new", "o"), ("mode", "replaced"), ("added", "yes")]);
    assert_eq!(query_pairs(&echo), want);
    assert_eq!(
        echo["json"],
        json!({"username": "ada", "role": "user", "keep": true, "absent": "added", "source": "gateway", "tags": ["a", "b"]}),
        "a re-encoded body arrives whole"
    );
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn request_transform_templates_read_the_request_context() {
    let b = backend().run().await;
    let g = gateway(
        &(CONSUMERS.to_string()
            + r#"
policies:
  - { name: keys, type: key-auth }
  - name: t
    type: request-transform
    config:
      add:
        headers: { x-caller: "{{request.consumer.name}}", x-item: "{{request.path.id}}" }
        query: { search: "{{request.query.q}}" }
        body: { who: "{{request.consumer.name}}", item: "{{request.path.id}}", count: 3, nested: { a: 1 } }
routes:
  - { name: r, path: "/items/{id}", upstream: "BACKEND", policies: [t, keys] }
"#)
        .replace("BACKEND", &b.url()),
    );
    let url = format!("http://{}/items/i-7?q=two%20words", g.proxy_addr);
    let (s, _, echo) = common::send("POST", &url, Some(json!({})), &[("apikey", "k-app")]).await;
    assert_eq!(s, 200, "{echo}");
    assert_eq!(echo["headers"]["x-caller"], json!(["app"]), "authentication ran first");
    assert_eq!(echo["headers"]["x-item"], json!(["i-7"]));
    assert_eq!(query_pairs(&echo), pairs(&[("q", "two words"), ("search", "two words")]));
    assert_eq!(echo["json"], json!({"who": "app", "item": "i-7", "count": 3, "nested": {"a": 1}}));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn request_transform_leaves_bodies_that_are_not_json_objects_alone() {
    let b = backend().run().await;
    let g = gateway(
        &r#"
policies:
  - { name: t, type: request-transform, config: { remove: { body: [a] }, add: { headers: { x-seen: "yes" }, body: { added: true } } } }
routes:
  - { name: r, path: /r, upstream: "BACKEND", policies: [t] }
"#
        .replace("BACKEND", &b.url()),
    );
    let url = format!("http://{}/r", g.proxy_addr);
    let (s, _, echo) = common::send("POST", &url, Some(json!([{"a": 1}, 2])), &[]).await;
    assert_eq!(s, 200, "{echo}");
    assert_eq!(echo["json"], json!([{"a": 1}, 2]), "an array is passed as it came");
    assert_eq!(echo["headers"]["x-seen"], json!(["yes"]), "header operations still apply");

    let text = "a=1&added=false";
    let resp = client().post(&url).header("content-type", "text/plain").body(text).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["body_bytes"], text.len());
    assert_eq!(echo["json"], Value::Null);
    assert_eq!(echo["headers"]["content-type"], json!(["text/plain"]));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn response_transform_reshapes_a_routes_answer() {
    let (json_url, _) = canned_backend(
        "content-type: application/json\r\nx-internal: secret\r\nx-old: o\r\n",
        r#"{"name": "Ada", "secret": "s3", "status": "internal", "version": 1}"#,
    )
    .await;
    let text = backend().raw("text/plain", "plain words, not JSON").run().await;
    let g = gateway(
        &r#"
policies:
  - name: t
    type: response-transform
    config:
      remove:  { headers: [X-Internal], body: [secret] }
      rename:  { headers: { X-Old: x-new }, body: { name: full_name, secret: leaked } }
      replace: { headers: { x-new: from-replace, x-absent: nope }, body: { status: public, absent: nope } }
      add:     { headers: { x-served-by: manifold, content-type: text/plain }, body: { version: 2, links: { self: /j } } }
routes:
  - { name: j, path: /j, upstream: "JSON", policies: [t] }
  - { name: txt, path: /txt, upstream: "TEXT", policies: [t] }
"#
        .replace("JSON", &json_url)
        .replace("TEXT", &text.url()),
    );
    let base = format!("http://{}", g.proxy_addr);
    let (s, h, bytes) = fetch(client().get(format!("{base}/j"))).await;
    assert_eq!(s, 200);
    assert!(h.get("x-internal").is_none() && h.get("x-old").is_none(), "{h:?}");
    assert_eq!(header(&h, "x-new"), "from-replace");
    assert!(h.get("x-absent").is_none(), "replace only changes what is there");
    assert_eq!(header(&h, "x-served-by"), "manifold");
    assert_eq!(header(&h, "content-type"), "application/json", "add only sets what is absent");
    let body: Value = serde_json::from_slice(&bytes).expect("a JSON body");
    assert_eq!(body, json!({"full_name": "Ada", "status": "public", "version": 1, "links": {"self": "/j"}}));

    let (s, h, bytes) = fetch(client().get(format!("{base}/txt"))).await;
    assert_eq!(s, 200);
    assert_eq!(&bytes[..], b"plain words, not JSON", "a body that is not JSON passes untouched");
    assert_eq!(header(&h, "x-served-by"), "manifold");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn response_transform_reshapes_a_compositions_answer() {
    let b = backend().json(json!({"id": 1})).run().await;
    let g = gateway(
        &r#"
policies:
  - { name: t, type: response-transform, config: { remove: { headers: [x-internal], body: [b] }, rename: { body: { a: first } }, add: { headers: { x-shaped: "yes" }, body: { count: 2 } } } }
compositions:
  - name: c
    path: /c
    policies: [t]
    calls: { a: { url: "BACKEND/a" }, b: { url: "BACKEND/b" } }
    response:
      headers: { x-internal: secret }
"#
        .replace("BACKEND", &b.url()),
    );
    let (s, h, bytes) = fetch(client().get(format!("http://{}/c", g.proxy_addr))).await;
    assert_eq!(s, 200);
    assert!(h.get("x-internal").is_none(), "{h:?}");
    assert_eq!(header(&h, "x-shaped"), "yes");
    assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"first": {"id": 1}, "count": 2}));
    g.shutdown();
}

const CORS: &str = r#"
  - name: cors
    type: cors
    config: { origins: ["https://app.example"], methods: [GET, POST], headers: [x-token], exposed_headers: [x-total], credentials: true, max_age: 10m }
"#;

async fn preflight(url: &str, origin: &str) -> (u16, HeaderMap, Value) {
    let headers = [("origin", origin), ("access-control-request-method", "POST"), ("access-control-request-headers", "x-token")];
    let (s, h, body) = common::send("OPTIONS", url, None, &headers).await;
    (s.as_u16(), h, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflights_are_answered_by_the_gateway() {
    let b = backend().run().await;
    let g = gateway(&format!(
        "policies:{CORS}routes:\n  - {{ name: c, path: /c, methods: [GET], upstream: \"{}\", policies: [cors] }}\n",
        b.url()
    ));
    let url = format!("http://{}/c", g.proxy_addr);
    let (s, h, body) = preflight(&url, "https://app.example").await;
    assert_eq!(s, 204, "not a 405 for a GET-only route: {body}");
    assert_eq!(header(&h, "access-control-allow-origin"), "https://app.example");
    let methods: Vec<String> = header(&h, "access-control-allow-methods").split(',').map(|m| m.trim().to_uppercase()).collect();
    assert!(methods.contains(&"GET".to_string()) && methods.contains(&"POST".to_string()), "{methods:?}");
    assert!(header(&h, "access-control-allow-headers").to_lowercase().contains("x-token"), "{h:?}");
    assert_eq!(header(&h, "access-control-max-age"), "600");
    assert_eq!(header(&h, "access-control-allow-credentials"), "true");
    assert!(header(&h, "vary").to_lowercase().contains("origin"), "{h:?}");

    let (s, h, body) = preflight(&url, "https://evil.example").await;
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert!(h.get("access-control-allow-origin").is_none());
    assert_eq!(b.hits.load(Ordering::SeqCst), 0, "preflights never reach the backend");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_headers_on_actual_requests_only_for_allowed_origins() {
    let b = backend().run().await;
    let g = gateway(&format!(
        "policies:{CORS}routes:\n  - {{ name: c, path: /c, methods: [GET], upstream: \"{}\", policies: [cors] }}\n",
        b.url()
    ));
    let url = format!("http://{}/c", g.proxy_addr);
    let (s, h, body) = common::send("GET", &url, None, &[("origin", "https://app.example")]).await;
    assert_eq!((s.as_u16(), body["method"].as_str()), (200, Some("GET")), "the backend's answer");
    assert_eq!(header(&h, "access-control-allow-origin"), "https://app.example");
    assert!(header(&h, "access-control-expose-headers").to_lowercase().contains("x-total"), "{h:?}");

    let (s, h, body) = common::send("GET", &url, None, &[("origin", "https://evil.example")]).await;
    assert_eq!((s.as_u16(), body["method"].as_str()), (200, Some("GET")), "still answered");
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_for_any_origin_and_before_authentication() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{CONSUMERS}
policies:
  - {{ name: anyone, type: cors, config: {{ origins: ["*"], methods: [GET, POST], headers: [x-token] }} }}
  - {{ name: keys, type: key-auth }}
routes:
  - {{ name: k, path: /k, upstream: "{}", policies: [keys, anyone] }}
"#,
        b.url()
    ));
    let url = format!("http://{}/k", g.proxy_addr);
    let (s, h, body) = preflight(&url, "https://anywhere.example").await;
    assert_eq!(s, 204, "a preflight carries no key and needs none: {body}");
    assert_eq!(header(&h, "access-control-allow-origin"), "*");
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);

    let (s, _, _) = common::send("GET", &url, None, &[("origin", "https://anywhere.example")]).await;
    assert_eq!(s, 401, "the actual request still needs a key");
    let (s, h, _) = common::send("GET", &url, None, &[("origin", "https://anywhere.example"), ("apikey", "k-app")]).await;
    assert_eq!(s, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), "*");
    g.shutdown();
}

const CACHE: &str =
    "  - { name: cache, type: response-cache, config: { ttl: 2s, vary_headers: [x-lang], vary_query: true, max_bytes: 1MiB } }\n";

/// One request's `Cache-Status`, checked to be Manifold's.
async fn cached(method: &str, url: &str, lang: &str) -> (u16, String, Value) {
    let (s, h, body) = common::send(method, url, None, &[("x-lang", lang)]).await;
    let status = header(&h, "cache-status");
    assert!(status.is_empty() || status.starts_with("manifold;"), "Cache-Status: {status}");
    (s.as_u16(), status, body)
}

fn is_hit(cache_status: &str) -> bool {
    cache_status.contains("hit") && !cache_status.contains("fwd=")
}

#[tokio::test(flavor = "multi_thread")]
async fn response_cache_hits_varies_and_expires() {
    let b = backend().run().await;
    let g = gateway(&format!("policies:\n{CACHE}routes:\n  - {{ name: c, path: /c, upstream: \"{}\", policies: [cache] }}\n", b.url()));
    let url = format!("http://{}/c?a=1", g.proxy_addr);
    let hits = || b.hits.load(Ordering::SeqCst);

    let (s, status, first) = cached("GET", &url, "en").await;
    assert_eq!(s, 200);
    assert!(status.contains("fwd=miss"), "Cache-Status: {status}");
    assert_eq!(hits(), 1);
    let (s, status, again) = cached("GET", &url, "en").await;
    assert!(s == 200 && is_hit(&status), "Cache-Status: {status}");
    assert_eq!((hits(), &again), (1, &first), "the stored answer, byte for byte");

    // Another x-lang or another query is another entry.
    let (_, status, _) = cached("GET", &url, "fr").await;
    assert!(status.contains("fwd=miss"), "Cache-Status: {status}");
    let (_, status, _) = cached("GET", &url.replace("a=1", "a=2"), "en").await;
    assert!(status.contains("fwd=miss"), "Cache-Status: {status}");
    assert_eq!(hits(), 3);
    let (_, status, _) = cached("GET", &url, "fr").await;
    assert!(is_hit(&status), "Cache-Status: {status}");
    assert_eq!(hits(), 3);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, status, _) = cached("GET", &url, "en").await;
    assert!(s == 200 && status.contains("fwd=miss"), "expired after the ttl: {status}");
    assert_eq!(hits(), 4);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn response_cache_stores_only_cacheable_answers() {
    let ok = backend().run().await;
    let failing = backend().status(500).run().await;
    let (no_store, no_store_hits) =
        canned_backend("content-type: application/json\r\ncache-control: no-store\r\n", r#"{"fresh": true}"#).await;
    let g = gateway(&format!(
        "policies:\n{CACHE}routes:
  - {{ name: ok, path: /ok, upstream: \"{}\", policies: [cache] }}
  - {{ name: failing, path: /failing, upstream: \"{}\", policies: [cache] }}
  - {{ name: no-store, path: /no-store, upstream: \"{no_store}\", policies: [cache] }}
",
        ok.url(),
        failing.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    for _ in 0..2 {
        assert_eq!(cached("POST", &format!("{base}/ok"), "en").await.0, 200);
        assert_eq!(cached("GET", &format!("{base}/failing"), "en").await.0, 500);
        assert_eq!(cached("GET", &format!("{base}/no-store"), "en").await.0, 200);
    }
    assert_eq!(ok.hits.load(Ordering::SeqCst), 2, "POST is never cached");
    assert_eq!(failing.hits.load(Ordering::SeqCst), 2, "a 500 is not stored");
    assert_eq!(no_store_hits.load(Ordering::SeqCst), 2, "Cache-Control: no-store is not stored");

    // The same route does cache a GET: the policy is on.
    let (_, status, _) = cached("GET", &format!("{base}/ok"), "en").await;
    assert!(status.contains("fwd=miss"), "Cache-Status: {status}");
    let (_, status, _) = cached("GET", &format!("{base}/ok"), "en").await;
    assert!(is_hit(&status), "Cache-Status: {status}");
    assert_eq!(ok.hits.load(Ordering::SeqCst), 3);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn response_cache_never_hands_one_callers_answer_to_another() {
    let b = backend().run().await;
    let g = gateway(&format!("policies:\n{CACHE}routes:\n  - {{ name: c, path: /c, upstream: \"{}\", policies: [cache] }}\n", b.url()));
    let url = format!("http://{}/c", g.proxy_addr);
    let get = |headers: Vec<(&'static str, &'static str)>| {
        let url = url.clone();
        async move {
            let (_, h, _) = common::send("GET", &url, None, &headers).await;
            header(&h, "cache-status")
        }
    };
    // Credentials and cookies identify the caller to the backend: each
    // caller has its own entries.
    assert!(get(vec![("authorization", "Bearer alice")]).await.contains("fwd=miss"));
    assert!(get(vec![("authorization", "Bearer bob")]).await.contains("fwd=miss"), "another token, another entry");
    assert!(is_hit(&get(vec![("authorization", "Bearer alice")]).await));
    assert!(get(vec![("cookie", "session=1")]).await.contains("fwd=miss"));
    assert!(get(vec![]).await.contains("fwd=miss"), "an anonymous caller gets no one's answer");
    // The host is part of what the backend answered (X-Forwarded-Host).
    assert!(get(vec![("host", "tenant-a.example")]).await.contains("fwd=miss"));
    assert!(get(vec![("host", "tenant-b.example")]).await.contains("fwd=miss"));
    assert!(is_hit(&get(vec![("host", "tenant-a.example")]).await));
    // HEAD is answered from what GET stored.
    let (s, h, _) = common::send("HEAD", &url, None, &[]).await;
    assert!(s == 200 && is_hit(&header(&h, "cache-status")), "{h:?}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 6);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preflight_for_a_method_is_decided_by_that_methods_route() {
    let b = backend().run().await;
    let g = gateway(&format!(
        "policies:{CORS}routes:
  - {{ name: read, path: /items, methods: [GET], upstream: \"{0}\", policies: [cors] }}
  - {{ name: write, path: /items, methods: [POST], upstream: \"{0}\" }}
",
        b.url()
    ));
    // POST /items has a route, without cors: the GET route's policy must
    // not open it to other origins.
    let (s, h, _) = preflight(&format!("http://{}/items", g.proxy_addr), "https://app.example").await;
    assert_ne!(s, 204);
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_transform_refuses_a_body_that_claims_json_and_is_not() {
    let b = backend().run().await;
    let g = gateway(&format!(
        "policies:\n  - {{ name: t, type: request-transform, config: {{ remove: {{ body: [is_admin] }} }} }}\nroutes:\n  - {{ name: r, path: /r, upstream: \"{}\", policies: [t] }}\n",
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    // A lone surrogate: serde_json refuses it, lenient backends do not; the
    // field the transform removes must not slip through.
    let body = r#"{"is_admin": true, "x": "\ud800"}"#;
    let resp = client().post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
    let (s, _, echo) = common::send("POST", &url, Some(json!({"is_admin": true, "x": 1})), &[]).await;
    assert_eq!((s.as_u16(), &echo["json"]), (200, &json!({"x": 1})));
    g.shutdown();
}
