//! The admin API (SPEC §5) on its own listener, loopback by default. In
//! DB-less mode it answers reads and `POST /config`; entity writes are 405.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::compose::context::request_context;
mod entities;
mod openapi;
mod ui;

use crate::config::load::config_from_text_against;
use crate::config::{Config, ConfigErrors, Format};
use crate::diff::ConfigDiff;
use crate::ids::TraceContext;
use crate::server::Shared;

#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub token: Option<Arc<str>>,
    /// The admin API's own backend client, for `try`.
    pub client: crate::upstream::Client,
    /// Database mode: where the node saves each config it loads.
    pub snapshot_path: Option<std::path::PathBuf>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/config", get(get_config).post(post_config))
        .route("/status", get(status))
        .route("/status/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/compositions/{name}/try", post(try_composition))
        .route("/compositions/{name}/validate", post(ui::validate))
        .route("/compositions/{name}/yaml", get(ui::composition_yaml))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/yaml-lines.js", get(ui::yaml_js))
        .route("/ui/app.css", get(ui::app_css))
        .route("/audit", get(entities::audit))
        .route("/openapi.json", get(openapi_json))
        .route("/upstreams/{name}/health", get(upstream_health))
        .route("/consumers/{name}/credentials", get(entities::list_credentials).post(entities::add_credential))
        .route("/{kind}", get(entities::list).post(entities::create))
        .route("/{kind}/{name}", get(entities::get).put(entities::put).patch(entities::patch).delete(entities::delete))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn(json_rejections))
        .with_state(state)
}

/// axum answers a request its extractors cannot read (a query string,
/// a path, a JSON body) with a plain-text 4xx; SPEC §5 wants every error as
/// `{"message": ...}`. Handlers' own errors are JSON already and pass as
/// they are. Found by the schemathesis run (tests/schemathesis/).
async fn json_rejections(req: axum::extract::Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let plain = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/plain"));
    if !resp.status().is_client_error() || !plain {
        return resp;
    }
    let status = resp.status();
    // A rejection's text is one short line; more is not read.
    let text = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => status.canonical_reason().unwrap_or("invalid request").to_string(),
    };
    message(status, &text)
}

/// Prometheus text format; node-wide gauges are read now.
async fn metrics(State(state): State<AdminState>) -> Response {
    let shared = &state.shared;
    let m = &shared.services.metrics;
    m.config_version.set(shared.snapshot.load().version as i64);
    m.config_reloads.set(shared.reloads.load(Ordering::Relaxed) as i64);
    m.database_reachable.set(i64::from(shared.store.is_some() && shared.db_reachable.load(Ordering::Relaxed)));
    if let Some(r) = &shared.services.redis {
        m.redis_reachable.set(i64::from(r.reachable.load(Ordering::Relaxed)));
        m.rate_limit_fallbacks.set(r.fallbacks.load(Ordering::Relaxed) as i64);
    }
    crate::server::tls::record_expiry(shared);
    // Each target of an upstream with health checks: 1 when it takes
    // traffic; series of targets no longer configured go.
    m.target_healthy.reset();
    let now = crate::upstream::health::now_ms();
    for plan in shared.snapshot.load().upstreams.values().filter(|p| p.health.is_some()) {
        let upstream = plan.name.as_deref().unwrap_or("");
        for t in plan.set().targets.iter() {
            let health = t.state.health(now);
            let up = health == crate::upstream::health::Health::Healthy;
            m.target_healthy.with_label_values(&[upstream, &t.label, health.as_str()]).set(i64::from(up));
        }
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
}

/// `GET /upstreams/{name}/health`: this node's view of each target of a
/// running upstream.
async fn upstream_health(State(state): State<AdminState>, axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let snap = state.shared.snapshot.load();
    match snap.upstreams.get(&name) {
        Some(plan) => Json(crate::upstream::health::report(plan)).into_response(),
        None => message(StatusCode::NOT_FOUND, &format!("no upstream {name:?} in the running config")),
    }
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

async fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> Response {
    message(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        // Readiness stays open for load balancers and probes; it tells nothing else.
        // The playground's static assets are open too: they hold no data, and
        // the page must load for the user to type the token its data calls
        // then send as `Authorization: Bearer` (see `ui`).
        if req.uri().path() != "/status/ready" && !ui::is_asset(req.uri().path()) {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
                let mut resp = message(StatusCode::UNAUTHORIZED, "a valid admin token is required (Authorization: Bearer ...)");
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
                return resp;
            }
        }
    }
    next.run(req).await
}

fn wants_yaml(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("yaml"))
}

