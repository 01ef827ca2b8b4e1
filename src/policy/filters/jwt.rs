//! `jwt`: a bearer token verified with its issuer's key, or a key of the
//! policy's JWK Set (fetched in the background: `policy::jwt`).

use std::sync::Arc;

use crate::config::JwtConfig;
use crate::policy::filter::{Bind, Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::identity::{ConsumerInfo, Identities};
use crate::policy::jwt::JwtPolicy;
use crate::policy::{Refusal, Services};

#[derive(Debug)]
pub struct Jwt {
    policy: JwtPolicy,
    /// Registered with the node's JWKS store when bound.
    jwks_url: Option<String>,
    anonymous: Option<Arc<ConsumerInfo>>,
    /// The consumers' credentials, given when bound (empty before).
    ids: Arc<Identities>,
}

impl Filter for Jwt {
    type Config = JwtConfig;

    fn compile(c: &JwtConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let header = cx.header_name("header", &c.header);
        for (i, claim) in c.claims_to_verify.iter().enumerate() {
            if claim != "exp" && claim != "nbf" {
                cx.error(&format!("claims_to_verify[{i}]"), format!("unknown claim {claim:?}: use exp or nbf"));
            }
        }
        if let Some(url) = &c.jwks_url {
            let ok = url.parse::<http::Uri>().ok().is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                cx.error("jwks_url", format!("invalid URL {url:?}"));
            }
        }
        let anonymous = cx.anonymous(&c.anonymous);
        let (Some(header), false) = (header, cx.has_errors()) else { return Err(cx.invalid()) };
        let policy = JwtPolicy {
            header,
            query_param: c.query_param.clone(),
            verify_exp: c.claims_to_verify.iter().any(|x| x == "exp"),
            verify_nbf: c.claims_to_verify.iter().any(|x| x == "nbf"),
            leeway: c.leeway.0.as_secs(),
            jwks: None,
        };
        Ok(Jwt { policy, jwks_url: c.jwks_url.clone(), anonymous, ids: Arc::default() })
    }

    fn phase(&self) -> Phase {
        Phase::Authentication
    }

    fn bind(&mut self, node: &Arc<Services>, cx: &mut Bind<'_>) {
        self.ids = cx.identities().clone();
        self.policy.jwks = self.jwks_url.as_deref().map(|u| node.jwks.entry(u));
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        if cx.auth.consumer.is_some() {
            return Ok(());
        }
        if let Some(token) = self.policy.find_token(cx.headers, cx.query.as_deref()) {
            match self.policy.verify(&token, &self.ids.by_issuer) {
                Ok((info, claims)) => {
                    cx.auth.consumer = Some(info);
                    cx.out.claims = Some(claims);
                }
                Err(why) => {
                    cx.auth.blame();
                    tracing::debug!(policy = %cx.policy, why, "jwt refused");
                }
            }
        }
        cx.auth.offer_anonymous(&self.anonymous);
        Ok(())
    }
}
