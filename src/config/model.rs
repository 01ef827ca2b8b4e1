//! The declarative config of SPEC §2 as serde types. One format for files,
//! the admin API's `/config`, `export` and `sync`. Unknown fields are errors.
//!
//! These types say what can be written; `validate` says what makes sense;
//! `crate::snapshot` turns a valid config into what the request path runs.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::units::{ByteSize, Dur};

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compositions: Vec<Composition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Consumer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
}

/// A plain proxied route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Empty means every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Empty means any host. `*.example.com` matches one or more labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub path: String,
    pub upstream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_rewrite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub preserve_host: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Composition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    pub calls: IndexMap<String, Call>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Call {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Largest backend body accepted (default 10MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<ByteSize>,
    /// Most items a `for_each` may expand to (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub forward_headers: IndexMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Credential {
    /// Files may hold `key:`; it is replaced by its SHA-256 digest on load.
    KeyAuth {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_sha256: Option<String>,
    },
    /// Files may hold `password:`; it is replaced by an argon2id hash on load.
    BasicAuth {
        username: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_hash: Option<String>,
    },
    Jwt {
        issuer: String,
        algorithm: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_key: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(rename = "type")]
    pub kind: PolicyKind,
    #[serde(default, skip_serializing_if = "is_false")]
    pub global: bool,
    /// Checked against the typed config of `kind` (see [`PolicyConfig`]).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub config: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    KeyAuth,
    BasicAuth,
    Jwt,
    Acl,
    IpRestriction,
    RateLimit,
    CorrelationId,
    RequestTransform,
    ResponseTransform,
    Cors,
    HttpsRedirect,
    RequestSizeLimit,
    ResponseCache,
}

/// The typed `config` of each policy type, with SPEC defaults.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyConfig {
    KeyAuth(KeyAuthConfig),
    BasicAuth(BasicAuthConfig),
    Jwt(JwtConfig),
    Acl(AclConfig),
    IpRestriction(IpRestrictionConfig),
    RateLimit(RateLimitConfig),
    CorrelationId(CorrelationIdConfig),
    RequestTransform(TransformConfig),
    ResponseTransform(TransformConfig),
    Cors(CorsConfig),
    HttpsRedirect(HttpsRedirectConfig),
    RequestSizeLimit(RequestSizeLimitConfig),
    ResponseCache(ResponseCacheConfig),
}

fn default_key_names() -> Vec<String> {
    vec!["apikey".into()]
}
fn default_authorization() -> String {
    "authorization".into()
}
fn default_claims() -> Vec<String> {
    vec!["exp".into()]
}
fn default_request_id_header() -> String {
    "x-request-id".into()
}
fn default_403() -> u16 {
    403
}
fn default_301() -> u16 {
    301
}
fn default_by() -> String {
    "consumer".into()
}
fn default_ten_minutes() -> Dur {
    Dur(std::time::Duration::from_secs(600))
}
fn default_cache_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    #[serde(default = "default_key_names")]
    pub key_names: Vec<String>,
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default)]
    pub anonymous: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default)]
    pub anonymous: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default = "default_authorization")]
    pub header: String,
    #[serde(default)]
    pub query_param: Option<String>,
    #[serde(default = "default_claims")]
    pub claims_to_verify: Vec<String>,
    #[serde(default)]
    pub leeway: Dur,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub anonymous: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub deny: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionConfig {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default = "default_403")]
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitWindow {
    pub limit: u64,
    pub window: Dur,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    Local,
    Cluster,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub window: Option<Dur>,
    #[serde(default)]
    pub limits: Option<Vec<RateLimitWindow>>,
    #[serde(default = "default_by")]
    pub by: String,
    #[serde(default = "default_scope")]
    pub scope: RateLimitScope,
    #[serde(default = "yes")]
    pub fault_tolerant: bool,
}
fn default_scope() -> RateLimitScope {
    RateLimitScope::Local
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelationIdConfig {
    #[serde(default = "default_request_id_header")]
    pub header: String,
    #[serde(default = "yes")]
    pub echo_downstream: bool,
}

/// One of `add`, `remove`, `rename`, `replace` of a transform policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformTargets {
    #[serde(default)]
    pub headers: Option<Value>,
    #[serde(default)]
    pub query: Option<Value>,
    #[serde(default)]
    pub body: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub add: Option<TransformTargets>,
    #[serde(default)]
    pub remove: Option<TransformTargets>,
    #[serde(default)]
    pub rename: Option<TransformTargets>,
    #[serde(default)]
    pub replace: Option<TransformTargets>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    #[serde(default = "default_ten_minutes")]
    pub max_age: Dur,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsRedirectConfig {
    #[serde(default = "default_301")]
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSizeLimitConfig {
    pub max_bytes: ByteSize,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheConfig {
    pub ttl: Dur,
    #[serde(default)]
    pub vary_headers: Vec<String>,
    #[serde(default = "yes")]
    pub vary_query: bool,
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
}
