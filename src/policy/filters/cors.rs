//! `cors`: preflights answered by the gateway, `Access-Control-*` on the
//! actual answers (the headers themselves are `policy::cors`).

use std::sync::Arc;

use http::StatusCode;

use crate::config::CorsConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::cors::{self, Cors as Rules};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub struct Cors(Arc<Rules>);

impl Filter for Cors {
    type Config = CorsConfig;

    fn compile(c: &CorsConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        if c.origins.is_empty() {
            cx.error("origins", "needs at least one origin (or \"*\")");
        }
        for (i, o) in c.origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                cx.error(&format!("origins[{i}]"), format!("invalid origin {o:?}: expected * or scheme://host[:port]"));
            }
        }
        if c.credentials && c.origins.iter().any(|o| o == "*") {
            cx.error("credentials", "credentials cannot be allowed for every origin (*)");
        }
        for (i, m) in c.methods.iter().enumerate() {
            cx.method(&format!("methods[{i}]"), m);
        }
        for (list, name) in [(&c.headers, "headers"), (&c.exposed_headers, "exposed_headers")] {
            for (i, h) in list.iter().enumerate() {
                cx.header_name(&format!("{name}[{i}]"), h);
            }
        }
        if cx.has_errors() {
            return Err(cx.invalid());
        }
        Ok(Cors(Arc::new(Rules::new(c))))
    }

    fn phase(&self) -> Phase {
        Phase::Cors
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        if cors::is_preflight(cx.facts.method, cx.headers) {
            return Err(match self.0.preflight(cx.headers) {
                Some(headers) => Refusal {
                    error: GatewayError::new(ErrorCode::BadRequest, "preflight"),
                    rate: None,
                    reply: Some(StatusCode::NO_CONTENT),
                    headers,
                    body: None,
                    policy: None,
                },
                None => GatewayError::new(ErrorCode::Forbidden, "this origin or method is not allowed by the CORS policy").into(),
            });
        }
        cx.out.headers.extend(self.0.actual(cx.headers));
        Ok(())
    }
}