/// With `secrets`, certificates keep their private keys.
fn config_shown(config: &Config, yaml: bool, secrets: bool) -> Response {
    let mut value = match serde_json::to_value(config) {
        Ok(v) => v,
        Err(e) => return message(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render the config: {e}")),
    };
    if !secrets {
        crate::certs::redact_config(&mut value);
    }
    if yaml {
        match serde_norway::to_string(&value) {
            Ok(text) => ([(header::CONTENT_TYPE, "application/yaml")], text).into_response(),
            Err(e) => message(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render YAML: {e}")),
        }
    } else {
        Json(value).into_response()
    }
}

#[derive(Deserialize)]
struct GetConfigQuery {
    /// The real secrets (credentials' secrets, certificates' private keys)
    /// instead of their redactions (`manifold export --include-secrets`):
    /// for backups and restores.
    #[serde(default)]
    include_secrets: bool,
}

async fn get_config(State(state): State<AdminState>, Query(q): Query<GetConfigQuery>, headers: HeaderMap) -> Response {
    let mut config = match &state.shared.store {
        Some(store) => match store.load().await {
            Ok((config, _)) => config,
            Err(e) => return entities::store_error(e, None, None),
        },
        None => (*state.shared.snapshot.load().config).clone(),
    };
    if q.include_secrets {
        tracing::info!("the config was read with its secrets (include_secrets)");
    } else {
        crate::config::secrets::redact_config(&mut config);
    }
    config_shown(&config, wants_yaml(&headers), q.include_secrets)
}

/// The 400 body of SPEC §5: every error, keyed by field.
pub fn invalid(errors: &ConfigErrors) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "message": "invalid config", "fields": fields_of(errors) }))).into_response()
}

/// Every error keyed by field; messages of one field joined by `; `.
pub fn fields_of(errors: &ConfigErrors) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    for e in &errors.0 {
        let key = if e.path.is_empty() { "(document)".to_string() } else { e.path.clone() };
        match fields.get_mut(&key) {
            Some(Value::String(prev)) => {
                prev.push_str("; ");
                prev.push_str(&e.message);
            }
            _ => {
                fields.insert(key, Value::String(e.message.clone()));
            }
        }
    }
    fields
}

#[derive(Deserialize)]
struct ConfigQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn post_config(State(state): State<AdminState>, Query(q): Query<ConfigQuery>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return message(StatusCode::BAD_REQUEST, "the body is not UTF-8");
    };
    let format = Format::from_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    // Passwords the running config already holds keep their hashes, so an
    // unchanged config posted again changes nothing.
    let (previous, against) = match &state.shared.store {
        Some(store) => match store.load().await {
            Ok(loaded) => loaded,
            Err(e) => return entities::store_error(e, None, None),
        },
        None => ((*state.shared.snapshot.load().config).clone(), 0),
    };
    // Validation hashes passwords (argon2): CPU work, off the runtime, and
    // in database mode outside the store's write lock.
    let text = text.to_string();
    let current = q.dry_run.then(|| previous.clone());
    let parsed = tokio::task::spawn_blocking(move || config_from_text_against(&text, format, Some(&previous))).await;
    let config = match parsed {
        Ok(Ok(c)) => c,
        Ok(Err(errors)) => return invalid(&errors),
        Err(_) => return message(StatusCode::INTERNAL_SERVER_ERROR, "validation did not finish"),
    };
    // A dry run answers what the real write would: the upstreams' TLS
    // files are read when a config compiles, so compile those here too.
    if let Some(current) = current {
        let mut errors = Vec::new();
        crate::snapshot::compile_upstreams(&config, &mut errors, None);
        if !errors.is_empty() {
            return invalid(&ConfigErrors(errors));
        }
        return Json(json!({ "dry_run": true, "changes": ConfigDiff::between(&current, &config) })).into_response();
    }
    if state.shared.store.is_some() {
        return entities::replace_all(&state, &headers, config, against).await;
    }
    let shared = &state.shared;
    let _guard = shared.reload_lock.lock().await;
    let diff = ConfigDiff::between(&shared.snapshot.load().config, &config);
    match shared.replace_config(config) {
        Ok(version) => {
            tracing::info!(
                version,
                created = diff.created.len(),
                updated = diff.updated.len(),
                deleted = diff.deleted.len(),
                "config replaced through the admin API"
            );
            Json(json!({ "version": version, "changes": diff })).into_response()
        }
        Err(errors) => invalid(&errors),
    }
}

