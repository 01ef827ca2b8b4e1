//! The declarative config of SPEC §2 as serde types. One format for files,
//! the admin API's `/config`, `export` and `sync`. Unknown fields are errors.
//!
//! These types say what can be written; `validate` says what makes sense;
//! `crate::snapshot` turns a valid config into what the request path runs.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::units::{ByteSize, Dur, Percent};

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn yes() -> bool {
    true
}

/// A config document: every key optional, each a list of entities with unique names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plain proxied routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Endpoints that fan out to backend calls and merge their answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compositions: Vec<Composition>,
    /// Who calls: names, groups and credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Consumer>,
    /// Authentication, limits, transforms and more, attached to routes and compositions by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    /// Pools of backend targets, named by a route's `upstream` or a call's `upstream`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    /// TLS certificates the proxy's TLS listener serves, chosen by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
}

/// A plain proxied route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique among routes: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Empty means every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Empty means any host. `*.example.com` matches one or more labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The path matched: `{param}` is one segment, `{*rest}` the remainder.
    pub path: String,
    /// Where requests go: `http://host[:port][/base]`, or the name of an upstream.
    pub upstream: String,
    /// The forwarded path, with `{param}` placeholders; default: the request path unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_rewrite: Option<String>,
    /// Deadline for the upstream's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// The longest the upstream's answer body may pause between two reads; past it the answer is cut. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_timeout: Option<Dur>,
    /// Forward the client's Host header instead of the upstream's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub preserve_host: bool,
    /// Names of the policies applied to this route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Tunnel WebSocket upgrades (HTTP/1.1 `Upgrade: websocket`, HTTP/2 extended CONNECT) to the upstream once its policies admitted the handshake and the upstream answered 101. Default false: an upgrade request is refused (400).
    #[serde(default, skip_serializing_if = "is_false")]
    pub websocket: bool,
    /// How long a WebSocket tunnel may carry no byte either way before the gateway closes it. Default 1h; only with `websocket: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_idle_timeout: Option<Dur>,
}

/// One endpoint answered by backend calls, merged and reshaped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Composition {
    /// Unique among compositions: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The method answered (default GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Empty means any host. `*.example.com` matches one or more labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The path matched: `{param}` is one segment, `{*rest}` the remainder.
    pub path: String,
    /// Deadline for the whole composition (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Names of the policies applied to this composition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The backend calls, by name; a call that reads another one runs after it.
    pub calls: IndexMap<String, Call>,
    /// How the answer is built; default: each call's body under its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSpec>,
}

/// One backend call of a composition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// Default GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `http://host[:port]/path?query`; templates (`{{request.path.id}}`, `{{user.body.id}}`) only in the path and query.
    /// Exactly one of `url`, or `upstream` with `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The name of an upstream the call goes to, instead of a `url`; needs `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// With `upstream`: the path and query (`/users/{{request.path.id}}?full=1`), templated and escaped exactly like a `url`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Default: the composition's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// A required call that fails fails the composition (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub required: bool,
    /// JSONPath: the call runs only when its value is truthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// JSONPath: one request per value, results in order (`{{item}}` is the value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// Requests of a `for_each` in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Headers sent; values may be templates.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    /// Headers copied from the client request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_headers: Vec<String>,
    /// JSON body sent; strings starting with `$` are JSONPath queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Retries after a failure, for idempotent methods only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Largest backend body accepted (default 10MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<ByteSize>,
    /// Most items a `for_each` may expand to (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u32>,
    /// With `required: false`: the body the call has when it fails or is skipped, instead of null (a literal JSON value; strings are text, never queries); the calls that read it run on it, and it is still listed in Manifold-Partial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Value>,
    /// With `for_each`: send the values in groups (`{{items}}` in the url, `$.items` in a JSON body) and match the answer's elements back to items by `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// GET calls only: keep successful answers on the node, shared by every request whose call is the same (method, final URL, `vary_headers`, forwarded headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CallCache>,
    /// GET calls only: identical calls in flight at once on the node share one backend request (always on with `cache`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub collapse: bool,
}

/// How a `for_each` call's values are grouped into backend requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Most values in one request.
    pub size: u32,
    /// JSONPath evaluated on each element of the answer's array; an element belongs to the item whose value equals it.
    pub key: String,
    /// JSONPath to the array in the answer (default: the answer is the array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// How long a call's answers are kept and served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallCache {
    /// How long an answer is fresh (served without asking the backend).
    pub ttl: Dur,
    /// After `ttl`, how long a stale answer is served at once while one background request refreshes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<Dur>,
    /// After `ttl`, how long a stale answer is served when the backend fails or times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<Dur>,
    /// Client request headers whose values are part of the key (as well as every header the call forwards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vary_headers: Vec<String>,
    /// `local` (default): this node's store; `cluster`: also in Redis under the same key, so every node shares answers (Redis away: node-local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<CacheScope>,
}

