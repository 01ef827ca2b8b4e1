//! Every check a config passes before it is accepted, whatever its source
//! (files, `POST /config`, later the database). All errors are collected.
//!
//! This module holds the entry points ([`validate`], [`warnings`]...), the
//! error collector, the checks of routes, consumers, policies and
//! certificates, and the small checks every entity shares (names, tags,
//! methods, header names, durations, hosts, policy references). Upstreams
//! are checked in `upstreams.rs`, compositions and their calls in
//! `compositions.rs`.

mod compositions;
mod upstreams;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::load::Origins;
use super::model::*;
use super::pattern::{parse_rewrite, PathPattern};
use super::secrets::sha256_hex;
use super::units::Dur;
use super::ConfigError;
use crate::policy::compile::PolicyPlan;
use compositions::check_composition;
pub use compositions::split_call_url;
use upstreams::{check_upstream_entity, check_upstream_ref};

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

/// Whether a string holds a `{{...}}` expression.
fn holds_template(text: &str) -> bool {
    text.find("{{").is_some_and(|open| text[open + 2..].contains("}}"))
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
