//! Database mode's store: the config in Postgres (one table per entity
//! kind), its version, and the audit log. Every write is one transaction:
//! lock the version, apply the change to the whole current config,
//! validate exactly as `manifold validate` does, write the rows and the
//! audit record, bump the version and NOTIFY the nodes.
//!
//! Never on the request path: nodes read the store only to build snapshots.

pub mod sync;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};

use crate::config::load::LoadedConfig;
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::diff::ConfigDiff;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The channel nodes LISTEN on; the payload is the new config version.
pub const CHANNEL: &str = "manifold_config";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Routes,
    Compositions,
    Consumers,
    Policies,
    Upstreams,
    Certificates,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Routes, Kind::Compositions, Kind::Consumers, Kind::Policies, Kind::Upstreams, Kind::Certificates];

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.table() == s)
    }

    /// Also the admin API's path segment and the config's top-level key.
    pub fn table(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Compositions => "compositions",
            Kind::Consumers => "consumers",
            Kind::Policies => "policies",
            Kind::Upstreams => "upstreams",
            Kind::Certificates => "certificates",
        }
    }

    /// One entity of this kind, in messages (`policy "keys"`).
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Routes => "route",
            Kind::Compositions => "composition",
            Kind::Consumers => "consumer",
            Kind::Policies => "policy",
            Kind::Upstreams => "upstream",
            Kind::Certificates => "certificate",
        }
    }
}

#[derive(Debug)]
pub enum StoreError {
    /// The database could not be reached or failed: 503.
    Unavailable(String),
    /// The schema is missing, older or newer than this build.
    Schema(String),
    NotFound,
    /// A duplicate name, or a delete of something still in use: 409.
    Conflict(String),
    /// `If-Match` named another version: 412.
    PreconditionFailed(String),
    /// The change would make the config invalid: 400 with every error.
    Invalid(ConfigErrors),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(m) => write!(f, "the database is unavailable: {m}"),
            StoreError::Schema(m) => f.write_str(m),
            StoreError::NotFound => f.write_str("not found"),
            StoreError::Conflict(m) | StoreError::PreconditionFailed(m) => f.write_str(m),
            StoreError::Invalid(e) => write!(f, "invalid config: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    /// Only a database that cannot be reached (or is too busy) is 503; a
    /// value it refuses is the caller's error, a lost race a conflict.
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            if code.starts_with("22") {
                return invalid("", format!("a value the database cannot store: {}", db.message()));
            }
            if code == "40001" || code == "40P01" {
                return StoreError::Conflict("a concurrent change got in the way; try again".into());
            }
        }
        StoreError::Unavailable(e.to_string())
    }
}

fn invalid(path: &str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid(ConfigErrors(vec![ConfigError { file: None, path: path.to_string(), message: message.into() }]))
}

/// One change to the config, as the admin API asks for it.
#[derive(Debug)]
pub enum Change {
    Create {
        kind: Kind,
        entity: Value,
    },
    /// Create or replace (`PUT`).
    Put {
        kind: Kind,
        name: String,
        entity: Value,
        if_match: Option<i64>,
    },
    /// JSON merge patch (RFC 7396) of the stored entity (`PATCH`).
    Patch {
        kind: Kind,
        name: String,
        patch: Value,
        if_match: Option<i64>,
    },
    Delete {
        kind: Kind,
        name: String,
        if_match: Option<i64>,
    },
    /// Appends a credential (as JSON) to a consumer, in the transaction.
    AddCredential {
        consumer: String,
        credential: Value,
    },
    /// Replace the whole config (`POST /config`), validated by the caller
    /// against the stored config at version `against` (its secrets hashed
    /// there, outside the write's lock). Still that version: written as
    /// validated; another: validated again here, like every change.
    ReplaceAll {
        validated: Box<crate::config::Validated>,
        against: u64,
    },
}

