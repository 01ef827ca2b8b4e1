//! Secrets are write-only (config/secrets.rs): JWT secrets, password
//! hashes and key digests are redacted as `sha256:<12 hex>` in every admin
//! read, list, `/audit` and export; `GET /config?include_secrets=true`
//! (`export --include-secrets`) and the snapshot file keep them, so a
//! backup restores; a redaction written back keeps the stored secret.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{backend, client, drop_db, fresh_db, send, GatewayProcess};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use manifold::config::secrets::{redact, sha256_hex, UNMATCHED};
use manifold::gateway::{DatabaseOptions, Gateway, GatewayOptions};
use serde_json::{json, Value};

const HS_SECRET: &str = "an-hs256-secret-that-must-never-be-shown";
const KEY: &str = "k-write-only-1";

/// A valid token signed with `secret`.
fn token(secret: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 300;
    let t = encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "app-iss", "sub": "u", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    );
    format!("Bearer {}", t.unwrap())
}

fn consumer() -> Value {
    json!({
        "name": "app",
        "credentials": [
            {"type": "jwt", "issuer": "app-iss", "algorithm": "HS256", "secret": HS_SECRET},
            {"type": "basic-auth", "username": "app", "password": "pw-1"},
            {"type": "key-auth", "key": KEY},
        ]
    })
}

fn config_yaml(upstream: &str) -> String {
    format!(
        "consumers:\n  - {}\npolicies:\n  - {{ name: jwt, type: jwt }}\nroutes:\n  - {{ name: r, path: /r, upstream: \"{upstream}\", policies: [jwt] }}\n",
        consumer()
    )
}

fn manifold(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(args)
        .env_remove("MANIFOLD_DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn get_text(url: &str, accept: &str) -> String {
    let resp = client().get(url).header("accept", accept).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    resp.text().await.unwrap()
}

/// The stored values, from a read that includes them.
struct Stored {
    password_hash: String,
    key_digest: String,
}

fn stored(config: &Value) -> Stored {
    let creds = &config["consumers"][0]["credentials"];
    assert_eq!(creds[0]["secret"], HS_SECRET, "{config}");
    let password_hash = creds[1]["password_hash"].as_str().unwrap().to_string();
    assert!(password_hash.starts_with("$argon2"), "{config}");
    let key_digest = creds[2]["key_sha256"].as_str().unwrap().to_string();
    assert_eq!(key_digest, sha256_hex(KEY));
    Stored { password_hash, key_digest }
}

/// `text` shows each secret only as its redaction.
fn redacted(what: &str, text: &str, s: &Stored) {
    for secret in [HS_SECRET, &s.password_hash, &s.key_digest, KEY, "$argon2"] {
        assert!(!text.contains(secret), "{what} shows {secret:?}: {text}");
    }
    for secret in [HS_SECRET, &s.password_hash, &s.key_digest] {
        assert!(text.contains(&redact(secret)), "{what} lacks the redaction of {secret:?}: {text}");
    }
}

async fn proxied(proxy: std::net::SocketAddr, secret: &str) -> u16 {
    let resp = client().get(format!("http://{proxy}/r")).header("authorization", token(secret)).send().await.unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn db_less_reads_exports_and_logs_redact_and_a_redacted_config_posted_back_keeps_the_secrets() {
    let b = backend().run().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), config_yaml(&b.url())).unwrap();
    let g = GatewayProcess::start(dir.path(), &[]);
    let admin = format!("http://{}", g.admin);

    let full: Value = client().get(format!("{admin}/config?include_secrets=true")).send().await.unwrap().json().await.unwrap();
    let s = stored(&full);
    redacted("GET /config", &get_text(&format!("{admin}/config"), "application/json").await, &s);
    redacted("GET /config (YAML)", &get_text(&format!("{admin}/config"), "application/yaml").await, &s);
    redacted("GET /consumers", &get_text(&format!("{admin}/consumers"), "application/json").await, &s);
    redacted("GET /consumers/app", &get_text(&format!("{admin}/consumers/app"), "application/json").await, &s);
    let (ok, yaml, err) = manifold(&["export", "--admin", &admin], &[]);
    assert!(ok, "{err}");
    redacted("export", &yaml, &s);
    let (ok, with_secrets, err) = manifold(&["export", "--admin", &admin, "--include-secrets"], &[]);
    assert!(ok, "{err}");
    assert!(with_secrets.contains(HS_SECRET) && with_secrets.contains(&s.password_hash), "{with_secrets}");
    assert_eq!(proxied(g.proxy, HS_SECRET).await, 200);

    // The redacted config posted back: nothing changes, the secrets stay.
    let shown: Value = client().get(format!("{admin}/config")).send().await.unwrap().json().await.unwrap();
    let (status, _, answer) = send("POST", &format!("{admin}/config?dry_run=true"), Some(shown.clone()), &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changes"], json!({"created": [], "updated": [], "deleted": []}));
    let (status, _, answer) = send("POST", &format!("{admin}/config"), Some(shown.clone()), &[]).await;
    assert_eq!(status, 200, "{answer}");
    let again: Value = client().get(format!("{admin}/config?include_secrets=true")).send().await.unwrap().json().await.unwrap();
    assert_eq!(again, full, "a redaction sent back is never stored");
    assert_eq!(proxied(g.proxy, HS_SECRET).await, 200, "the secret still verifies tokens");

    // A redaction of nothing stored is refused, never taken as the secret.
    let mut wrong = shown.clone();
    wrong["consumers"][0]["credentials"][0]["secret"] = json!(redact("another-secret"));
    wrong["consumers"][0]["credentials"][1]["password_hash"] = json!(redact("$argon2id$another"));
    let (status, _, answer) = send("POST", &format!("{admin}/config"), Some(wrong), &[]).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["fields"]["consumers.app.credentials[0].secret"], UNMATCHED, "{answer}");
    assert_eq!(answer["fields"]["consumers.app.credentials[1].password_hash"], UNMATCHED, "{answer}");
    // The same file given to `validate` (no stored secret to match) fails.
    let exported = dir.path().join("exported");
    std::fs::create_dir(&exported).unwrap();
    std::fs::write(exported.join("all.yaml"), &yaml).unwrap();
    let (ok, out, err) = manifold(&["validate", exported.to_str().unwrap()], &[]);
    assert!(!ok && format!("{out}{err}").contains(UNMATCHED), "{out}{err}");

    // Nothing above wrote a secret to the logs.
    let log = g.log.lock().unwrap().join("\n");
    assert!(!log.is_empty());
    for secret in [HS_SECRET, &s.password_hash, &s.key_digest, KEY] {
        assert!(!log.contains(secret), "the log shows {secret:?}");
    }
}

