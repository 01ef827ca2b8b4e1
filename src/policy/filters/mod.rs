//! One file per policy type, each a [`Filter`]. The list below is the only
//! place that names them all: it makes [`AnyFilter`], the enum the chain
//! dispatches through (a `match`, no boxing: a chain's future is as large
//! as its largest filter's).
//!
//! # Adding a policy type
//!
//! 1. its config: a struct in `config/model.rs` (serde `Deserialize`,
//!    `deny_unknown_fields`, `utoipa::ToSchema`), a variant of
//!    `PolicyKind` (its `type`), and the pair in `config/schema.rs`'s
//!    `POLICY_CONFIGS` (the JSON Schema of `config` for that `type`);
//! 2. its filter: a file here implementing [`Filter`] with
//!    `type Config = ThatStruct` (`compile` checks every field and builds
//!    the filter, `phase` places it, and the phases it needs: `request`,
//!    `upstream_request`, `request_body`, `response`; `bind` if it uses
//!    the node's services);
//! 3. one line in `filters!` below: `Variant(file::Type)`, `Variant`
//!    being the `PolicyKind` variant;
//! 4. its docs page in `docs/` (`tests/docs.rs` wants a section per
//!    type), and `manifold schema > docs/manifold.schema.json`.
//!
//! Nothing in the handler, the chain or the snapshot changes.

use http::Response;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::chain::Refusal;
use super::filter::{Bind, BodyStop, Compile, Filter, Invalid, Outgoing, Phase, RequestCx, ResponseCx, WholeBody};
use super::{Admission, Services};
use crate::body::Body;
use crate::config::PolicyKind;

/// A policy's `config` as its typed form (absent: every default); an error
/// names the field serde stopped at.
fn typed<T: DeserializeOwned>(config: &Value, cx: &mut Compile<'_>) -> Result<T, Invalid> {
    let value = if config.is_null() { Value::Object(Default::default()) } else { config.clone() };
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        cx.fail(&path, e.into_inner().to_string())
    })
}

macro_rules! filters {
    ($($variant:ident($module:ident::$ty:ident)),* $(,)?) => {
        $(pub mod $module;)*

        /// Every policy type's filter.
        #[derive(Debug)]
        pub enum AnyFilter {
            $($variant($module::$ty),)*
        }

        impl AnyFilter {
            /// A policy's filter: its `config` parsed into the filter's
            /// typed config (once), then compiled.
            pub(super) fn compile(kind: PolicyKind, config: &Value, cx: &mut Compile<'_>) -> Result<AnyFilter, Invalid> {
                match kind {
                    $(PolicyKind::$variant => {
                        let typed = typed::<<$module::$ty as Filter>::Config>(config, cx)?;
                        <$module::$ty as Filter>::compile(&typed, cx).map(AnyFilter::$variant)
                    })*
                }
            }

            pub fn phase(&self) -> Phase {
                match self { $(AnyFilter::$variant(f) => f.phase(),)* }
            }

            pub(super) fn bind(&mut self, node: &std::sync::Arc<Services>, cx: &mut Bind<'_>) {
                match self { $(AnyFilter::$variant(f) => f.bind(node, cx),)* }
            }

            pub(super) async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
                match self { $(AnyFilter::$variant(f) => f.request(cx).await,)* }
            }

            pub(super) fn rewrites_request(&self) -> bool {
                match self { $(AnyFilter::$variant(f) => f.rewrites_request(),)* }
            }

            pub(super) fn upstream_request(&self, ex: &mut Admission, req: &mut Outgoing<'_>) -> Option<Response<Body>> {
                match self { $(AnyFilter::$variant(f) => f.upstream_request(ex, req),)* }
            }

            pub(super) fn reads_request_body(&self) -> bool {
                match self { $(AnyFilter::$variant(f) => f.reads_request_body(),)* }
            }

            pub(super) fn request_body(&self, ex: &mut Admission, req: &Outgoing<'_>, body: &mut WholeBody) -> Result<(), BodyStop> {
                match self { $(AnyFilter::$variant(f) => f.request_body(ex, req, body),)* }
            }

            pub(super) fn has_response_phase(&self) -> bool {
                match self { $(AnyFilter::$variant(f) => f.has_response_phase(),)* }
            }

            pub(super) async fn response(&self, ex: &mut Admission, cx: &ResponseCx<'_>, resp: Response<Body>) -> Response<Body> {
                match self { $(AnyFilter::$variant(f) => f.response(ex, cx, resp).await,)* }
            }
        }
    };
}

filters! {
    IpRestriction(ip_restriction::IpRestriction),
    HttpsRedirect(https_redirect::HttpsRedirect),
    Cors(cors::Cors),
    CorrelationId(correlation_id::CorrelationId),
    KeyAuth(key_auth::KeyAuth),
    BasicAuth(basic_auth::BasicAuth),
    Jwt(jwt::Jwt),
    MtlsAuth(mtls_auth::MtlsAuth),
    Acl(acl::Acl),
    RateLimit(rate_limit::RateLimit),
    RequestSizeLimit(request_size_limit::RequestSizeLimit),
    RequestTransform(request_transform::RequestTransform),
    ResponseTransform(response_transform::ResponseTransform),
    ResponseCache(response_cache::ResponseCache),
    Wasm(wasm::Wasm),
}
