//! `ip-restriction`: the client's address against allowed and denied CIDRs.

use http::StatusCode;
use ipnet::IpNet;

use crate::config::validate::parse_cidr;
use crate::config::IpRestrictionConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// The refusal's code, from the configured status.
    code: ErrorCode,
}

impl Filter for IpRestriction {
    type Config = IpRestrictionConfig;

    fn compile(c: &IpRestrictionConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        if c.allow.is_empty() && c.deny.is_empty() {
            cx.error("", "needs allow or deny CIDRs");
        }
        let mut lists = [Vec::new(), Vec::new()];
        for ((list, name), out) in [(&c.allow, "allow"), (&c.deny, "deny")].into_iter().zip(lists.iter_mut()) {
            for (i, cidr) in list.iter().enumerate() {
                match parse_cidr(cidr) {
                    Ok(net) => out.push(net),
                    Err(e) => cx.error(&format!("{name}[{i}]"), e),
                }
            }
        }
        if !(400..=599).contains(&c.status) {
            cx.error("status", "expected a status from 400 to 599");
        }
        if cx.has_errors() {
            return Err(cx.invalid());
        }
        let code = match StatusCode::from_u16(c.status).map(|s| s.as_u16()) {
            Ok(401) => ErrorCode::Unauthorized,
            Ok(404) => ErrorCode::NotFound,
            Ok(429) => ErrorCode::RateLimited,
            _ => ErrorCode::Forbidden,
        };
        let [allow, deny] = lists;
        Ok(IpRestriction { allow, deny, code })
    }

    fn phase(&self) -> Phase {
        Phase::IpRestriction
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        let ip = cx.client_ip;
        let denied = self.deny.iter().any(|n| n.contains(&ip)) || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)));
        if denied {
            tracing::debug!(policy = %cx.policy, client_ip = %ip, "ip-restriction refused");
            return Err(GatewayError::new(self.code, "your address is not allowed here").into());
        }
        Ok(())
    }
}
