//! `mtls-auth`: the client certificate of a TLS connection, verified
//! against the policy's CAs and mapped to a consumer by an `mtls`
//! credential's subject or SAN.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::ConsumerInfo;
use crate::server::tls::TlsConn;

/// One mtls-auth policy's trust: its CAs.
pub struct MtlsPolicy {
    /// `None`: the CAs could not be used, and every certificate is refused.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl std::fmt::Debug for MtlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MtlsPolicy")
    }
}

impl MtlsPolicy {
    /// From the policy's `ca` PEM; the error is the `ca` field's.
    pub fn new(ca_pem: &str) -> Result<MtlsPolicy, String> {
        let mut roots = RootCertStore::empty();
        for cert in crate::certs::chain(ca_pem)? {
            roots.add(cert).map_err(|e| format!("a CA certificate cannot be used: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::certs::provider())
            .build()
            .map_err(|e| format!("the CAs cannot be used: {e}"))?;
        Ok(MtlsPolicy { verifier: Some(verifier) })
    }

    /// The consumer the connection's certificate names, if it chains to
    /// this policy's CAs and some credential names its subject or a SAN.
    /// `Err` says why a certificate that was shown is refused.
    pub fn identify(&self, tls: Option<&TlsConn>, ids: &MtlsIdentities) -> Result<Option<Arc<ConsumerInfo>>, &'static str> {
        let Some(chain) = tls.and_then(|t| t.client_chain.as_deref()).filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let verifier = self.verifier.as_ref().ok_or("the policy's CAs cannot be used")?;
        verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(|_| "the certificate is not trusted")?;
        let details = crate::certs::details(&chain[0]).map_err(|_| "the certificate cannot be read")?;
        if let Some(c) = ids.by_subject.get(&normalize_subject(&details.subject)) {
            return Ok(Some(c.clone()));
        }
        details.sans.iter().find_map(|san| ids.by_san.get(san)).cloned().map(Some).ok_or("no consumer holds this certificate")
    }
}

/// `CN=a, O=b` and `cn=a,O=b` are the same subject: attribute names are
/// compared without case and spaces around commas do not count.
pub fn normalize_subject(subject: &str) -> String {
    subject
        .split(',')
        .map(|rdn| match rdn.trim().split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_uppercase(), v.trim()),
            None => rdn.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Who holds which `mtls` credential, built once per config.
#[derive(Debug, Default)]
pub struct MtlsIdentities {
    by_subject: HashMap<String, Arc<ConsumerInfo>>,
    by_san: HashMap<String, Arc<ConsumerInfo>>,
}

impl MtlsIdentities {
    pub fn add(&mut self, subject: Option<&str>, san: Option<&str>, consumer: &Arc<ConsumerInfo>) {
        if let Some(s) = subject {
            self.by_subject.entry(normalize_subject(s)).or_insert_with(|| consumer.clone());
        }
        if let Some(s) = san {
            self.by_san.entry(s.to_string()).or_insert_with(|| consumer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_subject;

    #[test]
    fn subjects_compare_without_spacing_or_attribute_case() {
        assert_eq!(normalize_subject("CN=app, O=Example"), normalize_subject("cn=app,O=Example"));
        assert_ne!(normalize_subject("CN=app"), normalize_subject("CN=App"));
    }
}