/// Where a call's cached answers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    Local,
    Cluster,
}

/// How a composition's answer is built.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    /// Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Headers of the answer; values may be templates.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    /// Headers copied from calls' answers, by call name.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub forward_headers: IndexMap<String, Vec<String>>,
    /// JSON answer; strings starting with `$` are JSONPath queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// A handlebars template rendered as text instead of a JSON body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Content-Type of a `template` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Who calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Unique among consumers: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Groups, for acl policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// How this consumer authenticates.
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
    /// A client certificate accepted by mtls-auth policies: its subject (`CN=app,O=example`) or one of its SANs (`spiffe://...`, a DNS name, an email, a URI).
    Mtls {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        san: Option<String>,
    },
    /// A JWT issuer: `secret` for HS*, `public_key` (PEM) for RS*/ES*/EdDSA.
    Jwt {
        /// Matched against a token's `iss`.
        issuer: String,
        /// HS256/384/512, RS256/384/512, ES256/384 or EdDSA.
        algorithm: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_key: Option<String>,
    },
}

/// A TLS certificate the proxy's TLS listener serves to clients that ask for one of its `snis` (SPEC §7).
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Unique among certificates: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The server names (SNI) this certificate answers: exact names, or `*.domain` for one label under domain. No two certificates share one.
    pub snis: Vec<String>,
    /// The certificate chain, PEM, the server's own certificate first.
    pub cert: String,
    /// The private key of the first certificate, PEM (PKCS#8, PKCS#1 or SEC1). Never shown by admin reads; `export --include-secrets` includes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SHA-256 of `key` (hex), set on load and shown by admin reads; written without `key`, it keeps the key the gateway already holds for this certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Read-only: the certificate's subject, SANs and expiry, as admin reads show them; ignored when written.
    #[serde(default, skip_serializing)]
    #[schema(read_only)]
    pub details: Option<Value>,
}

/// Never prints the private key.
impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("name", &self.name)
            .field("tags", &self.tags)
            .field("snis", &self.snis)
            .field("key_sha256", &self.key_sha256)
            .finish_non_exhaustive()
    }
}

/// A pool of backend targets (SPEC §6), named by routes and composition calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Unique among upstreams: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The backends of the pool, at least one: `http://host[:port]` or `https://host[:port]`, no path.
    pub targets: Vec<UpstreamTarget>,
    /// Resolve each target whose host is a DNS name to every address it has, again on this period (at least 1s) and soon after a connect failure; without it, a name is one target resolved at connect time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_every: Option<Dur>,
    /// How a target is picked: round-robin (default; weighted, smooth), least-requests (fewest in flight per weight) or consistent-hash (by hash_on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// consistent-hash only, and required with it: what is hashed, consumer, ip, header:NAME or path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Longest wait for a connection to a target (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Dur>,
    /// Active and passive health checks: an unhealthy or ejected target gets no traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<UpstreamHealth>,
    /// Retries of failed idempotent requests on another target, within a budget (default: no retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<UpstreamRetries>,
    /// A cap on the requests in flight to this upstream, per node: over it, 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// TLS settings for https targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Speak HTTP/2 to the targets (ALPN over TLS, prior knowledge over http); default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub http2: bool,
}

/// One target of an upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTarget {
    /// `http://host[:port]` or `https://host[:port]`: no path, query or user info.
    pub url: String,
    /// Share of the traffic relative to the other targets: 1 to 1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// How an upstream picks a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    RoundRobin,
    LeastRequests,
    ConsistentHash,
}

/// Health checks of an upstream's targets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamHealth {
    /// Checks each node sends to every target on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveHealthCheck>,
    /// Outlier ejection from real traffic: connect errors, timeouts and 5xx answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<PassiveHealthCheck>,
}

/// Active health checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthCheck {
    /// The path requested on each target, such as /health.
    pub path: String,
    /// Time between two checks of one target (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    /// Deadline of one check (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Successful checks in a row that make an unhealthy target healthy (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_after: Option<u32>,
    /// Failed checks in a row that make a healthy target unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_after: Option<u32>,
    /// Answers that count as healthy: codes (200) or ranges ("200-399"), within 100-599 (default ["200-399"]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<Vec<StatusSpec>>,
}

/// Passive health checks (outlier ejection).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthCheck {
    /// Failures within `window` that eject a target (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// The span over which failures are counted (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Dur>,
    /// How long an ejected target gets no traffic (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eject_for: Option<Dur>,
    /// The largest share of the pool ejected at once (default 50%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejected: Option<Percent>,
}

