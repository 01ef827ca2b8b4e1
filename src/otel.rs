//! OpenTelemetry traces over OTLP/HTTP (protobuf): one SERVER span per
//! request the proxy serves and one CLIENT span per backend request, in the
//! client's trace (W3C `traceparent`), with the request ID as an attribute.
//!
//! Built only with the `otel` cargo feature, and on only when
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set when `manifold serve` starts. Without the feature the span types are
//! empty and their methods do nothing. With it but no endpoint, each request
//! and backend call pays one `OnceLock` read and carries an empty
//! `Option<Box<_>>`. Either way the handler parses the client's
//! `traceparent` for every request (ids.rs; numbers, no allocation).
//!
//! The SDK's batch processor queues finished spans (bounded by
//! `OTEL_BSP_MAX_QUEUE_SIZE`, 2048; spans are dropped when it is full) and
//! exports them from a thread of its own with reqwest's blocking client, so
//! no worker ever waits for the collector. [`Exporting::shutdown`] flushes.
//!
//! Ids flow through [`TraceContext`]: the server span is a child of the
//! client's span (`parent_id`) and puts its own ID in `span_id`; each
//! backend request's span is a child of that, and its ID is the parent-id
//! of the `traceparent` the backend gets, so the backend's spans hang under
//! the call that made them.

use http::{HeaderMap, HeaderValue, Method, Uri};

use crate::ids::TraceContext;

const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// Traces being exported; [`Exporting::shutdown`] sends what is queued.
pub struct Exporting {
    #[cfg(feature = "otel")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

/// Starts exporting when the environment names an OTLP endpoint. Call once,
/// before serving.
pub fn init() -> Option<Exporting> {
    let var = ENDPOINT_VARS.into_iter().find(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))?;
    imp::init(var)
}

impl Exporting {
    /// Exports the spans still queued (waiting at most 5 s for the
    /// collector) and stops the export thread.
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the last traces could not be exported");
        }
    }
}

/// The gateway's span for one request: SERVER kind, named `METHOD /route/{pattern}`.
#[derive(Default)]
pub struct ServerSpan {
    /// Boxed: an SDK span is hundreds of bytes, and this sits in every
    /// request's future even when nothing is exported.
    #[cfg(feature = "otel")]
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
}

impl ServerSpan {
    /// Starts the request's span when traces are exported, as a child of the
    /// client's span. A sampled span becomes the parent of the request's
    /// backend calls (`trace.span_id`), and the trace's sampled flag becomes
    /// the sampler's decision, so backends see what was recorded.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn start(trace: &mut TraceContext, method: &Method, request_id: &HeaderValue) -> ServerSpan {
        #[cfg(feature = "otel")]
        if let Some(tracer) = imp::tracer() {
            return ServerSpan { span: imp::start_server(tracer, trace, method, request_id).map(Box::new) };
        }
        ServerSpan::default()
    }

    /// Names the span after the route or composition that matched.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn routed(&mut self, method: &Method, pattern: &str, kind: &'static str, name: &str) {
        #[cfg(feature = "otel")]
        if let Some(span) = &mut self.span {
            imp::routed(span, method, pattern, kind, name);
        }
    }

    /// Ends the span with the answer's status (5xx marks it failed).
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn finish(self, status: u16, consumer: Option<&str>) {
        #[cfg(feature = "otel")]
        if let Some(span) = self.span {
            imp::finish_server(*span, status, consumer);
        }
    }
}

/// The span of one backend request (a plain route's upstream request, or
/// one composition call or `for_each` item, retries included): CLIENT kind,
/// named after the route or the call. Dropped unfinished, it ends as
/// cancelled (a composition drops the calls a failed required call makes
/// pointless).
#[derive(Default)]
pub struct CallSpan {
    #[cfg(feature = "otel")]
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
}

impl CallSpan {
    /// Starts the span when the request has a span of its own in `trace`,
    /// and then makes the `traceparent` in `headers` name it.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn start(trace: Option<&TraceContext>, name: &str, method: &Method, uri: &Uri, headers: &mut HeaderMap) -> CallSpan {
        #[cfg(feature = "otel")]
        if let (Some(tracer), Some(trace)) = (imp::tracer(), trace.filter(|t| t.span_id.is_some())) {
            return CallSpan { span: imp::start_client(tracer, trace, name, method, uri, headers).map(Box::new) };
        }
        CallSpan::default()
    }

    /// Ends the span: with the backend's status when it answered, failed
    /// with `error` (`timeout`, `connect`, ...) when the gateway gave up on it.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    pub fn finish(&mut self, status: Option<u16>, error: Option<&'static str>) {
        #[cfg(feature = "otel")]
        if let Some(span) = self.span.take() {
            imp::finish_client(*span, status, error);
        }
    }
}

#[cfg(feature = "otel")]
impl Drop for CallSpan {
    fn drop(&mut self) {
        self.finish(None, Some("cancelled"));
    }
}

#[cfg(not(feature = "otel"))]
mod imp {
    pub fn init(var: &str) -> Option<super::Exporting> {
        tracing::warn!("{var} is set, but this binary was built without the otel feature: no traces are exported");
        None
    }
}

#[cfg(feature = "otel")]
mod imp {
    use std::sync::OnceLock;

