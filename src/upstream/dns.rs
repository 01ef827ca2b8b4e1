//! DNS for upstreams with `resolve_every`: each target whose host is a name
//! stands for every address the name resolves to, re-resolved on that
//! period (and soon after a connect failure to one of them), off the
//! request path, on the control runtime. Addresses that come and go join
//! and leave the pool without a config change; a failed resolution keeps
//! the last good addresses.
//!
//! Names are looked up in the node's hosts file first (`--hosts-file`,
//! hosts(5) format, read at every resolution) and then by the system's
//! resolver.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use super::balance::{Target, UpstreamPlan};
use super::health::{HealthPolicy, Registry};
use super::Connector;

/// One target as written in the config, for a plan whose names resolve.
#[derive(Debug, Clone)]
pub struct Source {
    pub scheme: Scheme,
    /// The host as written (a name, or an IP address kept as it is).
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl Source {
    pub fn new(scheme: Scheme, authority: &Authority, weight: u32) -> Source {
        let port = authority.port_u16().unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
        Source { scheme, host: authority.host().to_string(), port, weight }
    }

    pub fn is_name(&self) -> bool {
        self.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_err()
    }

    /// `host:port` as written: the `Host` header and the TLS name.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority())
    }
}

/// What a plan resolves: its sources and how often.
#[derive(Debug)]
pub struct Resolution {
    pub sources: Vec<Source>,
    pub every: Duration,
}

/// The addresses of `host`: the hosts file's when it names the host, else
/// the system resolver's. Sorted, without duplicates.
pub async fn resolve(hosts_file: Option<&Path>, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
    if let Some(path) = hosts_file {
        // Unreadable (being rewritten, removed): the system's resolver.
        if let Ok(text) = tokio::fs::read_to_string(path).await {
            let found = from_hosts(&text, host);
            if !found.is_empty() {
                return Ok(found);
            }
        }
    }
    let addrs: BTreeSet<IpAddr> = tokio::net::lookup_host((host, port)).await?.map(|a| a.ip()).collect();
    Ok(addrs.into_iter().collect())
}

/// The addresses hosts(5) text gives `host` (names compared without case).
pub fn from_hosts(text: &str, host: &str) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(addr) = words.next().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
        if words.any(|w| w.eq_ignore_ascii_case(host)) {
            out.insert(addr);
        }
    }
    out.into_iter().collect()
}

/// The targets of `sources` given each name's addresses (`None`: not
/// resolved yet, and then the name is one target the system resolves at
/// connect time). States come from the registry, keyed by name and address,
/// so an address that stays keeps its health.
pub fn targets(
    upstream: &str,
    sources: &[Source],
    addresses: &dyn Fn(&Source) -> Option<Vec<IpAddr>>,
    registry: Option<&Registry>,
    health: Option<&HealthPolicy>,
    base: Option<&Arc<Connector>>,
    own_server_name: bool,
) -> Vec<Target> {
    let mut out = Vec::new();
    for s in sources {
        let state = |label: &str| match registry {
            Some(r) => r.state(upstream, label, health),
            None => Arc::default(),
        };
        // An https name needs a connector to check its certificate for
        // the name: without one, it stays one target.
        let resolved = if s.is_name() && (s.scheme != Scheme::HTTPS || own_server_name || base.is_some()) { addresses(s) } else { None };
        match resolved {
            Some(ips) if !ips.is_empty() => {
                for ip in ips {
                    let addr = SocketAddr::new(ip, s.port);
                    let Ok(authority) = addr.to_string().parse::<Authority>() else { continue };
                    let label = format!("{} ({ip})", s.url());
                    let mut t = Target::with_state(s.scheme.clone(), authority, s.weight, state(&label));
                    t.label = label.into();
                    if let Ok(host) = HeaderValue::from_str(&s.authority()) {
                        t.host = host;
                    }
                    // The certificate is checked for the name, not the address.
                    if s.scheme == Scheme::HTTPS && !own_server_name {
                        t.connector = base.and_then(|b| b.with_server_name(&s.host)).map(Arc::new);
                    }
                    out.push(t);
                }
            }
            _ => {
                let Ok(authority) = s.authority().parse::<Authority>() else { continue };
                let label = s.url();
                let st = state(&label);
                out.push(Target::with_state(s.scheme.clone(), authority, s.weight, st));
            }
        }
    }
    out
}

/// What a resolver task needs besides its plan.
pub struct ResolverContext {
    pub hosts_file: Option<PathBuf>,
    pub registry: Weak<Registry>,
    /// The node's connector (for https names of upstreams without `tls`).
    pub connector: Arc<Connector>,
}

