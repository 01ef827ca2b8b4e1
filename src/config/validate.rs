//! Every check a config passes before it is accepted, whatever its source
//! (files, `POST /config`, later the database). All errors are collected.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::load::Origins;
use super::model::*;
use super::pattern::{is_identifier, parse_rewrite, PathPattern};
use super::refs::{jsonpath_root, template_refs};
use super::units::Dur;
use super::ConfigError;
use crate::policy::compile::PolicyPlan;

/// Reserved call names: `request` is the client request, `item` the current
/// value of a `for_each`.
pub const RESERVED_CALL_NAMES: [&str; 3] = ["request", "item", "items"];

struct Errors<'a> {
    list: Vec<ConfigError>,
    file: Option<Arc<str>>,
    origins: &'a Origins,
}

impl Errors<'_> {
    fn at(&mut self, file: &Option<Arc<str>>) {
        self.file = file.clone();
    }
    /// Records an error, unless it is about an object that lost a wrong
    /// value while loading (its default, not the user, may have caused it).
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        if !self.origins.is_partial(&path) {
            self.push_always(path, message);
        }
    }
    /// Records an error that holds whatever a partial object's other fields
    /// are: a check of one field's own value (a name, a tag, a reference).
    fn push_always(&mut self, path: impl Into<String>, message: impl Into<String>) {
        // One error, one line: parser messages can span several.
        let message: String = message.into();
        let message = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        self.list.push(ConfigError { file: self.file.clone(), path: path.into(), message });
    }
}

pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

const NAME_RULE: &str = "a name is 1 to 64 characters of a-z, 0-9 and -, starting with a letter or digit";

fn check_name(errs: &mut Errors, base: &str, name: &str) {
    if !is_valid_name(name) {
        errs.push_always(format!("{base}.name"), format!("invalid name {name:?}: {NAME_RULE}"));
    }
}

fn check_tags(errs: &mut Errors, base: &str, tags: &[String]) {
    for (i, tag) in tags.iter().enumerate() {
        if tag.is_empty() || tag.len() > 128 || tag.chars().any(|c| c.is_control() || c == ',') {
            errs.push_always(format!("{base}.tags[{i}]"), "a tag is 1 to 128 printable characters without commas");
        }
    }
}

fn check_unique<'a>(errs: &mut Errors, kind: &str, names: impl Iterator<Item = (&'a str, &'a Option<Arc<str>>)>) {
    let mut seen: HashMap<&str, &Option<Arc<str>>> = HashMap::new();
    for (name, file) in names {
        if let Some(first) = seen.get(name) {
            errs.at(file);
            let where_ = first.as_deref().map(|f| format!(" (also defined in {f})")).unwrap_or_default();
            errs.push_always(format!("{kind}.{name}.name"), format!("duplicate name {name:?}{where_}"));
        } else {
            seen.insert(name, file);
        }
    }
}

fn check_method(errs: &mut Errors, path: String, method: &str) {
    let ok = !method.is_empty() && method.len() <= 32 && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    if !ok {
        errs.push(path, format!("invalid method {method:?}: use upper case, such as GET"));
    }
}

fn check_header_name(errs: &mut Errors, path: String, name: &str) {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        errs.push(path, format!("invalid header name {name:?}"));
    }
}

fn check_duration(errs: &mut Errors, path: String, d: Option<Dur>) {
    if let Some(d) = d {
        if d.0.is_zero() {
            errs.push(path, "must be more than 0");
        }
    }
}

fn check_host(errs: &mut Errors, path: String, host: &str) {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        errs.push(path, format!("invalid host {host:?}: a host name, or *.domain for its subdomains"));
    }
}

/// `scheme://host[:port][/base]` for a plain route's upstream.
pub fn check_upstream(upstream: &str) -> Result<(), String> {
    let uri: http::Uri = upstream.parse().map_err(|e| format!("invalid upstream {upstream:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("invalid upstream {upstream:?}: expected http(s)://host[:port][/base]")),
    }
    let authority = uri.authority().ok_or_else(|| format!("invalid upstream {upstream:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err("an upstream cannot hold user info (user@host)".into());
    }
    if authority.host().is_empty() {
        return Err(format!("invalid upstream {upstream:?}: no host"));
    }
    if uri.query().is_some() || upstream.contains('#') {
        return Err("an upstream cannot hold a query or fragment".into());
    }
    Ok(())
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("invalid CIDR {s:?}: expected an address or address/prefix"))
}

fn check_policy_refs(errs: &mut Errors, base: &str, names: &[String], policies: &HashSet<&str>) {
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if !policies.contains(name.as_str()) {
            errs.push_always(format!("{base}.policies[{i}]"), format!("unknown policy {name:?}"));
        } else if !seen.insert(name) {
            errs.push_always(format!("{base}.policies[{i}]"), format!("policy {name:?} is listed twice"));
        }
    }
}

const PATH_NOT_TEMPLATE: &str = "templates are not rendered in a path: {name} matches one segment and {*rest} the remainder";

/// Who answers a (host, path shape): the methods (`None` = all) and a label.
type Claim = (Option<Vec<String>>, String);

pub fn validate(config: &Config, origins: &Origins) -> Vec<ConfigError> {
    validate_compiling(config, origins).0
}

