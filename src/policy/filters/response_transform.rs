//! `response-transform`: the answer's headers, and a JSON object body
//! (read whole, up to the backend body limit).

use http::{header, HeaderValue, Response};

use super::request_transform::says_json;
use crate::body::Body;
use crate::config::TransformConfig;
use crate::errors::{ErrorCode, GatewayError};
use crate::policy::filter::{Compile, Filter, Invalid, Phase, ResponseCx};
use crate::policy::transform::{compile_checked, Transform};
use crate::policy::Admission;

#[derive(Debug)]
pub struct ResponseTransform(Transform);

impl Filter for ResponseTransform {
    type Config = TransformConfig;

    fn compile(c: &TransformConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        compile_checked(c, cx, false).map(ResponseTransform)
    }

    fn phase(&self) -> Phase {
        Phase::ResponseTransform
    }

    fn has_response_phase(&self) -> bool {
        true
    }

    async fn response(&self, ex: &mut Admission, cx: &ResponseCx<'_>, resp: Response<Body>) -> Response<Body> {
        use http_body_util::{BodyExt, Limited};
        let t = &self.0;
        // Templates read the request as a request-transform saw it, if one did.
        let null = serde_json::Value::Null;
        let ctx = ex.context.as_ref().unwrap_or(&null);
        let (mut parts, body) = resp.into_parts();
        t.apply_headers(&mut parts.headers, ctx);
        let bodiless = cx.head || matches!(parts.status.as_u16(), 204 | 304);
        if !says_json(&parts.headers) || bodiless || !t.touches_body() {
            return Response::from_parts(parts, body);
        }
        let bytes = match Limited::new(body, crate::compose::plan::DEFAULT_MAX_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => {
                let e = GatewayError::new(ErrorCode::UpstreamError, "the upstream answer could not be read to transform it");
                return e.into_response(cx.request_id.to_str().unwrap_or(""));
            }
        };
        let bytes = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(mut json) if json.is_object() => {
                t.apply_body(&mut json, ctx);
                bytes::Bytes::from(serde_json::to_vec(&json).unwrap_or_default())
            }
            _ => bytes,
        };
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        Response::from_parts(parts, Body::full(bytes))
    }
}
