//! The compiled, immutable form of a config: what the request path reads.
//! Built once per config change and swapped whole behind an `ArcSwap`, so a
//! request never parses config, never waits on a lock, and finishes on the
//! snapshot it started with.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::compose::CompositionPlan;
use crate::config::model::Balance;
use crate::config::pattern::{parse_rewrite, PathPattern, RewritePart, Segment};
use crate::config::{Config, ConfigError, ConfigErrors, Validated};
use crate::policy::{PolicyChain, Services};
use crate::upstream::health::{HealthPolicy, Registry as HealthRegistry};
use crate::upstream::{Balancer, Connector, UpstreamPlan, UpstreamTlsOptions};

/// The compiled upstreams of a config, by name.
pub type Upstreams = HashMap<String, Arc<UpstreamPlan>>;

/// Route timeout when a route sets none (Kong's default too).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(60);
/// Composition deadline when a composition sets none (SPEC §2).
pub const DEFAULT_COMPOSITION_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Snapshot {
    /// The config this was compiled from, as accepted (secrets hashed).
    pub config: Arc<Config>,
    pub version: u64,
    pub router: Router,
    /// Compositions by name, with their path patterns, for the admin API's
    /// `try` endpoint.
    pub compositions: HashMap<String, (PathPattern, Arc<CompositionPlan>)>,
    /// The named upstreams, for their health report and checkers.
    pub upstreams: Upstreams,
    /// The TLS listener's certificates by server name (`certificates`).
    pub certificates: Arc<crate::certs::SniTable>,
    /// Some policy (`mtls-auth`) reads client certificates: the TLS
    /// listener asks clients for one.
    pub wants_client_cert: bool,
}

/// A plain route, resolved: where to send, and how to rewrite.
#[derive(Debug)]
pub struct ProxyRoute {
    pub name: Arc<str>,
    /// Its targets (one for a URL) and how to reach them; the picked
    /// target's host is the `Host` sent unless `preserve_host`.
    pub upstream: Arc<UpstreamPlan>,
    /// The URL's base path without a trailing slash (may be empty).
    pub base_path: String,
    pub rewrite: Option<Vec<RewritePart>>,
    pub timeout: Duration,
    /// The longest pause between two reads of the answer's body.
    pub body_timeout: Duration,
    pub preserve_host: bool,
    /// `websocket: true`: upgrades are tunnelled, idle at most this long.
    pub websocket: Option<Duration>,
    /// The upstream speaks HTTP/2 (`http2: true`): gRPC requests get gRPC
    /// errors and their `grpc-timeout` honoured.
    pub grpc: bool,
}

/// A WebSocket tunnel idle this long is closed unless the route says
/// otherwise (SPEC §7: 1h).
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub enum Target {
    Proxy(Arc<ProxyRoute>),
    Composition(Arc<CompositionPlan>),
}

#[derive(Debug)]
struct Candidate {
    methods: Option<Vec<Method>>,
    policies: Arc<PolicyChain>,
    metrics: crate::metrics::RouteMetrics,
    params: Arc<[Arc<str>]>,
    target: Target,
    /// The route's path pattern (`/users/{id}`), which names its trace spans.
    pattern: Arc<str>,
    /// Added for an empty catch-all (`/files` for `/files/{*rest}`); an
    /// explicit route of the same shape comes first.
    implied: bool,
}

type Tree = matchit::Router<Vec<Candidate>>;

/// Host, then path, then method. Hosts are tried most specific first:
/// exact, then wildcard (longest suffix first), then routes for any host.
#[derive(Default)]
pub struct Router {
    exact: HashMap<String, Tree>,
    wildcard: Vec<(String, Tree)>,
    any: Option<Tree>,
}

pub enum RouteMatch<'a> {
    Found {
        target: &'a Target,
        params: Vec<(Arc<str>, String)>,
        policies: &'a Arc<PolicyChain>,
        metrics: &'a crate::metrics::RouteMetrics,
        pattern: &'a str,
    },
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