/// [`validate`], and the policies compiled by it when the config has no
/// error at all: validation and the policy compile are one pass.
pub fn validate_compiling(config: &Config, origins: &Origins) -> (Vec<ConfigError>, Option<PolicyPlan>) {
    let mut errs = Errors { list: Vec::new(), file: None, origins };
    let file_of = |v: &Vec<Option<Arc<str>>>, i: usize| v.get(i).cloned().flatten();

    // Entities that did not parse still exist for references: their own
    // errors were reported, a reference to them would only add noise.
    let policy_names: HashSet<&str> =
        config.policies.iter().map(|p| p.name.as_str()).chain(origins.unparsed_names("policies").map(|(n, _)| n)).collect();
    let upstream_names: HashSet<&str> =
        config.upstreams.iter().map(|u| u.name.as_str()).chain(origins.unparsed_names("upstreams").map(|(n, _)| n)).collect();

    check_unique(
        &mut errs,
        "routes",
        config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.routes.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("routes")),
    );
    check_unique(
        &mut errs,
        "compositions",
        config
            .compositions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.compositions.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("compositions")),
    );
    check_unique(
        &mut errs,
        "consumers",
        config
            .consumers
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.consumers.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("consumers")),
    );
    check_unique(
        &mut errs,
        "policies",
        config
            .policies
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.policies.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("policies")),
    );
    check_unique(
        &mut errs,
        "certificates",
        config
            .certificates
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.certificates.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("certificates")),
    );
    check_unique(
        &mut errs,
        "upstreams",
        config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), origins.upstreams.get(i).unwrap_or(&None)))
            .chain(origins.unparsed_names("upstreams")),
    );

    // Which (host, path shape) pairs are taken, by which methods, so two
    // entities can never answer the same request.
    let mut claims: HashMap<(String, String), Vec<Claim>> = HashMap::new();
    let mut claim = |errs: &mut Errors, base: &str, label: String, hosts: &[String], shape: &str, methods: Option<Vec<String>>| {
        // Without a wrong `methods` or `hosts`, the defaults claim too much.
        if errs.origins.partial.iter().any(|p| p == base) {
            return;
        }
        let any = [String::new()];
        let hosts: &[String] = if hosts.is_empty() { &any } else { hosts };
        for host in hosts {
            let entry = claims.entry((host.to_ascii_lowercase(), shape.to_string())).or_default();
            for (other_methods, other) in entry.iter() {
                let overlap = match (&methods, other_methods) {
                    (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
                    _ => true,
                };
                if overlap {
                    errs.push(format!("{base}.path"), format!("conflicts with {other}: same path, host and method"));
                }
            }
            entry.push((methods.clone(), label.clone()));
        }
    };

    for (i, route) in config.routes.iter().enumerate() {
        errs.at(&file_of(&origins.routes, i));
        let base = format!("routes.{}", route.name);
        check_name(&mut errs, &base, &route.name);
        check_tags(&mut errs, &base, &route.tags);
        for (j, m) in route.methods.iter().enumerate() {
            check_method(&mut errs, format!("{base}.methods[{j}]"), m);
        }
        for (j, h) in route.hosts.iter().enumerate() {
            check_host(&mut errs, format!("{base}.hosts[{j}]"), h);
        }
        match PathPattern::parse(&route.path) {
            _ if holds_template(&route.path) => errs.push(format!("{base}.path"), PATH_NOT_TEMPLATE),
            Ok(pattern) => {
                let params: Vec<&str> = pattern.param_names().collect();
                if let Some(rewrite) = &route.path_rewrite {
                    if holds_template(rewrite) {
                        errs.push(
                            format!("{base}.path_rewrite"),
                            "templates are not rendered in path_rewrite: it takes the path's parameters as {name} or {rest}",
                        );
                    } else if let Err(e) = parse_rewrite(rewrite, &params) {
                        errs.push(format!("{base}.path_rewrite"), e);
                    }
                }
                let methods = (!route.methods.is_empty()).then(|| route.methods.clone());
                claim(&mut errs, &base, format!("route {:?}", route.name), &route.hosts, &pattern.shape(), methods);
            }
            Err(e) => errs.push(format!("{base}.path"), e),
        }
        if holds_template(&route.upstream) {
            errs.push(
                format!("{base}.upstream"),
                "templates are not rendered in an upstream: it is fixed text, http://host[:port][/base]; path_rewrite changes the path",
            );
        } else if route.upstream.contains("://") {
            if let Err(e) = check_upstream(&route.upstream) {
                errs.push(format!("{base}.upstream"), e);
            }
        } else {
            check_upstream_ref(&mut errs, format!("{base}.upstream"), &route.upstream, &upstream_names);
        }
        check_duration(&mut errs, format!("{base}.timeout"), route.timeout);
        check_duration(&mut errs, format!("{base}.body_timeout"), route.body_timeout);
        check_policy_refs(&mut errs, &base, &route.policies, &policy_names);
        check_websocket(&mut errs, &base, route, config);
    }

    for (i, comp) in config.compositions.iter().enumerate() {
        errs.at(&file_of(&origins.compositions, i));
        let base = format!("compositions.{}", comp.name);
        check_name(&mut errs, &base, &comp.name);
        check_tags(&mut errs, &base, &comp.tags);
        let method = comp.method.clone().unwrap_or_else(|| "GET".into());
        check_method(&mut errs, format!("{base}.method"), &method);
        for (j, h) in comp.hosts.iter().enumerate() {
            check_host(&mut errs, format!("{base}.hosts[{j}]"), h);
        }
        match PathPattern::parse(&comp.path) {
            _ if holds_template(&comp.path) => errs.push(format!("{base}.path"), PATH_NOT_TEMPLATE),
            Ok(pattern) => {
                claim(&mut errs, &base, format!("composition {:?}", comp.name), &comp.hosts, &pattern.shape(), Some(vec![method]))
            }
            Err(e) => errs.push(format!("{base}.path"), e),
        }
        check_duration(&mut errs, format!("{base}.timeout"), comp.timeout);
        check_policy_refs(&mut errs, &base, &comp.policies, &policy_names);
        check_composition(&mut errs, &base, comp, &upstream_names);
    }

    let mut keys: HashMap<String, String> = HashMap::new();
    let mut usernames: HashMap<String, String> = HashMap::new();
    let mut issuers: HashMap<String, String> = HashMap::new();
    let mut mtls: HashMap<String, String> = HashMap::new();
    for (i, consumer) in config.consumers.iter().enumerate() {
        errs.at(&file_of(&origins.consumers, i));
        let base = format!("consumers.{}", consumer.name);
        check_name(&mut errs, &base, &consumer.name);
        check_tags(&mut errs, &base, &consumer.tags);
        for (j, g) in consumer.groups.iter().enumerate() {
            if !is_valid_name(g) {
                errs.push(format!("{base}.groups[{j}]"), format!("invalid group {g:?}: {NAME_RULE}"));
            }
        }
        for (j, cred) in consumer.credentials.iter().enumerate() {
            let path = format!("{base}.credentials[{j}]");
            let redacted = super::secrets::redacted_fields(cred);
            if !redacted.is_empty() {
                for field in redacted {
                    errs.push(format!("{path}.{field}"), super::secrets::UNMATCHED);
                }
                continue;
            }
            let unique = |errs: &mut Errors, seen: &mut HashMap<String, String>, what: &str, value: String| {
                if let Some(other) = seen.get(&value) {
                    errs.push(path.clone(), format!("{what} is already used by consumer {other:?}"));
                } else {
                    seen.insert(value, consumer.name.clone());
                }
            };
            match cred {
                Credential::KeyAuth { key, key_sha256 } => match (key, key_sha256) {
                    (Some(k), None) if !k.is_empty() => unique(&mut errs, &mut keys, "this key", sha256_hex(k)),
                    (None, Some(d)) if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) => {
                        unique(&mut errs, &mut keys, "this key", d.to_ascii_lowercase())
                    }
                    (None, Some(_)) => errs.push(format!("{path}.key_sha256"), "expected 64 hexadecimal characters"),
                    _ => errs.push(path.clone(), "a key-auth credential has exactly one of key or key_sha256"),
                },
                Credential::BasicAuth { username, password, password_hash } => {
                    if username.is_empty() || username.contains(':') {
                        errs.push(format!("{path}.username"), "a username is not empty and holds no ':'");
                    } else {
                        unique(&mut errs, &mut usernames, "this username", username.clone());
                    }
                    match (password, password_hash) {
                        (Some(p), None) if !p.is_empty() => {}
                        (None, Some(h)) if h.starts_with("$argon2") => {}
                        (None, Some(_)) => errs.push(format!("{path}.password_hash"), "expected an argon2 hash ($argon2id$...)"),
                        _ => errs.push(path.clone(), "a basic-auth credential has exactly one of password or password_hash"),
                    }
                }
                Credential::Mtls { subject, san } => match (subject, san) {
                    (Some(s), None) if !s.is_empty() => unique(&mut errs, &mut mtls, "this subject", format!("subject:{s}")),
                    (None, Some(s)) if !s.is_empty() => unique(&mut errs, &mut mtls, "this SAN", format!("san:{s}")),
                    _ => errs.push(path.clone(), "an mtls credential has exactly one of subject or san, not empty"),
                },
                Credential::Jwt { issuer, algorithm, secret, public_key } => {
                    if issuer.is_empty() {
                        errs.push(format!("{path}.issuer"), "must not be empty");
                    } else {
                        unique(&mut errs, &mut issuers, "this issuer", issuer.clone());
                    }
                    match algorithm.as_str() {
                        "HS256" | "HS384" | "HS512" => {
                            if secret.as_deref().unwrap_or("").is_empty() || public_key.is_some() {
                                errs.push(path.clone(), format!("{algorithm} needs a secret and no public_key"));
                            }
                        }
                        // Without a public_key, the key comes from a jwt policy's JWKS.
                        "RS256" | "RS384" | "RS512" | "ES256" | "ES384" | "EdDSA" => match (public_key, secret) {
                            (_, Some(_)) => errs.push(path.clone(), format!("{algorithm} takes a PEM public_key, not a secret")),
                            (Some(k), None) => {
                                if let Err(e) = crate::policy::jwt::decoding_key(algorithm, None, Some(k)) {
                                    errs.push(format!("{path}.public_key"), e);
                                }
                            }
                            (None, None) => {}
                        },
                        other => errs.push(
                            format!("{path}.algorithm"),
                            format!("unknown algorithm {other:?}: use HS256/384/512, RS256/384/512, ES256/384 or EdDSA"),
                        ),
                    }
                }
            }
        }
    }

    // A policy's config is checked by compiling it: the same pass the
    // snapshot runs, so what validates compiles.
    let (planned, mut policy_errors) = crate::policy::compile::compile_each(config, origins);
    for (i, policy) in config.policies.iter().enumerate() {
        errs.at(&file_of(&origins.policies, i));
        let base = format!("policies.{}", policy.name);
        check_name(&mut errs, &base, &policy.name);
        check_tags(&mut errs, &base, &policy.tags);
        errs.list.append(&mut policy_errors[i]);
    }

    for (i, upstream) in config.upstreams.iter().enumerate() {
        errs.at(&file_of(&origins.upstreams, i));
        check_upstream_entity(&mut errs, upstream);
    }

    // Each server name is one certificate's: the listener must never have
    // to choose between two.
    let mut snis: HashMap<String, &str> = HashMap::new();
    for (i, cert) in config.certificates.iter().enumerate() {
        errs.at(&file_of(&origins.certificates, i));
        let base = format!("certificates.{}", cert.name);
        check_name(&mut errs, &base, &cert.name);
        check_tags(&mut errs, &base, &cert.tags);
        if cert.snis.is_empty() {
            errs.push(format!("{base}.snis"), "needs at least one server name (the default certificate is --tls-cert's)");
        }
        for (j, sni) in cert.snis.iter().enumerate() {
            let path = format!("{base}.snis[{j}]");
            check_host(&mut errs, path.clone(), sni);
            if let Some(other) = snis.get(&sni.to_ascii_lowercase()) {
                errs.push(path, format!("{sni:?} is already served by certificate {other:?}"));
            } else {
                snis.insert(sni.to_ascii_lowercase(), &cert.name);
            }
        }
        match (&cert.key, &cert.key_sha256) {
            (Some(key), _) => {
                if let Err((field, e)) = crate::certs::certified_key(&cert.cert, key) {
                    let field = if field == crate::certs::CertField::Cert { "cert" } else { "key" };
                    errs.push(format!("{base}.{field}"), e);
                }
            }
            (None, Some(_)) => {
                if let Err(e) = crate::certs::chain(&cert.cert) {
                    errs.push(format!("{base}.cert"), e);
                }
                errs.push(format!("{base}.key"), super::secrets::KEY_UNMATCHED);
            }
            (None, None) => {
                if let Err(e) = crate::certs::chain(&cert.cert) {
                    errs.push(format!("{base}.cert"), e);
                }
                errs.push(format!("{base}.key"), "missing: the certificate's private key, PEM");
            }
        }
    }
    let plan = if errs.list.is_empty() { PolicyPlan::complete(planned) } else { None };
    (errs.list, plan)
}

