//! `request-transform`: headers and query changed before the target sees
//! them, and a JSON object body where the target reads it.

use http::header;

use crate::body::Body;
use crate::config::TransformConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{BodyStop, Compile, Filter, Invalid, Outgoing, Phase, WholeBody};
use crate::policy::transform::{compile_checked, Transform};
use crate::policy::Admission;

#[derive(Debug)]
pub struct RequestTransform(Transform);

impl Filter for RequestTransform {
    type Config = TransformConfig;

    fn compile(c: &TransformConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        compile_checked(c, cx, true).map(RequestTransform)
    }

    fn phase(&self) -> Phase {
        Phase::RequestTransform
    }

    fn rewrites_request(&self) -> bool {
        true
    }

    fn upstream_request(&self, ex: &mut Admission, req: &mut Outgoing<'_>) -> Option<http::Response<Body>> {
        let t = &self.0;
        if t.needs_context() {
            ex.template_context(req.parts, req.params);
        }
        let ctx = ex.context.as_ref().unwrap_or(&serde_json::Value::Null);
        t.apply_headers(&mut req.parts.headers, ctx);
        let q = t.apply_query(req.parts.uri.query(), ctx);
        if q.as_deref() != req.parts.uri.query() {
            req.set_query(q.as_deref());
        }
        None
    }

    fn reads_request_body(&self) -> bool {
        self.0.touches_body()
    }

    fn request_body(&self, ex: &mut Admission, req: &Outgoing<'_>, body: &mut WholeBody) -> Result<(), BodyStop> {
        match body.json().map(serde_json::Value::is_object) {
            Some(true) => {}
            // A body that says JSON and is not cannot pass unchanged by a
            // transform that was meant to change it.
            None if says_json(&req.parts.headers) && !body.bytes().is_empty() => {
                return Err(GatewayError::new(ErrorCode::BadRequest, "the request body is not valid JSON").into());
            }
            _ => return Ok(()),
        }
        let ctx = ex.template_context(req.parts, req.params);
        if let Some(json) = body.json_mut() {
            self.0.apply_body(json, ctx);
        }
        Ok(())
    }
}

/// Whether a message's Content-Type says JSON.
pub(crate) fn says_json(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"))
}
