//! `request-size-limit`: a declared length over the limit is refused before
//! any byte is read; a streamed body is cut where it passes it.

use crate::config::RequestSizeLimitConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub struct RequestSizeLimit {
    max: u64,
}

impl Filter for RequestSizeLimit {
    type Config = RequestSizeLimitConfig;

    fn compile(c: &RequestSizeLimitConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        if c.max_bytes.0 == 0 {
            return Err(cx.fail("max_bytes", "must be more than 0"));
        }
        Ok(RequestSizeLimit { max: c.max_bytes.0 })
    }

    fn phase(&self) -> Phase {
        Phase::RequestSizeLimit
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        let max = self.max;
        let declared = cx.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max) {
            return Err(GatewayError::new(ErrorCode::PayloadTooLarge, format!("the request body is over {max} bytes")).into());
        }
        cx.out.body_limit = Some(cx.out.body_limit.map_or(max, |l: u64| l.min(max)));
        Ok(())
    }
}
