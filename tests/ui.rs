//! The composition playground (`GET /ui`, SPEC §9): its endpoints (try with
//! a draft, live validation, the composition's YAML, the static assets) and,
//! through a real Chromium driven by playwright-core (`tests/ui/`), the page
//! itself against a real gateway and real backends. `.ci/run` installs
//! Chromium and playwright-core; without them the browser tests fail.

mod common;

use std::path::PathBuf;

use common::{backend, client, gateway, gateway_with, Backend};
use manifold::gateway::{Gateway, GatewayOptions};
use serde_json::{json, Value};

struct Backends {
    users: Backend,
    posts: Backend,
    extra: Backend,
}

async fn backends() -> Backends {
    Backends {
        users: backend().respond(|_| (200, json!({"id": 7, "name": "Ada"}))).run().await,
        posts: backend().respond(|_| (200, json!({"ids": [1, 2, 3]}))).run().await,
        extra: backend().respond(|req| (200, json!({"post": req["path"]}))).run().await,
    }
}

/// The saved composition: `user` and `posts`.
fn config(b: &Backends) -> String {
    format!(
        r#"
routes:
  - {{ name: health, path: "/health", upstream: "{u}" }}
consumers:
  - name: alice
    credentials:
      - {{ type: basic-auth, username: alice, password: s3cret }}
      - {{ type: key-auth, key: alice-key-123 }}
compositions:
  - name: dash
    path: "/users/{{id}}/dash"
    calls:
      user: {{ url: "{u}/users/{{{{request.path.id}}}}" }}
      posts: {{ url: "{p}/posts?user={{{{user.body.id}}}}" }}
    response:
      body: {{ name: $.user.body.name, posts: $.posts.body.ids }}
"#,
        u = b.users.url(),
        p = b.posts.url()
    )
}

/// The draft: one more call per post (`for_each`), and a new answer.
fn draft_yaml(b: &Backends) -> String {
    format!(
        r#"name: dash
path: /users/{{id}}/dash
calls:
  user:
    url: {u}/users/{{{{request.path.id}}}}
  posts:
    url: {p}/posts?user={{{{user.body.id}}}}
  each:
    for_each: $.posts.body.ids
    url: {e}/post/{{{{item}}}}
response:
  body:
    name: $.user.body.name
    first: $.each.body[0].post
"#,
        u = b.users.url(),
        p = b.posts.url(),
        e = b.extra.url()
    )
}

