//! Secrets in the config are write-only: JWT `secret`s, basic-auth
//! `password_hash`es and key-auth `key_sha256` digests are stored and
//! served whole, but every read shows them redacted, as
//! `sha256:<the first 12 hex digits of the SHA-256 of the stored value>`:
//! admin reads, lists, `/audit`, `manifold export`. Only
//! `GET /config?include_secrets=true` (`export --include-secrets`) and the
//! node's own snapshot file hold the real values, so a backup restores.
//!
//! A write that sends a redacted value back (a config exported without its
//! secrets, edited and synced) keeps the stored value whose redaction it
//! is ([`restore`]); a redacted value that matches no stored secret is a
//! validation error, never stored as if it were the secret.
//!
//! [`redact_config`] and [`redact_entity`] are the one place a kind of
//! secret is listed: another kind (a certificate's private key) joins there.
//!
//! On load, [`hash_secrets`] replaces plain keys by their SHA-256 digest
//! and plain passwords by an argon2id hash (kept from the previous config
//! when it is the same password), and [`restore_keys`] gives back a
//! certificate written with its `key_sha256` the key it is the digest of.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Config, Credential};

const PREFIX: &str = "sha256:";
const SHOWN_HEX: usize = 12;

/// A certificate written with a `key_sha256` that matches no key this
/// gateway holds (config validation): as [`UNMATCHED`], the gateway's to judge.
pub const KEY_UNMATCHED: &str = "missing: key_sha256 matches no key this gateway holds for this certificate (write the key itself)";
/// What a write that holds a redacted value matching no stored secret is told.
pub const UNMATCHED: &str = "a redacted value (sha256:...) that matches no stored secret: send the value itself";

/// The redacted form of a stored secret.
pub fn redact(value: &str) -> String {
    format!("{PREFIX}{}", &sha256_hex(value)[..SHOWN_HEX])
}

