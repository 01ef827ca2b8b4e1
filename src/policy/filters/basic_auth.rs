//! `basic-auth`: `Authorization: Basic`, checked against the consumers'
//! argon2 hashes off the worker thread (the node's password cache
//! remembers successes).

use std::sync::Arc;

use http::HeaderMap;

use crate::config::BasicAuthConfig;
use crate::policy::filter::{Bind, Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::identity::{ConsumerInfo, Identities};
use crate::policy::{Refusal, Services};

#[derive(Debug)]
pub struct BasicAuth {
    hide: bool,
    anonymous: Option<Arc<ConsumerInfo>>,
    /// The consumers' credentials, given when bound (empty before).
    ids: Arc<Identities>,
    /// The node's argon2 permits and verified-password cache.
    node: Option<Arc<Services>>,
}

impl Filter for BasicAuth {
    type Config = BasicAuthConfig;

    fn compile(c: &BasicAuthConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let anonymous = cx.anonymous(&c.anonymous);
        if cx.has_errors() {
            return Err(cx.invalid());
        }
        Ok(BasicAuth { hide: c.hide_credentials, anonymous, ids: Arc::default(), node: None })
    }

    fn phase(&self) -> Phase {
        Phase::Authentication
    }

    fn bind(&mut self, node: &Arc<Services>, cx: &mut Bind<'_>) {
        self.ids = cx.identities().clone();
        self.node = Some(node.clone());
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        cx.auth.basic_offered = true;
        if cx.auth.consumer.is_some() {
            return Ok(());
        }
        if let (Some((user, pass)), Some(node)) = (basic_credentials(cx.headers), &self.node) {
            cx.auth.blame();
            match self.ids.by_username.get(&user) {
                Some((info, hash)) => {
                    if node.verify_password(&user, &pass, Some(hash)).await {
                        cx.auth.consumer = Some(info.clone());
                        if self.hide {
                            cx.headers.remove(http::header::AUTHORIZATION);
                        }
                    }
                }
                // As slow as a wrong password: the time taken does not tell
                // which usernames exist.
                None => {
                    let _ = node.verify_password(&user, &pass, None).await;
                }
            }
        }
        cx.auth.offer_anonymous(&self.anonymous);
        Ok(())
    }
}

/// The username and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}