/// `websocket` and its idle timeout: a tunnel is HTTP/1.1 to the backend
/// (the upstream layer's h1 client hands the connection over after a 101).
fn check_websocket(errs: &mut Errors, base: &str, route: &Route, config: &Config) {
    check_duration(errs, format!("{base}.websocket_idle_timeout"), route.websocket_idle_timeout);
    if !route.websocket {
        if route.websocket_idle_timeout.is_some() {
            errs.push(format!("{base}.websocket_idle_timeout"), "only applies with websocket: true");
        }
        return;
    }
    if config.upstreams.iter().any(|u| u.name == route.upstream && u.http2) {
        errs.push(
            format!("{base}.websocket"),
            format!("upstream {:?} has http2: true; WebSocket tunnels go to the backend over HTTP/1.1", route.upstream),
        );
    }
}

/// `upstream: NAME` of a route or a call: a known upstream.
fn check_upstream_ref(errs: &mut Errors, path: String, name: &str, upstreams: &HashSet<&str>) {
    if !is_valid_name(name) {
        errs.push_always(path, format!("invalid upstream {name:?}: expected http(s)://host[:port][/base] or the name of an upstream"));
    } else if !upstreams.contains(name) {
        errs.push_always(path, unknown("upstream", name, upstreams.iter().copied()));
    }
}

