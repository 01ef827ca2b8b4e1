//! `key-auth`: an API key from a header or query parameter, looked up by
//! its SHA-256.

use std::sync::Arc;

use http::HeaderMap;

use crate::config::KeyAuthConfig;
use crate::policy::filter::{Bind, Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::identity::{ConsumerInfo, Identities};
use crate::policy::{Refusal, Services};

#[derive(Debug)]
pub struct KeyAuth {
    /// Lower case: header names, then query parameter names.
    names: Vec<String>,
    hide: bool,
    anonymous: Option<Arc<ConsumerInfo>>,
    /// The consumers' credentials, given when bound (empty before).
    ids: Arc<Identities>,
}

impl Filter for KeyAuth {
    type Config = KeyAuthConfig;

    fn compile(c: &KeyAuthConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        if c.key_names.is_empty() {
            cx.error("key_names", "needs at least one name");
        }
        for (i, n) in c.key_names.iter().enumerate() {
            cx.header_name(&format!("key_names[{i}]"), n);
        }
        let anonymous = cx.anonymous(&c.anonymous);
        if cx.has_errors() {
            return Err(cx.invalid());
        }
        Ok(KeyAuth {
            names: c.key_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            hide: c.hide_credentials,
            anonymous,
            ids: Arc::default(),
        })
    }

    fn phase(&self) -> Phase {
        Phase::Authentication
    }

    fn bind(&mut self, _node: &Arc<Services>, cx: &mut Bind<'_>) {
        self.ids = cx.identities().clone();
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        if cx.auth.consumer.is_some() {
            return Ok(()); // an earlier method already accepted the request
        }
        if let Some(key) = find_key(cx.headers, cx.query, &self.names, self.hide) {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
            cx.auth.consumer = self.ids.by_key_digest.get(&digest).cloned();
            if cx.auth.consumer.is_none() {
                cx.auth.blame();
            }
        }
        cx.auth.offer_anonymous(&self.anonymous);
        Ok(())
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