async fn openapi_json() -> Response {
    Json(openapi::document()).into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    let shared = &state.shared;
    let snap = shared.snapshot.load();
    Json(json!({
        "node_id": shared.node_id,
        "mode": if shared.store.is_some() { "database" } else { "db-less" },
        "config_version": snap.version,
        "database_reachable": if shared.store.is_some() { json!(shared.db_reachable.load(Ordering::Relaxed)) } else { Value::Null },
        "reloads": shared.reloads.load(Ordering::Relaxed),
        "redis": shared.services.redis.as_ref().map(|r| json!({
            "reachable": r.reachable.load(Ordering::Relaxed),
            "rate_limit_fallbacks": r.fallbacks.load(Ordering::Relaxed),
        })),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "entities": {
            "routes": snap.config.routes.len(),
            "compositions": snap.config.compositions.len(),
            "consumers": snap.config.consumers.len(),
            "policies": snap.config.policies.len(),
            "upstreams": snap.config.upstreams.len(),
            "certificates": snap.config.certificates.len(),
        },
    }))
    .into_response()
}

async fn ready(State(_): State<AdminState>) -> Response {
    // A node only starts serving with a loaded config, so it is ready as
    // soon as it answers. Database mode will add the not-yet-loaded case.
    Json(json!({ "ready": true })).into_response()
}

/// The entities of `kind` as the admin API shows them: secrets redacted.
fn entities(config: &Config, kind: &str) -> Option<Vec<Value>> {
    fn values<T: serde::Serialize>(list: &[T]) -> Vec<Value> {
        list.iter().filter_map(|e| serde_json::to_value(e).ok()).collect()
    }
    let mut all = match kind {
        "routes" => values(&config.routes),
        "compositions" => values(&config.compositions),
        "consumers" => values(&config.consumers),
        "policies" => values(&config.policies),
        "upstreams" => values(&config.upstreams),
        "certificates" => values(&config.certificates),
        _ => return None,
    };
    for entity in &mut all {
        crate::config::secrets::redact_entity(kind, entity);
    }
    Some(all)
}

/// DB-less mode: entities come from the running config.
fn list_from_snapshot(state: &AdminState, kind: &str, page: &entities::Page) -> Response {
    let snap = state.shared.snapshot.load();
    let Some(all) = entities(&snap.config, kind) else {
        return message(StatusCode::NOT_FOUND, "not found");
    };
    let tags = page.tags();
    let all: Vec<Value> = all
        .into_iter()
        .filter(|e| tags.iter().all(|t| e.get("tags").and_then(Value::as_array).is_some_and(|ts| ts.iter().any(|x| x == t))))
        .collect();
    let (size, offset) = (page.size(), page.offset());
    let data: Vec<Value> = all.iter().skip(offset).take(size).cloned().collect();
    let next = (offset + size < all.len()).then(|| format!("/{kind}?size={size}&offset={}", offset + size));
    Json(json!({ "data": data, "next": next })).into_response()
}