/// A target of an upstream: `http(s)://host[:port]`, nothing more.
fn check_target_url(url: &str) -> Result<(), String> {
    if holds_template(url) {
        return Err("templates are not rendered in a target: it is fixed text, http(s)://host[:port]".into());
    }
    let expected = || format!("invalid target {url:?}: expected http://host[:port] or https://host[:port]");
    let uri: http::Uri = url.parse().map_err(|e| format!("{}: {e}", expected()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(expected());
    }
    let authority = uri.authority().ok_or_else(expected)?;
    if authority.as_str().contains('@') {
        return Err("a target cannot hold user info (user@host)".into());
    }
    if authority.host().is_empty() {
        return Err(format!("invalid target {url:?}: no host"));
    }
    if uri.query().is_some() || url.contains('#') || url.ends_with('?') {
        return Err("a target cannot hold a query or fragment".into());
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "a target cannot hold a path ({:?}): a route's path_rewrite or a call's path says what is requested",
            uri.path()
        ));
    }
    Ok(())
}

/// A status code or range of an active health check: `200`, `"200"` or `"200-399"`, within 100-599.
fn check_status_spec(spec: &StatusSpec) -> Result<(), String> {
    let code = |n: u16| (100..=599).contains(&n).then_some(n);
    let ok = match spec {
        StatusSpec::Code(n) => code(*n).is_some(),
        StatusSpec::Text(t) => {
            let parse = |p: &str| p.trim().parse::<u16>().ok().and_then(code);
            match t.split_once('-') {
                Some((lo, hi)) => matches!((parse(lo), parse(hi)), (Some(lo), Some(hi)) if lo <= hi),
                None => parse(t).is_some(),
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("invalid status {}: expected a code or a range such as \"200-399\", within 100-599", status_text(spec)))
    }
}

fn status_text(spec: &StatusSpec) -> String {
    match spec {
        StatusSpec::Code(n) => n.to_string(),
        StatusSpec::Text(t) => format!("{t:?}"),
    }
}

/// What a retry may be `on`: `connect`, `timeout`, or a 5xx status.
fn check_retry_on(spec: &StatusSpec) -> Result<(), String> {
    let ok = match spec {
        StatusSpec::Code(n) => (500..=599).contains(n),
        StatusSpec::Text(t) => matches!(t.as_str(), "connect" | "timeout") || t.parse::<u16>().is_ok_and(|n| (500..=599).contains(&n)),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("unknown retry condition {}: use connect, timeout or a status from 500 to 599", status_text(spec)))
    }
}

fn check_percent(errs: &mut Errors, path: String, p: Option<super::units::Percent>) {
    if let Some(p) = p {
        if !(0.0..=100.0).contains(&p.0) {
            errs.push(path, "expected a percentage from 0% to 100%");
        }
    }
}

fn check_at_least_one(errs: &mut Errors, path: String, n: Option<u32>) {
    if n == Some(0) {
        errs.push(path, "must be at least 1");
    }
}

fn check_upstream_entity(errs: &mut Errors, upstream: &Upstream) {
    let base = format!("upstreams.{}", upstream.name);
    check_name(errs, &base, &upstream.name);
    check_tags(errs, &base, &upstream.tags);
    if upstream.targets.is_empty() {
        errs.push(format!("{base}.targets"), "an upstream needs at least one target");
    }
    let mut seen = HashSet::new();
    for (i, target) in upstream.targets.iter().enumerate() {
        let path = format!("{base}.targets[{i}]");
        match check_target_url(&target.url) {
            Err(e) => errs.push(format!("{path}.url"), e),
            Ok(()) => {
                if !seen.insert(target.url.trim_end_matches('/').to_ascii_lowercase()) {
                    errs.push(format!("{path}.url"), format!("target {:?} is listed twice", target.url));
                }
            }
        }
        if let Some(w) = target.weight {
            if !(1..=1000).contains(&w) {
                errs.push(format!("{path}.weight"), "expected a weight from 1 to 1000");
            }
        }
    }
    check_duration(errs, format!("{base}.resolve_every"), upstream.resolve_every);
    if upstream.resolve_every.is_some_and(|d| d.0 < std::time::Duration::from_secs(1)) {
        errs.push(format!("{base}.resolve_every"), "at least 1s: a resolver is not to be asked many times a second");
    }
    check_duration(errs, format!("{base}.connect_timeout"), upstream.connect_timeout);
    if let Some(hash_on) = &upstream.hash_on {
        if upstream.balance != Some(Balance::ConsistentHash) {
            errs.push(format!("{base}.hash_on"), "hash_on goes with balance: consistent-hash");
        }
        match hash_on.as_str() {
            "consumer" | "ip" | "path" => {}
            other => match other.strip_prefix("header:") {
                Some(h) => check_header_name(errs, format!("{base}.hash_on"), h),
                None => errs.push(format!("{base}.hash_on"), format!("invalid key {other:?}: use consumer, ip, header:NAME or path")),
            },
        }
    } else if upstream.balance == Some(Balance::ConsistentHash) {
        // No default: what a pool is sticky on is the author's choice.
        errs.push(format!("{base}.hash_on"), "balance: consistent-hash needs hash_on: consumer, ip, header:NAME or path");
    }
    if let Some(health) = &upstream.health {
        if health.active.is_none() && health.passive.is_none() {
            errs.push(format!("{base}.health"), "needs active, passive or both");
        }
        if let Some(active) = &health.active {
            let abase = format!("{base}.health.active");
            if !active.path.starts_with('/')
                || active.path.contains('#')
                || active.path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                errs.push(format!("{abase}.path"), format!("invalid path {:?}: expected /path[?query]", active.path));
            }
            check_duration(errs, format!("{abase}.interval"), active.interval);
            check_duration(errs, format!("{abase}.timeout"), active.timeout);
            check_at_least_one(errs, format!("{abase}.healthy_after"), active.healthy_after);
            check_at_least_one(errs, format!("{abase}.unhealthy_after"), active.unhealthy_after);
            if let Some(statuses) = &active.statuses {
                if statuses.is_empty() {
                    errs.push(format!("{abase}.statuses"), "needs at least one status or range");
                }
                for (i, s) in statuses.iter().enumerate() {
                    if let Err(e) = check_status_spec(s) {
                        errs.push(format!("{abase}.statuses[{i}]"), e);
                    }
                }
            }
        }
        if let Some(passive) = &health.passive {
            let pbase = format!("{base}.health.passive");
            check_at_least_one(errs, format!("{pbase}.failures"), passive.failures);
            check_duration(errs, format!("{pbase}.window"), passive.window);
            check_duration(errs, format!("{pbase}.eject_for"), passive.eject_for);
            check_percent(errs, format!("{pbase}.max_ejected"), passive.max_ejected);
        }
    }
    if let Some(retries) = &upstream.retries {
        let rbase = format!("{base}.retries");
        check_at_least_one(errs, format!("{rbase}.max"), Some(retries.max));
        for (i, on) in retries.on.iter().flatten().enumerate() {
            if let Err(e) = check_retry_on(on) {
                errs.push(format!("{rbase}.on[{i}]"), e);
            }
        }
        check_percent(errs, format!("{rbase}.budget"), retries.budget);
    }
    if let Some(cb) = &upstream.circuit_breaker {
        check_at_least_one(errs, format!("{base}.circuit_breaker.max_in_flight"), Some(cb.max_in_flight));
    }
    if let Some(tls) = &upstream.tls {
        let tbase = format!("{base}.tls");
        for (field, value) in
            [("ca_file", &tls.ca_file), ("client_cert_file", &tls.client_cert_file), ("client_key_file", &tls.client_key_file)]
        {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errs.push(format!("{tbase}.{field}"), "expected the path of a PEM file");
            }
        }
        if let Some(name) = tls.server_name.as_deref().filter(|n| n.parse::<std::net::IpAddr>().is_err()) {
            if name.starts_with("*.") {
                errs.push(format!("{tbase}.server_name"), format!("invalid server name {name:?}: a host name or an IP address"));
            } else {
                check_host(errs, format!("{tbase}.server_name"), name);
            }
        }
        match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(_), None) => errs.push(format!("{tbase}.client_key_file"), "client_cert_file needs client_key_file"),
            (None, Some(_)) => errs.push(format!("{tbase}.client_cert_file"), "client_key_file needs client_cert_file"),
            _ => {}
        }
    }
}

