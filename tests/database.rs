//! Database mode against the machine's real Postgres. Each test makes its
//! own database, so tests run in parallel; MANIFOLD_TEST_DATABASE_URL
//! points at the server (default: postgres@127.0.0.1:5432).

mod common;

use std::time::{Duration, Instant};

use common::{backend, client, drop_db, fresh_db};
use manifold::config::Config;
use manifold::gateway::{DatabaseOptions, Gateway, GatewayOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn node(url: &str, snapshot: &std::path::Path) -> anyhow::Result<Gateway> {
    let mut opts =
        GatewayOptions { database: Some(DatabaseOptions { url: url.into(), snapshot_path: snapshot.into() }), ..Default::default() };
    opts.server.workers = 1;
    Gateway::start(opts, Config::default())
}

use common::send;

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_an_unmigrated_database() {
    let url = fresh_db(false).await;
    let dir = tempfile::tempdir().unwrap();
    let err = node(&url, &dir.path().join("snap.json")).err().expect("refused").to_string();
    assert!(err.contains("manifold migrate"), "{err}");
    // `manifold migrate` fixes it, and says so once.
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_manifold")).args(["migrate"]).env("MANIFOLD_DATABASE_URL", &url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied migrations"));
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_manifold")).args(["migrate"]).env("MANIFOLD_DATABASE_URL", &url).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    node(&url, &dir.path().join("snap.json")).expect("starts once migrated").shutdown();
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn entity_crud_answers_every_status_of_the_spec() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let route = json!({"name": "users", "path": "/users/{id}", "upstream": "http://127.0.0.1:9", "tags": ["team-a"]});

    let (s, h, body) = send("POST", &format!("{admin}/routes"), Some(route.clone()), &[]).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["name"], "users");
    assert_eq!(h["etag"], "\"1\"");
    let (s, _, body) = send("POST", &format!("{admin}/routes"), Some(route.clone()), &[]).await;
    assert_eq!(s, 409, "{body}");

    let (s, _, body) = send("GET", &format!("{admin}/routes/users"), None, &[]).await;
    assert_eq!((s, body["path"].as_str()), (StatusCode::OK, Some("/users/{id}")));
    let (s, _, body) = send("GET", &format!("{admin}/routes/nope"), None, &[]).await;
    assert_eq!((s, body), (StatusCode::NOT_FOUND, json!({"message": "not found"})));
    let (s, _, _) = send("GET", &format!("{admin}/widgets"), None, &[]).await;
    assert_eq!(s, 404);

    // Every error, keyed by field relative to the entity.
    let bad = json!({"name": "bad", "path": "no-slash", "upstream": "ftp://x", "policies": ["ghost"], "timeout": "soon"});
    let (s, _, body) = send("POST", &format!("{admin}/routes"), Some(bad), &[]).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["fields"]["timeout"].is_string(), "{body}");
    let bad = json!({"name": "bad", "path": "no-slash", "upstream": "ftp://x", "policies": ["ghost"]});
    let (s, _, body) = send("POST", &format!("{admin}/routes"), Some(bad), &[]).await;
    assert_eq!(s, 400);
    for field in ["path", "upstream", "policies[0]"] {
        assert!(body["fields"][field].is_string(), "{field} in {body}");
    }

    // Replace, merge, and lost updates.
    let (s, h, body) = send(
        "PUT",
        &format!("{admin}/routes/users"),
        Some(json!({"path": "/u/{id}", "upstream": "http://127.0.0.1:9"})),
        &[("if-match", "\"1\"")],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["etag"], "\"2\"");
    let (s, _, _) = send("PATCH", &format!("{admin}/routes/users"), Some(json!({"timeout": "2s"})), &[("if-match", "\"1\"")]).await;
    assert_eq!(s, 412);
    let (s, _, body) =
        send("PATCH", &format!("{admin}/routes/users"), Some(json!({"timeout": "2s", "tags": ["team-b"]})), &[("if-match", "\"2\"")]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!((body["path"].as_str(), body["timeout"].as_str()), (Some("/u/{id}"), Some("2s")));
    let (s, _, body) = send(
        "PUT",
        &format!("{admin}/routes/other"),
        Some(json!({"name": "different", "path": "/o", "upstream": "http://127.0.0.1:9"})),
        &[],
    )
    .await;
    assert_eq!(s, 400, "{body}");
    let (s, _, _) = send("PUT", &format!("{admin}/routes/other"), Some(json!({"path": "/o", "upstream": "http://127.0.0.1:9"})), &[]).await;
    assert_eq!(s, 201);

    // Paging and tags.
    let (_, _, page) = send("GET", &format!("{admin}/routes?size=1"), None, &[]).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], "/routes?size=1&offset=1");
    let (_, _, tagged) = send("GET", &format!("{admin}/routes?tags=team-b"), None, &[]).await;
    assert_eq!(tagged["data"].as_array().unwrap().iter().map(|r| r["name"].clone()).collect::<Vec<_>>(), vec![json!("users")]);

    // A policy still in use cannot be deleted; the error names who uses it.
    let (s, _, _) = send("POST", &format!("{admin}/policies"), Some(json!({"name": "ids", "type": "correlation-id"})), &[]).await;
    assert_eq!(s, 201);
    let (s, _, _) = send("PATCH", &format!("{admin}/routes/users"), Some(json!({"policies": ["ids"]})), &[]).await;
    assert_eq!(s, 200);
    let (s, _, body) = send("DELETE", &format!("{admin}/policies/ids"), None, &[]).await;
    assert_eq!(s, 409);
    assert!(body["message"].as_str().unwrap().contains("routes.users"), "{body}");
    let (s, _, _) = send("DELETE", &format!("{admin}/routes/users"), None, &[]).await;
    assert_eq!(s, 204);
    let (s, _, _) = send("DELETE", &format!("{admin}/policies/ids"), None, &[]).await;
    assert_eq!(s, 204);
    let (s, _, _) = send("DELETE", &format!("{admin}/policies/ids"), None, &[]).await;
    assert_eq!(s, 404);
    g.shutdown();
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_reaches_every_node_and_is_audited() {
    let b = backend().run().await;
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&url, &dir.path().join("a.json")).unwrap();
    let other = node(&url, &dir.path().join("b.json")).unwrap();
    let route = json!({"name": "live", "path": "/live", "upstream": b.url()});
    let (s, _, _) = send("POST", &format!("http://{}/routes", a.admin_addr), Some(route), &[("x-manifold-actor", "alice")]).await;
    assert_eq!(s, 201);
    // The writing node serves it before answering; the other within moments.
    assert_eq!(client().get(format!("http://{}/live", a.proxy_addr)).send().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if client().get(format!("http://{}/live", other.proxy_addr)).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the other node never served the new route");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, status) = send("GET", &format!("http://{}/status", other.admin_addr), None, &[]).await;
    assert_eq!(status["mode"], "database");
    assert_eq!(status["database_reachable"], true);
    assert_eq!(status["config_version"], 2);

    let (_, _, log) = send("GET", &format!("http://{}/audit", other.admin_addr), None, &[]).await;
    let entry = &log["data"][0];
    assert_eq!(entry["actor"], "alice");
    assert_eq!(entry["action"], "create");
    assert_eq!(entry["entity"], json!({"kind": "routes", "name": "live"}));
    assert_eq!(entry["before"], Value::Null);
    assert_eq!(entry["after"]["path"], "/live");
    assert!(entry["time"].as_str().is_some_and(|t| t.len() > 10));
    a.shutdown();
    other.shutdown();
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn post_config_replaces_everything_in_one_transaction() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let yaml = "routes:\n  - { name: a, path: /a, upstream: \"http://127.0.0.1:9\" }\n  - { name: b, path: /b, upstream: \"http://127.0.0.1:9\" }\n";
    let resp = client().post(format!("{admin}/config?dry_run=true")).body(yaml).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["changes"]["created"].as_array().unwrap().len(), 2);
    let (_, _, page) = send("GET", &format!("{admin}/routes"), None, &[]).await;
    assert_eq!(page["data"], json!([]), "a dry run writes nothing");
    let resp = client().post(format!("{admin}/config")).body(yaml).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (_, _, page) = send("GET", &format!("{admin}/routes"), None, &[]).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    // An invalid whole config changes nothing.
    let resp = client().post(format!("{admin}/config")).body("routes: [{ name: c, path: nope, upstream: \"x\" }]").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let (_, _, page) = send("GET", &format!("{admin}/routes"), None, &[]).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    g.shutdown();
    drop_db(&url).await;
}

