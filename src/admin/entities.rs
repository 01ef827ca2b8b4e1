//! Entity CRUD, `/audit` and config replacement in database mode (SPEC §5).
//! Every write goes through `Store::write` (validated on the whole config,
//! audited, versioned in one transaction); the node then catches up at once
//! instead of waiting for its own notification.

// Handlers return ready responses as their errors, as axum handlers do.
#![allow(clippy::result_large_err)]

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{invalid, message, not_found, AdminState};
use crate::config::secrets::redact_entity;
use crate::config::{ConfigError, ConfigErrors, Format};
use crate::store::{Change, Kind, Store, StoreError};

#[derive(Deserialize)]
pub struct Page {
    size: Option<usize>,
    offset: Option<usize>,
    /// Comma-separated tags an entity must all hold.
    tags: Option<String>,
}

impl Page {
    pub fn size(&self) -> usize {
        self.size.unwrap_or(100).clamp(1, 1000)
    }
    pub fn offset(&self) -> usize {
        self.offset.unwrap_or(0)
    }
    pub fn tags(&self) -> Vec<String> {
        self.tags.as_deref().unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect()
    }
}

/// Who made a change, for the audit log: `X-Manifold-Actor` when given.
fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-manifold-actor")
        .and_then(|v| v.to_str().ok())
        .map(|a| a.chars().take(128).collect())
        .filter(|a: &String| !a.is_empty())
        .unwrap_or_else(|| "admin-api".to_string())
}

/// `If-Match: "3"` (or `3`): the entity version the writer last saw.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Response> {
    match headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .map(Some)
            .map_err(|_| message(StatusCode::BAD_REQUEST, "If-Match must be an entity version, such as \"3\"")),
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header value")
}

/// Errors of a write on one entity name fields relative to it
/// (`calls.user.url`, not `compositions.dash.calls.user.url`).
fn relative(errors: ConfigErrors, kind: Kind, name: Option<&str>) -> ConfigErrors {
    let Some(name) = name else { return errors };
    let prefix = format!("{}.{name}.", kind.table());
    ConfigErrors(
        errors
            .0
            .into_iter()
            .map(|e| ConfigError { path: e.path.strip_prefix(&prefix).map(str::to_string).unwrap_or(e.path), ..e })
            .collect(),
    )
}

pub fn store_error(e: StoreError, kind: Option<Kind>, name: Option<&str>) -> Response {
    match e {
        StoreError::Unavailable(m) => {
            tracing::warn!(error = %m, "admin write failed: database unavailable");
            message(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable; the node keeps serving its last config, try again later")
        }
        StoreError::Schema(m) => message(StatusCode::INTERNAL_SERVER_ERROR, &m),
        StoreError::NotFound => message(StatusCode::NOT_FOUND, "not found"),
        StoreError::Conflict(m) => message(StatusCode::CONFLICT, &m),
        StoreError::PreconditionFailed(m) => message(StatusCode::PRECONDITION_FAILED, &m),
        StoreError::Invalid(errors) => match kind {
            Some(kind) => invalid(&relative(errors, kind, name)),
            None => invalid(&errors),
        },
    }
}

fn store_of(state: &AdminState) -> Option<&Store> {
    state.shared.store.as_ref()
}

fn read_only() -> Response {
    message(
        StatusCode::METHOD_NOT_ALLOWED,
        "entities are read-only in DB-less mode: edit the config files, or replace the whole config with POST /config",
    )
}

/// After a write, the node serves it before answering.
async fn catch_up(state: &AdminState) {
    if let (Some(store), Some(path)) = (store_of(state), &state.snapshot_path) {
        if let Err(e) = crate::store::sync::catch_up(store, &state.shared, path).await {
            tracing::warn!(error = %e, "could not load the config just written; the sync will retry");
        }
    }
}

fn kind_of(kind: &str) -> Result<Kind, Response> {
    Kind::parse(kind).ok_or_else(|| message(StatusCode::NOT_FOUND, "not found"))
}

/// An entity in a write's body: JSON when `Content-Type` says so, YAML
/// otherwise (JSON is YAML too), as `POST /config` reads it. Credentials too.
fn entity_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
    let format = Format::from_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    let parsed = std::str::from_utf8(body)
        .map_err(|_| "the body is not UTF-8".to_string())
        .and_then(|text| crate::config::load::parse_value(text, format).map_err(|e| format!("the body is {e}")));
    match parsed {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(message(StatusCode::BAD_REQUEST, "the body must be an object (one entity)")),
        Err(e) => Err(message(StatusCode::BAD_REQUEST, &e)),
    }
}