/// Retries of an upstream's failed requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRetries {
    /// Tries after the first one, at least 1 (another target first).
    pub max: u32,
    /// What is retried: connect, timeout, or a 5xx status such as 502 (default [connect, 502, 503, 504]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<StatusSpec>>,
    /// Retries in flight allowed as a share of the upstream's requests in flight on this node, 3 always allowed (default 20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Percent>,
}

/// A cap on an upstream's requests in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Requests in flight per node, at least 1; over it the answer is 503 at once.
    pub max_in_flight: u32,
}

/// TLS to an upstream's https targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Verify the target's certificate (default true); false is logged as a warning at every config load.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub verify: bool,
    /// PEM file of the CAs trusted instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The name sent as SNI and checked in the certificate (default: the target's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM certificate chain for mTLS to the targets (with client_key_file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// PEM private key for mTLS to the targets (with client_cert_file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// A status code (`502`), a range of them (`"200-399"`), or, in retries' `on`, a condition (`connect`, `timeout`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusSpec {
    /// Written as a number.
    Code(u16),
    /// Written as a string.
    Text(String),
}

impl Serialize for StatusSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StatusSpec::Code(c) => s.serialize_u16(*c),
            StatusSpec::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for StatusSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StatusSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a status such as 200, a range such as \"200-399\", or a word such as connect")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusSpec, E> {
                u16::try_from(v).map(StatusSpec::Code).map_err(|_| E::custom(format!("{v} is not a status")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusSpec, E> {
                u16::try_from(v).map(StatusSpec::Code).map_err(|_| E::custom(format!("{v} is not a status")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusSpec, E> {
                Ok(StatusSpec::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for StatusSpec {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .description(Some("A status code (502), a range (\"200-399\"), or in retries' `on` a condition (connect, timeout)."))
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(100)).maximum(Some(599)))
            .item(ObjectBuilder::new().schema_type(Type::String))
            .into()
    }
}
impl utoipa::ToSchema for StatusSpec {}

/// What is applied around routes and compositions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique among policies: a-z, 0-9 and -, at most 64 characters.
    pub name: String,
    /// Free labels, for filtering in the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Which policy this is; decides the shape of `config`.
    #[serde(rename = "type")]
    pub kind: PolicyKind,
    /// Applied to every route and composition.
    #[serde(default, skip_serializing_if = "is_false")]
    pub global: bool,
    /// Settings of the policy, shaped by its `type`; absent means every default.
    /// Checked against the typed config of its `type` (`KeyAuthConfig`...).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub config: Value,
}

/// A policy type.
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
    MtlsAuth,
    Wasm,
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

/// `config` of a key-auth policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    /// Where the key is looked up: a header, then a query parameter (default [apikey]).
    #[serde(default = "default_key_names")]
    pub key_names: Vec<String>,
    /// Remove the key before forwarding.
    #[serde(default)]
    pub hide_credentials: bool,
    /// Consumer used when no key is given.
    #[serde(default)]
    pub anonymous: Option<String>,
}

/// `config` of a basic-auth policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// Remove the Authorization header before forwarding.
    #[serde(default)]
    pub hide_credentials: bool,
    /// Consumer used when no credentials are given.
    #[serde(default)]
    pub anonymous: Option<String>,
}

/// `config` of a jwt policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Header holding the `Bearer` token (default authorization).
    #[serde(default = "default_authorization")]
    pub header: String,
    /// Query parameter holding the token, if any.
    #[serde(default)]
    pub query_param: Option<String>,
    /// Of exp and nbf (default [exp]).
    #[serde(default = "default_claims")]
    pub claims_to_verify: Vec<String>,
    /// Clock skew allowed on exp and nbf (default 0s).
    #[serde(default)]
    pub leeway: Dur,
    /// A JWK set for RS*/ES*/EdDSA tokens whose credential has no public_key.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Consumer used when no token is given.
    #[serde(default)]
    pub anonymous: Option<String>,
}

/// `config` of an acl policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Groups allowed (exactly one of allow or deny).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Groups denied (exactly one of allow or deny).
    #[serde(default)]
    pub deny: Option<Vec<String>>,
}

/// `config` of an ip-restriction policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionConfig {
    /// CIDRs or addresses allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDRs or addresses denied.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Status of a refused request (default 403).
    #[serde(default = "default_403")]
    pub status: u16,
}

/// One window of a rate limit.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitWindow {
    /// Requests allowed per window.
    pub limit: u64,
    /// Length of the window.
    pub window: Dur,
}

