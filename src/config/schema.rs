//! `manifold schema`: the JSON Schema (draft 2020-12) of the config format,
//! for editors (`# yaml-language-server: $schema=...`) and CI.
//!
//! Generated from the same types `validate` parses into, through their
//! `utoipa::ToSchema` derivations (also behind `/openapi.json`): OpenAPI 3.1
//! schemas are the JSON Schema 2020-12 dialect, so the components become
//! `$defs` and their references `#/$defs/...`. What serde accepts beyond what
//! the derivations say (durations and sizes as numbers, `null` lists, the
//! per-type `config` of a policy, name rules) is added here, next to the
//! reason. Checks that need more than one field or another entity (unique
//! names, references, call cycles, templates, JSONPath, CIDRs) stay
//! `validate`'s alone.

use serde_json::{json, Map, Value};

use super::model::*;

/// `$id` of the schema: a name, not a download location (the repository
/// ships the file as docs/manifold.schema.json).
pub const SCHEMA_ID: &str = "urn:manifold:config";

/// Entity names (SPEC §2), as `validate::is_valid_name` checks them.
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9-]*$";

/// What `Dur::parse` takes: a number, optionally followed by a unit.
const DURATION_PATTERN: &str = r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*$";

/// What `ByteSize::parse` takes: whole bytes, optionally with a unit of
/// powers of 1024, in any case.
const SIZE_PATTERN: &str = r"^\s*[0-9]+\s*([bB]|[kKmMgG]([iI]?[bB])?)?\s*$";

/// Call names: identifiers other than the reserved `request` and `item`.
const CALL_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// Tags: no commas, no control characters.
const TAG_PATTERN: &str = r"^[^,\x00-\x1f\x7f-\x9f]*$";

/// Methods as `validate` takes them: upper case, such as `GET`.
const METHOD_PATTERN: &str = "^[A-Z_-]{1,32}$";

/// The `config` type of each policy `type`.
const POLICY_CONFIGS: [(PolicyKind, &str); 15] = [
    (PolicyKind::KeyAuth, "KeyAuthConfig"),
    (PolicyKind::BasicAuth, "BasicAuthConfig"),
    (PolicyKind::Jwt, "JwtConfig"),
    (PolicyKind::Acl, "AclConfig"),
    (PolicyKind::IpRestriction, "IpRestrictionConfig"),
    (PolicyKind::RateLimit, "RateLimitConfig"),
    (PolicyKind::CorrelationId, "CorrelationIdConfig"),
    (PolicyKind::RequestTransform, "TransformConfig"),
    (PolicyKind::ResponseTransform, "TransformConfig"),
    (PolicyKind::Cors, "CorsConfig"),
    (PolicyKind::HttpsRedirect, "HttpsRedirectConfig"),
    (PolicyKind::RequestSizeLimit, "RequestSizeLimitConfig"),
    (PolicyKind::ResponseCache, "ResponseCacheConfig"),
    (PolicyKind::MtlsAuth, "MtlsAuthConfig"),
    (PolicyKind::Wasm, "WasmConfig"),
];

/// The JSON Schema (draft 2020-12) of a config document.
pub fn config_schema() -> Value {
    let mut defs = Map::new();
    collect::<Config>(&mut defs);
    collect::<KeyAuthConfig>(&mut defs);
    collect::<BasicAuthConfig>(&mut defs);
    collect::<JwtConfig>(&mut defs);
    collect::<AclConfig>(&mut defs);
    collect::<IpRestrictionConfig>(&mut defs);
    collect::<RateLimitConfig>(&mut defs);
    collect::<CorrelationIdConfig>(&mut defs);
    collect::<TransformConfig>(&mut defs);
    collect::<CorsConfig>(&mut defs);
    collect::<HttpsRedirectConfig>(&mut defs);
    collect::<RequestSizeLimitConfig>(&mut defs);
    collect::<ResponseCacheConfig>(&mut defs);
    collect::<MtlsAuthConfig>(&mut defs);
    collect::<WasmConfig>(&mut defs);
    for name in POLICY_CONFIGS.map(|(_, def)| def) {
        assert!(defs.contains_key(name), "no schema for {name}");
    }
    refine(&mut defs);
    let mut defs: Vec<(String, Value)> = defs.into_iter().collect();
    defs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut defs: Map<String, Value> = defs.into_iter().collect();
    for def in defs.values_mut() {
        rewrite_refs(def);
    }

    // The document itself is a Config; an empty file (null) is an empty config.
    let mut root = defs.get("Config").cloned().unwrap_or_default();
    root["type"] = json!(["object", "null"]);
    let mut out = Map::new();
    out.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
    out.insert("$id".into(), json!(SCHEMA_ID));
    out.insert("title".into(), json!("Manifold config"));
    if let Value::Object(root) = root {
        out.extend(root);
    }
    out.insert("$defs".into(), Value::Object(defs));
    Value::Object(out)
}

/// A type's schema and every schema it refers to.
fn collect<T: utoipa::ToSchema>(defs: &mut Map<String, Value>) {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    nested.push((T::name().into_owned(), T::schema()));
    for (name, schema) in nested {
        defs.insert(name, serde_json::to_value(schema).expect("a schema is JSON"));
    }
}

/// `#/components/schemas/X` (OpenAPI) -> `#/$defs/X` (JSON Schema).
fn rewrite_refs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(s) if key == "$ref" => {
                        if let Some(name) = s.strip_prefix("#/components/schemas/") {
                            *s = format!("#/$defs/{name}");
                        }
                    }
                    _ => rewrite_refs(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

fn property<'a>(defs: &'a mut Map<String, Value>, def: &str, field: &str) -> &'a mut Value {
    let p = defs.get_mut(def).and_then(|d| d.pointer_mut(&format!("/properties/{field}")));
    p.unwrap_or_else(|| panic!("{def} has no field {field}"))
}

