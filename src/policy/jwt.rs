//! The `jwt` policy: tokens verified with the key of the consumer their
//! `iss` names, or with a key from a JWK Set fetched off the request path.
//!
//! The algorithm is never the token's choice: a consumer's credential names
//! one, and a JWK's key type (and `alg`, when it has one) fixes it, so
//! `alg: none` and the HS/RS confusion (an HMAC made with a public key)
//! never verify.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::ConsumerInfo;

/// How often a JWK Set is fetched again while all goes well.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// The least time between two fetches of one set (an unknown `kid`
/// asks for one early, but cannot make the gateway hammer the server).
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// A JWK Set bigger than this is refused.
const JWKS_MAX_BYTES: usize = 1 << 20;

/// The key a credential's algorithm and key text describe.
pub fn decoding_key(algorithm: &str, secret: Option<&str>, public_key: Option<&str>) -> Result<(Algorithm, Option<DecodingKey>), String> {
    let alg = Algorithm::from_str(algorithm).map_err(|_| format!("unknown algorithm {algorithm:?}"))?;
    let key = match (alg, secret, public_key) {
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, Some(s), _) => Some(DecodingKey::from_secret(s.as_bytes())),
        (Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512, _, Some(pem)) => {
            Some(DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| format!("not an RSA public key in PEM: {e}"))?)
        }
        (Algorithm::ES256 | Algorithm::ES384, _, Some(pem)) => {
            Some(DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("not an EC public key in PEM: {e}"))?)
        }
        (Algorithm::EdDSA, _, Some(pem)) => {
            Some(DecodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| format!("not an Ed25519 public key in PEM: {e}"))?)
        }
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, None, _) => return Err(format!("{algorithm} needs a secret")),
        (Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512, _, _) => return Err(format!("unsupported algorithm {algorithm:?}")),
        (_, _, None) => None,
    };
    Ok((alg, key))
}

/// One consumer's jwt credential.
#[derive(Clone)]
pub struct IssuerKey {
    pub consumer: Arc<ConsumerInfo>,
    pub algorithm: Algorithm,
    /// `None`: only a policy's JWKS can verify this issuer's tokens.
    pub key: Option<DecodingKey>,
}

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKey").field("consumer", &self.consumer.name).field("algorithm", &self.algorithm).finish()
    }
}

/// A compiled `jwt` policy.
#[derive(Debug)]
pub struct JwtPolicy {
    pub header: http::HeaderName,
    pub query_param: Option<String>,
    pub verify_exp: bool,
    pub verify_nbf: bool,
    pub leeway: u64,
    pub jwks: Option<Arc<JwksEntry>>,
}

/// Why a token was refused (logged at debug, never shown to the client).
pub type Rejection = &'static str;

impl JwtPolicy {
    /// The token from the header (`Bearer x`, or the bare value of a
    /// header other than Authorization) or the query parameter.
    pub fn find_token(&self, headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
        if let Some(v) = headers.get(&self.header).and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            let token = match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                Some(_) => return None,
                None if self.header == http::header::AUTHORIZATION => return None,
                None => v,
            };
            return Some(token.to_string());
        }
        let name = self.query_param.as_deref()?;
        query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| crate::compose::context::percent_decode(v, true))
        })
    }

    /// Verifies `token`; the consumer and the token's claims on success.
    pub fn verify(&self, token: &str, issuers: &HashMap<String, IssuerKey>) -> Result<(Arc<ConsumerInfo>, Value), Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token or unsupported algorithm")?;
        let iss = unverified_issuer(token).ok_or("the token has no iss claim")?;
        let issuer = issuers.get(&iss).ok_or("unknown issuer")?;
        // An issuer with a key of its own is checked with it; the policy's
        // JWKS vouches only for issuers configured without one.
        let (algorithm, key) = match (&issuer.key, &self.jwks) {
            (Some(key), _) => (issuer.algorithm, key.clone()),
            (None, Some(jwks)) => jwks.key_for(header.kid.as_deref(), header.alg)?,
            (None, None) => return Err("this issuer's key comes from a JWKS, and this policy has none"),
        };
        if header.alg != algorithm || issuer.algorithm != algorithm {
            return Err("the token's algorithm is not the one configured");
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway;
        validation.validate_exp = self.verify_exp;
        validation.validate_nbf = self.verify_nbf;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        if self.verify_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        if self.verify_nbf {
            validation.required_spec_claims.insert("nbf".into());
        }
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => "the token is not valid yet",
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_) => "the token lacks a claim to verify",
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad signature",
            _ => "the token does not verify",
        })?;
        Ok((issuer.consumer.clone(), data.claims))
    }
}

/// The `iss` of a token, read before the signature is checked only to
/// pick the key that checks it.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()?.get("iss")? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The keys of one JWK Set URL, kept fresh by [`JwksStore::run`].
pub struct JwksEntry {
    pub url: String,
    keys: ArcSwap<HashMap<String, (DecodingKey, Option<Algorithm>)>>,
    fetched: AtomicBool,
    /// Millis since the store's epoch of the last fetch attempt; 0 = never.
    last_attempt: AtomicU64,
    last_success: AtomicU64,
    wanted: AtomicBool,
}