/// Where rate-limit counters live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    Local,
    Cluster,
}

/// `config` of a rate-limit policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per window (with window, or use limits).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Length of the window.
    #[serde(default)]
    pub window: Option<Dur>,
    /// Several windows at once, instead of limit and window.
    #[serde(default)]
    pub limits: Option<Vec<RateLimitWindow>>,
    /// What is counted: consumer (default), ip, route or header:NAME.
    #[serde(default = "default_by")]
    pub by: String,
    /// local (each node) or cluster (shared through Redis).
    #[serde(default = "default_scope")]
    pub scope: RateLimitScope,
    /// Let requests through when Redis is unavailable (default true).
    #[serde(default = "yes")]
    pub fault_tolerant: bool,
}
fn default_scope() -> RateLimitScope {
    RateLimitScope::Local
}

/// `config` of a correlation-id policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelationIdConfig {
    /// Default x-request-id.
    #[serde(default = "default_request_id_header")]
    pub header: String,
    /// Also set it on the answer (default true).
    #[serde(default = "yes")]
    pub echo_downstream: bool,
}

/// One of `add`, `remove`, `rename`, `replace` of a transform policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformTargets {
    /// Header names (remove) or a map of names to values.
    #[serde(default)]
    pub headers: Option<Value>,
    /// Query parameter names (remove) or a map of names to values.
    #[serde(default)]
    pub query: Option<Value>,
    /// JSON field names (remove) or a map of fields to values.
    #[serde(default)]
    pub body: Option<Value>,
}

/// `config` of a request-transform or response-transform policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Added when absent.
    #[serde(default)]
    pub add: Option<TransformTargets>,
    /// Removed.
    #[serde(default)]
    pub remove: Option<TransformTargets>,
    /// Renamed: old name to new name.
    #[serde(default)]
    pub rename: Option<TransformTargets>,
    /// Replaced when present.
    #[serde(default)]
    pub replace: Option<TransformTargets>,
}

/// `config` of a cors policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins, or "*".
    #[serde(default)]
    pub origins: Vec<String>,
    /// Allowed methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Headers the browser may read.
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    /// Allow credentials (not with "*" origins).
    #[serde(default)]
    pub credentials: bool,
    /// How long a preflight is cached (default 10m).
    #[serde(default = "default_ten_minutes")]
    pub max_age: Dur,
}

/// `config` of an https-redirect policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpsRedirectConfig {
    /// 301 (default) or 308.
    #[serde(default = "default_301")]
    pub status: u16,
}

/// `config` of a request-size-limit policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSizeLimitConfig {
    /// Largest request body accepted.
    pub max_bytes: ByteSize,
}

/// `config` of a response-cache policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheConfig {
    /// How long an answer is kept.
    pub ttl: Dur,
    /// Request headers that are part of the cache key.
    #[serde(default)]
    pub vary_headers: Vec<String>,
    /// The query string is part of the cache key (default true).
    #[serde(default = "yes")]
    pub vary_query: bool,
    /// Memory for cached answers (default 64MiB).
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
}

/// `config` of a wasm policy: a proxy-wasm filter (docs/plugins.md).
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WasmConfig {
    /// The module (a WebAssembly binary), a path relative to the config
    /// file that defines the policy. Exactly one of `module` and
    /// `module_base64`.
    #[serde(default)]
    pub module: Option<String>,
    /// The module itself, base64.
    #[serde(default)]
    pub module_base64: Option<String>,
    /// The SHA-256 (hex) of the module: filled in from the file when a
    /// config with a `module` path is loaded, and checked whenever it is
    /// compiled, so a rebuilt module is a change the config diff shows and
    /// a node never runs other bytes than the config names.
    #[serde(default)]
    pub module_sha256: Option<String>,
    /// The plugin configuration the module reads in `proxy_on_configure`:
    /// a string is passed as its bytes, any other value as JSON.
    #[serde(default)]
    pub config: Value,
    /// The policy phase it runs in: `request-transform` (the default),
    /// `response-transform` or `response-cache` (it runs after admission).
    #[serde(default)]
    pub phase: Option<String>,
    /// Fuel one request's callbacks share (default 10000000).
    #[serde(default)]
    pub fuel: Option<u64>,
    /// The most linear memory the module may have (default 16MiB).
    #[serde(default)]
    pub max_memory: Option<ByteSize>,
}

/// `config` of an mtls-auth policy.
#[derive(Clone, Debug, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsAuthConfig {
    /// The CAs (PEM) a client certificate must chain to.
    pub ca: String,
    /// Consumer used when no certificate is given.
    #[serde(default)]
    pub anonymous: Option<String>,
}