impl Router {
    pub fn find(&self, host: &str, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut allowed: Vec<Method> = Vec::new();
        let exact = self.exact.get(host).into_iter();
        let wild = self.wildcard.iter().filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str())).map(|(_, t)| t);
        for tree in exact.chain(wild).chain(self.any.iter()) {
            let Ok(m) = tree.at(path) else { continue };
            for cand in m.value {
                let ok = cand.methods.as_ref().is_none_or(|ms| ms.iter().any(|x| x == method));
                if ok {
                    let mut values = m.params.iter().map(|(_, v)| v);
                    let params = cand.params.iter().map(|name| (name.clone(), values.next().unwrap_or("").to_string())).collect();
                    return RouteMatch::Found {
                        target: &cand.target,
                        params,
                        policies: &cand.policies,
                        metrics: &cand.metrics,
                        pattern: &cand.pattern,
                    };
                }
                allowed.extend(cand.methods.iter().flatten().cloned());
            }
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            allowed.dedup();
            RouteMatch::MethodNotAllowed(allowed)
        }
    }
}

/// The shapes a pattern answers on: itself and, for a trailing catch-all,
/// the path without it (`/files` and `/files/` for `/files/{*rest}`).
fn shapes(pattern: &PathPattern) -> Vec<(String, bool)> {
    let shape = pattern.shape();
    let mut out = vec![(shape.clone(), false)];
    if matches!(pattern.segments.last(), Some(Segment::CatchAll(_))) {
        let cut = shape.rfind("/{*").unwrap_or(0);
        let prefix = &shape[..cut];
        out.push((format!("{prefix}/"), true));
        if !prefix.is_empty() {
            out.push((prefix.to_string(), true));
        }
    }
    out
}

fn err(path: String, message: String) -> ConfigError {
    ConfigError { file: None, path, message }
}

fn parse_methods(methods: &[String]) -> Option<Vec<Method>> {
    if methods.is_empty() {
        return None;
    }
    Some(methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect())
}

/// Compiles each upstream once: its targets, balancer and, with a `tls`
/// block, its own connector (the files read now; an unreadable one is an
/// error at its field).
///
/// With a health registry (a node's), each target's state is the one an
/// earlier config of the node had for the same upstream, target and health
/// settings; without (a dry run), every state is new.
pub fn compile_upstreams(config: &Config, errors: &mut Vec<ConfigError>, registry: Option<&HealthRegistry>) -> Upstreams {
    let mut out = HashMap::new();
    for u in &config.upstreams {
        let base = format!("upstreams.{}", u.name);
        let health = u.health.as_ref().map(|h| Arc::new(HealthPolicy::compile(h)));
        let mut targets = Vec::with_capacity(u.targets.len());
        for (i, t) in u.targets.iter().enumerate() {
            let uri: http::Uri = match t.url.parse() {
                Ok(uri) => uri,
                Err(e) => {
                    errors.push(err(format!("{base}.targets[{i}].url"), e.to_string()));
                    continue;
                }
            };
            let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
                errors.push(err(format!("{base}.targets[{i}].url"), "expected http(s)://host[:port]".into()));
                continue;
            };
            let label = format!("{scheme}://{authority}");
            let state = match registry {
                Some(r) => r.state(&u.name, &label, health.as_deref()),
                None => Arc::default(),
            };
            targets.push(crate::upstream::Target::with_state(scheme, authority, t.weight.unwrap_or(100).clamp(1, 1000), state));
        }
        if targets.len() != u.targets.len() || targets.is_empty() {
            continue;
        }
        let connect_timeout = u.connect_timeout.map(|d| d.0);
        let connector = match &u.tls {
            Some(tls) => {
                let tbase = format!("{base}.tls");
                let opts = UpstreamTlsOptions {
                    base: &tbase,
                    verify: tls.verify,
                    ca_file: tls.ca_file.as_deref(),
                    server_name: tls.server_name.as_deref(),
                    client_cert_file: tls.client_cert_file.as_deref(),
                    client_key_file: tls.client_key_file.as_deref(),
                };
                match Connector::for_upstream(&opts, connect_timeout.unwrap_or(crate::upstream::DEFAULT_CONNECT_TIMEOUT)) {
                    Ok(c) => Some(Arc::new(c)),
                    Err((path, message)) => {
                        errors.push(err(path, message));
                        continue;
                    }
                }
            }
            None => None,
        };
        // An own connector carries the timeout; else it applies to the node's.
        let connect_timeout = if connector.is_some() { None } else { connect_timeout };
        let balancer = match u.balance {
            Some(Balance::LeastRequests) => Balancer::LeastRequests,
            // validate requires a well-formed hash_on with consistent-hash.
            Some(Balance::ConsistentHash) => match u.hash_on.as_deref().and_then(crate::upstream::HashOn::parse) {
                Some(on) => Balancer::ConsistentHash(on),
                None => {
                    errors.push(err(format!("{base}.hash_on"), "balance: consistent-hash needs hash_on".into()));
                    continue;
                }
            },
            Some(Balance::RoundRobin) | None => Balancer::RoundRobin,
        };
        let retry = u.retries.as_ref().map(|r| {
            let on: Vec<String> = match &r.on {
                Some(on) => on
                    .iter()
                    .map(|s| match s {
                        crate::config::model::StatusSpec::Code(c) => c.to_string(),
                        crate::config::model::StatusSpec::Text(t) => t.clone(),
                    })
                    .collect(),
                None => ["connect", "502", "503", "504"].map(String::from).to_vec(),
            };
            crate::upstream::RetryPolicy::new(r.max, on.iter().map(String::as_str), r.budget.map_or(20.0, |b| b.0))
        });
        let max_in_flight = u.circuit_breaker.as_ref().map(|c| c.max_in_flight as usize);
        // resolve_every: each name stands for its addresses, the last ones
        // the node resolved (none yet: the name itself, until the resolver
        // has run).
        let resolution = u.resolve_every.map(|every| crate::upstream::dns::Resolution {
            sources: targets.iter().map(|t| crate::upstream::dns::Source::new(t.scheme.clone(), &t.authority, t.weight)).collect(),
            every: every.0,
        });
        let targets = match &resolution {
            Some(res) => {
                let own_name = connector.as_ref().is_some_and(|c| c.has_server_name());
                let base = connector.as_ref().or_else(|| registry.and_then(|r| r.node_connector()));
                let cached = |s: &crate::upstream::dns::Source| registry.and_then(|r| r.cached(&u.name, &s.authority(), &s.host));
                crate::upstream::dns::targets(&u.name, &res.sources, &cached, registry, health.as_deref(), base, own_name)
            }
            None => targets,
        };
        let mut plan = UpstreamPlan::with_balancer(Some(u.name.as_str().into()), targets, balancer, connector, connect_timeout, u.http2)
            .with_resilience(retry, max_in_flight)
            .with_health(health);
        if let Some(res) = resolution {
            plan = plan.resolved(res);
        }
        out.insert(u.name.clone(), Arc::new(plan));
    }
    out
}