fn get_from_snapshot(state: &AdminState, kind: &str, name: &str) -> Response {
    let snap = state.shared.snapshot.load();
    let found = entities(&snap.config, kind).and_then(|all| all.into_iter().find(|e| e.get("name").and_then(Value::as_str) == Some(name)));
    match found {
        Some(entity) => Json(entity).into_response(),
        None => message(StatusCode::NOT_FOUND, "not found"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TryRequest {
    method: Option<String>,
    path: String,
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
    #[serde(default)]
    body: Value,
    /// An unsaved draft of the composition (a JSON object or YAML text),
    /// validated with the live config and run instead of the saved one.
    #[serde(default)]
    composition: Option<Value>,
}

/// Runs a composition for real and reports every backend call (SPEC §5).
async fn try_composition(State(state): State<AdminState>, Path(name): Path<String>, body: Bytes) -> Response {
    let input: TryRequest = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({ "message": "invalid try request", "fields": { "body": e.to_string() } })))
                .into_response()
        }
    };
    let snap = match input.composition {
        None | Some(Value::Null) => state.shared.snapshot.load_full(),
        Some(draft) => match ui::draft_snapshot(&state, &name, draft).await {
            Ok(s) => s,
            Err(resp) => return resp,
        },
    };
    let Some((pattern, plan)) = snap.compositions.get(&name) else {
        return not_found().await;
    };
    let mut field_errors = serde_json::Map::new();
    let method = match input.method.as_deref().map(|m| http::Method::from_bytes(m.as_bytes())) {
        None => plan.method.clone(),
        Some(Ok(m)) => m,
        Some(Err(_)) => {
            field_errors.insert("method".into(), json!("invalid method"));
            plan.method.clone()
        }
    };
    let (path, query) = match input.path.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (input.path.clone(), None),
    };
    let params = match crate::server::hygiene::normalize_path(&path).ok().and_then(|p| pattern.matches(&p)) {
        Some(p) => p,
        None => {
            field_errors.insert(
                "path".into(),
                json!(format!(
                    "does not match the composition's path {:?}",
                    snap.config.compositions.iter().find(|c| c.name == name).map(|c| c.path.clone()).unwrap_or_default()
                )),
            );
            vec![]
        }
    };
    let query = match input.query {
        None | Some(Value::Null) => query,
        Some(Value::String(q)) => Some(q),
        Some(Value::Object(map)) => Some(
            map.iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        crate::compose::template::percent_encode(k),
                        crate::compose::template::percent_encode(&crate::compose::template::value_text(v))
                    )
                })
                .collect::<Vec<_>>()
                .join("&"),
        ),
        Some(_) => {
            field_errors.insert("query".into(), json!("expected an object or a query string"));
            None
        }
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in &input.headers {
        match (http::HeaderName::from_bytes(k.as_bytes()), v.as_str().map(http::HeaderValue::from_str)) {
            (Ok(n), Some(Ok(v))) => {
                headers.append(n, v);
            }
            _ => {
                field_errors.insert(format!("headers.{k}"), json!("invalid header"));
            }
        }
    }
    if !field_errors.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({ "message": "invalid try request", "fields": field_errors }))).into_response();
    }
    let params: Vec<(Arc<str>, String)> = params.into_iter().map(|(k, v)| (Arc::from(k), v)).collect();
    let request = request_context(&method, &params, query.as_deref(), Some(&headers), input.body);
    let request_id = crate::ids::request_id(&headers);
    let trace = TraceContext::from_headers(&headers);
    let ex = crate::compose::Exchange {
        client: &state.client,
        request_id: &request_id,
        trace: &trace,
        client_headers: &headers,
        record: true,
        correlation: None,
        metrics: None,
        // A try has no client connection: it hashes as the loopback.
        pick: crate::upstream::PickInput {
            headers: &headers,
            peer: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            trusted_proxies: &[],
            path: &path,
        },
    };
    let outcome = crate::compose::run(ex, plan, request).await;
    let (parts, body) = outcome.response.into_parts();
    let bytes = match body {
        crate::body::Body::Full(Some(b)) => b,
        _ => Default::default(),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let mut resp_headers = crate::compose::context::headers_map(&parts.headers);
    resp_headers.insert("x-request-id".into(), json!(request_id.to_str().unwrap_or("")));
    Json(json!({
        "response": { "status": parts.status.as_u16(), "headers": resp_headers, "body": body },
        "calls": outcome.calls,
    }))
    .into_response()
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