/// What a valid config asks for that is allowed but unsafe, at its field:
/// logged at every load (see [`log_warnings`]).
pub fn warnings(config: &Config) -> Vec<ConfigError> {
    let mut out = Vec::new();
    certificate_warnings(config, &mut out);
    for u in &config.upstreams {
        let Some(tls) = &u.tls else { continue };
        if !tls.verify {
            out.push(ConfigError {
                file: None,
                path: format!("upstreams.{}.tls.verify", u.name),
                message: format!(
                    "upstream {:?}: certificate verification is off (tls.verify: false): anyone on the path to its targets can read and change the traffic",
                    u.name
                ),
            });
        }
        // A `tls` block applies to https:// targets only: with none, it was
        // most likely meant for targets written as http:// by mistake.
        if !u.targets.is_empty() && u.targets.iter().all(|t| t.url.starts_with("http://")) {
            out.push(ConfigError {
                file: None,
                path: format!("upstreams.{}.tls", u.name),
                message: format!("upstream {:?}: a tls block, but every target is http:// (plain text): the block is not used", u.name),
            });
        }
    }
    out
}

/// Expired certificates, and certificates not valid yet, at their `cert`.
fn certificate_warnings(config: &Config, out: &mut Vec<ConfigError>) {
    let now = crate::certs::now_unix();
    for c in &config.certificates {
        let Some(d) = crate::certs::chain(&c.cert).ok().and_then(|chain| crate::certs::details(&chain[0]).ok()) else { continue };
        let message = if d.not_after < now {
            format!("certificate {:?} has expired: clients will refuse it", c.name)
        } else if d.not_before > now {
            format!("certificate {:?} is not valid yet: clients will refuse it", c.name)
        } else {
            continue;
        };
        out.push(ConfigError { file: None, path: format!("certificates.{}.cert", c.name), message });
    }
}

/// Logs [`warnings`], one line each.
pub fn log_warnings(config: &Config) {
    for w in warnings(config) {
        tracing::warn!(field = %w.path, "{}", w.message);
    }
}

/// Where a composition's template or query reads from.
struct Reads {
    path: String,
    roots: Vec<(String, bool)>,
}

fn template_reads(errs: &mut Errors, path: String, template: &str) -> Reads {
    // Output in urls and headers is always escaped for where it lands;
    // only a response template may print raw text.
    if !path.ends_with(".template") && super::refs::has_unescaped_output(template) {
        errs.push(path.clone(), "unescaped output ({{{...}}} or {{&...}}) is allowed only in response.template");
    }
    if let Err(e) = handlebars::Template::compile(template) {
        // handlebars lists every token it expected; the reason and place say enough.
        let reason = e.reason().to_string();
        let reason = reason.split(": expected").next().unwrap_or(&reason);
        let place = e.pos().map(|(line, col)| format!(" at line {line} column {col}")).unwrap_or_default();
        errs.push(path.clone(), format!("invalid template: {reason}{place}"));
    }
    let roots = template_refs(template).into_iter().map(|r| (r.root, r.certain)).collect();
    Reads { path, roots }
}

fn query_reads(errs: &mut Errors, path: String, query: &str, anchored: bool) -> Reads {
    let mut roots = Vec::new();
    match jsonpath_root(query) {
        Ok(Some(root)) => roots.push((root, true)),
        Ok(None) if anchored => errs.push(path.clone(), format!("{query:?} must start with the name it reads, such as $.user.body")),
        Ok(None) => {}
        Err(e) => errs.push(path.clone(), e),
    }
    Reads { path, roots }
}

/// Whether a string holds a `{{...}}` expression.
fn holds_template(text: &str) -> bool {
    text.find("{{").is_some_and(|open| text[open + 2..].contains("}}"))
}

