//! `/openapi.json`: the admin API described as OpenAPI 3.1, with the entity
//! schemas derived from the very types the config is parsed into.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem, PathsBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ComponentsBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required, ResponseBuilder, Schema};

use crate::config::{Certificate, Composition, Config, Consumer, Credential, Policy, Route, Upstream};

fn json(schema: impl Into<RefOr<Schema>>) -> Content {
    Content::new(Some(schema))
}

fn object() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Object).into()
}

fn response(description: &str, schema: Option<RefOr<Schema>>) -> utoipa::openapi::Response {
    let mut r = ResponseBuilder::new().description(description);
    if let Some(s) = schema {
        r = r.content("application/json", json(s));
    }
    r.build()
}

fn name_param(name: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

fn query_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

fn op(summary: &str) -> OperationBuilder {
    OperationBuilder::new()
        .summary(Some(summary))
        .response("400", response("invalid input: `{message, fields}`, every error", Some(object())))
        .response("401", response("missing or wrong admin token", Some(object())))
        .response("503", response("database mode: the database is unavailable", Some(object())))
}

/// A schema and every schema it refers to.
fn with_nested<T: utoipa::ToSchema>(builder: ComponentsBuilder) -> ComponentsBuilder {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    builder.schema_from::<T>().schemas_from_iter(nested)
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn integer() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Integer)
}

/// Any JSON value.
fn any(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new().description(Some(description)).into()
}

/// The body of `POST /compositions/{name}/try`.
fn try_request() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("path", string().description(Some("the request path, matching the composition's path; may end in ?query")))
        .required("path")
        .property("method", string().description(Some("default: the composition's method")))
        .property("query", any("an object of name to value, or a query string"))
        .property("headers", ObjectBuilder::new().schema_type(Type::Object).description(Some("request headers, name to value")))
        .property("body", any("the request body (JSON)"))
        .property(
            "composition",
            any("an unsaved draft to run instead of the stored composition: the entity as a JSON object, or its YAML text; validated with the rest of the live config"),
        )
        .into()
}

/// The answer of `try`.
fn try_answer() -> RefOr<Schema> {
    let response = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("status", integer())
        .property("headers", ObjectBuilder::new().schema_type(Type::Object))
        .property("body", any("JSON, or the text of a non-JSON answer"));
    let call = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("name", string().description(Some("the call; a for_each item is name[i]")))
        .property("url", string())
        .property("started_ms", ObjectBuilder::new().schema_type(Type::Number).description(Some("since the composition started")))
        .property("duration_ms", ObjectBuilder::new().schema_type(Type::Number))
        .property("status", integer().description(Some("the backend's status, absent when there was no answer")))
        .property("error", any("null, or {kind, message}"))
        .property("retries", integer().description(Some("retries sent after the first request")));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("response", response)
        .property("calls", utoipa::openapi::schema::ArrayBuilder::new().items(call))
        .into()
}

pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    for (kind, schema) in [
        ("routes", "Route"),
        ("compositions", "Composition"),
        ("consumers", "Consumer"),
        ("policies", "Policy"),
        ("upstreams", "Upstream"),
        ("certificates", "Certificate"),
    ] {
        let entity = || RefOr::Ref(Ref::from_schema_name(schema));
        let body = || {
            RequestBodyBuilder::new()
                .content("application/json", json(entity()))
                .content("application/yaml", json(entity()))
                .required(Some(Required::True))
                .build()
        };
        let list = op(&format!("List {kind}"))
            .parameter(query_param("size", "page size, default 100, at most 1000"))
            .parameter(query_param("offset", "entities to skip"))
            .parameter(query_param("tags", "comma-separated tags an entity must all hold"))
            .response("200", response("`{data: [...], next}`", Some(object())));
        let create = op(&format!("Create one of {kind}"))
            .request_body(Some(body()))
            .response("201", response("created; ETag is its version", Some(entity())))
            .response("405", response("DB-less mode: entities are read-only", Some(object())))
            .response("409", response("the name is taken", Some(object())));
        let mut collection = PathItem::new(HttpMethod::Get, list);
        collection.post = Some(create.build());
        paths = paths.path(format!("/{kind}"), collection);

        let get = op("Read one")
            .parameter(name_param("name"))
            .response("200", response("the entity", Some(entity())))
            .response("404", response("`{\"message\": \"not found\"}`", Some(object())));
        let put = op("Create or replace (If-Match: version)")
            .parameter(name_param("name"))
            .request_body(Some(body()))
            .response("200", response("replaced", Some(entity())))
            .response("201", response("created", Some(entity())))
            .response("412", response("If-Match named another version", Some(object())));
        let patch = op("Merge (JSON merge patch; If-Match: version)")
            .parameter(name_param("name"))
            .request_body(Some(RequestBodyBuilder::new().content("application/json", json(object())).build()))
            .response("200", response("merged", Some(entity())))
            .response("404", response("not found", Some(object())))
            .response("412", response("If-Match named another version", Some(object())));
        let delete = op("Delete (If-Match: version)")
            .parameter(name_param("name"))
            .response("204", response("deleted", None))
            .response("404", response("not found", Some(object())))
            .response(
                "409",
                response(
                    "still in use (a policy attached somewhere, an upstream named by a route or call): the users are named",
                    Some(object()),
                ),
            );
        let mut item = PathItem::new(HttpMethod::Get, get);
        item.put = Some(put.build());
        item.patch = Some(patch.build());
        item.delete = Some(delete.build());
        paths = paths.path(format!("/{kind}/{{name}}"), item);
    }
    let config = || RefOr::Ref(Ref::from_schema_name("Config"));
    let mut config_item = PathItem::new(
        HttpMethod::Get,
        op("The whole config (YAML with Accept: application/yaml)").response("200", response("the config", Some(config()))),
    );
    config_item.post = Some(
        op("Replace the whole config in one transaction (YAML unless Content-Type says JSON)")
            .parameter(query_param("dry_run", "true: answer the diff only"))
            .request_body(Some(RequestBodyBuilder::new().content("application/json", json(config())).build()))
            .response("200", response("`{version, changes: {created, updated, deleted}}`", Some(object())))
            .build(),
    );
    paths = paths.path("/config", config_item);
    let mut creds = PathItem::new(
        HttpMethod::Get,
        op("A consumer's credentials, without secrets")
            .parameter(name_param("name"))
            .response("200", response("`{data: [...]}`", Some(object()))),
    );
    creds.post = Some(
        op("Add a credential; a key-auth one without a key gets a generated key, shown once")
            .parameter(name_param("name"))
            .request_body(Some(
                RequestBodyBuilder::new().content("application/json", json(RefOr::Ref(Ref::from_schema_name("Credential")))).build(),
            ))
            .response("201", response("`{credential, key?}`", Some(object())))
            .build(),
    );
    paths = paths.path("/consumers/{name}/credentials", creds);
    paths = paths.path(
        "/compositions/{name}/try",
        PathItem::new(
            HttpMethod::Post,
            op("Run a composition for real (the saved one, or an unsaved draft) and report every backend call")
                .parameter(name_param("name"))
                .request_body(Some(
                    RequestBodyBuilder::new().content("application/json", json(try_request())).required(Some(Required::True)).build(),
                ))
                .response("200", response("the composition's answer and its calls", Some(try_answer())))
                .response("404", response("no composition of that name (and no draft given)", Some(object()))),
        ),
    );
    paths = paths.path(
        "/compositions/{name}/validate",
        PathItem::new(
            HttpMethod::Post,
            op("Check a draft of the composition (YAML or JSON text) against the live config, as validate would")
                .parameter(name_param("name"))
                .request_body(Some(RequestBodyBuilder::new().content("application/yaml", Content::new(Some(string()))).build()))
                .response(
                    "200",
                    response("`{valid, fields: {path: message}, composition}`: every error, and the draft parsed to JSON", Some(object())),
                ),
        ),
    );
    paths = paths.path(
        "/compositions/{name}/yaml",
        PathItem::new(
            HttpMethod::Get,
            op("One composition as YAML text (database mode: with its ETag, for If-Match)")
                .parameter(name_param("name"))
                .response(
                    "200",
                    ResponseBuilder::new().description("the composition").content("application/yaml", Content::new(Some(string()))).build(),
                )
                .response("404", response("not found", Some(object()))),
        ),
    );
    let text = |summary: &str, content_type: &str| {
        op(summary).response("200", ResponseBuilder::new().description(summary).content(content_type, Content::new(Some(string()))).build())
    };
    paths = paths.path("/metrics", PathItem::new(HttpMethod::Get, text("Prometheus metrics, text format 0.0.4", "text/plain")));
    paths = paths.path(
        "/ui",
        PathItem::new(
            HttpMethod::Get,
            text("The composition playground (HTML; its scripts call this API with the admin token)", "text/html"),
        ),
    );
    for (path, method, summary) in [
        ("/audit", HttpMethod::Get, "The change log: time, actor, action, entity, before, after"),
        ("/status", HttpMethod::Get, "Node id, mode, config version, database reachable, uptime"),
        ("/status/ready", HttpMethod::Get, "200 once a config is loaded (no token needed)"),
        ("/openapi.json", HttpMethod::Get, "This document"),
    ] {
        let mut o = op(summary).response("200", response("see the summary", Some(object())));
        if path.contains("{name}") {
            o = o.parameter(name_param("name"));
        }
        paths = paths.path(path, PathItem::new(method, o));
    }
    let mut components = ComponentsBuilder::new();
    components = with_nested::<Config>(components);
    components = with_nested::<Route>(components);
    components = with_nested::<Composition>(components);
    components = with_nested::<Consumer>(components);
    components = with_nested::<Credential>(components);
    components = with_nested::<Policy>(components);
    components = with_nested::<Upstream>(components);
    components = with_nested::<Certificate>(components);
    let components =
        components.security_scheme("admin_token", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build())).build();
    OpenApiBuilder::new()
        .info(InfoBuilder::new().title("Manifold admin API").version(env!("CARGO_PKG_VERSION")).build())
        .paths(paths.build())
        .components(Some(components))
        .build()
}