fn node(url: &str, snapshot: &std::path::Path) -> Gateway {
    let mut opts =
        GatewayOptions { database: Some(DatabaseOptions { url: url.into(), snapshot_path: snapshot.into() }), ..Default::default() };
    opts.server.workers = 1;
    Gateway::start(opts, manifold::config::Config::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn database_mode_keeps_secrets_write_only_and_a_backup_with_them_restores() {
    let b = backend().run().await;
    let (db, empty_db) = (fresh_db(true).await, fresh_db(true).await);
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snap.json");
    let g = node(&db, &snapshot);
    let admin = format!("http://{}", g.admin_addr);

    let (status, _, created) = send("POST", &format!("{admin}/consumers"), Some(consumer()), &[]).await;
    assert_eq!(status, 201, "{created}");
    for (kind, entity) in [
        ("policies", json!({"name": "jwt", "type": "jwt"})),
        ("routes", json!({"name": "r", "path": "/r", "upstream": b.url(), "policies": ["jwt"]})),
    ] {
        let (status, _, answer) = send("POST", &format!("{admin}/{kind}"), Some(entity), &[]).await;
        assert_eq!(status, 201, "{answer}");
    }
    let full: Value = client().get(format!("{admin}/config?include_secrets=true")).send().await.unwrap().json().await.unwrap();
    let s = stored(&full);
    redacted("the create's answer", &created.to_string(), &s);
    for path in ["/config", "/consumers", "/consumers/app", "/audit"] {
        redacted(path, &get_text(&format!("{admin}{path}"), "application/json").await, &s);
    }
    assert_eq!(proxied(g.proxy_addr, HS_SECRET).await, 200);

    // The audit log in the database holds redactions only.
    let store = manifold::store::Store::connect(&db).await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT coalesce(before::text, '') || coalesce(after::text, '') FROM audit_log")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert!(rows.len() >= 3);
    for secret in [HS_SECRET, &s.password_hash, &s.key_digest] {
        assert!(rows.iter().all(|r| !r.contains(secret)), "the audit log holds {secret:?}");
    }

    // The entity as read, written back: unchanged. A PATCH of another
    // field and a PUT of the redacted credentials keep the secrets.
    let (_, _, shown) = send("GET", &format!("{admin}/consumers/app"), None, &[]).await;
    let (status, _, answer) = send("PUT", &format!("{admin}/consumers/app"), Some(shown.clone()), &[]).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, answer) = send("PATCH", &format!("{admin}/consumers/app"), Some(json!({"groups": ["mobile"]})), &[]).await;
    assert_eq!(status, 200, "{answer}");
    redacted("the patch's answer", &answer.to_string(), &s);
    let mut put = shown.clone();
    put["groups"] = json!(["mobile", "web"]);
    let (status, _, answer) = send("PUT", &format!("{admin}/consumers/app"), Some(put), &[]).await;
    assert_eq!(status, 200, "{answer}");
    let now: Value = client().get(format!("{admin}/config?include_secrets=true")).send().await.unwrap().json().await.unwrap();
    assert_eq!(now["consumers"][0]["credentials"], full["consumers"][0]["credentials"]);
    assert_eq!(now["consumers"][0]["groups"], json!(["mobile", "web"]));
    assert_eq!(proxied(g.proxy_addr, HS_SECRET).await, 200);
    let mut wrong = shown.clone();
    wrong["credentials"][0]["secret"] = json!(redact("another-secret"));
    let (status, _, answer) = send("PUT", &format!("{admin}/consumers/app"), Some(wrong), &[]).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["fields"]["credentials[0].secret"], UNMATCHED, "{answer}");

    // The snapshot file is the node's disaster copy: the real values, 0600.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777, 0o600);
    let saved = std::fs::read_to_string(&snapshot).unwrap();
    assert!(saved.contains(HS_SECRET) && saved.contains(&s.password_hash), "the snapshot keeps the secrets");

    // export: redacted, or whole with --include-secrets (database or admin API).
    let (ok, yaml, err) = manifold(&["export"], &[("MANIFOLD_DATABASE_URL", &db)]);
    assert!(ok, "{err}");
    redacted("export from the database", &yaml, &s);
    let (ok, backup, err) = manifold(&["export", "--include-secrets"], &[("MANIFOLD_DATABASE_URL", &db)]);
    assert!(ok, "{err}");
    assert!(backup.contains(HS_SECRET), "{backup}");
    let (ok, backup_api, err) = manifold(&["export", "--admin", &admin, "--include-secrets"], &[]);
    assert!(ok, "{err}");
    assert_eq!(backup_api, backup);

    // sync compares secrets without printing them: the redacted export is
    // in sync with the node it came from...
    let (redacted_file, backup_file) = (dir.path().join("redacted.yaml"), dir.path().join("backup.yaml"));
    std::fs::write(&redacted_file, &yaml).unwrap();
    std::fs::write(&backup_file, &backup).unwrap();
    let (ok, out, err) = manifold(&["sync", redacted_file.to_str().unwrap(), "--admin", &admin], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("in sync, nothing to change"), "{out}");
    // ...cannot restore an empty one (nothing to match its redactions)...
    let fresh = node(&empty_db, &dir.path().join("snap2.json"));
    let fresh_admin = format!("http://{}", fresh.admin_addr);
    let (ok, out, err) = manifold(&["sync", redacted_file.to_str().unwrap(), "--admin", &fresh_admin], &[]);
    assert!(!ok, "{out}");
    assert!(err.contains(UNMATCHED), "{err}");
    // ...and the backup does, printing no secret.
    let (ok, out, err) = manifold(&["sync", backup_file.to_str().unwrap(), "--admin", &fresh_admin], &[]);
    assert!(ok, "{out}{err}");
    for secret in [HS_SECRET, &s.password_hash, &s.key_digest] {
        assert!(!out.contains(secret) && !err.contains(secret), "sync printed {secret:?}: {out}{err}");
    }
    let restored: Value = client().get(format!("{fresh_admin}/config?include_secrets=true")).send().await.unwrap().json().await.unwrap();
    assert_eq!(restored["consumers"], now["consumers"]);
    assert_eq!(proxied(fresh.proxy_addr, HS_SECRET).await, 200);

    g.shutdown();
    fresh.shutdown();
    drop(store);
    drop_db(&db).await;
    drop_db(&empty_db).await;
}
