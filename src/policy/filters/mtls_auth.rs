//! `mtls-auth`: the client certificate of the TLS handshake, chained to
//! the policy's CAs and named by a consumer's credential (`policy::mtls`).

use std::sync::Arc;

use crate::config::MtlsAuthConfig;
use crate::policy::filter::{Bind, Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::identity::{ConsumerInfo, Identities};
use crate::policy::mtls::MtlsPolicy;
use crate::policy::{Refusal, Services};

#[derive(Debug)]
pub struct MtlsAuth {
    policy: MtlsPolicy,
    anonymous: Option<Arc<ConsumerInfo>>,
    /// The consumers' credentials, given when bound (empty before).
    ids: Arc<Identities>,
}

impl Filter for MtlsAuth {
    type Config = MtlsAuthConfig;

    fn compile(c: &MtlsAuthConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let policy = match MtlsPolicy::new(&c.ca) {
            Ok(p) => Some(p),
            Err(e) => {
                cx.error("ca", e);
                None
            }
        };
        let anonymous = cx.anonymous(&c.anonymous);
        let (Some(policy), false) = (policy, cx.has_errors()) else { return Err(cx.invalid()) };
        Ok(MtlsAuth { policy, anonymous, ids: Arc::default() })
    }

    fn phase(&self) -> Phase {
        Phase::Authentication
    }

    fn bind(&mut self, _node: &Arc<Services>, cx: &mut Bind<'_>) {
        self.ids = cx.identities().clone();
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        if cx.auth.consumer.is_some() {
            return Ok(());
        }
        match self.policy.identify(cx.facts.tls, &self.ids.mtls) {
            Ok(found) => cx.auth.consumer = found,
            Err(why) => {
                cx.auth.blame();
                tracing::debug!(policy = %cx.policy, why, "mtls-auth refused");
            }
        }
        cx.auth.offer_anonymous(&self.anonymous);
        Ok(())
    }
}