/// The error for a template written where none is rendered (a body's
/// values, `when`, `for_each`): where templates work, and the JSONPath
/// that reads what the template meant to.
fn not_rendered(text: &str, build_text: Option<&str>) -> String {
    let base = "templates are not rendered here, only in url, headers and response.template";
    let open = text.find("{{").unwrap_or(0);
    let after = &text[open + 2..];
    let inner =
        after[..after.find("}}").unwrap_or(after.len())].trim_matches(|c: char| matches!(c, '{' | '}' | '~' | '&') || c.is_whitespace());
    let is_path = inner.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && inner.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
    let whole = text.trim().starts_with("{{") && text.trim().ends_with("}}") && text.matches("{{").count() == 1;
    match (is_path, whole, build_text) {
        (true, true, _) => format!("{base}: write the JSONPath $.{inner} instead"),
        (true, false, Some(hint)) => format!("{base}: a value here is a JSONPath such as $.{inner} or literal JSON; {hint}"),
        (true, false, None) => format!("{base}: a value here is a JSONPath such as $.{inner} or literal JSON"),
        (false, _, _) => format!("{base}: use a JSONPath such as $.user.body.id"),
    }
}

/// JSONPath leaves of a body template: strings starting with `$` (not `$$`).
/// A `{{...}}` in a leaf is an error: a body is never rendered.
fn body_reads(errs: &mut Errors, path: String, body: &Value, anchored: bool, out: &mut Vec<Reads>) {
    match body {
        Value::String(s) if holds_template(s) && !s.starts_with("$$") => {
            let hint = (!anchored).then_some("to build text, use response.template");
            errs.push(path, not_rendered(s, hint));
        }
        Value::String(s) if s.starts_with('$') && !s.starts_with("$$") => out.push(query_reads(errs, path, s, anchored)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                body_reads(errs, format!("{path}[{i}]"), v, anchored, out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                body_reads(errs, format!("{path}.{k}"), v, anchored, out);
            }
        }
        _ => {}
    }
}

/// Headers the gateway sets itself on a backend call, or that describe one
/// connection: a call may not set or forward them.
const CALL_MANAGED_HEADERS: [&str; 10] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "expect"];

/// Headers of a composition's own answer that only the gateway can set:
/// its framing (a backend's `content-length` would not fit the new body)
/// and hop-by-hop headers.
fn check_response_header(errs: &mut Errors, path: String, name: &str) {
    let lower = name.to_ascii_lowercase();
    if lower != "host" && lower != "expect" && CALL_MANAGED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        errs.push(path, format!("{name} is set by the gateway for the answer it builds and cannot be configured"));
    } else {
        check_header_name(errs, path, name);
    }
}

/// `unknown call "usr"`, with the closest name when one is a likely typo
/// (at most two edits away).
fn unknown_call<'a>(name: &str, calls: impl Iterator<Item = &'a String>) -> String {
    unknown("call", name, calls.map(String::as_str).chain(["request"]))
}

/// `unknown KIND "NAME"`, with the closest of `known` when one is a likely
/// typo (at most two edits away).
fn unknown<'a>(kind: &str, name: &str, known: impl Iterator<Item = &'a str>) -> String {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
                prev = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    }
    let best = known.map(|c| (distance(name, c), c)).filter(|(d, c)| *d <= 2 && *d < c.chars().count().min(name.chars().count())).min();
    match best {
        Some((_, c)) => format!("unknown {kind} {name:?} (did you mean {c:?}?)"),
        None => format!("unknown {kind} {name:?}"),
    }
}

fn check_call_header(errs: &mut Errors, path: String, name: &str) {
    let lower = name.to_ascii_lowercase();
    if CALL_MANAGED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        errs.push(path, format!("{name} is set by the gateway for each call and cannot be configured"));
    } else {
        check_header_name(errs, path, name);
    }
}

/// Splits a call URL into its fixed origin (`scheme://host[:port]`) and the
/// templated rest. Templates in the origin are an error: they would let a
/// request choose where the gateway connects.
pub fn split_call_url(url: &str) -> Result<(&str, &str), String> {
    let Some(scheme_end) = url.find("://") else {
        return Err(format!("invalid url {url:?}: expected http(s)://host[:port]/path"));
    };
    let after = &url[scheme_end + 3..];
    let origin_end = scheme_end + 3 + after.find(['/', '?']).unwrap_or(after.len());
    let (origin, rest) = url.split_at(origin_end);
    if origin.contains("{{") || origin.contains("}}") {
        return Err("the scheme, host and port of a url are fixed text: templates are allowed only in its path and query".into());
    }
    let uri: http::Uri = origin.parse().map_err(|e| format!("invalid url {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) || origin.contains('@') {
        return Err(format!("invalid url {url:?}: expected http(s)://host[:port]/path"));
    }
    check_call_rest(rest, "a url")?;
    Ok((origin, rest))
}

/// What a url's path and query, or an upstream call's `path`, may not hold
/// literally: a fragment, an empty segment, a `.` or `..` segment. `what`
/// names it in the message ("a url", "a path").
fn check_call_rest(rest: &str, what: &str) -> Result<(), String> {
    let literal = strip_templates(rest);
    if literal.contains('#') {
        return Err(format!("{what} cannot hold a fragment"));
    }
    if literal.split('?').next().unwrap_or("").contains("//") {
        return Err(format!("{} cannot hold an empty segment (//)", path_of(what)));
    }
    Ok(())
}

fn path_of(what: &str) -> &'static str {
    if what == "a url" {
        "a url path"
    } else {
        "a path"
    }
}