pub async fn list(State(state): State<AdminState>, Path(kind): Path<String>, Query(page): Query<Page>) -> Response {
    let Some(store) = store_of(&state) else { return super::list_from_snapshot(&state, &kind, &page) };
    let kind = match kind_of(&kind) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match store.list(kind, &page.tags(), page.size(), page.offset()).await {
        Ok((mut data, more)) => {
            for entity in &mut data {
                redact_entity(kind.table(), entity);
            }
            let tags = page.tags.as_deref().map(|t| format!("&tags={t}")).unwrap_or_default();
            let next = more.then(|| format!("/{}?size={}&offset={}{tags}", kind.table(), page.size(), page.offset() + page.size()));
            Json(json!({ "data": data, "next": next })).into_response()
        }
        Err(e) => store_error(e, None, None),
    }
}

pub async fn get(State(state): State<AdminState>, Path((kind, name)): Path<(String, String)>) -> Response {
    let Some(store) = store_of(&state) else { return super::get_from_snapshot(&state, &kind, &name) };
    let kind = match kind_of(&kind) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match store.get(kind, &name).await {
        Ok((mut entity, version)) => {
            redact_entity(kind.table(), &mut entity);
            ([(header::ETAG, etag(version))], Json(entity)).into_response()
        }
        Err(StoreError::NotFound) => not_found().await,
        Err(e) => store_error(e, None, None),
    }
}

async fn write(state: &AdminState, headers: &HeaderMap, kind: Kind, name: Option<&str>, change: Change) -> Response {
    let Some(store) = store_of(state) else { return read_only() };
    match store.write(&actor(headers), change).await {
        Ok(outcome) => {
            catch_up(state).await;
            match outcome.entity {
                None => StatusCode::NO_CONTENT.into_response(),
                Some(mut entity) => {
                    redact_entity(kind.table(), &mut entity);
                    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
                    (status, [(header::ETAG, etag(outcome.entity_version))], Json(entity)).into_response()
                }
            }
        }
        Err(e) => store_error(e, Some(kind), name),
    }
}

