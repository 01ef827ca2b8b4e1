//! Consumers as the policies see them: who holds which credential, built
//! once per config.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::{jwt, mtls};
use crate::config::{Config, Credential};

pub const X_CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub const X_CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// An authenticated (or anonymous) consumer.
#[derive(Debug)]
pub struct ConsumerInfo {
    pub name: String,
    pub groups: Vec<String>,
    /// `X-Consumer-Name` and `X-Consumer-Groups`, made once per config.
    pub(super) name_header: Option<HeaderValue>,
    pub(super) groups_header: Option<HeaderValue>,
    /// This consumer's rate-limit bucket (`by: consumer`).
    pub(super) limit_key: String,
}

impl ConsumerInfo {
    pub fn new(name: &str, groups: &[String]) -> ConsumerInfo {
        ConsumerInfo {
            name: name.to_string(),
            groups: groups.to_vec(),
            name_header: HeaderValue::from_str(name).ok(),
            groups_header: HeaderValue::from_str(&groups.join(",")).ok(),
            limit_key: format!("c:{name}"),
        }
    }
}

/// Who holds which credential, built once per config.
#[derive(Debug, Default)]
pub struct Identities {
    /// SHA-256 of each API key (the config holds them in hex).
    pub(super) by_key_digest: HashMap<[u8; 32], Arc<ConsumerInfo>>,
    pub(super) by_name: HashMap<String, Arc<ConsumerInfo>>,
    /// basic-auth username -> consumer and argon2 hash.
    pub(super) by_username: HashMap<String, (Arc<ConsumerInfo>, Arc<str>)>,
    /// jwt issuer -> consumer, algorithm and key.
    pub(super) by_issuer: HashMap<String, jwt::IssuerKey>,
    pub(super) mtls: mtls::MtlsIdentities,
}

impl Identities {
    /// The consumers by name only, without their credentials: what a
    /// policy's compile needs (its `anonymous` consumer). Credentials come
    /// when the policies are bound ([`Identities::build`]).
    pub fn names(config: &Config) -> Identities {
        let mut ids = Identities::default();
        for c in &config.consumers {
            ids.by_name.insert(c.name.clone(), Arc::new(ConsumerInfo::new(&c.name, &c.groups)));
        }
        ids
    }

    pub fn build(config: &Config) -> Identities {
        let mut ids = Identities::default();
        for c in &config.consumers {
            let info = Arc::new(ConsumerInfo::new(&c.name, &c.groups));
            ids.by_name.insert(c.name.clone(), info.clone());
            for cred in &c.credentials {
                match cred {
                    Credential::KeyAuth { key_sha256: Some(d), .. } => {
                        let mut digest = [0u8; 32];
                        if hex::decode_to_slice(d, &mut digest).is_ok() {
                            ids.by_key_digest.insert(digest, info.clone());
                        }
                    }
                    Credential::BasicAuth { username, password_hash: Some(h), .. } => {
                        ids.by_username.entry(username.clone()).or_insert_with(|| (info.clone(), Arc::from(h.as_str())));
                    }
                    Credential::Jwt { issuer, algorithm, secret, public_key } => {
                        if let Ok((algorithm, key)) = jwt::decoding_key(algorithm, secret.as_deref(), public_key.as_deref()) {
                            ids.by_issuer.entry(issuer.clone()).or_insert(jwt::IssuerKey { consumer: info.clone(), algorithm, key });
                        }
                    }
                    Credential::Mtls { subject, san } => ids.mtls.add(subject.as_deref(), san.as_deref(), &info),
                    _ => {}
                }
            }
        }
        ids
    }
}