async fn post(g: &Gateway, path: &str, content_type: &str, body: String, token: Option<&str>) -> (u16, Value) {
    let mut req = client().post(format!("http://{}{path}", g.admin_addr)).header("content-type", content_type).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn try_runs_an_unsaved_draft_in_yaml_or_json() {
    let b = backends().await;
    let g = gateway(&config(&b));
    let body = json!({"path": "/users/7/dash", "composition": draft_yaml(&b)});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["response"]["status"], 200, "{out}");
    assert_eq!(out["response"]["body"], json!({"name": "Ada", "first": "/post/1"}));
    let names: Vec<&str> = out["calls"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["user", "posts", "each[0]", "each[1]", "each[2]"], "{out}");
    for c in out["calls"].as_array().unwrap() {
        assert_eq!(c["status"], 200, "{c}");
        assert!(c["started_ms"].as_f64().is_some() && c["duration_ms"].as_f64().is_some(), "{c}");
        assert!(c["url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{c}");
    }
    // The draft as a JSON object, too; the saved composition is unchanged.
    let draft: Value = serde_norway::from_str(&draft_yaml(&b)).unwrap();
    let body = json!({"path": "/users/7/dash", "composition": draft});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["calls"].as_array().unwrap().len(), 5);
    let live = client().get(format!("http://{}/users/7/dash", g.proxy_addr)).send().await.unwrap();
    assert_eq!(live.json::<Value>().await.unwrap(), json!({"name": "Ada", "posts": [1, 2, 3]}));
    // A draft may add a composition that does not exist yet.
    let new = draft_yaml(&b).replace("name: dash", "name: fresh").replace("/dash", "/fresh");
    let body = json!({"path": "/users/7/fresh", "composition": new});
    let (status, out) = post(&g, "/compositions/fresh/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["response"]["body"]["first"], "/post/1");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn try_with_an_invalid_draft_answers_400_with_every_field() {
    let b = backends().await;
    let g = gateway(&config(&b));
    let broken = draft_yaml(&b)
        .replace("    for_each: $.posts", "    for_eech: $.posts")
        .replace("  posts:\n    url:", "  posts:\n    timeout: soon\n    url:");
    let body = json!({"path": "/users/7/dash", "composition": broken});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 400, "{out}");
    let fields = out["fields"].as_object().unwrap();
    assert!(fields.keys().any(|k| k.starts_with("compositions.dash.calls.each")), "{out}");
    assert!(fields.keys().any(|k| k.starts_with("compositions.dash.calls.posts.timeout")), "{out}");
    assert!(out["message"].is_string());
    // Not YAML at all; a name that is not the composition's.
    let body = json!({"path": "/users/7/dash", "composition": "calls: [unclosed"});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 400, "{out}");
    assert!(out["fields"]["compositions.dash"].as_str().unwrap().contains("invalid YAML"), "{out}");
    let body = json!({"path": "/users/7/dash", "composition": draft_yaml(&b).replace("name: dash", "name: other")});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 400, "{out}");
    assert!(out["fields"]["compositions.dash.name"].is_string(), "{out}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_answers_every_field_and_the_parsed_draft() {
    let b = backends().await;
    let g = gateway(&config(&b));
    let (status, out) = post(&g, "/compositions/dash/validate", "application/yaml", draft_yaml(&b), None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["valid"], true, "{out}");
    assert_eq!(out["fields"], json!({}));
    assert_eq!(out["composition"]["calls"]["each"]["for_each"], "$.posts.body.ids");
    let broken = draft_yaml(&b).replace("    url: {", "    urll: {").replace("path: /users/{id}/dash", "path: users");
    let broken = if broken.contains("urll") { broken } else { broken.replacen("    url: ", "    urll: ", 1) };
    let (status, out) = post(&g, "/compositions/dash/validate", "application/yaml", broken, None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["valid"], false, "{out}");
    let fields = out["fields"].as_object().unwrap();
    assert!(fields.contains_key("compositions.dash.calls.user.urll"), "{out}");
    assert!(fields.len() >= 2, "every error, not only the first: {out}");
    assert_eq!(out["composition"]["name"], "dash");
    // The same validation as `manifold validate`: a semantic error too.
    let (_, out) =
        post(&g, "/compositions/dash/validate", "application/yaml", draft_yaml(&b).replace("$.posts.body.ids", "$.psts.body.ids"), None)
            .await;
    assert_eq!(out["valid"], false, "{out}");
    assert!(out["fields"].as_object().unwrap().keys().any(|k| k.starts_with("compositions.dash.calls.each")), "{out}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn ui_assets_are_served_with_their_content_types_and_the_yaml_of_a_composition() {
    let b = backends().await;
    let g = gateway(&config(&b));
    for (path, ct) in
        [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/yaml-lines.js", "text/javascript"), ("/ui/app.css", "text/css")]
    {
        let resp = client().get(format!("http://{}{path}", g.admin_addr)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let got = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(got.starts_with(ct), "{path}: {got}");
        assert!(!resp.text().await.unwrap().is_empty());
    }
    let resp = client().get(format!("http://{}/compositions/dash/yaml", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/yaml");
    let text = resp.text().await.unwrap();
    let back: Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(back["name"], "dash");
    assert_eq!(back["path"], "/users/{id}/dash");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_the_page_loads_but_its_data_calls_need_the_token() {
    let b = backends().await;
    let opts = GatewayOptions { admin_token: Some("s3cret-token".into()), ..Default::default() };
    let g = gateway_with(&config(&b), opts);
    let resp = client().get(format!("http://{}/ui", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the page itself holds no data");
    for path in ["/config", "/status", "/compositions/dash/yaml"] {
        let resp = client().get(format!("http://{}{path}", g.admin_addr)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
    let (status, _) = post(&g, "/compositions/dash/validate", "application/yaml", draft_yaml(&b), None).await;
    assert_eq!(status, 401);
    let body = json!({"path": "/users/7/dash", "composition": draft_yaml(&b)}).to_string();
    let (status, _) = post(&g, "/compositions/dash/try", "application/json", body.clone(), None).await;
    assert_eq!(status, 401);
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body, Some("s3cret-token")).await;
    assert_eq!(status, 200, "{out}");
    // Only the exact assets are open, nothing else under /ui.
    let resp = client().get(format!("http://{}/ui/other", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    g.shutdown();
}

// --- the page in a real browser ------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tests/ui/playground.mjs` with `env`; its JSON summary on success.
async fn run_browser(env: Vec<(&str, String)>) -> Value {
    let chromium = std::env::var("MANIFOLD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium is missing at {chromium}: the browser tests need it (`apt-get install -y chromium`; .ci/run installs it)"
    );
    assert!(
        repo().join("tests/ui/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci` in tests/ui (.ci/run does)"
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo().join("tests/ui/playground.mjs")).env("CHROMIUM", &chromium).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = match tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run node (the browser tests need Node.js; .ci/run checks for it): {e}"),
        Err(_) => panic!("the browser script did not finish in 120 s"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser script failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|_| panic!("no summary from the browser script:\n{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn playground_edits_validates_runs_and_applies_a_composition() {
    let b = backends().await;
    let g = gateway(&config(&b));
    // A dependent call whose `when` is false (the user has no seller_id).
    let seller =
        format!("  seller:\n    when: $.user.body.seller_id\n    url: {}/sellers/{{{{user.body.seller_id}}}}\nresponse:", b.users.url());
    let fixed = draft_yaml(&b).replacen("response:", &seller, 1);
    // A call name typo in a JSONPath: the error belongs to `each`'s line.
    let broken = fixed.replace("for_each: $.posts.body.ids", "for_each: $.psts.body.ids");
    let shot = repo().join("target/ui/waterfall.png");
    let summary = run_browser(vec![
        ("ADMIN_URL", format!("http://{}", g.admin_addr)),
        ("COMPOSITION", "dash".into()),
        ("BROKEN_YAML", broken),
        ("ERROR_AT", "for_each: $.psts".into()),
        ("FIXED_YAML", fixed),
        ("PARAMS", json!({"id": "7"}).to_string()),
        ("EXPECT_CALLS", "user,posts,each[0],each[1],each[2]".into()),
        // The user has no seller_id: `when` is false, shown as not run, not as a failure.
        ("EXPECT_NOT_RUN", "seller".into()),
        ("SCREENSHOT", shot.display().to_string()),
        ("APPLY", "1".into()),
    ])
    .await;
    assert!(summary["error_message"].as_str().unwrap_or("").contains("psts"), "{summary}");
    assert!(shot.exists());
    // Applied: the route answers the new way.
    let resp = client().get(format!("http://{}/users/7/dash", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"name": "Ada", "first": "/post/1"}));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn playground_asks_for_the_token_and_never_puts_it_in_a_url() {
    let b = backends().await;
    let token = "tok-7f3a9c1e-never-in-urls";
    let opts = GatewayOptions { admin_token: Some(token.into()), ..Default::default() };
    let g = gateway_with(&config(&b), opts);
    let fixed = draft_yaml(&b);
    let summary = run_browser(vec![
        ("ADMIN_URL", format!("http://{}", g.admin_addr)),
        ("COMPOSITION", "dash".into()),
        ("TOKEN", token.into()),
        ("LOGIN_SCREENSHOT", repo().join("target/ui/token.png").display().to_string()),
        ("BROKEN_YAML", fixed.replace("    url: {", "    urll: {").replacen("    url: ", "    urll: ", 1)),
        ("ERROR_AT", "urll:".into()),
        ("FIXED_YAML", fixed),
        ("PARAMS", json!({"id": "7"}).to_string()),
        ("EXPECT_CALLS", "user,posts,each[0]".into()),
    ])
    .await;
    assert_eq!(summary["asked_for_token"], true, "{summary}");
    let urls = summary["urls"].as_array().unwrap();
    assert!(urls.iter().any(|u| u.as_str().unwrap().contains("/try")), "{summary}");
    assert!(urls.iter().all(|u| !u.as_str().unwrap().contains(token)), "{summary}");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn try_reports_the_retries_of_each_call() {
    let b = backends().await;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    let flaky = backend()
        .respond(
            move |_| if s.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 { (503, json!({})) } else { (200, json!({"ok": true})) },
        )
        .run()
        .await;
    let g = gateway(&config(&b));
    let draft = format!("path: /users/{{id}}/dash\ncalls:\n  flaky: {{ url: \"{}/f\", retries: 3 }}\n", flaky.url());
    let body = json!({"path": "/users/7/dash", "composition": draft});
    let (status, out) = post(&g, "/compositions/dash/try", "application/json", body.to_string(), None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["calls"][0]["name"], "flaky");
    assert_eq!(out["calls"][0]["status"], 200, "{out}");
    assert_eq!(out["calls"][0]["retries"], 2, "{out}");
    g.shutdown();
}

/// Database mode (the machine's Postgres, as tests/database.rs uses it):
/// the page applies a draft with `PUT /compositions/{name}` and `If-Match`.
#[tokio::test(flavor = "multi_thread")]
async fn playground_applies_a_draft_as_an_entity_write_in_database_mode() {
    use manifold::gateway::DatabaseOptions;
    use manifold::store::Store;
    let server = std::env::var("MANIFOLD_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin_db = Store::connect(&server).await.expect("the test Postgres is reachable");
    let db = format!("manifold_t_{}", manifold::ids::new_uuid().replace('-', ""));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(admin_db.pool()).await.unwrap();
    let url = format!("{}/{db}", server.rsplit_once('/').unwrap().0);
    Store::connect(&url).await.unwrap().migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = GatewayOptions {
        database: Some(DatabaseOptions { url: url.clone(), snapshot_path: dir.path().join("snap.json") }),
        ..Default::default()
    };
    opts.server.workers = 1;
    let g = Gateway::start(opts, manifold::config::Config::default()).unwrap();

    let b = backends().await;
    let saved: Value = serde_norway::from_str::<Value>(&config(&b)).unwrap()["compositions"][0].clone();
    let resp = client().post(format!("http://{}/compositions", g.admin_addr)).json(&saved).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client().get(format!("http://{}/compositions/dash/yaml", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.headers()["etag"], "\"1\"", "the editor gets the entity version");
    let fixed = draft_yaml(&b);
    run_browser(vec![
        ("ADMIN_URL", format!("http://{}", g.admin_addr)),
        ("COMPOSITION", "dash".into()),
        ("BROKEN_YAML", fixed.replace("$.user.body.name", "$.usr.body.name")),
        ("ERROR_AT", "name: $.usr".into()),
        ("FIXED_YAML", fixed),
        ("PARAMS", json!({"id": "7"}).to_string()),
        ("EXPECT_CALLS", "user,posts,each[0]".into()),
        ("APPLY", "1".into()),
    ])
    .await;
    let resp = client().get(format!("http://{}/compositions/dash", g.admin_addr)).send().await.unwrap();
    assert_eq!(resp.headers()["etag"], "\"2\"", "one write, on the version loaded");
    let resp = client().get(format!("http://{}/users/7/dash", g.proxy_addr)).send().await.unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"name": "Ada", "first": "/post/1"}));
    g.shutdown();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))).execute(admin_db.pool()).await.unwrap();
}