pub async fn create(State(state): State<AdminState>, Path(kind): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if store_of(&state).is_none() {
        return read_only();
    }
    let (kind, entity) = match (kind_of(&kind), entity_body(&headers, &body)) {
        (Ok(k), Ok(e)) => (k, e),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let name = entity.get("name").and_then(Value::as_str).map(str::to_string);
    write(&state, &headers, kind, name.as_deref(), Change::Create { kind, entity }).await
}

/// `PUT` (create or replace) and `PATCH` (merge) differ only in the change.
async fn put_or_patch(state: AdminState, kind: String, name: String, headers: HeaderMap, body: axum::body::Bytes, merge: bool) -> Response {
    if store_of(&state).is_none() {
        return read_only();
    }
    let (kind, value, if_match) = match (kind_of(&kind), entity_body(&headers, &body), if_match(&headers)) {
        (Ok(k), Ok(e), Ok(m)) => (k, e, m),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
    };
    let change = if merge {
        Change::Patch { kind, name: name.clone(), patch: value, if_match }
    } else {
        Change::Put { kind, name: name.clone(), entity: value, if_match }
    };
    write(&state, &headers, kind, Some(&name), change).await
}

pub async fn put(
    State(state): State<AdminState>,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    put_or_patch(state, kind, name, headers, body, false).await
}

pub async fn patch(
    State(state): State<AdminState>,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    put_or_patch(state, kind, name, headers, body, true).await
}

pub async fn delete(State(state): State<AdminState>, Path((kind, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if store_of(&state).is_none() {
        return read_only();
    }
    let (kind, if_match) = match (kind_of(&kind), if_match(&headers)) {
        (Ok(k), Ok(m)) => (k, m),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    write(&state, &headers, kind, Some(&name), Change::Delete { kind, name: name.clone(), if_match }).await
}

pub async fn audit(State(state): State<AdminState>, Query(page): Query<Page>) -> Response {
    let Some(store) = store_of(&state) else {
        return message(StatusCode::NOT_FOUND, "the audit log exists in database mode only");
    };
    match store.audit(page.size(), page.offset()).await {
        Ok((data, more)) => {
            let next = more.then(|| format!("/audit?size={}&offset={}", page.size(), page.offset() + page.size()));
            Json(json!({ "data": data, "next": next })).into_response()
        }
        Err(e) => store_error(e, None, None),
    }
}

/// `POST /config` in database mode: the whole config, validated against
/// the stored config at version `against`, written through the store.
pub async fn replace_all(state: &AdminState, headers: &HeaderMap, config: crate::config::Validated, against: u64) -> Response {
    let Some(store) = store_of(state) else { return read_only() };
    match store.write(&actor(headers), Change::ReplaceAll { validated: Box::new(config), against }).await {
        Ok(outcome) => {
            catch_up(state).await;
            Json(json!({ "version": outcome.config_version, "changes": outcome.diff })).into_response()
        }
        Err(e) => store_error(e, None, None),
    }
}

/// A credential as the admin API shows it: what identifies it, never a
/// secret or a hash of one beyond a short digest prefix.
fn shown(c: &crate::config::Credential) -> Value {
    use crate::config::Credential;
    match c {
        Credential::KeyAuth { key_sha256, .. } => {
            json!({"type": "key-auth", "key_sha256_prefix": key_sha256.as_deref().map(|d| &d[..d.len().min(8)])})
        }
        Credential::BasicAuth { username, .. } => json!({"type": "basic-auth", "username": username}),
        Credential::Jwt { issuer, algorithm, .. } => json!({"type": "jwt", "issuer": issuer, "algorithm": algorithm}),
        Credential::Mtls { subject, san } => json!({"type": "mtls", "subject": subject, "san": san}),
    }
}

pub async fn list_credentials(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let consumer = match store_of(&state) {
        Some(store) => match store.get(Kind::Consumers, &name).await {
            Ok((v, _)) => serde_json::from_value::<crate::config::Consumer>(v).ok(),
            Err(StoreError::NotFound) => None,
            Err(e) => return store_error(e, None, None),
        },
        None => state.shared.snapshot.load().config.consumers.iter().find(|c| c.name == name).cloned(),
    };
    match consumer {
        Some(c) => Json(json!({ "data": c.credentials.iter().map(shown).collect::<Vec<_>>(), "next": null })).into_response(),
        None => message(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Adds a credential to a consumer. A key-auth credential without a key
/// gets a generated one, shown in this answer only: the store keeps its
/// SHA-256 digest.
pub async fn add_credential(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::config::Credential;
    let Some(store) = store_of(&state) else { return read_only() };
    let body = match entity_body(&headers, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut credential: Credential = match serde_path_to_error::deserialize(body) {
        Ok(c) => c,
        Err(e) => {
            let path = e.path().to_string();
            let errors = ConfigErrors(vec![ConfigError {
                file: None,
                path: if path == "." { String::new() } else { path },
                message: e.into_inner().to_string(),
            }]);
            return invalid(&errors);
        }
    };
    let mut plain_key = None;
    if let Credential::KeyAuth { key, key_sha256 } = &mut credential {
        if key.is_none() && key_sha256.is_none() {
            let mut bytes = [0u8; 24];
            if getrandom::fill(&mut bytes).is_err() {
                return message(StatusCode::INTERNAL_SERVER_ERROR, "no randomness available to generate a key");
            }
            *key = Some(hex::encode(bytes));
        }
        plain_key = key.clone();
    }
    let change = Change::AddCredential { consumer: name.clone(), credential: serde_json::to_value(&credential).unwrap_or(Value::Null) };
    match store.write(&actor(&headers), change).await {
        Ok(outcome) => {
            catch_up(&state).await;
            let stored: Option<crate::config::Consumer> = outcome.entity.and_then(|e| serde_json::from_value(e).ok());
            let last = stored.as_ref().and_then(|c| c.credentials.last()).map(shown).unwrap_or(Value::Null);
            let mut answer = json!({ "credential": last });
            if let Some(k) = plain_key {
                answer["key"] = Value::String(k);
                answer["note"] = json!("the key is shown once; only its SHA-256 digest is stored");
            }
            (StatusCode::CREATED, Json(answer)).into_response()
        }
        Err(e) => store_error(e, Some(Kind::Consumers), Some(&name)),
    }
}