    use http::{HeaderMap, HeaderValue, Method, Uri};
    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
        TracerProvider as _,
    };
    use opentelemetry::{Context, InstrumentationScope, Key, KeyValue};
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
    use opentelemetry_sdk::Resource;

    use crate::ids::{TraceContext, TRACEPARENT};

    static TRACER: OnceLock<SdkTracer> = OnceLock::new();

    pub fn tracer() -> Option<&'static SdkTracer> {
        TRACER.get()
    }

    pub fn init(var: &str) -> Option<super::Exporting> {
        // The exporter would quietly fall back to localhost:4318 on a value
        // that is not a URL.
        let endpoint = std::env::var(var).unwrap_or_default();
        let valid = endpoint.parse::<Uri>().is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some());
        if !valid {
            tracing::error!(%endpoint, "{var} is not an http(s) URL: no traces are exported");
            return None;
        }
        // Endpoint, headers, timeout and compression come from the standard
        // OTEL_EXPORTER_OTLP_* variables; the exporter reads them itself.
        let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "{var} is set, but traces cannot be exported");
                return None;
            }
        };
        // OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service;
        // without them it is "manifold", not the SDK's "unknown_service".
        let detected = Resource::builder().build();
        let service = detected.get(&Key::from_static_str("service.name")).map(|v| v.as_str().into_owned());
        let resource = match service.as_deref() {
            Some(name) if name != "unknown_service" => detected,
            _ => Resource::builder().with_service_name("manifold").build(),
        };
        let service = resource.get(&Key::from_static_str("service.name")).map(|v| v.as_str().into_owned()).unwrap_or_default();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let scope = InstrumentationScope::builder("manifold").with_version(env!("CARGO_PKG_VERSION")).build();
        if TRACER.set(provider.tracer_with_scope(scope)).is_err() {
            tracing::warn!("traces are already being exported");
            return None;
        }
        tracing::info!(service, %endpoint, "exporting traces over OTLP/HTTP");
        Some(super::Exporting { provider })
    }

    fn span_id(id: u64) -> SpanId {
        SpanId::from_bytes(id.to_be_bytes())
    }

    fn id_of(span: &Span) -> u64 {
        u64::from_be_bytes(span.span_context().span_id().to_bytes())
    }

    fn trace_id(trace: &TraceContext) -> TraceId {
        TraceId::from_bytes(trace.trace_id.to_be_bytes())
    }

    fn method_name(method: &Method) -> String {
        method.as_str().to_owned()
    }

    pub fn start_server(tracer: &SdkTracer, trace: &mut TraceContext, method: &Method, request_id: &HeaderValue) -> Option<Span> {
        let id = trace_id(trace);
        let flags = trace.flag_bits();
        let parent = match trace.parent_id {
            Some(p) => {
                Context::new().with_remote_span_context(SpanContext::new(id, span_id(p), TraceFlags::new(flags), true, TraceState::NONE))
            }
            None => Context::new(),
        };
        let mut builder = tracer.span_builder(method_name(method)).with_kind(SpanKind::Server).with_attributes([
            KeyValue::new("http.request.method", method_name(method)),
            KeyValue::new("manifold.request_id", String::from_utf8_lossy(request_id.as_bytes()).into_owned()),
        ]);
        // A new trace keeps the ID the gateway already chose for it.
        builder.trace_id = Some(id);
        let span = tracer.build_with_context(builder, &parent);
        let sampled = span.span_context().is_sampled();
        trace.flags = (flags & !1) | u8::from(sampled);
        if !span.is_recording() {
            return None;
        }
        trace.span_id = Some(id_of(&span));
        Some(span)
    }

    pub fn routed(span: &mut Span, method: &Method, pattern: &str, kind: &'static str, name: &str) {
        span.update_name(format!("{method} {pattern}"));
        span.set_attribute(KeyValue::new("http.route", pattern.to_owned()));
        let key = if kind == "route" { "manifold.route" } else { "manifold.composition" };
        span.set_attribute(KeyValue::new(key, name.to_owned()));
    }

    pub fn finish_server(mut span: Span, status: u16, consumer: Option<&str>) {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if let Some(c) = consumer {
            span.set_attribute(KeyValue::new("manifold.consumer", c.to_owned()));
        }
        if status >= 500 {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
            span.set_status(Status::error(""));
        }
        span.end();
    }

    pub fn start_client(
        tracer: &SdkTracer,
        trace: &TraceContext,
        name: &str,
        method: &Method,
        uri: &Uri,
        headers: &mut HeaderMap,
    ) -> Option<Span> {
        let parent_id = trace.span_id?;
        let parent = SpanContext::new(trace_id(trace), span_id(parent_id), TraceFlags::new(trace.flag_bits()), false, TraceState::NONE);
        let mut attributes = vec![KeyValue::new("http.request.method", method_name(method))];
        if let Some(host) = uri.host() {
            attributes.push(KeyValue::new("server.address", host.to_owned()));
        }
        if let Some(port) = uri.port_u16().or_else(|| uri.scheme_str().map(|s| if s == "https" { 443 } else { 80 })) {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        let builder = tracer.span_builder(name.to_owned()).with_kind(SpanKind::Client).with_attributes(attributes);
        let span = tracer.build_with_context(builder, &Context::new().with_remote_span_context(parent));
        if !span.is_recording() {
            return None;
        }
        headers.insert(TRACEPARENT, trace.traceparent(id_of(&span)));
        Some(span)
    }

    pub fn finish_client(mut span: Span, status: Option<u16>, error: Option<&'static str>) {
        if let Some(s) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        match (error, status) {
            (Some(kind), _) => {
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(kind));
            }
            (None, Some(s)) if s >= 500 => {
                span.set_attribute(KeyValue::new("error.type", s.to_string()));
                span.set_status(Status::error(""));
            }
            _ => {}
        }
        span.end();
    }
}
