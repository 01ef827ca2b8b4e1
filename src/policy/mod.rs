//! Policies around routes and compositions, compiled once per config and
//! run in SPEC §2's fixed phase order whatever order they are listed in.
//!
//! Enforced today: `ip-restriction`, `key-auth`, `acl`. The other types are
//! validated but not applied yet (issue 5); every node names them in its
//! log and `/status` (see `Snapshot::unenforced_policies`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::config::validate::{parse_cidr, policy_config, sha256_hex};
use crate::config::{Config, Credential, PolicyConfig, PolicyKind};
use crate::errors::{ErrorCode, GatewayError};

pub const X_CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub const X_CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// Whether the runtime applies policies of this type yet.
pub fn is_enforced(kind: PolicyKind) -> bool {
    matches!(kind, PolicyKind::IpRestriction | PolicyKind::KeyAuth | PolicyKind::Acl)
}

/// An authenticated (or anonymous) consumer.
#[derive(Debug)]
pub struct ConsumerInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// Who holds which credential, built once per config.
#[derive(Debug, Default)]
pub struct Identities {
    by_key_digest: HashMap<String, Arc<ConsumerInfo>>,
    by_name: HashMap<String, Arc<ConsumerInfo>>,
}

impl Identities {
    pub fn build(config: &Config) -> Identities {
        let mut ids = Identities::default();
        for c in &config.consumers {
            let info = Arc::new(ConsumerInfo { name: c.name.clone(), groups: c.groups.clone() });
            ids.by_name.insert(c.name.clone(), info.clone());
            for cred in &c.credentials {
                if let Credential::KeyAuth { key_sha256: Some(d), .. } = cred {
                    ids.by_key_digest.insert(d.clone(), info.clone());
                }
            }
        }
        ids
    }
}

#[derive(Debug)]
enum Compiled {
    IpRestriction { allow: Vec<IpNet>, deny: Vec<IpNet>, status: StatusCode },
    KeyAuth { names: Vec<String>, hide: bool, anonymous: Option<Arc<ConsumerInfo>> },
    Acl { allow: Option<Vec<String>>, deny: Option<Vec<String>> },
}

#[derive(Debug)]
struct Step {
    name: String,
    phase: u8,
    what: Compiled,
}

/// The policies of one route or composition, in phase order.
#[derive(Debug, Default)]
pub struct PolicyChain {
    steps: Vec<Step>,
    ids: Arc<Identities>,
}

fn phase(kind: PolicyKind) -> u8 {
    match kind {
        PolicyKind::IpRestriction => 0,
        PolicyKind::HttpsRedirect => 1,
        PolicyKind::Cors => 2,
        PolicyKind::CorrelationId => 3,
        PolicyKind::KeyAuth | PolicyKind::BasicAuth | PolicyKind::Jwt => 4,
        PolicyKind::Acl => 5,
        PolicyKind::RateLimit => 6,
        PolicyKind::RequestSizeLimit => 7,
        PolicyKind::RequestTransform => 8,
        PolicyKind::ResponseTransform => 9,
        PolicyKind::ResponseCache => 10,
    }
}

const AUTH_PHASE: u8 = 4;