/// Keeps `plan`'s targets equal to what its names resolve to, until the
/// plan is in no live config.
pub async fn run(plan: Weak<UpstreamPlan>, cx: ResolverContext) {
    // At most one early resolution (after connect failures) per this long.
    const EARLY_AT_MOST_EVERY: Duration = Duration::from_secs(1);
    let mut last: Option<Vec<(String, Vec<IpAddr>)>> = None;
    // Names whose last resolution failed: said once when it starts failing
    // and once when it resolves again, not every period.
    let mut failing: std::collections::HashSet<String> = Default::default();
    let Some(early) = plan.upgrade().map(|p| p.resolve_now.clone()) else { return };
    loop {
        let Some(p) = plan.upgrade() else { return };
        let Some(res) = p.resolution.as_ref() else { return };
        let every = res.every;
        let names: Vec<Source> = res.sources.iter().filter(|s| s.is_name()).cloned().collect();
        drop(p);
        let mut now: Vec<(String, Vec<IpAddr>)> = Vec::new();
        for s in &names {
            let key = s.authority();
            let upstream = || plan.upgrade().and_then(|p| p.name.clone()).unwrap_or_else(|| "".into());
            match resolve(cx.hosts_file.as_deref(), &s.host, s.port).await {
                Ok(ips) if !ips.is_empty() => {
                    if failing.remove(&key) {
                        tracing::info!(upstream = %upstream(), host = %s.host, "a target's name resolves again");
                    }
                    now.push((key, ips));
                }
                outcome => {
                    // Keep the last good addresses of this name.
                    let kept = last.as_ref().and_then(|l| l.iter().find(|(k, _)| *k == key).cloned());
                    if failing.insert(key.clone()) {
                        let why = match &outcome {
                            Ok(_) => "no addresses".to_string(),
                            Err(e) => e.to_string(),
                        };
                        match &kept {
                            Some(k) => {
                                tracing::warn!(upstream = %upstream(), host = %s.host, error = %why, "cannot resolve a target's name: keeping its last {} addresses", k.1.len())
                            }
                            None => {
                                tracing::warn!(upstream = %upstream(), host = %s.host, error = %why, "cannot resolve a target's name: it stays one target, resolved when a connection is opened")
                            }
                        }
                    }
                    if let Some(k) = kept {
                        now.push(k);
                    }
                }
            }
        }
        let Some(p) = plan.upgrade() else { return };
        if last.as_ref() != Some(&now) {
            let registry = cx.registry.upgrade();
            let lookup = |s: &Source| now.iter().find(|(k, _)| *k == s.authority()).map(|(_, ips)| ips.clone());
            let res = p.resolution.as_ref().expect("checked above");
            let base = p.connector.clone().unwrap_or_else(|| cx.connector.clone());
            let base = Some(&base);
            let own_name = p.own_server_name;
            let upstream = p.name.as_deref().unwrap_or("");
            let targets = targets(upstream, &res.sources, &lookup, registry.as_deref(), p.health.as_deref(), base, own_name);
            if last.is_some() || !now.is_empty() {
                let list: Vec<String> = now.iter().map(|(k, ips)| format!("{k} → {ips:?}")).collect();
                tracing::info!(upstream, addresses = %list.join("; "), "upstream targets resolved");
            }
            if let Some(r) = registry.as_deref() {
                for (k, ips) in &now {
                    r.remember(upstream, k, ips);
                }
            }
            p.replace_targets(targets);
            if let Some(r) = registry.as_deref() {
                super::health::start_checks(r, &p);
            }
            last = Some(now);
        }
        drop(p);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = early.notified() => tokio::time::sleep(EARLY_AT_MOST_EVERY).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_text_gives_every_address_of_a_name() {
        let text = "127.0.0.1 localhost\n# 10.0.0.9 users\n10.0.0.1 users users.internal\n10.0.0.2\tUSERS # b\n::1 users\nbad users\n";
        let got = from_hosts(text, "users");
        let want: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "::1"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(got, want);
        assert!(from_hosts(text, "orders").is_empty());
    }

    #[test]
    fn names_expand_and_addresses_keep_their_own_host() {
        let connector = Arc::new(Connector::new(&Default::default()).unwrap());
        let sources = vec![
            Source { scheme: Scheme::HTTP, host: "users.internal".into(), port: 8080, weight: 50 },
            Source { scheme: Scheme::HTTP, host: "10.0.0.7".into(), port: 80, weight: 100 },
        ];
        let ips = |s: &Source| (s.host == "users.internal").then(|| vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()]);
        let t = targets("u", &sources, &ips, None, None, Some(&connector), false);
        let shown: Vec<(String, String, u32)> =
            t.iter().map(|t| (t.authority.to_string(), t.host.to_str().unwrap().to_string(), t.weight)).collect();
        assert_eq!(
            shown,
            [
                ("10.0.0.1:8080".to_string(), "users.internal:8080".to_string(), 50),
                ("[::1]:8080".to_string(), "users.internal:8080".to_string(), 50),
                ("10.0.0.7:80".to_string(), "10.0.0.7:80".to_string(), 100),
            ]
        );
        // Not resolved yet: the name is one target.
        let none = |_: &Source| None;
        let t = targets("u", &sources, &none, None, None, Some(&connector), false);
        assert_eq!(t[0].authority.as_str(), "users.internal:8080");
    }
}
