//! `acl`: the authenticated consumer's groups against allowed or denied
//! groups.

use crate::config::AclConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub enum Acl {
    Allow(Vec<String>),
    Deny(Vec<String>),
}

impl Filter for Acl {
    type Config = AclConfig;

    fn compile(c: &AclConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        match (&c.allow, &c.deny) {
            (Some(groups), None) if !groups.is_empty() => Ok(Acl::Allow(groups.clone())),
            (None, Some(groups)) if !groups.is_empty() => Ok(Acl::Deny(groups.clone())),
            _ => Err(cx.fail("", "an acl has exactly one of allow or deny, with at least one group")),
        }
    }

    fn phase(&self) -> Phase {
        Phase::Acl
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        let groups = cx.auth.consumer.as_ref().map(|c| c.groups.as_slice()).unwrap_or(&[]);
        let in_any = |list: &Vec<String>| list.iter().any(|g| groups.contains(g));
        let refused = match self {
            Acl::Allow(a) => !in_any(a),
            Acl::Deny(d) => in_any(d),
        };
        if refused {
            return Err(GatewayError::new(ErrorCode::Forbidden, "you are not allowed to use this route").into());
        }
        Ok(())
    }
}
