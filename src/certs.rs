//! Certificates: the TLS listener's (the `certificates` entities and the
//! default one of `--tls-cert`) and the client certificates `mtls-auth`
//! reads. PEM parsing, the check that a key belongs to its certificate,
//! what admin reads show of one instead of its key (subject, SANs, expiry),
//! and the SNI table the listener's resolver looks names up in.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value};

/// The crypto every TLS piece of the node uses: rustls on ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain from PEM, the first certificate first.
pub fn chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) found".into());
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c).map_err(|e| format!("certificate {} of the chain cannot be parsed: {e}", i + 1))?;
    }
    Ok(certs)
}

/// Which field a certificate's error is at: `cert` or `key`.
#[derive(Debug, PartialEq, Eq)]
pub enum CertField {
    Cert,
    Key,
}

/// The certificate and key ready to serve, once the key was found to be
/// the certificate's own.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, (CertField, String)> {
    let chain = chain(cert_pem).map_err(|e| (CertField::Cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| (CertField::Key, format!("not a PEM private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| (CertField::Key, format!("the private key cannot be used (RSA, ECDSA P-256/P-384 or Ed25519): {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err((CertField::Key, "the private key does not belong to the certificate (the first of cert)".into()))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err((CertField::Cert, format!("the certificate cannot be read: {e}"))),
    }
}

/// What a certificate says about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Details {
    /// RFC 4514 order as x509-parser prints it: `CN=app, O=example`.
    pub subject: String,
    /// Subject alternative names as text: DNS names, URIs, emails, IPs.
    pub sans: Vec<String>,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    pub not_before: i64,
}

pub fn details(der: &[u8]) -> Result<Details, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(d.to_string()),
                GeneralName::URI(u) => sans.push(u.to_string()),
                GeneralName::RFC822Name(e) => sans.push(e.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string()),
                    16 => sans.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(Details {
        subject: cert.subject().to_string(),
        sans,
        not_after: cert.validity().not_after.timestamp(),
        not_before: cert.validity().not_before.timestamp(),
    })
}

/// The SHA-256 of a private key's PEM, as admin reads show it.
pub fn key_digest(key_pem: &str) -> String {
    crate::config::secrets::sha256_hex(key_pem)
}

fn rfc3339(unix: i64) -> String {
    // Days-from-civil (Howard Hinnant's algorithm), to print a UTC time
    // without a date crate for one field.
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A `certificates` entity as admin reads, the audit log and diffs show it:
/// `key` goes (its `key_sha256` stays), and `details` tells the
/// certificate's subject, SANs and expiry.
pub fn redact_entity(entity: &mut Value) {
    let Some(map) = entity.as_object_mut() else { return };
    if let Some(key) = map.remove("key") {
        if !map.contains_key("key_sha256") {
            if let Some(k) = key.as_str() {
                map.insert("key_sha256".into(), Value::String(key_digest(k)));
            }
        }
    }
    let shown = map.get("cert").and_then(Value::as_str).and_then(|pem| chain(pem).ok()).and_then(|c| details(&c[0]).ok());
    if let Some(d) = shown {
        map.insert(
            "details".into(),
            json!({ "subject": d.subject, "sans": d.sans, "not_before": rfc3339(d.not_before), "not_after": rfc3339(d.not_after) }),
        );
    }
}

/// [`redact_entity`] for every certificate of a whole config as JSON.
pub fn redact_config(config: &mut Value) {
    if let Some(list) = config.get_mut("certificates").and_then(Value::as_array_mut) {
        list.iter_mut().for_each(redact_entity);
    }
}

/// A certificate ready to serve.
#[derive(Debug)]
pub struct Served {
    /// The entity's name, or `default` for `--tls-cert`.
    pub name: String,
    pub key: Arc<CertifiedKey>,
    pub not_after: i64,
}

impl Served {
    pub fn new(name: &str, cert_pem: &str, key_pem: &str) -> Result<Served, (CertField, String)> {
        let key = certified_key(cert_pem, key_pem)?;
        let not_after = details(&key.cert[0]).map_err(|e| (CertField::Cert, e))?.not_after;
        Ok(Served { name: name.to_string(), key: Arc::new(key), not_after })
    }
}

/// The certificates of one config by server name: exact names, and
/// `*.domain` wildcards that match one label under `domain`.
#[derive(Debug, Default)]
pub struct SniTable {
    exact: HashMap<String, Arc<Served>>,
    wildcard: HashMap<String, Arc<Served>>,
    pub all: Vec<Arc<Served>>,
}

impl SniTable {
    /// Built from a validated config; a certificate that does not load is
    /// an error at its field (validation found none, unless it changed).
    pub fn compile(certs: &[crate::config::Certificate]) -> Result<SniTable, Vec<(String, String)>> {
        let mut table = SniTable::default();
        let mut errors = Vec::new();
        for c in certs {
            let base = format!("certificates.{}", c.name);
            let served = match Served::new(&c.name, &c.cert, c.key.as_deref().unwrap_or("")) {
                Ok(s) => Arc::new(s),
                Err((field, e)) => {
                    errors.push((format!("{base}.{}", if field == CertField::Cert { "cert" } else { "key" }), e));
                    continue;
                }
            };
            for sni in &c.snis {
                let sni = sni.to_ascii_lowercase();
                match sni.strip_prefix("*.") {
                    Some(domain) => table.wildcard.insert(domain.to_string(), served.clone()),
                    None => table.exact.insert(sni, served.clone()),
                };
            }
            table.all.push(served);
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// The certificate for `sni`: an exact name first, then a wildcard of
    /// its parent domain.
    pub fn find(&self, sni: &str) -> Option<&Arc<Served>> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        self.exact.get(&sni).or_else(|| sni.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)))
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn prints_utc_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