fn merge(target: &mut Value, extra: Value) {
    if let (Value::Object(t), Value::Object(e)) = (target, extra) {
        t.extend(e);
    }
}

/// What serde accepts beyond what the derivations express.
fn refine(defs: &mut Map<String, Value>) {
    // `Dur` and `ByteSize` deserialize by hand: strings with a unit, or
    // bare numbers (seconds, bytes).
    defs.insert(
        "Dur".into(),
        json!({
            "description": "A duration: a number followed by ms, s, m or h (500ms, 30s, 1m, 2h); a bare number means seconds.",
            "anyOf": [
                { "type": "string", "pattern": DURATION_PATTERN, "examples": ["500ms", "30s", "1m"] },
                { "type": "number", "minimum": 0 }
            ]
        }),
    );
    defs.insert(
        "ByteSize".into(),
        json!({
            "description": "A size in bytes, with an optional unit of powers of 1024: B, KB/KiB, MB/MiB, GB/GiB (10MiB).",
            "anyOf": [
                { "type": "string", "pattern": SIZE_PATTERN, "examples": ["64KiB", "10MiB"] },
                { "type": "integer", "minimum": 0 }
            ]
        }),
    );

    // A top-level key may be `null` (`routes:` with nothing under it).
    for kind in ["routes", "compositions", "consumers", "policies", "upstreams", "certificates"] {
        property(defs, "Config", kind)["type"] = json!(["array", "null"]);
    }

    for def in ["Route", "Composition", "Consumer", "Policy", "Upstream", "Certificate"] {
        merge(property(defs, def, "name"), json!({ "pattern": NAME_PATTERN, "maxLength": 64 }));
        merge(
            property(defs, def, "tags"),
            json!({ "items": { "type": "string", "minLength": 1, "maxLength": 128, "pattern": TAG_PATTERN } }),
        );
    }
    merge(property(defs, "Consumer", "groups"), json!({ "items": { "type": "string", "pattern": NAME_PATTERN, "maxLength": 64 } }));
    merge(property(defs, "Route", "methods"), json!({ "items": { "type": "string", "pattern": METHOD_PATTERN } }));
    merge(property(defs, "Composition", "method"), json!({ "pattern": METHOD_PATTERN }));
    merge(property(defs, "Call", "method"), json!({ "pattern": METHOD_PATTERN }));
    merge(
        property(defs, "Composition", "calls"),
        json!({ "propertyNames": { "type": "string", "pattern": CALL_NAME_PATTERN, "not": { "enum": ["request", "item"] } } }),
    );

    // Integer ranges serde (u16, u32) or validate (statuses) hold them to.
    merge(property(defs, "ResponseSpec", "status"), json!({ "minimum": 100, "maximum": 599 }));
    merge(property(defs, "IpRestrictionConfig", "status"), json!({ "minimum": 400, "maximum": 599 }));
    merge(property(defs, "HttpsRedirectConfig", "status"), json!({ "enum": [301, 308] }));
    for field in ["max_concurrency", "max_items", "retries"] {
        merge(property(defs, "Call", field), json!({ "maximum": u32::MAX }));
    }
    for field in ["max_concurrency", "max_items"] {
        merge(property(defs, "Call", field), json!({ "minimum": 1 }));
    }

    // Upstreams: at least one target, weights 1-1000, counts from 1.
    merge(property(defs, "Upstream", "targets"), json!({ "minItems": 1 }));
    merge(property(defs, "UpstreamTarget", "weight"), json!({ "minimum": 1, "maximum": 1000 }));
    for field in ["healthy_after", "unhealthy_after"] {
        merge(property(defs, "ActiveHealthCheck", field), json!({ "minimum": 1, "maximum": u32::MAX }));
    }
    merge(property(defs, "PassiveHealthCheck", "failures"), json!({ "minimum": 1, "maximum": u32::MAX }));
    merge(property(defs, "UpstreamRetries", "max"), json!({ "minimum": 1, "maximum": u32::MAX }));
    merge(property(defs, "CircuitBreaker", "max_in_flight"), json!({ "minimum": 1, "maximum": u32::MAX }));

    // A call goes to a `url`, or to an `upstream` with a `path`: exactly one.
    if let Some(Value::Object(call)) = defs.get_mut("Call") {
        call.insert(
            "oneOf".into(),
            json!([
                { "required": ["url"], "not": { "anyOf": [{ "required": ["upstream"] }, { "required": ["path"] }] } },
                { "required": ["upstream", "path"], "not": { "required": ["url"] } }
            ]),
        );
    }

    // An internally tagged enum with deny_unknown_fields: every variant
    // holds its own fields and `type`, nothing else.
    if let Some(Value::Array(variants)) = defs.get_mut("Credential").and_then(|c| c.get_mut("oneOf")) {
        for v in variants {
            v["additionalProperties"] = json!(false);
        }
    }

    // A policy's `config` is checked against the type its `type` names;
    // absent or null means every default.
    let rules: Vec<Value> = POLICY_CONFIGS
        .iter()
        .map(|(kind, def)| {
            let kind = serde_json::to_value(kind).expect("a policy type is a string");
            json!({
                "if": { "properties": { "type": { "const": kind } }, "required": ["type"] },
                "then": { "properties": { "config": { "anyOf": [
                    { "type": "null" },
                    { "$ref": format!("#/components/schemas/{def}") }
                ] } } }
            })
        })
        .collect();
    if let Some(Value::Object(policy)) = defs.get_mut("Policy") {
        policy.insert("allOf".into(), Value::Array(rules));
    }
}