#[derive(Debug)]
pub struct WriteOutcome {
    /// The entity as stored (secrets hashed); `None` after a delete.
    pub entity: Option<Value>,
    pub entity_version: i64,
    pub config_version: u64,
    pub created: bool,
    pub diff: ConfigDiff,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// The node's policy services, so a write is checked as this node
    /// would take it (a cluster rate limit needs Redis).
    services: Arc<crate::policy::Services>,
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn entities_of(config: &Config, kind: Kind) -> Vec<(String, Value)> {
    fn pairs<T: serde::Serialize>(list: &[T], name: impl Fn(&T) -> &str) -> Vec<(String, Value)> {
        list.iter().map(|e| (name(e).to_string(), serde_json::to_value(e).unwrap_or(Value::Null))).collect()
    }
    match kind {
        Kind::Routes => pairs(&config.routes, |e| &e.name),
        Kind::Compositions => pairs(&config.compositions, |e| &e.name),
        Kind::Consumers => pairs(&config.consumers, |e| &e.name),
        Kind::Policies => pairs(&config.policies, |e| &e.name),
        Kind::Upstreams => pairs(&config.upstreams, |e| &e.name),
        Kind::Certificates => pairs(&config.certificates, |e| &e.name),
    }
}

/// What parsing the written entity found: its errors, and what the
/// validation that follows must know about it (see [`Origins`]).
#[derive(Default)]
struct EntityParse {
    errors: Vec<crate::config::ConfigError>,
    partial: Vec<String>,
    unparsed: Vec<crate::config::load::Unparsed>,
}

/// Puts `entity` (already named) into `config`, replacing one of its name,
/// parsed as a file's entity is: every structural error is recorded in
/// `parse`, and an entity that cannot be built at all is taken out (its name
/// still known), so the checks across the config still run.
fn set_entity(config: &mut Config, parse: &mut EntityParse, kind: Kind, name: &str, entity: Value) {
    fn put<T: serde::de::DeserializeOwned>(
        list: &mut Vec<T>,
        parse: &mut EntityParse,
        kind: Kind,
        name: &str,
        value: Value,
        get: impl Fn(&T) -> &str,
    ) {
        let parsed = crate::config::load::parse_entity::<T>(&format!("{}.{name}", kind.table()), value, &None);
        parse.errors.extend(parsed.errors);
        parse.partial.extend(parsed.partial);
        let at = list.iter().position(|e| get(e) == name);
        match (parsed.entity, at) {
            (Some(entity), Some(i)) => list[i] = entity,
            (Some(entity), None) => list.push(entity),
            (None, at) => {
                if let Some(i) = at {
                    list.remove(i);
                }
                parse.unparsed.push(crate::config::load::Unparsed { kind: kind.table(), name: name.to_string(), file: None });
            }
        }
    }
    match kind {
        Kind::Routes => put(&mut config.routes, parse, kind, name, entity, |e| &e.name),
        Kind::Compositions => put(&mut config.compositions, parse, kind, name, entity, |e| &e.name),
        Kind::Consumers => put(&mut config.consumers, parse, kind, name, entity, |e| &e.name),
        Kind::Policies => put(&mut config.policies, parse, kind, name, entity, |e| &e.name),
        Kind::Upstreams => put(&mut config.upstreams, parse, kind, name, entity, |e| &e.name),
        Kind::Certificates => put(&mut config.certificates, parse, kind, name, entity, |e| &e.name),
    }
}

fn remove_entity(config: &mut Config, kind: Kind, name: &str) {
    match kind {
        Kind::Routes => config.routes.retain(|e| e.name != name),
        Kind::Compositions => config.compositions.retain(|e| e.name != name),
        Kind::Consumers => config.consumers.retain(|e| e.name != name),
        Kind::Policies => config.policies.retain(|e| e.name != name),
        Kind::Upstreams => config.upstreams.retain(|e| e.name != name),
        Kind::Certificates => config.certificates.retain(|e| e.name != name),
    }
}

/// Who still uses the entity `kind` `name`, by the path of each field
/// naming it (`routes.r`, `compositions.c.calls.user`): a delete of a used
/// entity is refused with this list (409) rather than as the invalid config
/// it would leave (400).
fn users_of(config: &Config, kind: Kind, name: &str) -> Vec<String> {
    match kind {
        Kind::Policies => {
            let routes = config.routes.iter().filter(|r| r.policies.iter().any(|p| p == name)).map(|r| format!("routes.{}", r.name));
            let comps =
                config.compositions.iter().filter(|c| c.policies.iter().any(|p| p == name)).map(|c| format!("compositions.{}", c.name));
            routes.chain(comps).collect()
        }
        Kind::Upstreams => {
            let routes = config.routes.iter().filter(|r| r.upstream == name).map(|r| format!("routes.{}", r.name));
            let calls = config.compositions.iter().flat_map(|c| {
                c.calls
                    .iter()
                    .filter(|(_, call)| call.upstream.as_deref() == Some(name))
                    .map(move |(call, _)| format!("compositions.{}.calls.{call}", c.name))
            });
            routes.chain(calls).collect()
        }
        Kind::Routes | Kind::Compositions | Kind::Consumers | Kind::Certificates => Vec::new(),
    }
}

fn tags_of(entity: &Value) -> Vec<String> {
    entity
        .get("tags")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

impl Store {
    /// Checks writes with these services (see [`Store::services`]).
    pub fn with_services(mut self, services: Arc<crate::policy::Services>) -> Store {
        self.services = services;
        self
    }

    /// Connects, or fails within a few seconds.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(3)).connect(url).await?;
        Ok(Store { pool, services: crate::policy::Services::new(None) })
    }

    /// A store whose connections are made when first needed, so a node can
    /// start while the database is down.
    pub fn lazy(url: &str) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(3)).connect_lazy(url)?;
        Ok(Store { pool, services: crate::policy::Services::new(None) })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations this build carries; returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        let before = self.applied().await.unwrap_or_default();
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Schema(format!("migration failed: {e}")))?;
        let after = self.applied().await?;
        Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
    }

    async fn applied(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| r.get::<i64, _>(0)).collect())
    }

    /// Refuses a schema this build was not made for.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let applied = match self.applied().await {
            Ok(a) => a,
            Err(StoreError::Unavailable(m)) if m.contains("_sqlx_migrations") => vec![],
            Err(e) => return Err(e),
        };
        let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        if let Some(v) = applied.iter().find(|v| !known.contains(v)) {
            return Err(StoreError::Schema(format!("the database schema is newer than this build (migration {v}); upgrade manifold")));
        }
        if let Some(v) = known.iter().find(|v| !applied.contains(v)) {
            return Err(StoreError::Schema(format!("the database schema is not migrated (migration {v} missing): run `manifold migrate`")));
        }
        Ok(())
    }

    /// This database's identity and its config version.
    pub async fn version(&self) -> Result<(String, u64), StoreError> {
        let row = sqlx::query("SELECT instance::text, version FROM config_state WHERE id = 1").fetch_one(&self.pool).await?;
        Ok((row.get(0), row.get::<i64, _>(1) as u64))
    }

    async fn load_in(tx: &mut Transaction<'_, Postgres>) -> Result<(Config, u64), StoreError> {
        Self::load_versioned(tx).await.map(|(c, _, v)| (c, v))
    }

    async fn load_versioned(tx: &mut Transaction<'_, Postgres>) -> Result<(Config, String, u64), StoreError> {
        let row = sqlx::query("SELECT instance::text, version FROM config_state WHERE id = 1").fetch_one(&mut **tx).await?;
        let (instance, version): (String, i64) = (row.get(0), row.get(1));
        let mut doc = Map::new();
        for kind in Kind::ALL {
            let sql = format!("SELECT entity FROM {} ORDER BY created_at, name", kind.table());
            let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut **tx).await?;
            let list: Vec<Value> = rows.iter().map(|r| r.get::<Value, _>(0)).collect();
            doc.insert(kind.table().into(), Value::Array(list));
        }
        let config: Config =
            serde_json::from_value(Value::Object(doc)).map_err(|e| StoreError::Schema(format!("a stored entity does not parse: {e}")))?;
        Ok((config, instance, version as u64))
    }

    /// The whole config and its version, read consistently.
    pub async fn load(&self) -> Result<(Config, u64), StoreError> {
        self.load_with_instance().await.map(|(c, _, v)| (c, v))
    }

    /// Like [`Store::load`], with the database's identity.
    pub async fn load_with_instance(&self) -> Result<(Config, String, u64), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let out = Self::load_versioned(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// One entity and its version.
    pub async fn get(&self, kind: Kind, name: &str) -> Result<(Value, i64), StoreError> {
        let sql = format!("SELECT entity, version FROM {} WHERE name = $1", kind.table());
        let row = sqlx::query(AssertSqlSafe(sql)).bind(name).fetch_optional(&self.pool).await?.ok_or(StoreError::NotFound)?;
        Ok((row.get(0), row.get(1)))
    }

    /// A page of entities, optionally only those holding every tag given.
    pub async fn list(&self, kind: Kind, tags: &[String], size: usize, offset: usize) -> Result<(Vec<Value>, bool), StoreError> {
        let sql = format!("SELECT entity FROM {} WHERE tags @> $1 ORDER BY created_at, name LIMIT $2 OFFSET $3", kind.table());
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tags)
            .bind(size as i64 + 1)
            .bind(offset.min(i64::MAX as usize) as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut list: Vec<Value> = rows.iter().map(|r| r.get::<Value, _>(0)).collect();
        let more = list.len() > size;
        list.truncate(size);
        Ok((list, more))
    }

    /// The change log, newest first.
    pub async fn audit(&self, size: usize, offset: usize) -> Result<(Vec<Value>, bool), StoreError> {
        let rows = sqlx::query(
            "SELECT to_json(at)::text, actor, action, kind, name, before, after, config_version FROM audit_log ORDER BY id DESC LIMIT $1 OFFSET $2",
        )
        .bind(size as i64 + 1)
        .bind(offset.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut list: Vec<Value> = rows
            .iter()
            .map(|r| {
                let at: String = r.get(0);
                // Rows written before secrets were redacted in the log hold them.
                let kind: String = r.get(3);
                let shown = |v: Option<Value>| {
                    v.map(|mut v| {
                        crate::config::secrets::redact_entity(&kind, &mut v);
                        v
                    })
                };
                json!({
                    "time": at.trim_matches('"'),
                    "actor": r.get::<String, _>(1),
                    "action": r.get::<String, _>(2),
                    "entity": { "kind": r.get::<String, _>(3), "name": r.get::<String, _>(4) },
                    "before": shown(r.get::<Option<Value>, _>(5)),
                    "after": shown(r.get::<Option<Value>, _>(6)),
                    "config_version": r.get::<i64, _>(7),
                })
            })
            .collect();
        let more = list.len() > size;
        list.truncate(size);
        Ok((list, more))
    }

    /// Applies one change in one transaction (see the module doc).
    pub async fn write(&self, actor: &str, change: Change) -> Result<WriteOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A writer that hangs must not hold every other writer's lock for
        // as long as TCP takes to notice: bounded waits, bounded work.
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
        sqlx::query("SET LOCAL statement_timeout = '15s'").execute(&mut *tx).await?;
        sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '30s'").execute(&mut *tx).await?;
        // Serializes writers: each sees the config the previous one left.
        sqlx::query("SELECT version FROM config_state WHERE id = 1 FOR UPDATE").execute(&mut *tx).await?;
        let (current, version) = Self::load_in(&mut tx).await?;
        let mut next = current.clone();
        let mut parse = EntityParse::default();
        // A whole config validated against the config still stored: its
        // validation (and compiled policies) stand.
        let mut change = change;
        let mut validated = None;
        if let Change::ReplaceAll { validated: v, against } = &mut change {
            // (`plan` is set only by validation: a config merely wrapped
            // `From` a `Config` is validated here.)
            if *against == version && v.plan.is_some() {
                validated = Some(std::mem::replace(&mut **v, Config::default().into()));
            }
        }

        let single: Option<(Kind, String)> = match &change {
            Change::ReplaceAll { validated: v, .. } => {
                next = validated.as_ref().map_or_else(|| v.config.clone(), |v| v.config.clone());
                None
            }
            Change::Create { kind, entity } => {
                let name = entity.get("name").and_then(Value::as_str).ok_or_else(|| invalid("name", "a name is required"))?.to_string();
                if entities_of(&current, *kind).iter().any(|(n, _)| *n == name) {
                    return Err(StoreError::Conflict(format!("{} {name:?} already exists", kind.table())));
                }
                set_entity(&mut next, &mut parse, *kind, &name, entity.clone());
                Some((*kind, name))
            }
            Change::Put { kind, name, entity, if_match } | Change::Patch { kind, name, patch: entity, if_match } => {
                let stored = self.row_version(&mut tx, *kind, name).await?;
                match (if_match, &stored) {
                    (Some(want), Some((_, have))) if want != have => {
                        return Err(StoreError::PreconditionFailed(format!("{} {name:?} is at version {have}, not {want}", kind.table())));
                    }
                    // If-Match names a version of something that is gone.
                    (Some(want), None) => {
                        return Err(StoreError::PreconditionFailed(format!(
                            "{} {name:?} does not exist (expected version {want})",
                            kind.table()
                        )));
                    }
                    _ => {}
                }
                let mut value = match (&change, &stored) {
                    (Change::Patch { .. }, None) => return Err(StoreError::NotFound),
                    (Change::Patch { .. }, Some((old, _))) => {
                        let mut merged = old.clone();
                        merge_patch(&mut merged, entity);
                        merged
                    }
                    _ => entity.clone(),
                };
                match value.get("name").and_then(Value::as_str) {
                    Some(n) if n != name => return Err(invalid("name", format!("the name {n:?} does not match the URL's {name:?}"))),
                    Some(_) => {}
                    None => {
                        if let Value::Object(m) = &mut value {
                            m.insert("name".into(), Value::String(name.clone()));
                        }
                    }
                }
                set_entity(&mut next, &mut parse, *kind, name, value);
                Some((*kind, name.clone()))
            }
            Change::AddCredential { consumer, credential } => {
                let Some((mut stored, _)) = self.row_version(&mut tx, Kind::Consumers, consumer).await? else {
                    return Err(StoreError::NotFound);
                };
                if let Some(m) = stored.as_object_mut() {
                    let list = m.entry("credentials").or_insert_with(|| Value::Array(vec![]));
                    if let Some(list) = list.as_array_mut() {
                        list.push(credential.clone());
                    }
                }
                set_entity(&mut next, &mut parse, Kind::Consumers, consumer, stored);
                Some((Kind::Consumers, consumer.clone()))
            }
            Change::Delete { kind, name, if_match } => {
                let Some((_, have)) = self.row_version(&mut tx, *kind, name).await? else { return Err(StoreError::NotFound) };
                if let Some(want) = if_match {
                    if *want != have {
                        return Err(StoreError::PreconditionFailed(format!("{} {name:?} is at version {have}, not {want}", kind.table())));
                    }
                }
                let users = users_of(&current, *kind, name);
                if !users.is_empty() {
                    return Err(StoreError::Conflict(format!("{} {name:?} is still used by {}", kind.singular(), users.join(", "))));
                }
                remove_entity(&mut next, *kind, name);
                Some((*kind, name.clone()))
            }
        };

        // Exactly the checks `manifold validate` makes, on the whole config;
        // argon2 hashing is CPU work, kept off the control runtime.
        let previous = current.clone();
        let services = self.services.clone();
        let next = tokio::task::spawn_blocking(move || {
            let next = match validated {
                Some(v) => v,
                None => {
                    let mut loaded = LoadedConfig::from_config(next);
                    loaded.origins.partial = parse.partial;
                    loaded.origins.unparsed = parse.unparsed;
                    crate::config::load::finish(loaded, parse.errors, Some(&previous))?
                }
            };
            let config = next.config.clone();
            // What only a node can check (routing conflicts, what this node
            // lacks); every node compiles the config as it loads it.
            crate::snapshot::compile(next, 0, &services)?;
            Ok(config)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("validation did not finish: {e}")))?
        .map_err(StoreError::Invalid)?;

        let diff = ConfigDiff::between(&current, &next);
        if diff.is_empty() {
            // Nothing changes: no version, no notification, no audit record.
            let (entity, entity_version) = match &single {
                Some((kind, name)) => match self.row_version(&mut tx, *kind, name).await? {
                    Some((v, ver)) => (Some(v), ver),
                    None => (None, 0),
                },
                None => (None, 0),
            };
            let version: i64 = sqlx::query_scalar("SELECT version FROM config_state WHERE id = 1").fetch_one(&mut *tx).await?;
            tx.rollback().await?;
            let deleted = matches!(change, Change::Delete { .. });
            return Ok(WriteOutcome {
                entity: if deleted { None } else { entity },
                entity_version,
                config_version: version as u64,
                created: false,
                diff,
            });
        }
        let version: i64 =
            sqlx::query_scalar("UPDATE config_state SET version = version + 1, updated_at = now() WHERE id = 1 RETURNING version")
                .fetch_one(&mut *tx)
                .await?;
        let mut outcome =
            WriteOutcome { entity: None, entity_version: 0, config_version: version as u64, created: false, diff: diff.clone() };
        for kind in Kind::ALL {
            let before: Vec<(String, Value)> = entities_of(&current, kind);
            let after: Vec<(String, Value)> = entities_of(&next, kind);
            for (name, new) in &after {
                let old = before.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                // Compared as text: a reordered object is a change (its order is served).
                if old.map(Value::to_string) == Some(new.to_string()) {
                    continue;
                }
                let sql = format!(
                    "INSERT INTO {t} (name, tags, entity)
                     VALUES ($1, $2, CASE WHEN $3::text::jsonb IS NOT NULL THEN $3::text::json END)
                     ON CONFLICT (name) DO UPDATE SET tags = EXCLUDED.tags, entity = EXCLUDED.entity,
                       version = {t}.version + 1, updated_at = now()
                     RETURNING version",
                    t = kind.table()
                );
                // As text: a JSONB parameter would lose the key order the JSON column
                // keeps. The JSONB cast still refuses what JSONB cannot hold (\u0000).
                let row_version: i64 =
                    sqlx::query_scalar(AssertSqlSafe(sql)).bind(name).bind(tags_of(new)).bind(new.to_string()).fetch_one(&mut *tx).await?;
                self.audit_row(&mut tx, actor, if old.is_some() { "update" } else { "create" }, kind, name, old, Some(new), version)
                    .await?;
                if single.as_ref() == Some(&(kind, name.clone())) {
                    outcome.entity = Some(new.clone());
                    outcome.entity_version = row_version;
                    outcome.created = old.is_none();
                }
            }
            for (name, old) in &before {
                if after.iter().any(|(n, _)| n == name) {
                    continue;
                }
                let sql = format!("DELETE FROM {} WHERE name = $1", kind.table());
                sqlx::query(AssertSqlSafe(sql)).bind(name).execute(&mut *tx).await?;
                self.audit_row(&mut tx, actor, "delete", kind, name, Some(old), None, version).await?;
            }
        }
        // An unchanged PUT still answers with the stored entity.
        if let (Some((kind, name)), None) = (&single, &outcome.entity) {
            if let Some((_, v)) = entities_of(&next, *kind).into_iter().find(|(n, _)| n == name) {
                outcome.entity = Some(v);
                outcome.entity_version = self.row_version(&mut tx, *kind, name).await?.map_or(0, |(_, v)| v);
            }
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(version.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn row_version(&self, tx: &mut Transaction<'_, Postgres>, kind: Kind, name: &str) -> Result<Option<(Value, i64)>, StoreError> {
        let sql = format!("SELECT entity, version FROM {} WHERE name = $1", kind.table());
        let row = sqlx::query(AssertSqlSafe(sql)).bind(name).fetch_optional(&mut **tx).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    #[allow(clippy::too_many_arguments)]
    async fn audit_row(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        actor: &str,
        action: &str,
        kind: Kind,
        name: &str,
        before: Option<&Value>,
        after: Option<&Value>,
        version: i64,
    ) -> Result<(), StoreError> {
        // The log keeps what changed, never a secret: only its redaction.
        let logged = |v: Option<&Value>| {
            v.map(|v| {
                let mut v = v.clone();
                crate::config::secrets::redact_entity(kind.table(), &mut v);
                v.to_string()
            })
        };
        sqlx::query("INSERT INTO audit_log (actor, action, kind, name, before, after, config_version) VALUES ($1, $2, $3, $4, $5::text::json, $6::text::json, $7)")
            .bind(actor)
            .bind(action)
            .bind(kind.table())
            .bind(name)
            .bind(logged(before))
            .bind(logged(after))
            .bind(version)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