/// `POST /config` validates before the store's write lock and hands the
/// store the validated config with the version it was validated against;
/// the store writes it as validated only when it comes from validation and
/// that version is still the stored one, and validates it again otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn a_whole_config_is_written_as_validated_only_by_validation_at_the_stored_version() {
    use manifold::config::load::config_from_text;
    use manifold::config::Format;
    use manifold::store::{Change, Store, StoreError};
    let url = fresh_db(true).await;
    let store = Store::connect(&url).await.unwrap();
    let (_, version) = store.load().await.unwrap();

    // Never validated (wrapped `From` a config): validated by the store,
    // and refused, although its version is the stored one.
    let bad: Config = serde_json::from_value(json!({"routes": [{"name": "r", "path": "nope", "upstream": "http://127.0.0.1:9"}]})).unwrap();
    let err = store.write("test", Change::ReplaceAll { validated: Box::new(bad.into()), against: version }).await.unwrap_err();
    assert!(matches!(&err, StoreError::Invalid(e) if e.to_string().contains("routes.r.path")), "{err}");

    // Validated at a version that is no longer the stored one: validated
    // again (with the stored config's secrets), and written.
    let good = "routes:\n  - { name: r, path: /r, upstream: \"http://127.0.0.1:9\" }\n";
    let stale = config_from_text(good, Format::Yaml).unwrap();
    let other = config_from_text("routes:\n  - { name: o, path: /o, upstream: \"http://127.0.0.1:9\" }\n", Format::Yaml).unwrap();
    store.write("test", Change::ReplaceAll { validated: Box::new(other), against: version }).await.unwrap();
    let out = store.write("test", Change::ReplaceAll { validated: Box::new(stale), against: version }).await.unwrap();
    let (config, now) = store.load().await.unwrap();
    assert_eq!(now, out.config_version);
    assert_eq!(config.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["r"]);
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_started_while_the_database_is_down_serves_its_saved_snapshot() {
    let b = backend().run().await;
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.json");
    let g = node(&url, &snap).unwrap();
    let (s, _, _) =
        send("POST", &format!("http://{}/routes", g.admin_addr), Some(json!({"name": "kept", "path": "/kept", "upstream": b.url()})), &[])
            .await;
    assert_eq!(s, 201);
    g.shutdown();

    // A database nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = format!("postgres://postgres@{closed}/nothing");
    let g = node(&down, &snap).expect("starts from the saved snapshot");
    assert_eq!(client().get(format!("http://{}/kept", g.proxy_addr)).send().await.unwrap().status(), 200);
    let (_, _, status) = send("GET", &format!("http://{}/status", g.admin_addr), None, &[]).await;
    assert_eq!(status["database_reachable"], false);
    let (s, _, body) =
        send("POST", &format!("http://{}/routes", g.admin_addr), Some(json!({"name": "x", "path": "/x", "upstream": b.url()})), &[]).await;
    assert_eq!(s, 503, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unavailable"));
    g.shutdown();

    // Without a snapshot either, a node refuses to start, and says why.
    let err = node(&down, &dir.path().join("none.json")).err().expect("refused").to_string();
    assert!(err.contains("unreachable") && err.contains("snapshot"), "{err}");
    drop_db(&url).await;
}

fn manifold(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifold")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_to_several_regions_then_export_round_trips() {
    let (east_db, west_db, third_db) = (fresh_db(true).await, fresh_db(true).await, fresh_db(true).await);
    let dir = tempfile::tempdir().unwrap();
    let east = node(&east_db, &dir.path().join("e.json")).unwrap();
    let west = node(&west_db, &dir.path().join("w.json")).unwrap();
    let files = dir.path().join("config");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(
        files.join("a.yaml"),
        "routes:\n  - { name: users, path: \"/users/{id}\", upstream: \"http://127.0.0.1:9\" }\npolicies:\n  - { name: ids, type: correlation-id }\n",
    )
    .unwrap();
    std::fs::write(
        files.join("b.yaml"),
        "consumers:\n  - name: app\n    credentials:\n      - { type: basic-auth, username: app, password: s3cret }\n      - { type: key-auth, key: k-1 }\n",
    )
    .unwrap();
    std::fs::write(files.join("c.yaml"), "upstreams:\n  - { name: pool, targets: [{ url: \"http://10.0.0.1:8080\", weight: 7 }] }\n")
        .unwrap();
    let (e, w) = (format!("http://{}", east.admin_addr), format!("http://{}", west.admin_addr));
    let files_arg = files.to_str().unwrap();

    let (ok, out, err) = manifold(&["sync", files_arg, "--admin", &e, "--admin", &w, "--dry-run"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("+ routes/users") && out.contains("+ consumers/app") && out.contains("+ upstreams/pool"), "{out}");
    let (_, _, page) = send("GET", &format!("{e}/routes"), None, &[]).await;
    assert_eq!(page["data"], json!([]), "a dry run changes nothing");

    let (ok, out, err) = manifold(&["sync", files_arg, "--admin", &e, "--admin", &w], &[]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("applied, config version").count(), 2, "{out}");
    for admin in [&e, &w] {
        let (_, _, page) = send("GET", &format!("{admin}/routes"), None, &[]).await;
        assert_eq!(page["data"][0]["name"], "users");
        let (_, _, pool) = send("GET", &format!("{admin}/upstreams/pool"), None, &[]).await;
        assert_eq!(pool["targets"][0]["weight"], 7, "{pool}");
        let (_, _, consumer) = send("GET", &format!("{admin}/consumers/app"), None, &[]).await;
        let shown = consumer.to_string();
        assert!(!shown.contains("s3cret") && !shown.contains("\"k-1\""), "secrets are stored hashed: {shown}");
    }
    // Idempotent: the second sync finds nothing to do, passwords included.
    let (ok, out, _) = manifold(&["sync", files_arg, "--admin", &e, "--admin", &w], &[]);
    assert!(ok);
    assert_eq!(out.matches("in sync, nothing to change").count(), 2, "{out}");

    // export from one region, sync into an empty one: the same config
    // (with its secrets: an export without them holds only redactions).
    let (ok, yaml, err) = manifold(&["export", "--admin", &e, "--include-secrets"], &[]);
    assert!(ok, "{err}");
    let exported = dir.path().join("exported.yaml");
    std::fs::write(&exported, &yaml).unwrap();
    let third = node(&third_db, &dir.path().join("t.json")).unwrap();
    let t = format!("http://{}", third.admin_addr);
    let (ok, _, err) = manifold(&["sync", exported.to_str().unwrap(), "--admin", &t], &[]);
    assert!(ok, "{err}");
    let a: Value = client().get(format!("{e}/config")).send().await.unwrap().json().await.unwrap();
    let b: Value = client().get(format!("{t}/config")).send().await.unwrap().json().await.unwrap();
    assert_eq!(a, b);
    // export straight from the database says the same.
    let (ok, from_db, _) = manifold(&["export", "--include-secrets"], &[("MANIFOLD_DATABASE_URL", &east_db)]);
    assert!(ok);
    assert_eq!(from_db, yaml);
    for g in [east, west, third] {
        g.shutdown();
    }
    for db in [east_db, west_db, third_db] {
        drop_db(&db).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_costs_no_request_and_the_node_catches_up() {
    let b = backend().run().await;
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    // One node reaches Postgres through a relay the test can cut; the other
    // directly, to keep writing during the outage.
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let relay = common::Relay::start(pg).await;
    let relayed_url = url.replace("127.0.0.1:5432", &relay.addr.to_string());
    assert_ne!(relayed_url, url, "the test database URL names 127.0.0.1:5432");
    let cut_node = node(&relayed_url, &dir.path().join("cut.json")).unwrap();
    let writer = node(&url, &dir.path().join("writer.json")).unwrap();
    let (s, _, _) =
        send("POST", &format!("http://{}/routes", writer.admin_addr), Some(json!({"name": "a", "path": "/a", "upstream": b.url()})), &[])
            .await;
    assert_eq!(s, 201);
    let proxy = cut_node.proxy_addr;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client().get(format!("http://{proxy}/a")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "the route never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load on the cut node for the whole outage.
    let load = common::Load::start(&format!("http://{proxy}/a"), 4);
    relay.cut();
    let admin = format!("http://{}", cut_node.admin_addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, status) = send("GET", &format!("{admin}/status"), None, &[]).await;
        if status["database_reachable"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the node never noticed the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, _) = send("POST", &format!("{admin}/routes"), Some(json!({"name": "x", "path": "/x", "upstream": b.url()})), &[]).await;
    assert_eq!(s, 503, "admin writes answer 503 while the database is away");
    // Meanwhile the config changes elsewhere.
    let (s, _, _) = send(
        "POST",
        &format!("http://{}/routes", writer.admin_addr),
        Some(json!({"name": "late", "path": "/late", "upstream": b.url()})),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    // The issue's measure: 30 s without the database, under load.
    tokio::time::sleep(Duration::from_secs(30)).await;
    relay.restore();
    // Back: the node reconnects and catches up with what it missed.
    let deadline = Instant::now() + Duration::from_secs(15);
    while client().get(format!("http://{proxy}/late")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "the node did not catch up after the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during the outage");
    assert!(ok > 10);
    let (_, _, status) = send("GET", &format!("{admin}/status"), None, &[]).await;
    assert_eq!(status["database_reachable"], true);
    cut_node.shutdown();
    writer.shutdown();
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_api_key_is_shown_once_and_stored_as_a_digest() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let (s, _, _) = send("POST", &format!("{admin}/consumers"), Some(json!({"name": "app", "groups": ["mobile"]})), &[]).await;
    assert_eq!(s, 201);
    let (s, _, body) = send("POST", &format!("{admin}/consumers/app/credentials"), Some(json!({"type": "key-auth"})), &[]).await;
    assert_eq!(s, 201, "{body}");
    let key = body["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 48);
    let digest = manifold::config::secrets::sha256_hex(&key);
    assert_eq!(body["credential"]["key_sha256_prefix"], digest[..8]);

    let (_, _, consumer) = send("GET", &format!("{admin}/consumers/app"), None, &[]).await;
    // Reads show the digest redacted (secrets are write-only).
    assert_eq!(consumer["credentials"][0]["key_sha256"], manifold::config::secrets::redact(&digest));
    assert!(!consumer.to_string().contains(&key), "the key itself is never stored");
    let (_, _, list) = send("GET", &format!("{admin}/consumers/app/credentials"), None, &[]).await;
    assert_eq!(list["data"], json!([{"type": "key-auth", "key_sha256_prefix": &digest[..8]}]));
    // A second key for the same consumer; the same key for another is refused.
    let (s, _, _) = send(
        "POST",
        &format!("{admin}/consumers/app/credentials"),
        Some(json!({"type": "basic-auth", "username": "app", "password": "pw"})),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = send("POST", &format!("{admin}/consumers"), Some(json!({"name": "other"})), &[]).await;
    assert_eq!(s, 201);
    let (s, _, body) =
        send("POST", &format!("{admin}/consumers/other/credentials"), Some(json!({"type": "key-auth", "key": key})), &[]).await;
    assert_eq!(s, 400, "{body}");
    let (s, _, _) = send("POST", &format!("{admin}/consumers/ghost/credentials"), Some(json!({"type": "key-auth"})), &[]).await;
    assert_eq!(s, 404);
    g.shutdown();
    drop_db(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_database_is_taken_even_though_its_versions_start_again() {
    let b = backend().run().await;
    let (old_db, new_db) = (fresh_db(true).await, fresh_db(true).await);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.json");
    // The old database reaches version 4, and the node saves it.
    let g = node(&old_db, &snap).unwrap();
    for name in ["a", "b", "c"] {
        let (s, _, _) = send(
            "POST",
            &format!("http://{}/routes", g.admin_addr),
            Some(json!({"name": name, "path": format!("/{name}"), "upstream": b.url()})),
            &[],
        )
        .await;
        assert_eq!(s, 201);
    }
    g.shutdown();
    // The rebuilt one is at version 2 when the node, started from its saved
    // snapshot while the database was away, reaches it.
    let writer = node(&new_db, &dir.path().join("w.json")).unwrap();
    let (s, _, _) = send(
        "POST",
        &format!("http://{}/routes", writer.admin_addr),
        Some(json!({"name": "fresh", "path": "/fresh", "upstream": b.url()})),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    let relay = common::Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    relay.cut();
    let g = node(&new_db.replace("127.0.0.1:5432", &relay.addr.to_string()), &snap).unwrap();
    assert_eq!(client().get(format!("http://{}/a", g.proxy_addr)).send().await.unwrap().status(), 200, "serves the saved snapshot");
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client().get(format!("http://{}/fresh", g.proxy_addr)).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "the node kept the old database's config");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client().get(format!("http://{}/a", g.proxy_addr)).send().await.unwrap().status(), 404);
    g.shutdown();
    writer.shutdown();
    drop_db(&old_db).await;
    drop_db(&new_db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn if_match_on_a_missing_entity_and_unchanged_writes() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let route = json!({"path": "/r", "upstream": "http://127.0.0.1:9"});
    // If-Match names a version of something that does not exist: 412, not a creation.
    let (s, _, _) = send("PUT", &format!("{admin}/routes/r"), Some(route.clone()), &[("if-match", "\"1\"")]).await;
    assert_eq!(s, 412);
    let (s, _, _) = send("PUT", &format!("{admin}/routes/r"), Some(route.clone()), &[]).await;
    assert_eq!(s, 201);
    // The same entity again changes nothing: no new version, no audit record.
    let (s, h, _) = send("PUT", &format!("{admin}/routes/r"), Some(route.clone()), &[]).await;
    assert_eq!((s, h["etag"].to_str().unwrap()), (StatusCode::OK, "\"1\""));
    let (_, _, status) = send("GET", &format!("{admin}/status"), None, &[]).await;
    assert_eq!(status["config_version"], 2);
    let (_, _, log) = send("GET", &format!("{admin}/audit"), None, &[]).await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1);
    // A value Postgres cannot store is the client's error, not an outage.
    let comp =
        json!({"name": "nul", "path": "/nul", "calls": {"a": {"url": "http://127.0.0.1:9/a"}}, "response": {"body": {"text": "a\u{0}b"}}});
    let (s, _, body) = send("POST", &format!("{admin}/compositions"), Some(comp), &[]).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("invalid"), "{body}");
    g.shutdown();
    drop_db(&url).await;
}

/// Entity writes take YAML like `POST /config`; the served JSON keeps the
/// key order of `response.body` as written, through a PATCH too (JSONB would
/// sort the keys); `sync --dry-run` names the fields that change.
#[tokio::test(flavor = "multi_thread")]
async fn yaml_writes_keep_the_order_of_response_body_and_dry_runs_show_fields() {
    let b = backend().json(json!({"id": 7, "name": "Ada"})).run().await;
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let yaml = format!(
        "name: ordered\npath: /ordered\ntimeout: 2s\ncalls:\n  user: {{ url: \"{}/u\" }}\nresponse:\n  body:\n    middle: fixed\n    alpha: $.user.body.id\n    zeta: $.user.body.name\n",
        b.url()
    );
    let resp = client().post(format!("{admin}/compositions")).header("content-type", "application/yaml").body(yaml).send().await.unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let resp = client()
        .patch(format!("{admin}/compositions/ordered"))
        .header("content-type", "application/json")
        .body(r#"{"timeout": "3s"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stored = resp.text().await.unwrap();
    assert!(stored.find("middle").unwrap() < stored.find("zeta").unwrap(), "the admin answer keeps the order: {stored}");
    let proxy = format!("http://{}/ordered", g.proxy_addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    let served = loop {
        let resp = client().get(&proxy).send().await.unwrap();
        if resp.status() == 200 {
            break resp.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the composition is served within 5 s, got {}", resp.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // JSONB would give zeta, alpha, middle (shorter keys first).
    assert_eq!(served, r#"{"middle":"fixed","alpha":7,"zeta":"Ada"}"#);
    // An entity that is not one object is refused with a clear message.
    let resp = client().post(format!("{admin}/routes")).header("content-type", "application/yaml").body("- a\n- b\n").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("must be an object"));

    // The dry run of a file that changes one field names it, before and after.
    let file = dir.path().join("c.yaml");
    let config: Value =
        client().get(format!("{admin}/config")).header("accept", "application/json").send().await.unwrap().json().await.unwrap();
    let mut comp = config["compositions"][0].clone();
    comp["timeout"] = json!("4s");
    std::fs::write(&file, serde_json::to_string(&json!({"compositions": [comp]})).unwrap()).unwrap();
    let (ok, out, err) = manifold(&["sync", file.to_str().unwrap(), "--admin", &admin, "--dry-run"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("~ compositions/ordered") && out.contains(r#"timeout: "3s" -> "4s""#), "{out}");
    g.shutdown();
    drop_db(&url).await;
}

/// A database-mode write is checked as `manifold validate` checks a file:
/// an unknown field does not hide the entity's other errors.
#[tokio::test(flavor = "multi_thread")]
async fn an_entity_write_reports_every_error_at_once() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let comp = json!({
        "name": "many", "path": "/many", "policies": ["nope"], "colour": "blue",
        "calls": {"a": {"url": "http://127.0.0.1:9/a/{{b.body.id}}"}, "b": {"url": "http://127.0.0.1:9/b/{{a.body.id}}", "retries": "x"}},
        "response": {"body": {"greeting": "Hello {{a.body.name}}"}}
    });
    let (s, _, body) = send("PUT", &format!("{admin}/compositions/many"), Some(comp), &[]).await;
    assert_eq!(s, 400, "{body}");
    let fields = body["fields"].as_object().unwrap();
    for want in ["colour", "policies", "response.body.greeting", "calls.b.retries"] {
        assert!(fields.keys().any(|k| k.starts_with(want)), "{want} in {body:#}");
    }
    let (_, _, page) = send("GET", &format!("{admin}/compositions"), None, &[]).await;
    assert_eq!(page["data"], json!([]), "nothing stored");
    g.shutdown();
    drop_db(&url).await;
}

/// Upstreams are entities like the others (SPEC §6): the same status codes,
/// ETags, audit records, errors by field, and a delete refused while a route
/// or a call names the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_crud_audit_and_a_delete_refused_while_used() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let users = json!({
        "name": "users", "tags": ["team-a"],
        "targets": [{"url": "http://10.0.0.1:8080", "weight": 300}, {"url": "http://10.0.0.2:8080"}],
        "connect_timeout": "2s",
    });

    let (s, h, body) = send("POST", &format!("{admin}/upstreams"), Some(users.clone()), &[("x-manifold-actor", "bob")]).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(h["etag"], "\"1\"");
    assert_eq!(body["targets"][0], json!({"url": "http://10.0.0.1:8080", "weight": 300}));
    let (s, _, body) = send("POST", &format!("{admin}/upstreams"), Some(users.clone()), &[]).await;
    assert_eq!(s, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("already exists"), "{body}");

    let (s, h, body) = send("GET", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!((s, h["etag"].to_str().unwrap()), (StatusCode::OK, "\"1\""));
    assert_eq!(body, users);
    let (s, _, body) = send("GET", &format!("{admin}/upstreams/nope"), None, &[]).await;
    assert_eq!((s, body), (StatusCode::NOT_FOUND, json!({"message": "not found"})));
    let (s, _, _) =
        send("POST", &format!("{admin}/upstreams"), Some(json!({"name": "other", "targets": [{"url": "http://10.0.0.3"}]})), &[]).await;
    assert_eq!(s, 201);
    let (_, _, page) = send("GET", &format!("{admin}/upstreams"), None, &[]).await;
    let names: Vec<&str> = page["data"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["users", "other"]);
    let (_, _, tagged) = send("GET", &format!("{admin}/upstreams?tags=team-a"), None, &[]).await;
    assert_eq!(tagged["data"].as_array().unwrap().len(), 1, "{tagged}");

    // Every error at once, relative to the entity.
    let bad = json!({
        "targets": [{"url": "http://10.0.0.1:8080/base", "weight": 0}],
        "health": {"passive": {"failures": 0}},
        "resolve_every": "100ms",
        "tls": {"client_key_file": "/k.pem"},
    });
    let (s, _, body) = send("PUT", &format!("{admin}/upstreams/users"), Some(bad), &[]).await;
    assert_eq!(s, 400, "{body}");
    for field in ["targets[0].url", "targets[0].weight", "health.passive.failures", "resolve_every", "tls.client_cert_file"] {
        assert!(body["fields"][field].is_string(), "{field} in {body}");
    }

    // Replace (with If-Match) and merge.
    let mut replaced = users.clone();
    replaced["targets"] = json!([{"url": "http://10.0.0.9:8080"}]);
    let (s, h, body) = send("PUT", &format!("{admin}/upstreams/users"), Some(replaced), &[("if-match", "\"1\"")]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["etag"], "\"2\"");
    let (s, _, _) = send("PATCH", &format!("{admin}/upstreams/users"), Some(json!({"http2": true})), &[("if-match", "\"1\"")]).await;
    assert_eq!(s, 412);
    let (s, h, body) = send("PATCH", &format!("{admin}/upstreams/users"), Some(json!({"http2": true})), &[]).await;
    assert_eq!((s, h["etag"].to_str().unwrap()), (StatusCode::OK, "\"3\""), "{body}");
    assert_eq!((body["http2"].as_bool(), body["targets"][0]["url"].as_str()), (Some(true), Some("http://10.0.0.9:8080")));

    // A route naming an unknown upstream is an error at its field.
    let (s, _, body) = send("POST", &format!("{admin}/routes"), Some(json!({"name": "r", "path": "/r", "upstream": "ghost"})), &[]).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["fields"]["upstream"], "unknown upstream \"ghost\"");

    // In use: a route and a composition call name it, both written through
    // the API like any entity.
    let (s, _, body) =
        send("POST", &format!("{admin}/routes"), Some(json!({"name": "users-api", "path": "/u", "upstream": "users"})), &[]).await;
    assert_eq!(s, 201, "{body}");
    let dash = json!({"name": "dash", "path": "/d", "calls": {"me": {"upstream": "users", "path": "/me"}}});
    let (s, _, body) = send("POST", &format!("{admin}/compositions"), Some(dash), &[]).await;
    assert_eq!(s, 201, "{body}");
    let (s, _, body) = send("DELETE", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["message"], "upstream \"users\" is still used by routes.users-api, compositions.dash.calls.me");
    let (s, _, _) = send("GET", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!(s, 200, "still there");
    let (s, _, _) = send("DELETE", &format!("{admin}/routes/users-api"), None, &[]).await;
    assert_eq!(s, 204);
    let (s, _, _) = send("DELETE", &format!("{admin}/compositions/dash"), None, &[]).await;
    assert_eq!(s, 204);

    let (s, _, body) = send("DELETE", &format!("{admin}/upstreams/users"), None, &[("x-manifold-actor", "bob")]).await;
    assert_eq!((s, body), (StatusCode::NO_CONTENT, Value::Null));
    let (s, _, _) = send("DELETE", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!(s, 404);
    let (s, _, _) = send("GET", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!(s, 404);

    // Each write is in the change log, newest first.
    let (_, _, log) = send("GET", &format!("{admin}/audit"), None, &[]).await;
    let entries: Vec<(String, String, String)> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["entity"]["kind"].as_str().unwrap().into(),
                e["entity"]["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = |a: &str, n: &str| (a.to_string(), "upstreams".to_string(), n.to_string());
    let other = |a: &str, k: &str, n: &str| (a.to_string(), k.to_string(), n.to_string());
    assert_eq!(
        entries,
        [
            want("delete", "users"),
            other("delete", "compositions", "dash"),
            other("delete", "routes", "users-api"),
            other("create", "compositions", "dash"),
            other("create", "routes", "users-api"),
            want("update", "users"),
            want("update", "users"),
            want("create", "other"),
            want("create", "users")
        ]
    );
    let deleted = &log["data"][0];
    assert_eq!((deleted["actor"].as_str(), &deleted["after"]), (Some("bob"), &Value::Null));
    assert_eq!(deleted["before"]["http2"], true);
    let (_, _, status) = send("GET", &format!("{admin}/status"), None, &[]).await;
    assert_eq!(status["entities"]["upstreams"], 1);
    g.shutdown();
    drop_db(&url).await;
}

/// `POST /config` in database mode takes upstreams with the rest, and the
/// dry run, the stored config and `manifold export` all carry them.
#[tokio::test(flavor = "multi_thread")]
async fn post_config_with_upstreams_and_export_carries_them() {
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let g = node(&url, &dir.path().join("snap.json")).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let yaml = "upstreams:\n  - name: users\n    targets:\n      - { url: \"http://10.0.0.1:8080\", weight: 5 }\n      - { url: \"https://users-b.internal\" }\n    tls: { server_name: users.internal }\n    http2: true\nroutes:\n  - { name: a, path: /a, upstream: \"http://127.0.0.1:9\" }\n";
    let resp = client().post(format!("{admin}/config?dry_run=true")).body(yaml).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert!(body["changes"]["created"].as_array().unwrap().contains(&json!({"kind": "upstreams", "name": "users"})), "{body}");
    let (_, _, page) = send("GET", &format!("{admin}/upstreams"), None, &[]).await;
    assert_eq!(page["data"], json!([]), "a dry run writes nothing");

    let resp = client().post(format!("{admin}/config")).body(yaml).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (s, _, one) = send("GET", &format!("{admin}/upstreams/users"), None, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(one["targets"][1]["url"], "https://users-b.internal");
    let config: Value = client().get(format!("{admin}/config")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["upstreams"][0]["tls"], json!({"server_name": "users.internal"}));
    let (_, _, log) = send("GET", &format!("{admin}/audit"), None, &[]).await;
    assert!(log["data"].as_array().unwrap().iter().any(|e| e["entity"] == json!({"kind": "upstreams", "name": "users"})), "{log}");

    // An invalid upstream refuses the whole config.
    let bad = yaml.replace("weight: 5", "weight: 5000");
    let resp = client().post(format!("{admin}/config")).body(bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["fields"]["upstreams.users.targets[0].weight"].is_string(), "{body}");

    let (ok, from_db, err) = manifold(&["export"], &[("MANIFOLD_DATABASE_URL", &url)]);
    assert!(ok, "{err}");
    let exported: Config = serde_norway::from_str(&from_db).unwrap();
    assert_eq!(exported.upstreams.len(), 1, "{from_db}");
    assert_eq!(exported.upstreams[0].targets[0].weight, Some(5));
    let (ok, from_admin, err) = manifold(&["export", "--admin", &admin], &[]);
    assert!(ok, "{err}");
    assert!(from_admin.contains("upstreams:") && from_admin.contains("https://users-b.internal"), "{from_admin}");
    g.shutdown();
    drop_db(&url).await;
}

/// An upstream written through one node is served by every node within
/// moments; two nodes put every consistent-hash key on the same target;
/// and health is each node's own: a target ejected by one node's traffic
/// is still healthy on the other.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_write_reaches_every_node_and_health_is_per_node() {
    let (b1, b2, b3) = (backend().run().await, backend().run().await, backend().run().await);
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    };
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&url, &dir.path().join("a.json")).unwrap();
    let other = node(&url, &dir.path().join("b.json")).unwrap();
    let pool = json!({
        "name": "pool",
        "targets": [{"url": b1.url()}, {"url": b2.url()}, {"url": b3.url()}, {"url": dead}],
        "balance": "consistent-hash",
        "hash_on": "header:x-user",
        "health": {"passive": {"failures": 1, "window": "1m", "eject_for": "10m", "max_ejected": "50%"}},
    });
    let (s, _, body) = send("POST", &format!("http://{}/upstreams", a.admin_addr), Some(pool), &[]).await;
    assert_eq!(s, 201, "{body}");
    let route = json!({"name": "h", "path": "/h/{*rest}", "upstream": "pool"});
    let (s, _, body) = send("POST", &format!("http://{}/routes", a.admin_addr), Some(route), &[]).await;
    assert_eq!(s, 201, "{body}");
    // The other node has both writes once it serves a's version (asked
    // without sending a request through the pool).
    let (_, _, status) = send("GET", &format!("http://{}/status", a.admin_addr), None, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, theirs) = send("GET", &format!("http://{}/status", other.admin_addr), None, &[]).await;
        if theirs["config_version"] == status["config_version"] {
            break;
        }
        assert!(Instant::now() < deadline, "the other node never served the new upstream: {theirs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both nodes place every key alike: on a live target (200, its host)
    // or on the dead one (502) — until node `a` ejects it.
    let place = |g: std::net::SocketAddr, key: String| async move {
        let resp = client().get(format!("http://{g}/h/x")).header("x-user", &key).send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (status, body["headers"]["host"][0].as_str().map(str::to_string))
    };
    let keys: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let mut on_other = Vec::new();
    for k in &keys {
        on_other.push(place(other.proxy_addr, k.clone()).await);
    }
    let (_, _, report) = send("GET", &format!("http://{}/upstreams/pool/health", other.admin_addr), None, &[]).await;
    let dead_on_other = report["targets"].as_array().unwrap().iter().find(|t| t["target"] == dead).unwrap().clone();
    // `other` ejected the dead target at its first failure (failures: 1)
    // if a key landed there; `a` has sent nothing yet.
    let (_, _, report_a) = send("GET", &format!("http://{}/upstreams/pool/health", a.admin_addr), None, &[]).await;
    let dead_on_a = report_a["targets"].as_array().unwrap().iter().find(|t| t["target"] == dead).unwrap().clone();
    assert_eq!(dead_on_a["state"], "healthy", "{report_a}");
    assert_eq!(dead_on_a["passive"]["ejections"], 0, "{report_a}");
    let landed_dead = on_other.iter().filter(|(s, _)| *s == 502).count();
    assert!(landed_dead >= 1, "no key of 40 on the dead target of 4: {on_other:?}");
    assert_eq!(dead_on_other["state"], "ejected", "{report}");
    assert_eq!(dead_on_other["passive"]["ejections"], 1, "{report}");
    // Once ejected on `other`, its keys go to the next live target there,
    // and every other key is where `a` puts it (a ejects on its own too).
    for (k, (status, host)) in keys.iter().zip(&on_other) {
        let on_a = place(a.proxy_addr, k.clone()).await;
        if *status == 200 {
            assert_eq!(&on_a, &(200, host.clone()), "{k}: the nodes disagree");
        }
    }
    let (_, _, report_a) = send("GET", &format!("http://{}/upstreams/pool/health", a.admin_addr), None, &[]).await;
    let dead_on_a = report_a["targets"].as_array().unwrap().iter().find(|t| t["target"] == dead).unwrap().clone();
    assert_eq!(dead_on_a["state"], "ejected", "{report_a}");
    a.shutdown();
    other.shutdown();
    drop_db(&url).await;
}

#[path = "common/tls.rs"]
mod tls;

#[tokio::test(flavor = "multi_thread")]
async fn certificate_crud_serves_by_sni_and_keeps_the_key_out_of_reads_and_the_audit_log() {
    use rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    let url = fresh_db(true).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = GatewayOptions {
        database: Some(DatabaseOptions { url: url.clone(), snapshot_path: dir.path().join("s.json") }),
        ..Default::default()
    };
    opts.server.workers = 1;
    // Listening from the start, with no certificate yet.
    opts.server.tls_listen = Some(([127, 0, 0, 1], 0).into());
    let g = Gateway::start(opts, Config::default()).unwrap();
    let admin = format!("http://{}", g.admin_addr);
    let ca = tls::ca("db test ca");
    let leaf = tls::leaf(&ca, "api.example.test", &["api.example.test"], ServerAuth);
    let handshake = |sni: &'static str| {
        let ca = ca.der.clone();
        let addr = g.tls_addr.unwrap();
        async move {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            roots.add(ca).unwrap();
            let config = tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(sni).unwrap();
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .ok()
                .map(|s| s.get_ref().1.peer_certificates().unwrap()[0].clone())
        }
    };
    assert!(handshake("api.example.test").await.is_none(), "no certificate yet");

    let entity = json!({"name": "api", "snis": ["api.example.test"], "cert": leaf.cert_pem, "key": leaf.key_pem});
    let (status, _, created) = send("POST", &format!("{admin}/certificates"), Some(entity), &[]).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created.get("key").is_none() && created["key_sha256"].as_str().map(str::len) == Some(64), "{created}");
    assert_eq!(handshake("api.example.test").await, Some(leaf.cert_der.clone()), "served once written, without a restart");

    let (status, _, patched) = send("PATCH", &format!("{admin}/certificates/api"), Some(json!({"tags": ["edge"]})), &[]).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(handshake("api.example.test").await, Some(leaf.cert_der.clone()), "a merge keeps the key");
    let (_, _, read) = send("GET", &format!("{admin}/certificates/api"), None, &[]).await;
    assert_eq!(read["details"]["subject"], "CN=api.example.test");
    for url in [format!("{admin}/certificates"), format!("{admin}/certificates/api"), format!("{admin}/audit"), format!("{admin}/config")] {
        let text = client().get(&url).send().await.unwrap().text().await.unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{url} shows the key");
    }

    // export from the database: keys only when asked for.
    let full = manifold::remote::export(None, None, Some(&url), true).await.unwrap();
    assert!(full.contains("PRIVATE KEY"));
    let plain = manifold::remote::export(None, None, Some(&url), false).await.unwrap();
    assert!(!plain.contains("PRIVATE KEY") && plain.contains("key_sha256"));

    let (status, _, _) = send("DELETE", &format!("{admin}/certificates/api"), None, &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(handshake("api.example.test").await.is_none(), "gone with its entity");
    g.shutdown();
    drop_db(&url).await;
}
