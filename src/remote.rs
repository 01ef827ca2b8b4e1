//! `manifold export` and `manifold sync`: the admin API as a client sees
//! it. Off the request path, so reqwest.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::{load_paths, Config};

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?)
}

fn with_token(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) if !t.is_empty() => req.bearer_auth(t),
        _ => req,
    }
}

/// Explains an admin API error answer, fields included.
async fn failure(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let mut text = format!("{status}: {}", body["message"].as_str().unwrap_or("(no message)"));
    if let Some(fields) = body["fields"].as_object() {
        for (k, v) in fields {
            text.push_str(&format!("\n  {k}: {}", v.as_str().unwrap_or("")));
        }
    }
    anyhow::anyhow!(text)
}

/// The whole live config as YAML, from a node's admin API or the database;
/// its secrets redacted unless `include_secrets` (config/secrets.rs; a
/// certificate then shows its `key_sha256` instead of its key).
pub async fn export(admin: Option<&str>, token: Option<&str>, database_url: Option<&str>, include_secrets: bool) -> anyhow::Result<String> {
    if let Some(url) = admin {
        let query = if include_secrets { "?include_secrets=true" } else { "" };
        let resp =
            with_token(client()?.get(format!("{}/config{query}", url.trim_end_matches('/'))).header("accept", "application/yaml"), token)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            return Err(failure(resp).await);
        }
        return Ok(resp.text().await?);
    }
    let Some(db) = database_url else { bail!("export needs --admin URL or MANIFOLD_DATABASE_URL") };
    let store = crate::store::Store::connect(db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut config, _) = store.load().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if !include_secrets {
        crate::config::secrets::redact_config(&mut config);
    }
    Ok(serde_norway::to_string(&config)?)
}

/// The diff as lines: `+`/`~`/`-` per entity, and under each update the
/// fields that change, `path: before -> after`.
fn describe(changes: &Value) -> (usize, String) {
    let short = |v: &Value| {
        let text = v.to_string();
        if text.chars().count() > 80 {
            format!("{}...", text.chars().take(77).collect::<String>())
        } else {
            text
        }
    };
    let mut count = 0;
    let mut lines = Vec::new();
    for (key, mark) in [("created", "+"), ("updated", "~"), ("deleted", "-")] {
        for e in changes[key].as_array().into_iter().flatten() {
            count += 1;
            lines.push(format!("  {mark} {}/{}", e["kind"].as_str().unwrap_or(""), e["name"].as_str().unwrap_or("")));
            for f in e["fields"].as_array().into_iter().flatten() {
                let path = f["path"].as_str().unwrap_or("");
                lines.push(match (f.get("before"), f.get("after")) {
                    (Some(b), Some(a)) => format!("      {path}: {} -> {}", short(b), short(a)),
                    (None, Some(a)) => format!("      + {path}: {}", short(a)),
                    (Some(b), None) => format!("      - {path}: {}", short(b)),
                    (None, None) => format!("      {path}"),
                });
            }
        }
    }
    (count, lines.join("\n"))
}

/// Makes every gateway's config equal to the files: prints each one's
/// diff, applies it unless `dry_run`. Returns whether all succeeded.
pub async fn sync(path: &PathBuf, admins: &[String], token: Option<&str>, dry_run: bool) -> anyhow::Result<bool> {
    if admins.is_empty() {
        bail!("sync needs at least one --admin URL (repeat it for several gateways)");
    }
    // Validated here first, so a bad file is reported as file: field: message.
    // A redacted secret (from an export without --include-secrets) is left
    // for each gateway to match against the secret it stores.
    let validated = match load_paths(std::slice::from_ref(path)) {
        Ok(validated) => Some(validated),
        Err(mut errors) => {
            errors.0.retain(|e| e.message != crate::config::secrets::UNMATCHED && e.message != crate::config::secrets::KEY_UNMATCHED);
            if !errors.0.is_empty() {
                bail!("{errors}");
            }
            None
        }
    };
    // Sent as written (secrets not yet hashed): each gateway hashes, and
    // keeps the hashes of passwords it already holds.
    let mut raw: Config = crate::config::load::parse_paths(std::slice::from_ref(path)).0.config;
    // With the digest of each module file validation compiled: a module
    // rebuilt under the same path is a change, and a gateway whose file
    // differs says so. (A config that only validated up to its redacted
    // secrets goes without: each gateway records its own file's.)
    if let Some(validated) = &validated {
        for (sent, checked) in raw.policies.iter_mut().zip(&validated.policies) {
            if let (Some(digest), serde_json::Value::Object(c)) = (checked.config.get("module_sha256"), &mut sent.config) {
                c.insert("module_sha256".into(), digest.clone());
            }
        }
    }
    let body = serde_json::to_vec(&raw)?;
    let http = client()?;
    let mut ok = true;
    for admin in admins {
        let base = admin.trim_end_matches('/');
        let post = |dry: bool| {
            with_token(http.post(format!("{base}/config{}", if dry { "?dry_run=true" } else { "" })), token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        };
        let resp = match post(true).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                eprintln!("{base}: {}", failure(r).await);
                ok = false;
                continue;
            }
            Err(e) => {
                eprintln!("{base}: cannot reach the admin API: {e}");
                ok = false;
                continue;
            }
        };
        let plan: Value = resp.json().await?;
        let (count, text) = describe(&plan["changes"]);
        if count == 0 {
            println!("{base}: in sync, nothing to change");
            continue;
        }
        println!("{base}: {count} change(s)\n{text}");
        if dry_run {
            continue;
        }
        match post(false).await {
            Ok(r) if r.status().is_success() => {
                let done: Value = r.json().await?;
                println!("{base}: applied, config version {}", done["version"]);
            }
            Ok(r) => {
                eprintln!("{base}: {}", failure(r).await);
                ok = false;
            }
            Err(e) => {
                eprintln!("{base}: {e}");
                ok = false;
            }
        }
    }
    Ok(ok)
}
