//! Compositions end to end (SPEC §2 compositions, §5 try): a real gateway
//! and real backends. Concurrency and order are proved by causality
//! (barriers, values only one call could produce), never by durations.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{backend, client, gateway};
use serde_json::{json, Value};

async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers, body) = common::send("GET", url, None, &[]).await;
    (status.as_u16(), headers, body)
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_calls_run_at_once() {
    // Each backend holds its answer until all three requests have arrived:
    // the composition can only answer if it sent them concurrently.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let a = backend().barrier(barrier.clone()).json(json!({"n": 1})).run().await;
    let b = backend().barrier(barrier.clone()).json(json!({"n": 2})).run().await;
    let c = backend().barrier(barrier.clone()).json(json!({"n": 3})).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: fan
    path: /fan
    timeout: 10s
    calls:
      a: {{ url: "{}/a" }}
      b: {{ url: "{}/b" }}
      c: {{ url: "{}/c" }}
"#,
        a.url(),
        b.url(),
        c.url()
    ));
    let (status, headers, body) = get(&format!("http://{}/fan", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    // The default body: each call's body under its name.
    assert_eq!(body, json!({"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}));
    let timing = header(&headers, "server-timing").unwrap();
    for name in ["a;dur=", "b;dur=", "c;dur=", "total;dur="] {
        assert!(timing.contains(name), "{timing}");
    }
    assert!(header(&headers, "manifold-partial").is_none());
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependent_call_reads_what_only_its_input_could_produce() {
    let users = backend().json(json!({"id": 7, "seller_id": "s-93a"})).run().await;
    // The seller backend answers only for the seller the user call named.
    let sellers = backend()
        .respond(
            |req| if req["path"] == "/sellers/s-93a" { (200, json!({"name": "Acme"})) } else { (404, json!({"error": "wrong seller"})) },
        )
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: "/users/{{id}}/dash"
    calls:
      user: {{ url: "{u}/users/{{{{request.path.id}}}}" }}
      seller: {{ url: "{s}/sellers/{{{{user.body.seller_id}}}}", when: $.user.body.seller_id }}
    response:
      body: {{ id: $.user.body.id, seller: $.seller.body.name, seller_status: $.seller.status }}
"#,
        u = users.url(),
        s = sellers.url()
    ));
    let (status, _, body) = get(&format!("http://{}/users/7/dash", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"id": 7, "seller": "Acme", "seller_status": 200}));
    assert_eq!(users.seen.lock().unwrap()[0]["path"], "/users/7");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_context_holds_the_request_and_every_call() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: ctx
    method: POST
    path: "/ctx/{{name}}"
    calls:
      echo:
        method: POST
        url: "{}/echo/{{{{request.path.name}}}}?q={{{{request.query.q}}}}"
        headers: {{ x-tenant: "{{{{request.headers.x-tenant}}}}" }}
        forward_headers: [authorization]
        body: {{ user: $.request.body.user, kind: view, price: "$$5" }}
    response:
      body:
        method: $.request.method
        name: $.request.path.name
        q: $.request.query.q
        status: $.echo.status
        error: $.echo.error
        content_type: "$.echo.headers['content-type']"
        took: $.echo.duration_ms
        backend_saw: $.echo.body
"#,
        b.url()
    ));
    let resp = client()
        .post(format!("http://{}/ctx/caf%C3%A9?q=a%20b&q=second", g.proxy_addr))
        .header("x-tenant", "t-1")
        .header("authorization", "Bearer abc")
        .header("x-private", "not forwarded")
        .json(&json!({"user": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    assert_eq!(body["name"], "café", "path values are percent-decoded");
    assert_eq!(body["q"], "a b", "the first value of a query parameter, decoded");
    assert_eq!(body["status"], 200);
    assert_eq!(body["error"], Value::Null);
    assert_eq!(body["content_type"], "application/json");
    assert!(body["took"].is_number());
    let saw = &body["backend_saw"];
    assert_eq!(saw["method"], "POST");
    assert_eq!(saw["path"], "/echo/caf%C3%A9", "re-encoded as one segment");
    assert_eq!(saw["query"], "q=a%20b");
    assert_eq!(saw["headers"]["x-tenant"][0], "t-1");
    assert_eq!(saw["headers"]["authorization"][0], "Bearer abc");
    assert!(saw["headers"].get("x-private").is_none());
    assert_eq!(saw["json"], json!({"user": 42, "kind": "view", "price": "$5"}));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_values_cannot_leave_their_place_in_the_url() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: ssrf
    path: /ssrf
    calls:
      echo:
        url: "{}/items/{{{{request.query.id}}}}/detail?tag={{{{request.query.tag}}}}&fixed=1"
        headers: {{ x-note: "{{{{request.query.note}}}}" }}
"#,
        b.url()
    ));
    let base = format!("http://{}/ssrf", g.proxy_addr);
    let long = "x".repeat(3000);
    let cases: Vec<(&str, &str, &str)> = vec![
        ("..%2Fadmin", "/items/..%2Fadmin/detail", "tag=t&fixed=1"),
        ("%252e%252e", "/items/%252e%252e/detail", "tag=t&fixed=1"),
        ("a%2Fb", "/items/a%2Fb/detail", "tag=t&fixed=1"),
        ("%3Fx%3D1%23", "/items/%3Fx%3D1%23/detail", "tag=t&fixed=1"),
        ("%40evil.com", "/items/%40evil.com/detail", "tag=t&fixed=1"),
        (&long, "", "tag=t&fixed=1"),
    ];
    for (id, want_path, want_query) in cases {
        let (status, _, body) = get(&format!("{base}?id={id}&tag=t")).await;
        assert_eq!(status, 200, "{id}: {body}");
        let saw = &body["echo"];
        if !want_path.is_empty() {
            assert_eq!(saw["path"], want_path, "{id}");
        } else {
            assert_eq!(saw["path"], format!("/items/{long}/detail"));
        }
        assert_eq!(saw["query"], want_query, "{id}");
    }
    // A query value cannot add parameters.
    let (_, _, body) = get(&format!("{base}?id=1&tag=a%26admin%3Dtrue")).await;
    assert_eq!(body["echo"]["query"], "tag=a%26admin%3Dtrue&fixed=1");
    // A value that is itself a dot segment is refused, not sent.
    let hits = b.hits.load(Ordering::SeqCst);
    let (status, _, body) = get(&format!("{base}?id=..&tag=t")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    // Nor is an empty value, which would merge two segments (`/items//detail`).
    let (status, _, _) = get(&format!("{base}?id=&tag=t")).await;
    assert_eq!(status, 400);
    // CR/LF cannot reach a header.
    let (status, _, _) = get(&format!("{base}?id=1&tag=t&note=a%0D%0AX-Injected:%201")).await;
    assert_eq!(status, 400);
    assert_eq!(b.hits.load(Ordering::SeqCst), hits, "refused requests never reached the backend");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_failure_answers_for_the_composition_and_cancels_the_rest() {
    // The user call fails only once the sibling's request has arrived, so
    // there is a running sibling to cancel (not one never sent).
    let both_sent = Arc::new(tokio::sync::Barrier::new(2));
    let not_found = backend().status(404).json(json!({"error": "no such user", "id": 9})).barrier(both_sent.clone()).run().await;
    let broken = backend().status(500).json(json!({"stack": "secret internals at 10.0.0.7"})).run().await;
    let slow = backend().delay(Duration::from_secs(3)).run().await;
    let sibling = backend().delay(Duration::from_secs(30)).barrier(both_sent).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: four
    path: /four
    calls:
      user: {{ url: "{nf}/users/9" }}
      other: {{ url: "{sib}/slow", required: false }}
  - name: five
    path: /five
    calls:
      user: {{ url: "{br}/users/9" }}
  - name: late
    path: /late
    timeout: 300ms
    calls:
      user: {{ url: "{slow}/users/9" }}
  - name: call-timeout
    path: /call-timeout
    calls:
      user: {{ url: "{slow}/users/9", timeout: 200ms }}
"#,
        nf = not_found.url(),
        br = broken.url(),
        slow = slow.url(),
        sib = sibling.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    // A backend's own 4xx passes through, status and body.
    let (status, headers, body) = get(&format!("{base}/four")).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"error": "no such user", "id": 9}));
    assert!(header(&headers, "server-timing").unwrap().contains("user;dur="));
    // The sibling still running was cancelled: its request was dropped.
    let mut waited = 0;
    while sibling.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(waited < 200, "the running sibling was not cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    // Anything else is a gateway error that leaks nothing.
    let (status, _, body) = get(&format!("{base}/five")).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_error");
    assert!(!body.to_string().contains("secret") && !body.to_string().contains("10.0.0.7"));
    for path in ["/late", "/call-timeout"] {
        let (status, headers, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 504, "{path}");
        assert_eq!(body["error"]["code"], "upstream_timeout");
        assert!(header(&headers, "server-timing").unwrap().contains("desc=\"timeout\""), "{path}");
    }
    g.shutdown();
}

/// An optional call's `fallback` is its body when it fails and when it is
/// skipped; the calls that read it run on it (a skipped call's fallback
/// feeds its own dependents too), and both stay in `Manifold-Partial`.
#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_is_the_body_of_a_failed_or_skipped_optional_call() {
    let echo = backend().run().await;
    let down = backend().status(503).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: fb
    path: /fb
    calls:
      recs: {{ url: "{d}/recs", required: false, fallback: {{ items: [], source: fallback }} }}
      detail: {{ url: "{u}/detail?source={{{{recs.body.source}}}}" }}
      orders: {{ url: "{d}/orders", required: false }}
      products: {{ url: "{u}/products/{{{{orders.body.first}}}}", required: false, fallback: [] }}
      review: {{ url: "{u}/review", when: $.products.error }}
    response:
      body:
        recs: $.recs.body
        recs_error: $.recs.error.kind
        detail_query: $.detail.body.query
        products: $.products.body
        products_error: $.products.error.kind
        review_error: $.review.error
"#,
        u = echo.url(),
        d = down.url()
    ));
    let (status, headers, body) = get(&format!("http://{}/fb", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    // recs failed: its fallback is its body, and `detail` ran on it.
    assert_eq!(body["recs"], json!({"items": [], "source": "fallback"}), "{body}");
    assert_eq!(body["recs_error"], "status");
    assert_eq!(body["detail_query"], "source=fallback");
    // products was skipped (orders failed, no fallback): its fallback is
    // its body, and `review`, which reads it, ran.
    assert_eq!(body["products"], json!([]));
    assert_eq!(body["products_error"], "skipped");
    assert_eq!(body["review_error"], Value::Null);
    assert_eq!(header(&headers, "manifold-partial"), Some("recs, orders, products"));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn optional_failures_skip_dependents_and_are_listed() {
    let users = backend().json(json!({"id": 1, "seller_id": 5, "vip": false})).run().await;
    let down = backend().status(503).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: partial
    path: /partial
    calls:
      user: {{ url: "{u}/users/1" }}
      orders: {{ url: "{d}/orders", required: false }}
      products: {{ url: "{u}/products/{{{{orders.body.first}}}}" }}
      perks: {{ url: "{u}/perks", when: $.user.body.vip }}
      perk_details: {{ url: "{u}/perks/{{{{perks.body.id}}}}" }}
    response:
      body:
        id: $.user.body.id
        orders: $.orders.body
        orders_error: $.orders.error.kind
        products_error: $.products.error.kind
        perks: $.perks.body
        perks_error: $.perks.error
"#,
        u = users.url(),
        d = down.url()
    ));
    let (status, headers, body) = get(&format!("http://{}/partial", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": 1, "orders": null, "orders_error": "status", "products_error": "skipped", "perks": null, "perks_error": null})
    );
    // Failed and skipped calls are listed; calls whose `when` was false are not.
    assert_eq!(header(&headers, "manifold-partial"), Some("orders, products"));
    let timing = header(&headers, "server-timing").unwrap();
    assert!(timing.contains("orders;dur=") && timing.contains("desc=\"status\""), "{timing}");
    assert!(timing.contains("products;dur=0;desc=\"skipped\""), "{timing}");
    // One entry per call (SPEC §2), the ones that did not run included.
    assert!(timing.contains("perks;dur=0;desc=\"not run\""), "{timing}");
    // Neither the skipped call nor the ones that did not run reached a backend.
    assert_eq!(users.hits.load(Ordering::SeqCst), 1);
    g.shutdown();
}

/// A `for_each` whose values repeat sends each distinct request once; every
/// item still gets its body, in item order (issue 15's in-request
/// de-duplication).
#[tokio::test(flavor = "multi_thread")]
async fn for_each_sends_a_repeated_value_once() {
    let orders = backend().json(json!({"ids": ["p1", "p2", "p1", "p3", "p1", "p2"]})).run().await;
    let catalog = backend()
        .respond(|req| {
            let id = req["path"].as_str().unwrap().trim_start_matches("/products/").to_string();
            (200, json!({"id": id}))
        })
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dedup
    path: /dedup
    calls:
      orders: {{ url: "{o}/orders" }}
      products: {{ for_each: $.orders.body.ids, url: "{c}/products/{{{{item}}}}", max_concurrency: 2 }}
    response:
      body: {{ ids: "$.products.body[*].id" }}
"#,
        o = orders.url(),
        c = catalog.url()
    ));
    let (status, _, body) = get(&format!("http://{}/dedup", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ids"], json!(["p1", "p2", "p1", "p3", "p1", "p2"]));
    let mut paths: Vec<String> = catalog.seen.lock().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect();
    paths.sort();
    assert_eq!(paths, ["/products/p1", "/products/p2", "/products/p3"], "each distinct request once");
    g.shutdown();
}

/// Two calls whose GET requests are the same are sent once, whether they
/// start together or one starts after the other answered; every call gets
/// the answer. A POST is always sent as written.
#[tokio::test(flavor = "multi_thread")]
async fn identical_get_calls_are_sent_once() {
    let echo = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: same
    path: /same
    calls:
      a: {{ url: "{e}/items/1" }}
      b: {{ url: "{e}/items/{{{{request.query.id}}}}" }}
      later: {{ url: "{e}/items/1?x={{{{a.body.query}}}}" }}
      again: {{ url: "{e}/items/1", when: $.a.body.path }}
      other: {{ url: "{e}/items/2" }}
      post_a: {{ method: POST, url: "{e}/events", body: {{ kind: view }} }}
      post_b: {{ method: POST, url: "{e}/events", body: {{ kind: view }} }}
    response:
      body:
        a: $.a.body.path
        b: $.b.body.path
        again: $.again.body.path
        other: $.other.body.path
"#,
        e = echo.url()
    ));
    let (status, headers, body) = get(&format!("http://{}/same?id=1", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"a": "/items/1", "b": "/items/1", "again": "/items/1", "other": "/items/2"}));
    let paths: Vec<String> = echo.seen.lock().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect();
    let count = |p: &str| paths.iter().filter(|x| *x == p).count();
    // a and b at once, `again` after a answered: one request. `later`
    // has another query: its own. Both POSTs are sent.
    assert_eq!((count("/items/1"), count("/items/2"), count("/events")), (2, 1, 2), "{paths:?}");
    let timing = header(&headers, "server-timing").unwrap();
    for call in ["a;", "b;", "again;", "later;", "other;"] {
        assert!(timing.contains(call), "{call} in {timing}");
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn for_each_runs_one_request_per_item_in_order_and_bounded() {
    let orders = backend().json(json!({"items": [{"product_id": "p3"}, {"product_id": "p1"}, {"product_id": "p2"}]})).run().await;
    // Items answer out of order (p3 slowest): the body keeps item order.
    let catalog = backend()
        .respond(|req| {
            let id = req["path"].as_str().unwrap().trim_start_matches("/products/").to_string();
            (200, json!({"id": id}))
        })
        .run()
        .await;
    let many = backend().json(json!({"ids": (0..101).collect::<Vec<_>>()})).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: each
    path: /each
    calls:
      orders: {{ url: "{o}/orders" }}
      products:
        for_each: $.orders.body.items[*].product_id
        url: "{c}/products/{{{{item}}}}"
        max_concurrency: 2
    response:
      body: {{ products: $.products.body, ids: "$.products.body[*].id" }}
  - name: too-many
    path: /too-many
    calls:
      list: {{ url: "{m}/list" }}
      each: {{ for_each: $.list.body.ids, url: "{c}/products/{{{{item}}}}" }}
  - name: none
    path: /none
    calls:
      list: {{ url: "{c}/products/x" }}
      each: {{ for_each: $.list.body.nothing, url: "{c}/products/{{{{item}}}}" }}
"#,
        o = orders.url(),
        c = catalog.url(),
        m = many.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    let (status, _, body) = get(&format!("{base}/each")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["products"], json!([{"id": "p3"}, {"id": "p1"}, {"id": "p2"}]));
    assert_eq!(body["ids"], json!(["p3", "p1", "p2"]), "a non-singular query gives an array");
    // 101 items is over the default limit of 100: a call failure, never a flood.
    let before = catalog.hits.load(Ordering::SeqCst);
    let (status, _, _) = get(&format!("{base}/too-many")).await;
    assert_eq!(status, 502);
    assert_eq!(catalog.hits.load(Ordering::SeqCst), before, "no item request was sent");
    let (status, _, body) = get(&format!("{base}/none")).await;
    assert_eq!(status, 200);
    assert_eq!(body["each"], json!([]));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_bodies_are_bounded_and_must_be_json() {
    let big = backend().raw("application/json", vec![b' '; 2 << 20]).run().await;
    let text = backend().raw("text/plain", "hello").run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: big
    path: /big
    calls:
      big: {{ url: "{b}/big", max_body_bytes: 1MiB, required: false }}
      text: {{ url: "{t}/text", required: false }}
    response:
      body: {{ big: $.big.error.kind, text: $.text.error.kind }}
"#,
        b = big.url(),
        t = text.url()
    ));
    let (status, headers, body) = get(&format!("http://{}/big", g.proxy_addr)).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"big": "body_too_large", "text": "invalid_json"}));
    assert_eq!(header(&headers, "manifold-partial"), Some("big, text"));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_shaped_by_body_template_status_and_headers() {
    let users = backend().json(json!({"name": "Ada <admin>", "tags": ["a", "b"]})).run().await;
    let etagged = backend().json(json!({"v": 1})).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: html
    path: /html
    calls:
      user: {{ url: "{u}/u" }}
    response:
      template: "<h1>{{{{user.body.name}}}}</h1>{{{{#each user.body.tags}}}}<i>{{{{this}}}}</i>{{{{/each}}}}"
      content_type: text/html; charset=utf-8
  - name: shaped
    path: /shaped
    calls:
      user: {{ url: "{u}/u" }}
      meta: {{ url: "{e}/m" }}
    response:
      status: 201
      headers: {{ cache-control: "private, max-age=10", x-user: "{{{{user.body.tags.[0]}}}}" }}
      forward_headers: {{ meta: [x-backend, content-type] }}
      body: {{ first_tag: "$.user.body.tags[0]", missing: $.user.body.nope, all: "$.user.body.tags[*]", literal: "$$.not.a.query", nested: {{ v: $.meta.body.v, fixed: [1, 2] }} }}
  - name: call-headers
    path: /call-headers
    calls:
      meta: {{ url: "{e}/m" }}
    response:
      body: {{ backend: "$.meta.headers['x-backend']", v: $.meta.body.v }}
"#,
        u = users.url(),
        e = etagged.url()
    ));
    let resp = client().get(format!("http://{}/html", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(resp.text().await.unwrap(), "<h1>Ada &lt;admin&gt;</h1><i>a</i><i>b</i>", "HTML-escaped by default");

    let (status, headers, body) = get(&format!("http://{}/shaped", g.proxy_addr)).await;
    assert_eq!(status, 201);
    assert_eq!(header(&headers, "cache-control"), Some("private, max-age=10"));
    assert_eq!(header(&headers, "x-user"), Some("a"));
    assert_eq!(header(&headers, "x-backend"), Some("yes"), "forwarded from the meta call");
    assert_eq!(headers.get_all("content-type").iter().count(), 1, "a forwarded content-type replaces the gateway's: {headers:?}");
    assert_eq!(
        body,
        json!({"first_tag": "a", "missing": null, "all": ["a", "b"], "literal": "$.not.a.query", "nested": {"v": 1, "fixed": [1, 2]}})
    );
    // A call's headers reach the document when a query reads them.
    let (status, _, body) = get(&format!("http://{}/call-headers", g.proxy_addr)).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"backend": "yes", "v": 1}));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn each_call_carries_the_request_id_and_its_own_span() {
    let a = backend().run().await;
    let b = backend().run().await;
    let g = gateway(&format!(
        "compositions: [{{ name: ids, path: /ids, calls: {{ a: {{ url: \"{}/a\" }}, b: {{ url: \"{}/b\" }} }} }}]",
        a.url(),
        b.url()
    ));
    let resp = client()
        .get(format!("http://{}/ids", g.proxy_addr))
        .header("x-request-id", "req-42")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let body: Value = resp.json().await.unwrap();
    let (ta, tb) = (body["a"]["headers"]["traceparent"][0].as_str().unwrap(), body["b"]["headers"]["traceparent"][0].as_str().unwrap());
    for (call, tp) in [("a", ta), ("b", tb)] {
        assert_eq!(body[call]["headers"]["x-request-id"][0], "req-42");
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{tp}");
        assert!(!tp.contains("b7ad6b7169203331"));
    }
    assert_ne!(ta, tb, "a new span per backend call");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_calls_retry() {
    // Fails the first two times, then answers.
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = attempts.clone();
    let flaky = backend()
        .respond(move |_| if n.fetch_add(1, Ordering::SeqCst) < 2 { (503, json!({})) } else { (200, json!({"ok": true})) })
        .run()
        .await;
    let g = gateway(&format!(
        "compositions: [{{ name: r, path: /r, calls: {{ flaky: {{ url: \"{}/x\", retries: 2 }} }} }}, {{ name: once, path: /once, calls: {{ flaky: {{ url: \"{}/x\" }} }} }}]",
        flaky.url(),
        flaky.url()
    ));
    let (status, _, body) = get(&format!("http://{}/r", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["flaky"], json!({"ok": true}));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    attempts.store(0, Ordering::SeqCst);
    let (status, _, _) = get(&format!("http://{}/once", g.proxy_addr)).await;
    assert_eq!(status, 502, "without retries the first 503 fails the call");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn try_runs_a_composition_and_reports_every_call() {
    let users = backend().json(json!({"id": 3, "name": "Grace"})).run().await;
    let orders = backend().status(500).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: "/v1/users/{{id}}/dashboard"
    calls:
      user: {{ url: "{u}/users/{{{{request.path.id}}}}?v={{{{request.query.v}}}}" }}
      orders: {{ url: "{o}/orders", required: false }}
    response:
      body: {{ name: $.user.body.name, tenant: "$.request.headers['x-tenant']" }}
"#,
        u = users.url(),
        o = orders.url()
    ));
    let admin = format!("http://{}", g.admin_addr);
    let resp = client()
        .post(format!("{admin}/compositions/dash/try"))
        .json(&json!({"path": "/v1/users/3/dashboard", "query": {"v": "2"}, "headers": {"x-tenant": "t9"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["response"]["status"], 200);
    assert_eq!(report["response"]["body"], json!({"name": "Grace", "tenant": "t9"}));
    assert_eq!(report["response"]["headers"]["manifold-partial"], "orders");
    let calls = report["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    let user = calls.iter().find(|c| c["name"] == "user").unwrap();
    assert_eq!(user["url"], format!("{}/users/3?v=2", users.url()));
    assert_eq!(user["status"], 200);
    assert_eq!(user["error"], Value::Null);
    assert!(user["started_ms"].is_number() && user["duration_ms"].is_number());
    let failed = calls.iter().find(|c| c["name"] == "orders").unwrap();
    assert_eq!(failed["status"], 500);
    assert_eq!(failed["error"]["kind"], "status");

    let resp = client().post(format!("{admin}/compositions/dash/try")).json(&json!({"path": "/elsewhere"})).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json::<Value>().await.unwrap()["fields"]["path"].is_string());
    let resp = client().post(format!("{admin}/compositions/nope/try")).json(&json!({"path": "/x"})).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deadline_bounds_a_whole_for_each() {
    // 20 items one at a time, 300 ms each: 6 s in all against a 1 s deadline.
    // Were the deadline applied per item, every item would make it.
    let list = backend().json(json!({"ids": (0..20).collect::<Vec<_>>()})).run().await;
    let slow = backend().delay(Duration::from_millis(300)).json(json!({})).run().await;
    let g = gateway(&format!(
        "compositions: [{{ name: e, path: /e, timeout: 1s, calls: {{ list: {{ url: \"{}/l\" }}, each: {{ for_each: $.list.body.ids, max_concurrency: 1, url: \"{}/i/{{{{item}}}}\" }} }} }}]",
        list.url(),
        slow.url()
    ));
    let (status, _, body) = get(&format!("http://{}/e", g.proxy_addr)).await;
    assert_eq!(status, 504, "{body}");
    assert!(slow.hits.load(Ordering::SeqCst) < 20, "the items after the deadline were never sent");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_item_stops_a_required_for_each() {
    let list = backend().json(json!({"ids": [0, 1, 2]})).run().await;
    // Item 0 answers 404 at once; the others would take 30 s.
    let items = backend().respond(|req| if req["path"] == "/i/0" { (404, json!({"missing": 0})) } else { (200, json!({})) }).run().await;
    let slow = backend().delay(Duration::from_secs(30)).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: e
    path: /e
    calls:
      list: {{ url: "{l}/l" }}
      each: {{ for_each: $.list.body.ids, url: "{i}/i/{{{{item}}}}" }}
      other: {{ url: "{s}/slow", required: false }}
"#,
        l = list.url(),
        i = items.url(),
        s = slow.url()
    ));
    let (status, _, body) = get(&format!("http://{}/e", g.proxy_addr)).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"missing": 0}));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_sending_its_body_is_cut_at_the_deadline() {
    use std::io::{Read, Write};
    let b = backend().run().await;
    let g = gateway(&format!(
        "compositions: [{{ name: p, method: POST, path: /p, timeout: 300ms, calls: {{ a: {{ url: \"{}/a\" }} }} }}]",
        b.url()
    ));
    let addr = g.proxy_addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":").unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    // A stalled upload is the client's fault, and says so: 408 (issue 12).
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn copied_values_are_the_json_their_values_would_write() {
    // Values the response copies as they are (kept as text when the answer
    // is parsed): written byte for byte as serializing the parsed value
    // would write them (escapes, unicode, number forms, whitespace and a
    // repeated key normalised), beside a value read both whole and by a
    // sub-path, and fields nothing reads that must still be JSON.
    let raw = concat!(
        "{ \"items\" : [ {\"name\":\"caf\\u00e9 \\\"q\\\" \\/ \\ud83d\\ude00\",\"n\": 1.50} , {\"name\":\"b\",\"n\":1e2} ],\n",
        "  \"n\": 18446744073709551616, \"big\": 18446744073709551615, \"neg\": -0, \"f\": 0.1,\n",
        "  \"s\": \"line\\nbreak\\t\\u0001 é\", \"obj\": {\"inner\": {\"k\": [1, {\"k\": 2, \"k\": 3}], \"e\": {}}},\n",
        "  \"skipped\": {\"deep\": [\"\\u2028\", 1e-300, null, true]}, \"s\": \"last \\u00e9\" }"
    );
    let source = backend().raw("application/json", raw).run().await;
    let text = backend().raw("text/plain", "plain words, not JSON").run().await;
    let bad = backend().raw("application/json", r#"{"x": 1, "skipped": [1e400]}"#).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: copy
    path: /copy
    calls:
      a: {{ url: "{a}/a" }}
      t: {{ url: "{t}/t", required: false }}
      b: {{ url: "{b}/b", required: false }}
    response:
      body:
        items: $.a.body.items
        first: "$.a.body.items[0].name"
        n: $.a.body.n
        big: $.a.body.big
        neg: $.a.body.neg
        f: $.a.body.f
        s: $.a.body.s
        inner: $.a.body.obj.inner
        missing: $.a.body.nope
        t: $.t.body.x
        t_kind: $.t.error.kind
        b: $.b.body.x
        b_kind: $.b.error.kind
"#,
        a = source.url(),
        t = text.url(),
        b = bad.url()
    ));
    let resp = client().get(format!("http://{}/copy", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(resp.headers(), "manifold-partial"), Some("t, b"));
    let bytes = resp.bytes().await.unwrap();
    let v: Value = serde_json::from_str(raw).unwrap();
    let want = json!({
        "items": v["items"], "first": v["items"][0]["name"], "n": v["n"], "big": v["big"], "neg": v["neg"], "f": v["f"],
        "s": v["s"], "inner": v["obj"]["inner"], "missing": null, "t": null, "t_kind": "invalid_json", "b": null, "b_kind": "invalid_json",
    });
    assert_eq!(String::from_utf8_lossy(&bytes), serde_json::to_string(&want).unwrap());
    assert_eq!(want["inner"], json!({"k": [1, {"k": 3}], "e": {}}));
    assert_eq!(want["s"], "last é");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_sharing_another_s_request_copies_from_its_answer() {
    // b's request is a's: b settles with a's answer, whose values the
    // response copies (parsed once, for what both read).
    let echo = backend().run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: shared
    path: /shared
    calls:
      a: {{ url: "{e}/items/1?q=x" }}
      b: {{ url: "{e}/items/1?q=x" }}
      c: {{ url: "{e}/items/1?q={{{{a.body.path}}}}" }}
    response:
      body: {{ a: $.a.body.path, b: $.b.body.query, b_path: $.b.body.path, c: $.c.body.query }}
"#,
        e = echo.url()
    ));
    let (status, _, body) = get(&format!("http://{}/shared", g.proxy_addr)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["a"], "/items/1");
    assert_eq!(body["b_path"], "/items/1");
    assert_eq!(body["b"], "q=x");
    assert_eq!(body["c"], "q=%2Fitems%2F1");
    assert_eq!(echo.seen.lock().unwrap().len(), 2, "a and b sent once, c its own");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_key_drops_what_its_first_value_held() {
    // `Value` keeps a repeated key's last value, so the fields of its first
    // value are gone: `user.tags` below is absent (null in the answer). The
    // projection copies `user.tags` from the first `user`; that copy must
    // not survive the second `user` (without tags) or `other` (not an
    // object at all) replacing the first.
    let raw = r#"{"user":{"tags":["stale"],"name":"first"},"user":{"name":"second"},"other":{"tags":[1]},"other":"text"}"#;
    let source = backend().raw("application/json", raw).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dup
    path: /dup
    calls:
      a: {{ url: "{a}/a" }}
    response:
      body: {{ tags: $.a.body.user.tags, name: $.a.body.user.name, other: $.a.body.other.tags }}
"#,
        a = source.url()
    ));
    let resp = client().get(format!("http://{}/dup", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    let v: Value = serde_json::from_str(raw).unwrap();
    let want = json!({"tags": v["user"]["tags"], "name": v["user"]["name"], "other": v["other"]["tags"]});
    assert_eq!(want, json!({"tags": null, "name": "second", "other": null}));
    assert_eq!(String::from_utf8_lossy(&bytes), serde_json::to_string(&want).unwrap());
    g.shutdown();
}