/// Compiles a validated config. Errors here are ones only the router can
/// see (two patterns matchit cannot tell apart) and what this node lacks
/// for it (`scope: cluster` without Redis).
pub fn compile(config: impl Into<Validated>, version: u64, services: &Arc<Services>) -> Result<Snapshot, ConfigErrors> {
    let Validated { config, plan } = config.into();
    // The policies: as validation compiled them, or (a config read back
    // from the database) by the same compile pass, which cannot fail for a
    // config that validated; then bound to this node, with the consumers'
    // credentials as they are now (hashed).
    let mut errors = Vec::new();
    let plan = plan.map_or_else(|| crate::policy::compile::compile(&config, &Default::default()), Ok);
    let identities = Arc::new(crate::policy::identity::Identities::build(&config));
    let bound = match plan.and_then(|plan| plan.bind(services, &identities)) {
        Ok(bound) => bound,
        Err(errs) => {
            errors.extend(errs);
            Default::default()
        }
    };
    errors.extend(services.check(&config));
    // host key ("" = any host, "*.x" = wildcard) -> shape -> candidates
    let mut tables: BTreeMap<String, BTreeMap<String, Vec<Candidate>>> = BTreeMap::new();
    let mut owners: HashMap<(String, String), String> = HashMap::new();
    let upstreams = compile_upstreams(&config, &mut errors, Some(&services.health));
    let mut add =
        |base: String, hosts: &[String], pattern: &PathPattern, methods: Option<Vec<Method>>, target: Target, attached: &[String]| {
            let entity = base.split_once('.').map_or(base.as_str(), |(_, n)| n);
            let policies = Arc::new(PolicyChain::build(&bound, entity, attached));
            let kind = if base.starts_with("routes.") { "route" } else { "composition" };
            let metrics = services.metrics.route(entity, kind);
            let params: Arc<[Arc<str>]> = pattern.param_names().map(Arc::from).collect();
            let path: Arc<str> = Arc::from(pattern.to_string());
            let any = [String::new()];
            let hosts: &[String] = if hosts.is_empty() { &any } else { hosts };
            for host in hosts {
                let table = tables.entry(host.to_ascii_lowercase()).or_default();
                for (shape, implied) in shapes(pattern) {
                    owners.entry((host.clone(), shape.clone())).or_insert_with(|| base.clone());
                    table.entry(shape).or_default().push(Candidate {
                        methods: methods.clone(),
                        policies: policies.clone(),
                        metrics: metrics.clone(),
                        params: params.clone(),
                        target: target.clone(),
                        pattern: path.clone(),
                        implied,
                    });
                }
            }
        };

    for route in &config.routes {
        let base = format!("routes.{}", route.name);
        let Ok(pattern) = PathPattern::parse(&route.path) else {
            continue;
        };
        let (upstream, base_path) = if route.upstream.contains("://") {
            let uri: http::Uri = match route.upstream.parse() {
                Ok(u) => u,
                Err(e) => {
                    errors.push(err(format!("{base}.upstream"), e.to_string()));
                    continue;
                }
            };
            let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
                errors.push(err(format!("{base}.upstream"), "expected scheme://host[:port]".into()));
                continue;
            };
            (Arc::new(UpstreamPlan::single(scheme, authority)), uri.path().trim_end_matches('/').to_string())
        } else {
            match upstreams.get(&route.upstream) {
                Some(u) => (u.clone(), String::new()),
                // validate reports the unknown name; an upstream that did
                // not compile has its own error.
                None => continue,
            }
        };
        let params: Vec<&str> = pattern.param_names().collect();
        let rewrite = match &route.path_rewrite {
            Some(r) => match parse_rewrite(r, &params) {
                Ok(parts) => Some(parts),
                Err(e) => {
                    errors.push(err(format!("{base}.path_rewrite"), e));
                    continue;
                }
            },
            None => None,
        };
        let grpc = upstream.http2;
        let route_data = ProxyRoute {
            name: route.name.as_str().into(),
            upstream,
            base_path,
            rewrite,
            timeout: route.timeout.map_or(DEFAULT_ROUTE_TIMEOUT, |d| d.0),
            body_timeout: route.body_timeout.map_or(crate::upstream::DEFAULT_BODY_TIMEOUT, |d| d.0),
            preserve_host: route.preserve_host,
            websocket: route.websocket.then(|| route.websocket_idle_timeout.map_or(DEFAULT_WEBSOCKET_IDLE_TIMEOUT, |d| d.0)),
            grpc,
        };
        add(base, &route.hosts, &pattern, parse_methods(&route.methods), Target::Proxy(Arc::new(route_data)), &route.policies);
    }
    let mut compositions = HashMap::new();
    for comp in &config.compositions {
        let base = format!("compositions.{}", comp.name);
        let Ok(pattern) = PathPattern::parse(&comp.path) else {
            continue;
        };
        let method = comp.method.clone().unwrap_or_else(|| "GET".into());
        let target = match crate::compose::plan::compile(comp, &upstreams) {
            Ok(mut plan) => {
                for call in &mut plan.calls {
                    call.duration = Some(services.metrics.call_histogram(&plan.name, &call.name));
                    // Only a call with `cache` or `collapse` holds the store.
                    let collapse = comp.calls.get(&*call.name).is_some_and(|c| c.collapse);
                    if call.wants_store(collapse) {
                        call.store = Some(services.call_store.clone());
                        call.collapsed = Some(services.metrics.call_collapsed_counter(&plan.name, &call.name));
                    }
                    let cluster = comp.calls.get(&*call.name).and_then(|c| c.cache.as_ref()).and_then(|c| c.scope);
                    if cluster == Some(crate::config::CacheScope::Cluster) {
                        call.redis = services.redis.clone();
                    }
                    if call.cache.is_some() {
                        call.cache_counts = Some(services.metrics.call_cache_counters(&plan.name, &call.name));
                    }
                }
                let plan = Arc::new(plan);
                compositions.insert(comp.name.clone(), (pattern.clone(), plan.clone()));
                Target::Composition(plan)
            }
            Err(errs) => {
                errors.extend(errs);
                continue;
            }
        };
        add(base, &comp.hosts, &pattern, parse_methods(&[method]), target, &comp.policies);
    }

    let mut router = Router::default();
    for (host, table) in tables {
        let mut tree = Tree::new();
        for (shape, mut candidates) in table {
            candidates.sort_by_key(|c| c.implied);
            if let Err(e) = tree.insert(shape.clone(), candidates) {
                let owner = owners.get(&(host.clone(), shape.clone())).cloned().unwrap_or_default();
                errors.push(err(format!("{owner}.path"), format!("the path cannot be routed beside the others: {e}")));
            }
        }
        if host.is_empty() {
            router.any = Some(tree);
        } else if let Some(suffix) = host.strip_prefix('*') {
            router.wildcard.push((suffix.to_string(), tree));
        } else {
            router.exact.insert(host, tree);
        }
    }
    router.wildcard.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
    let certificates = match crate::certs::SniTable::compile(&config.certificates) {
        Ok(table) => Arc::new(table),
        Err(bad) => {
            errors.extend(bad.into_iter().map(|(path, message)| err(path, message)));
            Default::default()
        }
    };
    let wants_client_cert = config.policies.iter().any(|p| p.kind == crate::config::PolicyKind::MtlsAuth);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Snapshot { config: Arc::new(config), version, router, compositions, upstreams, certificates, wants_client_cert })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_document, Format};

    fn snapshot(yaml: &str) -> Snapshot {
        let (loaded, errs) = parse_document(None, yaml, Format::Yaml);
        assert!(errs.is_empty(), "{errs:?}");
        compile(loaded.validated().unwrap(), 1, &Services::new(None)).unwrap()
    }

    fn found(s: &Snapshot, host: &str, method: &str, path: &str) -> Option<(String, Vec<(String, String)>)> {
        match s.router.find(host, &Method::from_bytes(method.as_bytes()).unwrap(), path) {
            RouteMatch::Found { target, params, .. } => {
                let name = match target {
                    Target::Proxy(p) => p.name.to_string(),
                    Target::Composition(c) => c.name.to_string(),
                };
                Some((name, params.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
            }
            _ => None,
        }
    }

    #[test]
    fn routing_table() {
        let s = snapshot(
            r#"
routes:
  - { name: users, path: "/api/users/{id}", upstream: "http://127.0.0.1:1" }
  - { name: users-me, path: /api/users/me, upstream: "http://127.0.0.1:1" }
  - { name: users-post, methods: [POST], path: "/api/orders/{uid}", upstream: "http://127.0.0.1:1" }
  - { name: files, path: "/files/{*rest}", upstream: "http://127.0.0.1:1" }
  - { name: host-a, hosts: [a.example.com], path: "/api/users/{id}", upstream: "http://127.0.0.1:1" }
  - { name: wild, hosts: ["*.example.com"], path: "/w", upstream: "http://127.0.0.1:1" }
  - { name: root, path: /, upstream: "http://127.0.0.1:1" }
"#,
        );
        let p = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        type Case<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, Vec<(String, String)>)>);
        let cases: Vec<Case> = vec![
            ("x", "GET", "/api/users/7", Some(("users", p(&[("id", "7")])))),
            ("x", "POST", "/api/users/7", Some(("users", p(&[("id", "7")])))),
            ("x", "POST", "/api/orders/7", Some(("users-post", p(&[("uid", "7")])))),
            ("x", "GET", "/api/orders/7", None),
            ("x", "GET", "/api/users/me", Some(("users-me", vec![]))),
            ("a.example.com", "GET", "/api/users/7", Some(("host-a", p(&[("id", "7")])))),
            ("b.example.com", "GET", "/api/users/7", Some(("users", p(&[("id", "7")])))),
            ("b.example.com", "GET", "/w", Some(("wild", vec![]))),
            ("example.com", "GET", "/w", None),
            ("x", "GET", "/files/a/b%2Fc", Some(("files", p(&[("rest", "a/b%2Fc")])))),
            ("x", "GET", "/files/", Some(("files", p(&[("rest", "")])))),
            ("x", "GET", "/files", Some(("files", p(&[("rest", "")])))),
            ("x", "GET", "/", Some(("root", vec![]))),
            ("x", "GET", "/nothing", None),
        ];
        for (host, method, path, want) in cases {
            let got = found(&s, host, method, path);
            let want = want.map(|(n, p)| (n.to_string(), p));
            assert_eq!(got, want, "{method} {host}{path}");
        }
    }

    #[test]
    fn method_not_allowed() {
        let s = snapshot(
            r#"
routes:
  - { name: only-get, methods: [GET, HEAD], path: /x, upstream: "http://127.0.0.1:1" }
"#,
        );
        match s.router.find("h", &Method::DELETE, "/x") {
            RouteMatch::MethodNotAllowed(m) => assert_eq!(m, [Method::GET, Method::HEAD]),
            _ => panic!("expected 405"),
        }
    }
}