impl std::fmt::Debug for JwksEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksEntry").field("url", &self.url).finish_non_exhaustive()
    }
}

impl JwksEntry {
    fn key_for(&self, kid: Option<&str>, token_alg: Algorithm) -> Result<(Algorithm, DecodingKey), Rejection> {
        let keys = self.keys.load();
        let found = match kid {
            Some(kid) => keys.get(kid),
            // Without a kid, only a set of one key is unambiguous.
            None if keys.len() == 1 => keys.values().next(),
            None => None,
        };
        let Some((key, alg)) = found else {
            // Keys may have rotated: fetch again soon (rate-limited).
            self.wanted.store(true, Ordering::Relaxed);
            return Err(if self.fetched.load(Ordering::Relaxed) { "unknown kid" } else { "the JWKS has not been fetched yet" });
        };
        // A key without `alg` fixes only its family; the decode step
        // refuses an algorithm of another family (no HS with an RSA key).
        let alg = alg.unwrap_or(token_alg);
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err("symmetric keys from a JWKS are not accepted");
        }
        Ok((alg, key.clone()))
    }
}

/// Every JWK Set URL the running configs use, and the task refreshing them.
pub struct JwksStore {
    entries: Mutex<HashMap<String, Arc<JwksEntry>>>,
    epoch: Instant,
    wake: tokio::sync::Notify,
}

impl Default for JwksStore {
    fn default() -> Self {
        JwksStore { entries: Mutex::default(), epoch: Instant::now(), wake: tokio::sync::Notify::new() }
    }
}

impl JwksStore {
    /// The entry for `url`, created (and fetched soon) if new.
    pub fn entry(&self, url: &str) -> Arc<JwksEntry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(url.to_string()).or_insert_with(|| {
            Arc::new(JwksEntry {
                url: url.to_string(),
                keys: ArcSwap::from_pointee(HashMap::new()),
                fetched: AtomicBool::new(false),
                last_attempt: AtomicU64::new(0),
                last_success: AtomicU64::new(0),
                wanted: AtomicBool::new(true),
            })
        });
        let entry = entry.clone();
        drop(entries);
        self.wake.notify_one();
        entry
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Fetches what is due, forever (on the control runtime).
    pub async fn run(self: Arc<Self>) {
        let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %e, "cannot build the JWKS client: jwt policies with jwks_url refuse every token"),
        };
        loop {
            let due: Vec<Arc<JwksEntry>> = {
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                // Sets no config uses any more are forgotten.
                entries.retain(|_, e| Arc::strong_count(e) > 1);
                let now = self.now_ms();
                entries
                    .values()
                    .filter(|e| {
                        let last = e.last_attempt.load(Ordering::Relaxed);
                        let since = now.saturating_sub(last);
                        let retry = if e.fetched.load(Ordering::Relaxed) { JWKS_MIN_INTERVAL } else { Duration::from_secs(1) };
                        last == 0
                            || (since >= retry.as_millis() as u64 && e.wanted.load(Ordering::Relaxed))
                            || now.saturating_sub(e.last_success.load(Ordering::Relaxed)) >= JWKS_REFRESH.as_millis() as u64
                                && since >= retry.as_millis() as u64
                    })
                    .cloned()
                    .collect()
            };
            for entry in due {
                entry.last_attempt.store(self.now_ms(), Ordering::Relaxed);
                match fetch(&client, &entry.url).await {
                    Ok(keys) => {
                        tracing::info!(url = %entry.url, keys = keys.len(), "fetched a JWK Set");
                        entry.keys.store(Arc::new(keys));
                        entry.fetched.store(true, Ordering::Relaxed);
                        entry.wanted.store(false, Ordering::Relaxed);
                        entry.last_success.store(self.now_ms(), Ordering::Relaxed);
                    }
                    Err(e) => {
                        entry.wanted.store(true, Ordering::Relaxed);
                        tracing::warn!(url = %entry.url, error = %e, "cannot fetch a JWK Set: keeping the keys fetched before");
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), self.wake.notified()).await;
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.without_url().to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.without_url().to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > JWKS_MAX_BYTES {
            return Err("the JWK Set is over 1 MiB".into());
        }
    }
    let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWK Set: {e}"))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| serde_json::to_value(a).ok())
            .and_then(|v| v.as_str().and_then(|s| Algorithm::from_str(s).ok()));
        let kid = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
        keys.insert(kid, (key, alg));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"me","sub":"x"}"#);
        assert_eq!(unverified_issuer(&format!("h.{payload}.s")).as_deref(), Some("me"));
        assert_eq!(unverified_issuer("nonsense"), None);
    }

    #[test]
    fn keys_must_match_their_algorithm() {
        assert!(decoding_key("HS256", Some("s"), None).is_ok());
        assert!(decoding_key("RS256", None, Some("not a pem")).is_err());
        assert!(decoding_key("none", None, None).is_err());
        assert!(matches!(decoding_key("ES256", None, None), Ok((Algorithm::ES256, None))));
    }
}
