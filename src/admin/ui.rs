//! The composition playground (SPEC §9): static assets compiled in, and the
//! draft mechanism shared by `try` and live validation.
//!
//! Auth decision: `/ui` and its static assets are public even when
//! `MANIFOLD_ADMIN_TOKEN` is set. They hold no data (the same bytes for
//! every node), and the page must load before the user can type a token.
//! Every data call the page makes goes to the ordinary admin endpoints with
//! `Authorization: Bearer <token>`, the token typed into a field and kept in
//! `sessionStorage`, never in a URL.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{fields_of, message, AdminState};
use crate::config::load::{config_from_text_against, Format};
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::snapshot::Snapshot;

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const YAML_JS: &str = include_str!("ui/yaml-lines.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Whether a request path is one of the playground's public static assets.
pub fn is_asset(path: &str) -> bool {
    matches!(path, "/ui" | "/ui/" | "/ui/app.js" | "/ui/yaml-lines.js" | "/ui/app.css")
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], text).into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn yaml_js() -> Response {
    asset("text/javascript; charset=utf-8", YAML_JS)
}

pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn error(path: String, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError { file: None, path, message }])
}

/// A draft composition as sent: a JSON object, or YAML (or JSON) text.
pub fn draft_value(name: &str, draft: Value) -> Result<Value, ConfigErrors> {
    let value = match draft {
        Value::String(text) => {
            crate::config::load::parse_value(&text, Format::Yaml).map_err(|e| error(format!("compositions.{name}"), e))?
        }
        v => v,
    };
    match value {
        Value::Object(_) => Ok(value),
        _ => Err(error(format!("compositions.{name}"), "expected an object (one composition)".into())),
    }
}

/// The live config with `draft` replacing (or adding) the composition
/// `name`, validated as `manifold validate` would validate the whole config,
/// then compiled. The one mechanism behind `try` with a draft and
/// `POST /compositions/{name}/validate`.
pub fn candidate(
    live: &Config,
    name: &str,
    draft: Value,
    services: &std::sync::Arc<crate::policy::Services>,
) -> Result<Snapshot, ConfigErrors> {
    let mut draft = draft_value(name, draft)?;
    let obj = draft.as_object_mut().expect("an object");
    match obj.get("name") {
        None => {
            obj.insert("name".into(), json!(name));
        }
        Some(Value::String(n)) if n == name => {}
        Some(_) => return Err(error(format!("compositions.{name}.name"), format!("must be {name:?}, the composition being edited"))),
    }
    let mut doc = serde_json::to_value(live).map_err(|e| error(String::new(), e.to_string()))?;
    let list = doc.as_object_mut().and_then(|d| {
        d.entry("compositions").or_insert_with(|| json!([]));
        d.get_mut("compositions").and_then(Value::as_array_mut)
    });
    let Some(list) = list else { return Err(error(String::new(), "the live config is not an object".into())) };
    match list.iter_mut().find(|c| c.get("name").and_then(Value::as_str) == Some(name)) {
        Some(slot) => *slot = draft,
        None => list.push(draft),
    }
    let text = doc.to_string();
    // An error outside the draft (the live config's own, say, after a rule
    // was added since it was stored) is marked so, not read as the draft's.
    let own = format!("compositions.{name}");
    let label = |errors: ConfigErrors| {
        ConfigErrors(
            errors
                .0
                .into_iter()
                .map(|e| {
                    if e.path == own || e.path.starts_with(&format!("{own}.")) {
                        e
                    } else {
                        ConfigError { message: format!("elsewhere in the config: {}", e.message), ..e }
                    }
                })
                .collect(),
        )
    };
    let config = config_from_text_against(&text, Format::Json, Some(live)).map_err(label)?;
    crate::snapshot::compile(config, 0, services).map_err(label)
}

async fn candidate_off_runtime(state: &AdminState, name: &str, draft: Value) -> Result<Result<Snapshot, ConfigErrors>, Response> {
    let live = state.shared.snapshot.load().config.clone();
    let services = state.shared.services.clone();
    let name = name.to_string();
    // Validation may hash passwords (argon2): CPU work, off the runtime.
    tokio::task::spawn_blocking(move || candidate(&live, &name, draft, &services))
        .await
        .map_err(|_| message(StatusCode::INTERNAL_SERVER_ERROR, "validation did not finish"))
}

/// For `try`: the snapshot to run a draft on.
pub async fn draft_snapshot(state: &AdminState, name: &str, draft: Value) -> Result<std::sync::Arc<Snapshot>, Response> {
    match candidate_off_runtime(state, name, draft).await? {
        Ok(snap) => Ok(std::sync::Arc::new(snap)),
        Err(errors) => Err(super::invalid(&errors)),
    }
}

/// `POST /compositions/{name}/validate`: the body is the composition's YAML
/// (or JSON) text. Answers 200 `{"valid", "fields", "composition"}`.
pub async fn validate(State(state): State<AdminState>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return message(StatusCode::BAD_REQUEST, "the body is not UTF-8");
    };
    let parsed = draft_value(&name, Value::String(text.to_string()));
    let composition = parsed.as_ref().ok().cloned().unwrap_or(Value::Null);
    let result = match parsed {
        Ok(v) => match candidate_off_runtime(&state, &name, v).await {
            Ok(r) => r.map(|_| ()),
            Err(resp) => return resp,
        },
        Err(e) => Err(e),
    };
    let composition = match (&result, composition) {
        (_, Value::Object(mut c)) => {
            c.entry("name").or_insert_with(|| json!(name));
            Value::Object(c)
        }
        (_, other) => other,
    };
    match result {
        Ok(()) => Json(json!({ "valid": true, "fields": {}, "composition": composition })).into_response(),
        Err(errors) => Json(json!({ "valid": false, "fields": fields_of(&errors), "composition": composition })).into_response(),
    }
}

/// `GET /compositions/{name}/yaml`: one composition as YAML text, for the
/// editor. In database mode the `ETag` (entity version) comes along, for
/// the `If-Match` of the write that applies the edit.
pub async fn composition_yaml(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let resp = super::entities::get(State(state), Path(("compositions".to_string(), name))).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
        return message(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the composition");
    };
    let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
        return message(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the composition");
    };
    let text = match serde_norway::to_string(&value) {
        Ok(t) => t,
        Err(e) => return message(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot render YAML: {e}")),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/yaml".parse().expect("static"));
    if let Some(tag) = parts.headers.get(header::ETAG) {
        headers.insert(header::ETAG, tag.clone());
    }
    (headers, text).into_response()
}