/// Whether `value` is a redaction (and so never a secret of its own).
pub fn is_redacted(value: &str) -> bool {
    value.strip_prefix(PREFIX).is_some_and(|h| h.len() == SHOWN_HEX && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The credential fields that hold a secret, in the stored form and in the
/// plain form a file may hold. The JSON walk and the typed one both use it.
const CREDENTIAL_SECRETS: [&str; 5] = ["secret", "password_hash", "key_sha256", "password", "key"];

/// The secret fields of one credential, by name.
fn secrets_mut(credential: &mut Credential) -> Vec<(&'static str, &mut Option<String>)> {
    match credential {
        Credential::KeyAuth { key, key_sha256 } => vec![("key", key), ("key_sha256", key_sha256)],
        Credential::BasicAuth { password, password_hash, .. } => vec![("password", password), ("password_hash", password_hash)],
        Credential::Jwt { secret, .. } => vec![("secret", secret)],
        // A subject or SAN names a certificate; it is no secret.
        Credential::Mtls { .. } => Vec::new(),
    }
}

/// The secret fields of one credential that hold a redaction.
pub fn redacted_fields(credential: &Credential) -> Vec<&'static str> {
    let mut c = credential.clone();
    secrets_mut(&mut c).into_iter().filter(|(_, v)| v.as_deref().is_some_and(is_redacted)).map(|(name, _)| name).collect()
}

/// Replaces every secret of `config` by its redaction; a certificate's
/// private key goes (its `key_sha256`, set on load, stays).
pub fn redact_config(config: &mut Config) {
    for certificate in &mut config.certificates {
        if let Some(key) = certificate.key.take() {
            certificate.key_sha256.get_or_insert_with(|| crate::certs::key_digest(&key));
        }
    }
    for consumer in &mut config.consumers {
        for credential in &mut consumer.credentials {
            for (_, value) in secrets_mut(credential) {
                if let Some(v) = value {
                    if !is_redacted(v) {
                        *v = redact(v);
                    }
                }
            }
        }
    }
}

/// Replaces every secret of one entity of `kind` (`consumers`...), as the
/// admin API and the store hold it in JSON, by its redaction.
pub fn redact_entity(kind: &str, entity: &mut Value) {
    if kind == "certificates" {
        // A private key is shown as its digest (certs.rs).
        return crate::certs::redact_entity(entity);
    }
    if kind != "consumers" {
        return;
    }
    let Some(credentials) = entity.get_mut("credentials").and_then(Value::as_array_mut) else {
        return;
    };
    for credential in credentials.iter_mut().filter_map(Value::as_object_mut) {
        for field in CREDENTIAL_SECRETS {
            if let Some(Value::String(v)) = credential.get_mut(field) {
                if !is_redacted(v) {
                    *v = redact(v);
                }
            }
        }
    }
}

/// Puts back, for every redacted secret of `config`, the value of
/// `previous` (the config being replaced) it is the redaction of. Those
/// that match none stay, for validation to refuse ([`UNMATCHED`]).
pub fn restore(config: &mut Config, previous: Option<&Config>) {
    // Certificates written with their key_sha256 only keep their key too.
    restore_keys(config, previous);
    let Some(previous) = previous else { return };
    for consumer in &mut config.consumers {
        // The consumer's own credentials first: a secret moved to another
        // consumer is found too.
        let own = previous.consumers.iter().filter(|c| c.name == consumer.name);
        let others = previous.consumers.iter().filter(|c| c.name != consumer.name);
        let stored: Vec<Credential> = own.chain(others).flat_map(|c| c.credentials.iter().cloned()).collect();
        for credential in &mut consumer.credentials {
            for (field, value) in secrets_mut(credential) {
                let Some(v) = value.as_mut().filter(|v| is_redacted(v)) else { continue };
                let found = stored.iter().find_map(|c| {
                    let mut c = c.clone();
                    secrets_mut(&mut c)
                        .into_iter()
                        .find(|(f, s)| *f == field && s.as_deref().is_some_and(|s| redact(s) == *v))
                        .and_then(|(_, s)| s.clone())
                });
                if let Some(real) = found {
                    *v = real;
                }
            }
        }
    }
}

/// The SHA-256 digest of `data`, as lowercase hex: a key-auth key's
/// `key_sha256`, a certificate key's digest, a wasm module's
/// `module_sha256`.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    hex::encode(Sha256::digest(data.as_ref()))
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
mod tests {
    use super::*;

    fn config() -> Config {
        crate::config::load::config_from_text(
            r#"
consumers:
  - name: app
    credentials:
      - { type: jwt, issuer: app, algorithm: HS256, secret: s3cret }
      - { type: basic-auth, username: u, password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA" }
      - { type: key-auth, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }
routes:
  - { name: r, path: /r, upstream: "http://127.0.0.1:1" }
"#,
            crate::config::Format::Yaml,
        )
        .unwrap()
        .into_config()
    }

    #[test]
    fn redactions() {
        assert_eq!(redact("s3cret"), format!("sha256:{}", &sha256_hex("s3cret")[..12]));
        assert!(is_redacted(&redact("x")));
        for not in ["sha256:", "sha256:0123456789ab0", "sha256:0123456789AB", "s3cret", "sha256:0123456789a"] {
            assert!(!is_redacted(not), "{not}");
        }
    }

    #[test]
    fn the_typed_and_the_json_walks_agree_and_hide_every_secret() {
        let plain = config();
        let mut typed = plain.clone();
        redact_config(&mut typed);
        let mut json = serde_json::to_value(&plain.consumers[0]).unwrap();
        redact_entity("consumers", &mut json);
        assert_eq!(serde_json::to_value(&typed.consumers[0]).unwrap(), json);
        let text = serde_json::to_string(&typed).unwrap();
        for secret in ["s3cret", "$argon2id", "9f86d081884c7d659a2f"] {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
        // Redacting twice changes nothing.
        let mut again = typed.clone();
        redact_config(&mut again);
        assert_eq!(again, typed);
        // Other kinds pass as they are.
        let mut route = serde_json::to_value(&plain.routes[0]).unwrap();
        let before = route.clone();
        redact_entity("routes", &mut route);
        assert_eq!(route, before);
    }

    #[test]
    fn a_redaction_sent_back_restores_the_stored_value() {
        let stored = config();
        let mut sent = stored.clone();
        redact_config(&mut sent);
        restore(&mut sent, Some(&stored));
        assert_eq!(sent, stored);
        // Without a stored config, or with another secret, it stays.
        let mut sent = stored.clone();
        redact_config(&mut sent);
        let redacted = sent.clone();
        restore(&mut sent, None);
        assert_eq!(sent, redacted);
        let mut other = stored.clone();
        if let Credential::Jwt { secret, .. } = &mut other.consumers[0].credentials[0] {
            *secret = Some("another".into());
        }
        restore(&mut sent, Some(&other));
        assert_eq!(redacted_fields(&sent.consumers[0].credentials[0]), ["secret"]);
        assert!(redacted_fields(&sent.consumers[0].credentials[1]).is_empty());
    }
}
