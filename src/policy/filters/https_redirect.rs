//! `https-redirect`: a plain-HTTP request is answered with a redirect to
//! the same URL over https.

use http::{HeaderValue, StatusCode};

use crate::config::HttpsRedirectConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub struct HttpsRedirect {
    status: StatusCode,
}

impl Filter for HttpsRedirect {
    type Config = HttpsRedirectConfig;

    fn compile(c: &HttpsRedirectConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        match c.status {
            301 => Ok(HttpsRedirect { status: StatusCode::MOVED_PERMANENTLY }),
            308 => Ok(HttpsRedirect { status: StatusCode::PERMANENT_REDIRECT }),
            _ => Err(cx.fail("status", "expected 301 or 308")),
        }
    }

    fn phase(&self) -> Phase {
        Phase::HttpsRedirect
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        // Plain HTTP here; only a trusted proxy can say the client used TLS.
        let https = cx.facts.tls.is_some()
            || cx.facts.trusted_peer
                && cx.headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"));
        if https {
            return Ok(());
        }
        let host = cx.headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        // Only a host[:port] may become the Location's authority.
        let plausible =
            !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
        if !plausible {
            return Err(GatewayError::new(ErrorCode::BadRequest, "the Host header is not a host name").into());
        }
        let location = match cx.query.as_deref() {
            Some(q) => format!("https://{host}{}?{q}", cx.facts.path),
            None => format!("https://{host}{}", cx.facts.path),
        };
        if let Ok(location) = HeaderValue::from_str(&location) {
            let mut r = Refusal::from(GatewayError::new(ErrorCode::BadRequest, "use https"));
            r.reply = Some(self.status);
            r.headers.insert(http::header::LOCATION, location);
            return Err(r);
        }
        Ok(())
    }
}