/// A `.` or `..` segment written in a call's path (also as `%2e`): the
/// error to report beside the path's other checks.
fn dot_segments(rest: &str, what: &str) -> Option<String> {
    let path_part = strip_templates(rest.split('?').next().unwrap_or(""));
    path_part
        .split('/')
        .any(|seg| matches!(seg.to_ascii_lowercase().as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."))
        .then(|| format!("{} cannot hold . or .. segments", path_of(what)))
}

/// A call's path and query, after a url's origin or as an upstream call's
/// `path`: the same checks, the same template rules.
fn check_call_path(errs: &mut Errors, field: String, rest: &str, what: &str, reads: &mut Vec<Reads>) {
    if let Some(e) = dot_segments(rest, what) {
        errs.push(field.clone(), e);
    }
    reads.push(template_reads(errs, field, rest));
}

/// The text of a template with each `{{...}}` expression replaced by `x`,
/// for checks of what the author wrote literally.
fn strip_templates(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        match rest[open..].find("}}") {
            Some(close) => {
                out.push('x');
                rest = &rest[open + close + 2..];
            }
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// `batch`, `cache` and `collapse` of one call (SPEC §8).
fn check_sharing(errs: &mut Errors, cbase: &str, call: &crate::config::Call, method: &str) {
    if let Some(b) = &call.batch {
        if call.for_each.is_none() {
            errs.push(format!("{cbase}.batch"), "batch goes with for_each: it groups the for_each's values into requests");
        }
        if b.size == 0 {
            errs.push(format!("{cbase}.batch.size"), "must be at least 1");
        }
        for (field, q) in [("key", Some(&b.key)), ("path", b.path.as_ref())] {
            let Some(q) = q else { continue };
            if !q.starts_with('$') {
                errs.push(format!("{cbase}.batch.{field}"), "expected a JSONPath query starting with $");
            } else if let Err(e) = jsonpath_root(q) {
                errs.push(format!("{cbase}.batch.{field}"), e);
            }
        }
    }
    if let Some(c) = &call.cache {
        if method != "GET" {
            errs.push(format!("{cbase}.cache"), format!("cache is for GET calls only, not {method}"));
        }
        if c.ttl.0.is_zero() {
            errs.push(format!("{cbase}.cache.ttl"), "must be more than 0");
        }
        for (i, h) in c.vary_headers.iter().enumerate() {
            check_header_name(errs, format!("{cbase}.cache.vary_headers[{i}]"), h);
        }
    }
    if call.collapse && method != "GET" {
        errs.push(format!("{cbase}.collapse"), format!("collapse is for GET calls only, not {method}"));
    }
}

fn check_composition(errs: &mut Errors, base: &str, comp: &Composition, upstreams: &HashSet<&str>) {
    if comp.calls.is_empty() {
        errs.push(format!("{base}.calls"), "a composition needs at least one call");
    }
    let mut deps: IndexMap<&str, Vec<String>> = IndexMap::new();
    for (name, call) in &comp.calls {
        let cbase = format!("{base}.calls.{name}");
        if !is_identifier(name) {
            errs.push(cbase.clone(), format!("invalid call name {name:?}: letters, digits and _, not starting with a digit"));
        }
        if RESERVED_CALL_NAMES.contains(&name.as_str()) {
            errs.push(cbase.clone(), format!("{name:?} is reserved"));
        }
        let method = call.method.clone().unwrap_or_else(|| "GET".into());
        check_method(errs, format!("{cbase}.method"), &method);
        check_duration(errs, format!("{cbase}.timeout"), call.timeout);
        if call.retries.unwrap_or(0) > 0 && !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE") {
            errs.push(format!("{cbase}.retries"), format!("retries are allowed only for idempotent methods, not {method}"));
        }
        if call.max_concurrency == Some(0) {
            errs.push(format!("{cbase}.max_concurrency"), "must be at least 1");
        }
        if call.max_items == Some(0) {
            errs.push(format!("{cbase}.max_items"), "must be at least 1");
        }
        if call.max_body_bytes.is_some_and(|b| b.0 == 0) {
            errs.push(format!("{cbase}.max_body_bytes"), "must be more than 0");
        }
        if call.fallback.is_some() && call.required {
            // A required call's failure fails the composition: a fallback
            // would never be used.
            errs.push(format!("{cbase}.fallback"), "fallback goes with required: false (a required call that fails fails the composition)");
        }
        if call.for_each.is_none() && (call.max_concurrency.is_some() || call.max_items.is_some()) {
            errs.push(cbase.clone(), "max_concurrency and max_items apply only to a for_each call");
        }
        check_sharing(errs, &cbase, call, &method);
        let mut reads = Vec::new();
        match (&call.url, &call.upstream, &call.path) {
            (Some(url), None, None) => match split_call_url(url) {
                Ok((_, rest)) => check_call_path(errs, format!("{cbase}.url"), rest, "a url", &mut reads),
                Err(e) => errs.push(format!("{cbase}.url"), e),
            },
            (Some(_), Some(_), _) => errs.push(cbase.clone(), "a call has url, or upstream with path, not both"),
            (Some(_), None, Some(_)) => errs.push(format!("{cbase}.path"), "path goes with upstream: a url holds its own path and query"),
            (None, None, None) => errs.push(cbase.clone(), "a call needs url, or upstream with path"),
            (None, None, Some(_)) => errs.push(format!("{cbase}.path"), "path goes with upstream: name the upstream the call goes to"),
            (None, Some(upstream), path) => {
                check_upstream_ref(errs, format!("{cbase}.upstream"), upstream, upstreams);
                match path {
                    None => errs.push(format!("{cbase}.path"), "a call to an upstream needs a path, such as /users/{{request.path.id}}"),
                    Some(p) if !p.starts_with('/') => {
                        errs.push(format!("{cbase}.path"), format!("invalid path {p:?}: expected /path[?query]"))
                    }
                    Some(p) => match check_call_rest(p, "a path") {
                        Ok(()) => check_call_path(errs, format!("{cbase}.path"), p, "a path", &mut reads),
                        Err(e) => errs.push(format!("{cbase}.path"), e),
                    },
                }
            }
        }
        for (h, v) in &call.headers {
            check_call_header(errs, format!("{cbase}.headers.{h}"), h);
            reads.push(template_reads(errs, format!("{cbase}.headers.{h}"), v));
        }
        for (i, h) in call.forward_headers.iter().enumerate() {
            check_call_header(errs, format!("{cbase}.forward_headers[{i}]"), h);
        }
        for (field, query) in [("when", &call.when), ("for_each", &call.for_each)] {
            if let Some(q) = query {
                if holds_template(q) {
                    errs.push(format!("{cbase}.{field}"), not_rendered(q, None));
                } else if q.starts_with('$') {
                    reads.push(query_reads(errs, format!("{cbase}.{field}"), q, true));
                } else {
                    errs.push(format!("{cbase}.{field}"), "expected a JSONPath query starting with $");
                }
            }
        }
        if let Some(body) = &call.body {
            body_reads(errs, format!("{cbase}.body"), body, true, &mut reads);
        }
        let mut mine = Vec::new();
        for r in reads {
            for (root, certain) in r.roots {
                if comp.calls.contains_key(&root) {
                    mine.push(root);
                } else if root == "item" {
                    if call.for_each.is_none() || r.path.ends_with(".for_each") || r.path.ends_with(".when") {
                        errs.push(r.path.clone(), "`item` is only available in the url, headers and body of a for_each call");
                    } else if call.batch.is_some() {
                        errs.push(
                            r.path.clone(),
                            "a batch call sends its values as `items` (comma-joined in the url, an array in the body), not `item`",
                        );
                    }
                } else if root == "items" {
                    let place = r.path.ends_with(".url") || r.path.ends_with(".path") || r.path.contains(".body");
                    if call.batch.is_none() || !place {
                        errs.push(r.path.clone(), "`items` is only available in the url and body of a call with batch");
                    }
                } else if root != "request" && certain {
                    errs.push(r.path.clone(), unknown_call(&root, comp.calls.keys()));
                }
            }
        }
        mine.dedup();
        deps.insert(name.as_str(), mine);
    }
    if let Some(cycle) = find_cycle(&deps) {
        errs.push(format!("{base}.calls"), format!("calls depend on each other in a cycle: {}", cycle.join(" -> ")));
    }

    let Some(resp) = &comp.response else { return };
    let rbase = format!("{base}.response");
    if let Some(status) = resp.status {
        if !(100..=599).contains(&status) {
            errs.push(format!("{rbase}.status"), "expected a status from 100 to 599");
        }
    }
    if resp.body.is_some() && resp.template.is_some() {
        errs.push(rbase.clone(), "a response has body or template, not both");
    }
    if resp.content_type.is_some() && resp.template.is_none() {
        errs.push(format!("{rbase}.content_type"), "content_type goes with template (a body is always JSON)");
    }
    let mut reads = Vec::new();
    for (h, v) in &resp.headers {
        check_response_header(errs, format!("{rbase}.headers.{h}"), h);
        reads.push(template_reads(errs, format!("{rbase}.headers.{h}"), v));
    }
    for (call, names) in &resp.forward_headers {
        if !comp.calls.contains_key(call) {
            errs.push(format!("{rbase}.forward_headers.{call}"), unknown_call(call, comp.calls.keys()));
        }
        for (i, h) in names.iter().enumerate() {
            check_response_header(errs, format!("{rbase}.forward_headers.{call}[{i}]"), h);
        }
    }
    if let Some(body) = &resp.body {
        body_reads(errs, format!("{rbase}.body"), body, false, &mut reads);
    }
    if let Some(t) = &resp.template {
        reads.push(template_reads(errs, format!("{rbase}.template"), t));
    }
    for r in reads {
        for (root, certain) in r.roots {
            if certain && !comp.calls.contains_key(&root) && root != "request" {
                errs.push(r.path.clone(), unknown_call(&root, comp.calls.keys()));
            }
        }
    }
}

/// A cycle in the call graph, as the names along it, first repeated last.
fn find_cycle(deps: &IndexMap<&str, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        deps: &'a IndexMap<&str, Vec<String>>,
        marks: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(node).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Active => {
                let start = stack.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(node, Mark::Active);
        stack.push(node);
        for dep in deps.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep.as_str(), deps, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for node in deps.keys() {
        if let Some(cycle) = visit(node, deps, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The argon2 hash `previous` already holds for this consumer's username,
/// when it is a hash of `password`: reloading an unchanged file then
/// changes nothing (a new salt would make every load look like an update).
fn previous_hash(previous: Option<&Config>, consumer: &str, username: &str, password: &str) -> Option<String> {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let prev = previous?.consumers.iter().find(|c| c.name == consumer)?;
    prev.credentials.iter().find_map(|c| match c {
        Credential::BasicAuth { username: u, password_hash: Some(h), .. } if u == username => {
            let parsed = PasswordHash::new(h).ok()?;
            argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).ok().map(|()| h.clone())
        }
        _ => None,
    })
}

/// A certificate written with its `key_sha256` instead of its `key` (as an
/// admin read or a plain export shows it) keeps the key `previous` holds
/// for the same certificate name, when the digest is that key's.
pub fn restore_keys(config: &mut Config, previous: Option<&Config>) {
    let Some(previous) = previous else { return };
    for cert in config.certificates.iter_mut().filter(|c| c.key.is_none()) {
        let Some(digest) = cert.key_sha256.as_deref().map(str::to_ascii_lowercase) else { continue };
        let held = previous.certificates.iter().find(|p| p.name == cert.name).and_then(|p| p.key.as_ref());
        if let Some(key) = held.filter(|k| sha256_hex(k) == digest) {
            cert.key = Some(key.clone());
        }
    }
}

/// Replaces plain keys by SHA-256 digests and plain passwords by argon2id
/// hashes, so no secret outlives loading; a password `previous` already
/// holds keeps its hash.
pub fn hash_secrets(config: &mut Config, previous: Option<&Config>) {
    use argon2::password_hash::{PasswordHasher, SaltString};
    // Certificates keep their key (the listener serves it); the digest is
    // what reads show of it.
    for cert in &mut config.certificates {
        cert.key_sha256 = cert.key.as_deref().map(sha256_hex);
        cert.details = None;
    }
    for consumer in &mut config.consumers {
        let consumer_name = consumer.name.clone();
        for cred in &mut consumer.credentials {
            match cred {
                Credential::KeyAuth { key, key_sha256 } => {
                    if let Some(k) = key.take() {
                        *key_sha256 = Some(sha256_hex(&k));
                    } else if let Some(d) = key_sha256 {
                        *d = d.to_ascii_lowercase();
                    }
                }
                Credential::BasicAuth { username, password, password_hash } => {
                    if let Some(p) = password.take() {
                        if let Some(h) = previous_hash(previous, &consumer_name, username, &p) {
                            *password_hash = Some(h);
                            continue;
                        }
                        // A salt must be unique, not secret: 16 random bytes.
                        let Ok(salt) = SaltString::encode_b64(&fastrand::u128(..).to_le_bytes()) else {
                            continue;
                        };
                        let hash = argon2::Argon2::default().hash_password(p.as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_default();
                        *password_hash = Some(hash);
                    }
                }
                Credential::Jwt { .. } | Credential::Mtls { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod unknown_call_tests {
    use super::{unknown, unknown_call};

    #[test]
    fn suggests_a_close_call_name_only() {
        let calls = ["user".to_string(), "orders".to_string()];
        assert_eq!(unknown_call("usr", calls.iter()), "unknown call \"usr\" (did you mean \"user\"?)");
        assert_eq!(unknown_call("reqest", calls.iter()), "unknown call \"reqest\" (did you mean \"request\"?)");
        assert_eq!(unknown("upstream", "userz", ["users", "orders"].into_iter()), "unknown upstream \"userz\" (did you mean \"users\"?)");
        assert_eq!(unknown("upstream", "billing", ["users"].into_iter()), "unknown upstream \"billing\"");
        assert_eq!(unknown_call("reviews", calls.iter()), "unknown call \"reviews\"");
        assert_eq!(unknown_call("ab", calls.iter()), "unknown call \"ab\"");
    }
}
