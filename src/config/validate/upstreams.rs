//! The checks of an upstream entity (targets, balancing, health checks,
//! retries, circuit breaker, TLS) and of a reference to one by name.

use std::collections::HashSet;

use super::compositions::unknown;
use super::{check_duration, check_header_name, check_host, check_name, check_tags, holds_template, is_valid_name, Errors};
use crate::config::model::{Balance, StatusSpec, Upstream};
use crate::config::units::Percent;

/// `upstream: NAME` of a route or a call: a known upstream.
pub(super) fn check_upstream_ref(errs: &mut Errors, path: String, name: &str, upstreams: &HashSet<&str>) {
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

fn check_percent(errs: &mut Errors, path: String, p: Option<Percent>) {
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

pub(super) fn check_upstream_entity(errs: &mut Errors, upstream: &Upstream) {
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