impl PolicyChain {
    /// The chain for an entity with these attached policies, plus the
    /// global ones. The config is valid, so every name resolves.
    pub fn build(config: &Config, attached: &[String], ids: &Arc<Identities>) -> PolicyChain {
        let mut steps = Vec::new();
        for p in config.policies.iter().filter(|p| p.global || attached.contains(&p.name)) {
            if !is_enforced(p.kind) {
                continue;
            }
            let Ok(typed) = policy_config(p.kind, &p.config) else { continue };
            let what = match typed {
                PolicyConfig::IpRestriction(c) => Compiled::IpRestriction {
                    allow: c.allow.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    deny: c.deny.iter().filter_map(|s| parse_cidr(s).ok()).collect(),
                    status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::FORBIDDEN),
                },
                PolicyConfig::KeyAuth(c) => Compiled::KeyAuth {
                    names: c.key_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                    hide: c.hide_credentials,
                    anonymous: c.anonymous.as_ref().and_then(|a| ids.by_name.get(a).cloned()),
                },
                PolicyConfig::Acl(c) => Compiled::Acl { allow: c.allow, deny: c.deny },
                _ => continue,
            };
            steps.push(Step { name: p.name.clone(), phase: phase(p.kind), what });
        }
        steps.sort_by_key(|s| s.phase);
        PolicyChain { steps, ids: ids.clone() }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the request phases. On success, the consumer (if any) has been
    /// stamped on the headers as `X-Consumer-*`; the client's own were
    /// removed first. `query` may lose a key the credential came in.
    pub fn admit(
        &self,
        client_ip: IpAddr,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
    ) -> Result<Option<Arc<ConsumerInfo>>, GatewayError> {
        headers.remove(X_CONSUMER_NAME);
        headers.remove(X_CONSUMER_GROUPS);
        let mut consumer: Option<Arc<ConsumerInfo>> = None;
        let mut anonymous: Option<Arc<ConsumerInfo>> = None;
        let has_auth = self.steps.iter().any(|s| s.phase == AUTH_PHASE);
        let mut auth_done = false;
        for step in &self.steps {
            if step.phase > AUTH_PHASE && has_auth && !auth_done {
                // Leaving the authentication phase: someone must have been accepted.
                consumer = consumer.or(anonymous.take());
                if consumer.is_none() {
                    return Err(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid"));
                }
                auth_done = true;
            }
            match &step.what {
                Compiled::IpRestriction { allow, deny, status } => {
                    let denied =
                        deny.iter().any(|n| n.contains(&client_ip)) || (!allow.is_empty() && !allow.iter().any(|n| n.contains(&client_ip)));
                    if denied {
                        let code = match status.as_u16() {
                            401 => ErrorCode::Unauthorized,
                            404 => ErrorCode::NotFound,
                            429 => ErrorCode::RateLimited,
                            _ => ErrorCode::Forbidden,
                        };
                        tracing::debug!(policy = %step.name, %client_ip, "ip-restriction refused");
                        return Err(GatewayError::new(code, "your address is not allowed here"));
                    }
                }
                Compiled::KeyAuth { names, hide, anonymous: anon } => {
                    if consumer.is_some() {
                        continue; // an earlier method already accepted the request
                    }
                    if let Some(key) = find_key(headers, query, names, *hide) {
                        consumer = self.ids.by_key_digest.get(&sha256_hex(&key)).cloned();
                    }
                    if consumer.is_none() && anonymous.is_none() {
                        anonymous = anon.clone();
                    }
                }
                Compiled::Acl { allow, deny } => {
                    let groups = consumer.as_ref().map(|c| c.groups.as_slice()).unwrap_or(&[]);
                    let in_any = |list: &Vec<String>| list.iter().any(|g| groups.contains(g));
                    let refused = match (allow, deny) {
                        (Some(a), _) => !in_any(a),
                        (None, Some(d)) => in_any(d),
                        (None, None) => false,
                    };
                    if refused {
                        return Err(GatewayError::new(ErrorCode::Forbidden, "you are not allowed to use this route"));
                    }
                }
            }
        }
        if has_auth && !auth_done {
            consumer = consumer.or(anonymous);
            if consumer.is_none() {
                return Err(GatewayError::new(ErrorCode::Unauthorized, "credentials are missing or invalid"));
            }
        }
        if let Some(c) = &consumer {
            if let Ok(v) = HeaderValue::from_str(&c.name) {
                headers.insert(X_CONSUMER_NAME, v);
            }
            if let Ok(v) = HeaderValue::from_str(&c.groups.join(",")) {
                headers.insert(X_CONSUMER_GROUPS, v);
            }
        }
        Ok(consumer)
    }
}

/// The key from the first configured header, else query parameter; removed
/// from the request when `hide`.
fn find_key(headers: &mut HeaderMap, query: &mut Option<String>, names: &[String], hide: bool) -> Option<String> {
    for name in names {
        if let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string) {
            if hide {
                headers.remove(name.as_str());
            }
            return Some(v);
        }
    }
    let q = query.as_deref()?;
    for name in names {
        let mut found = None;
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if found.is_none() && k == name {
                    found = Some(crate::compose::context::percent_decode(v, true));
                    return !hide;
                }
                true
            })
            .collect();
        if let Some(key) = found {
            if hide {
                *query = if kept.is_empty() { None } else { Some(kept.join("&")) };
            }
            return Some(key);
        }
    }
    None
}

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let peer = unmap(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .collect();
    for hop in hops.into_iter().rev() {
        let hop = unmap(hop);
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    // An IPv4 address seen as IPv4-mapped IPv6 is the same client.
    unmap(client)
}
