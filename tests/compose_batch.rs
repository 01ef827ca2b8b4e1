//! `batch` on a `for_each` call (SPEC §8): values in groups, the answers
//! matched back to items by `key`.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use serde_json::{json, Value};

/// The ids of a `?ids=1,2,3` query.
fn ids_of(request: &Value) -> Vec<String> {
    let query = request["query"].as_str().unwrap_or("");
    let ids = query.split('&').find_map(|p| p.strip_prefix("ids=")).unwrap_or("");
    ids.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_twenty_ids_go_in_three_batches_and_come_back_in_order() {
    let ids: Vec<u32> = (1..=120).collect();
    let list = backend().json(json!({ "ids": ids })).run().await;
    // The catalog answers in reverse order and knows no product 77.
    let catalog = backend()
        .respond(|r| {
            let products: Vec<Value> = ids_of(r)
                .iter()
                .rev()
                .filter(|id| id.as_str() != "77")
                .map(|id| json!({"id": id.parse::<u32>().unwrap(), "name": format!("p{id}")}))
                .collect();
            (200, Value::Array(products))
        })
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: /dash
    calls:
      list: {{ url: "{}/ids" }}
      products:
        for_each: $.list.body.ids[*]
        url: "{}/products?ids={{{{items}}}}&full=1"
        batch: {{ size: 50, key: $.id }}
        max_items: 200
        max_concurrency: 2
    response:
      body: {{ products: $.products.body }}
"#,
        list.url(),
        catalog.url()
    ));
    let url = format!("http://{}/dash", g.proxy_addr);
    let (status, headers, body) = within(15, "dash", send("GET", &url, None, &[])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(catalog.hits.load(Ordering::SeqCst), 3, "three backend requests");
    let mut sizes: Vec<usize> = catalog.seen.lock().unwrap().iter().map(|r| ids_of(r).len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [20, 50, 50]);
    let products = body["products"].as_array().unwrap();
    assert_eq!(products.len(), 120);
    for (i, p) in products.iter().enumerate() {
        let id = i as u32 + 1;
        if id == 77 {
            assert_eq!(p, &Value::Null, "an id no element matched is null");
        } else {
            assert_eq!(p["id"], id, "item {i} in order");
        }
    }
    let timing = headers["server-timing"].to_str().unwrap();
    assert!(timing.contains("products;dur=") && timing.contains(";batches=3"), "{timing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_values_are_sent_once_and_a_json_body_carries_items() {
    let list = backend().json(json!({ "ids": ["a", "b", "a", "c&d", "b"] })).run().await;
    // Answers `{data: [{sku, n}]}` for the items of its JSON body.
    let catalog = backend()
        .respond(|r| {
            let items = r["json"]["items"].as_array().cloned().unwrap_or_default();
            let data: Vec<Value> = items.iter().map(|sku| json!({"sku": sku, "n": 1})).collect();
            (200, json!({ "data": data }))
        })
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: /dash
    calls:
      list: {{ url: "{}/ids" }}
      skus:
        for_each: $.list.body.ids
        method: POST
        url: "{}/lookup"
        body: {{ items: $.items }}
        batch: {{ size: 2, key: $.sku, path: $.data }}
"#,
        list.url(),
        catalog.url()
    ));
    let (status, body) = proxy_get(&g, "/dash", &[]).await;
    assert_eq!(status, 200, "{body}");
    let skus: Vec<&Value> = body["skus"].as_array().unwrap().iter().map(|s| &s["sku"]).collect();
    assert_eq!(skus, [&json!("a"), &json!("b"), &json!("a"), &json!("c&d"), &json!("b")]);
    let sent: Vec<Value> = catalog.seen.lock().unwrap().iter().map(|r| r["json"]["items"].clone()).collect();
    assert_eq!(sent.len(), 2, "three distinct values in batches of two");
    assert!(sent.contains(&json!(["a", "b"])) && sent.contains(&json!(["c&d"])), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_are_escaped_one_by_one_and_a_non_array_answer_fails_the_call() {
    let list = backend().json(json!({ "ids": ["a,b", "x y", "é"] })).run().await;
    let catalog = backend().json(json!({"not": "an array"})).run().await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: /dash
    calls:
      list: {{ url: "{}/ids" }}
      p:
        for_each: $.list.body.ids
        url: "{}/p?ids={{{{items}}}}"
        batch: {{ size: 10, key: $.id }}
        required: false
"#,
        list.url(),
        catalog.url()
    ));
    let url = format!("http://{}/dash", g.proxy_addr);
    let (status, headers, body) = within(15, "dash", send("GET", &url, None, &[])).await;
    assert_eq!(status, 200);
    assert_eq!(body["p"], Value::Null);
    assert_eq!(headers["manifold-partial"], "p");
    let query = catalog.seen.lock().unwrap()[0]["query"].as_str().unwrap().to_string();
    assert_eq!(query, "ids=a%2Cb,x%20y,%C3%A9");
}

/// A list backend answering `ids`, a catalog answering each batch with
/// `{"id": N}` per id, and a gateway whose `p` call batches the list by 2
/// and caches each batch.
async fn cached_batches(ids: Value) -> (Backend, Backend, manifold::gateway::Gateway) {
    let list = backend().json(json!({ "ids": ids })).run().await;
    let catalog = backend()
        .respond(|r| (200, Value::Array(ids_of(r).iter().map(|id| json!({"id": id.parse::<u32>().unwrap()})).collect())))
        .run()
        .await;
    let g = gateway(&format!(
        r#"
compositions:
  - name: dash
    path: /dash
    calls:
      list: {{ url: "{}/ids" }}
      p:
        for_each: $.list.body.ids
        url: "{}/p?ids={{{{items}}}}"
        batch: {{ size: 2, key: $.id }}
        cache: {{ ttl: 60s }}
"#,
        list.url(),
        catalog.url()
    ));
    (list, catalog, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_a_cached_call_are_kept_by_their_url() {
    let (_list, catalog, g) = cached_batches(json!([1, 2, 3])).await;
    for round in 0..3 {
        let (status, body) = proxy_get(&g, "/dash", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(body["p"], json!([{"id": 1}, {"id": 2}, {"id": 3}]), "round {round}");
    }
    assert_eq!(catalog.hits.load(Ordering::SeqCst), 2, "two batches, each sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lists_each_batch_as_one_request_with_its_cache_mark() {
    let (_list, catalog, g) = cached_batches(json!([1, 2, 3, 4, 5])).await;
    let try_once = || async {
        let resp =
            client().post(format!("http://{}/compositions/dash/try", g.admin_addr)).json(&json!({"path": "/dash"})).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()
    };
    for want in ["miss", "hit"] {
        let report = within(15, "try", try_once()).await;
        let batches: Vec<&Value> =
            report["calls"].as_array().unwrap().iter().filter(|c| c["name"].as_str().unwrap().starts_with("p[")).collect();
        assert_eq!(batches.len(), 3, "{report}");
        let urls: Vec<&str> = batches.iter().map(|c| c["url"].as_str().unwrap()).collect();
        assert!(urls.iter().any(|u| u.ends_with("/p?ids=1,2")) && urls.iter().any(|u| u.ends_with("/p?ids=5")), "{urls:?}");
        assert!(batches.iter().all(|c| c["cache"] == want), "{report}");
        assert_eq!(report["response"]["body"]["p"], json!([{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}, {"id": 5}]));
    }
    assert_eq!(catalog.hits.load(Ordering::SeqCst), 3);
}
