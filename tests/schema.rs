//! `manifold schema` (SPEC §9): the shipped docs/manifold.schema.json is what
//! the command prints, and the schema agrees with `manifold validate`.
//!
//! Agreement is checked on what a schema can express: the shape of every
//! entity (unknown fields, types, required fields, enums, name and duration
//! syntax, the `config` of each policy type). Checks that need another field
//! or another entity are `validate`'s alone and out of scope here: unique
//! names, references to policies, consumers and calls, call cycles, template
//! and JSONPath syntax, URLs, path patterns, CIDRs, header names, "exactly
//! one of" pairs (acl allow/deny, key/key_sha256, limit+window/limits), JWT
//! keys and route conflicts.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const SCHEMA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/manifold.schema.json");

fn printed_schema() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_manifold")).arg("schema").output().expect("manifold runs");
    assert!(out.status.success(), "manifold schema failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn shipped_schema_is_the_printed_one() {
    let printed = printed_schema();
    assert!(printed.ends_with("}\n"), "pretty JSON with a trailing newline");
    let shipped = std::fs::read_to_string(SCHEMA_FILE).unwrap_or_default();
    assert!(
        shipped == printed,
        "docs/manifold.schema.json is not what `manifold schema` prints; regenerate it with\n\n    cargo run -- schema > docs/manifold.schema.json\n"
    );
}

#[test]
fn the_schema_is_draft_2020_12_with_every_policy_config() {
    let schema: Value = serde_json::from_str(&printed_schema()).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert!(schema["$id"].is_string() && schema["title"].is_string());
    assert!(jsonschema::meta::is_valid(&schema), "a valid 2020-12 schema");
    let text = schema.to_string();
    assert!(!text.contains("#/components/"), "every reference points into $defs");
    for key in ["routes", "compositions", "consumers", "policies", "upstreams", "certificates"] {
        assert!(schema["properties"][key].is_object(), "{key}");
    }
    assert_eq!(schema["additionalProperties"], false);
    let kinds = schema["$defs"]["PolicyKind"]["enum"].as_array().unwrap();
    let rules = schema["$defs"]["Policy"]["allOf"].as_array().unwrap();
    assert_eq!(kinds.len(), 15);
    for kind in kinds {
        let rule = rules.iter().find(|r| r["if"]["properties"]["type"]["const"] == *kind).unwrap_or_else(|| panic!("{kind}"));
        let target = rule["then"]["properties"]["config"]["anyOf"][1]["$ref"].as_str().unwrap();
        let def = target.strip_prefix("#/$defs/").unwrap();
        assert_eq!(schema["$defs"][def]["additionalProperties"], false, "{kind}: {def}");
    }
}

/// The schema's verdict on a YAML document: the errors, empty when valid.
fn schema_errors(validator: &jsonschema::Validator, yaml: &str) -> Vec<String> {
    let doc: Value = serde_norway::from_str(yaml).expect("test documents are YAML");
    validator.iter_errors(&doc).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// `manifold validate`'s verdict on a YAML document: its stderr, empty when valid.
fn validate_errors(dir: &Path, i: usize, yaml: &str) -> Option<String> {
    let file = dir.join(format!("doc-{i}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_manifold"))
        .arg("validate")
        .arg(&file)
        .env_remove("MANIFOLD_REDIS_URL")
        .env_remove("MANIFOLD_CONFIG_DIR")
        .output()
        .expect("manifold runs");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Valid documents: together they hold every entity, every field and every
/// policy type.
const VALID: &[&str] = &[
    // A certificate, an mtls-auth policy and mtls credentials.
    r#"
certificates:
  - name: example-com
    tags: [public]
    snis: [example.com, "*.example.com"]
    cert: |
      -----BEGIN CERTIFICATE-----
      MIIBqjCCAVCgAwIBAgIUZteJvU5wq4Gms+ftxfjLZO/dhv4wCgYIKoZIzj0EAwIw
      FjEUMBIGA1UEAwwLZXhhbXBsZS5jb20wIBcNMjYxMjA3MTgzNTQ0WhgPMjEyNjEx
      MTMxODM1NDRaMBYxFDASBgNVBAMMC2V4YW1wbGUuY29tMFkwEwYHKoZIzj0CAQYI
      KoZIzj0DAQcDQgAE0P9Jj5MHYi3XjB89T38Chj4Kpa6EHzHXXPMVyUtpcfLk3SqU
      CmF8wI+uaQsMlHdvli9uzMMg74QO4Hvw5+gKfaN6MHgwHQYDVR0OBBYEFKvOpv9T
      hVd7dBm6BnKFfYZudh/dMB8GA1UdIwQYMBaAFKvOpv9ThVd7dBm6BnKFfYZudh/d
      MA8GA1UdEwEB/wQFMAMBAf8wJQYDVR0RBB4wHIILZXhhbXBsZS5jb22CDSouZXhh
      bXBsZS5jb20wCgYIKoZIzj0EAwIDSAAwRQIgSZkzXDa0VwwO4mGpcmgO2Hn6fj8x
      Aqq42ksgIr4p5TgCIQD7idFuMCzToPY49RLW0VVbxBGiwA6v5fvCihkOyHIUxA==
      -----END CERTIFICATE-----
    key: |
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaw72pvR9ZEHSBsUE
      /zFJ/Qpl1ieXyEUUu4ZLZQAfT/+hRANCAATQ/0mPkwdiLdeMHz1PfwKGPgqlroQf
      Mddc8xXJS2lx8uTdKpQKYXzAj65pCwyUd2+WL27MwyDvhA7ge/Dn6Ap9
      -----END PRIVATE KEY-----
consumers:
  - name: app
    credentials: [{ type: mtls, subject: "CN=app" }, { type: mtls, san: "spiffe://example.com/app" }]
policies:
  - name: client-certs
    type: mtls-auth
    config:
      anonymous: app
      ca: |
        -----BEGIN CERTIFICATE-----
        MIIBqjCCAVCgAwIBAgIUZteJvU5wq4Gms+ftxfjLZO/dhv4wCgYIKoZIzj0EAwIw
        FjEUMBIGA1UEAwwLZXhhbXBsZS5jb20wIBcNMjYxMjA3MTgzNTQ0WhgPMjEyNjEx
        MTMxODM1NDRaMBYxFDASBgNVBAMMC2V4YW1wbGUuY29tMFkwEwYHKoZIzj0CAQYI
        KoZIzj0DAQcDQgAE0P9Jj5MHYi3XjB89T38Chj4Kpa6EHzHXXPMVyUtpcfLk3SqU
        CmF8wI+uaQsMlHdvli9uzMMg74QO4Hvw5+gKfaN6MHgwHQYDVR0OBBYEFKvOpv9T
        hVd7dBm6BnKFfYZudh/dMB8GA1UdIwQYMBaAFKvOpv9ThVd7dBm6BnKFfYZudh/d
        MA8GA1UdEwEB/wQFMAMBAf8wJQYDVR0RBB4wHIILZXhhbXBsZS5jb22CDSouZXhh
        bXBsZS5jb20wCgYIKoZIzj0EAwIDSAAwRQIgSZkzXDa0VwwO4mGpcmgO2Hn6fj8x
        Aqq42ksgIr4p5TgCIQD7idFuMCzToPY49RLW0VVbxBGiwA6v5fvCihkOyHIUxA==
        -----END CERTIFICATE-----
"#,
    // A wasm policy: fixtures/wasm/tenant.wat, base64, with every field.
    r#"
policies:
  - name: tenant
    type: wasm
    config:
      module_base64: |
        AGFzbQEAAAABHgVgBX9/f39/AX9gAABgAX8Bf2ACf38AYAN/f38BfwIiAQNlbnYacHJveHlfYWRk
        X2hlYWRlcl9tYXBfdmFsdWUAAAMFBAECAwQFAwEAAQd0BQZtZW1vcnkCABdwcm94eV9hYmlfdmVy
        c2lvbl8wXzJfMQABGHByb3h5X29uX21lbW9yeV9hbGxvY2F0ZQACF3Byb3h5X29uX2NvbnRleHRf
        Y3JlYXRlAAMYcHJveHlfb25fcmVxdWVzdF9oZWFkZXJzAAQKHwQCAAsFAEGACAsCAAsRAEEAQQBB
        CEEIQQQQABpBAAsLEgEAQQALDHgtdGVuYW50YWNtZQ==
      config: { tenant: acme }
      phase: request-transform
      fuel: 1000000
      max_memory: 1MiB
"#,
    "",
    "routes:\n",
    "{routes: [], compositions: null, consumers: [], policies: []}",
    r#"
routes:
  - name: users-api
    tags: [team-a, v2]
    methods: [GET, POST]
    hosts: [api.example.com, "*.example.org"]
    path: /api/users/{*rest}
    upstream: http://users.internal:8080/base
    path_rewrite: /v2/users/{rest}
    timeout: 30s
    preserve_host: true
    policies: [keys, basic, tokens, staff, office, limits, ids, req-t, resp-t, cors, tls, size, cache]
  - { name: plain, path: /plain, upstream: "http://127.0.0.1:9", timeout: 10 }
compositions:
  - name: user-dashboard
    tags: [demo]
    method: POST
    hosts: [api.example.com]
    path: /v1/users/{id}/dashboard
    timeout: 1.5s
    policies: [tokens]
    calls:
      user:
        url: http://users.internal:8080/users/{{request.path.id}}
        timeout: 500ms
        retries: 2
        max_body_bytes: 1MiB
      orders:
        url: http://orders.internal:8080/orders?user={{request.path.id}}
        required: false
        when: $.user.body.id
      products:
        for_each: $.orders.body.items[*].product_id
        url: http://catalog.internal:8080/products/{{item}}
        max_concurrency: 8
        max_items: 50
        max_body_bytes: 65536
      audit:
        method: POST
        url: http://audit.internal:8080/events
        headers: { x-tenant: "{{request.headers.x-tenant}}" }
        forward_headers: [authorization]
        body: { user: $.user.body.id, kind: dashboard-view, n: 1, list: [1, null] }
        required: false
    response:
      status: 201
      headers: { cache-control: "private, max-age=10" }
      forward_headers: { user: [etag] }
      body: { id: $.user.body.id, orders: $.orders.body.items }
  - name: page
    path: /page
    calls: { user: { url: "http://users.internal:8080/users/1" } }
    response: { template: "<p>{{user.body.name}}</p>", content_type: text/html }
consumers:
  - name: mobile-app
    tags: [mobile]
    groups: [internal, mobile]
    credentials:
      - { type: key-auth, key: secret-key }
      - { type: key-auth, key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }
      - { type: basic-auth, username: mobile, password: hunter2 }
      - { type: jwt, issuer: mobile-app, algorithm: HS256, secret: shh }
      - { type: jwt, issuer: other-app, algorithm: RS256 }
  - { name: guest }
policies:
  - { name: keys, type: key-auth, config: { key_names: [apikey, x-api-key], hide_credentials: true, anonymous: guest } }
  - { name: basic, type: basic-auth, config: { hide_credentials: false, anonymous: null } }
  - name: tokens
    type: jwt
    config: { header: authorization, query_param: jwt, claims_to_verify: [exp, nbf], leeway: 5s, jwks_url: "https://idp.example.com/jwks", anonymous: guest }
  - { name: staff, type: acl, config: { allow: [internal] } }
  - { name: office, type: ip-restriction, config: { allow: [10.0.0.0/8, 192.168.1.1], deny: ["2001:db8::/32"], status: 451 } }
  - { name: limits, type: rate-limit, config: { limit: 100, window: 1m, by: "header:x-tenant", scope: local, fault_tolerant: false } }
  - { name: ids, type: correlation-id, global: true, config: { header: x-request-id, echo_downstream: true } }
  - name: req-t
    type: request-transform
    config:
      add: { headers: { x-added: yes }, query: { q: "1" }, body: { added: true } }
      remove: { headers: [x-secret], query: [debug], body: [password] }
      rename: { headers: { x-old: x-new }, body: { old: new } }
      replace: { headers: { x-env: prod } }
  - { name: resp-t, type: response-transform, config: { remove: { headers: [server] }, add: { body: { v: 2 } } } }
  - name: cors
    type: cors
    config: { origins: ["https://app.example.com"], methods: [GET, POST], headers: [content-type], exposed_headers: [etag], credentials: true, max_age: 1h }
  - { name: tls, type: https-redirect, config: { status: 308 } }
  - { name: size, type: request-size-limit, config: { max_bytes: 10MiB } }
  - { name: cache, type: response-cache, config: { ttl: 30s, vary_headers: [accept-language], vary_query: false, max_bytes: 64mb } }
"#,
    // Defaults everywhere: a config may be absent or null.
    r#"
consumers: [{ name: guest }]
policies:
  - { name: keys, type: key-auth }
  - { name: basic, type: basic-auth, config: null }
  - { name: tokens, type: jwt, config: {} }
  - { name: ids, type: correlation-id }
  - { name: req-t, type: request-transform }
  - { name: resp-t, type: response-transform, config: {} }
  - { name: tls, type: https-redirect }
  - { name: limits, type: rate-limit, config: { limits: [{ limit: 10, window: 1s }, { limit: 1000, window: 1h }], scope: local } }
  - { name: deny, type: acl, config: { deny: [blocked] } }
  - { name: size, type: request-size-limit, config: { max_bytes: 1024 } }
  - { name: cache, type: response-cache, config: { ttl: 60 } }
  - { name: cors, type: cors, config: { origins: ["*"] } }
  - { name: office, type: ip-restriction, config: { deny: [10.0.0.1] } }
"#,
    // Every upstream field accepted in this version (the ones not built yet are validate's errors).
    r#"
upstreams:
  - name: users
    tags: [team-a]
    targets:
      - { url: "http://10.0.0.1:8080", weight: 1000 }
      - { url: "https://users-b.internal:8443/", weight: 1 }
      - { url: "http://users-c.internal" }
    balance: round-robin
    connect_timeout: 2s
    tls: { verify: true, ca_file: fixtures/tls/ca.pem, server_name: users.internal, client_cert_file: fixtures/tls/gateway.pem, client_key_file: fixtures/tls/gateway-key.pem }
    http2: true
  - { name: plain, targets: [{ url: "http://10.0.0.2" }], tls: { server_name: 10.0.0.2 }, connect_timeout: 1 }
  - { name: least, targets: [{ url: "http://10.0.0.3" }, { url: "http://10.0.0.4", weight: 200 }], balance: least-requests }
  - { name: by-user, targets: [{ url: "http://10.0.0.3" }, { url: "http://10.0.0.4" }], balance: consistent-hash, hash_on: "header:X-User" }
  - { name: by-consumer, targets: [{ url: "http://10.0.0.3" }], balance: consistent-hash, hash_on: consumer }
"#,
];

/// One valid route, composition, consumer and policy to break one field of.
const BASE: &str = r#"
routes:
  - { name: r, path: /r, upstream: "http://127.0.0.1:9" }
compositions:
  - name: c
    path: /c
    calls: { a: { url: "http://127.0.0.1:9/a" } }
consumers:
  - { name: u, credentials: [{ type: key-auth, key: k }] }
policies:
  - { name: p, type: rate-limit, config: { limit: 1, window: 1s } }
upstreams:
  - { name: up, targets: [{ url: "http://127.0.0.1:9", weight: 5 }] }
"#;

/// Documents both must reject, each with one structural error.
fn invalid() -> Vec<(&'static str, String)> {
    let edit = |from: &str, to: &str| {
        assert!(BASE.contains(from), "{from}");
        BASE.replacen(from, to, 1)
    };
    vec![
        ("not an object", "[1, 2]".to_string()),
        ("unknown top-level key", format!("{BASE}services: []\n")),
        ("a list that is not a list", "routes: { name: r }\n".to_string()),
        ("an entity that is not an object", "routes: [r]\n".to_string()),
        ("unknown field in a route", edit("path: /r,", "path: /r, retries: 3,")),
        ("unknown field in a composition", edit("path: /c\n", "path: /c\n    cache: true\n")),
        ("unknown field in a call", edit("url: \"http://127.0.0.1:9/a\"", "url: \"http://127.0.0.1:9/a\", urls: []")),
        ("unknown field in a response", edit("path: /c\n", "path: /c\n    response: { stauts: 200 }\n")),
        ("unknown field in a consumer", edit("name: u,", "name: u, group: [a],")),
        ("unknown field in a credential", edit("key: k }", "key: k, secret: s }")),
        ("unknown field in a policy", edit("type: rate-limit,", "type: rate-limit, enabled: true,")),
        ("unknown field in a policy config", edit("window: 1s }", "window: 1s, burst: 5 }")),
        ("a field of another policy type", edit("window: 1s }", "window: 1s, ttl: 1m }")),
        ("wrong type: boolean", edit("path: /r,", "path: /r, preserve_host: 3,")),
        ("wrong type: list of strings", edit("path: /r,", "path: /r, methods: GET,")),
        ("wrong type: calls", edit("calls: { a: { url: \"http://127.0.0.1:9/a\" } }", "calls: [a]")),
        ("wrong type: integer", edit("limit: 1,", "limit: many,")),
        ("negative integer", edit("limit: 1,", "limit: -1,")),
        ("wrong type: duration", edit("path: /r,", "path: /r, timeout: [1],")),
        ("bad duration", edit("path: /r,", "path: /r, timeout: 10 parsecs,")),
        ("bad size", edit("url: \"http://127.0.0.1:9/a\"", "url: \"http://127.0.0.1:9/a\", max_body_bytes: 10 MegaBytes")),
        ("bad name", edit("name: r,", "name: Users_API,")),
        ("name starting with -", edit("name: p,", "name: -p,")),
        ("name too long", edit("name: u,", &format!("name: {},", "a".repeat(65)))),
        ("empty name", edit("name: c\n", "name: \"\"\n")),
        ("bad group", edit("name: u,", "name: u, groups: [Admins],")),
        ("bad tag", edit("name: r,", "name: r, tags: [\"a,b\"],")),
        ("bad method", edit("path: /r,", "path: /r, methods: [get],")),
        ("reserved call name", edit("calls: { a:", "calls: { request:")),
        ("bad call name", edit("calls: { a:", "calls: { 1st:")),
        ("missing route upstream", edit(", upstream: \"http://127.0.0.1:9\"", "")),
        ("missing route path", edit("path: /r, ", "")),
        ("missing composition calls", edit("    calls: { a: { url: \"http://127.0.0.1:9/a\" } }\n", "")),
        ("missing call url", edit("{ url: \"http://127.0.0.1:9/a\" }", "{ method: GET }")),
        ("missing name", edit("name: p, ", "")),
        ("missing policy type", edit("type: rate-limit, ", "")),
        (
            "missing required config field",
            edit("type: rate-limit, config: { limit: 1, window: 1s }", "type: request-size-limit, config: {}"),
        ),
        ("missing credential type", edit("type: key-auth, ", "")),
        ("wrong policy type", edit("type: rate-limit,", "type: oauth2,")),
        ("wrong credential type", edit("type: key-auth,", "type: api-key,")),
        ("wrong enum value", edit("window: 1s }", "window: 1s, scope: global }")),
        ("config that is not an object", edit("config: { limit: 1, window: 1s }", "config: fast")),
        ("status out of range", edit("path: /c\n", "path: /c\n    response: { status: 42 }\n")),
        ("https-redirect status", format!("{BASE}  - {{ name: t, type: https-redirect, config: {{ status: 302 }} }}\n")),
        ("ip-restriction status", format!("{BASE}  - {{ name: t, type: ip-restriction, config: {{ allow: [10.0.0.1], status: 200 }} }}\n")),
        ("unknown field in an upstream", edit("name: up,", "name: up, pool: [],")),
        ("unknown field in a target", edit("weight: 5 }", "weight: 5, backup: true }")),
        ("unknown field in upstream tls", edit("name: up,", "name: up, tls: { verify_depth: 2 },")),
        ("weight 0", edit("weight: 5 }", "weight: 0 }")),
        ("weight over 1000", edit("weight: 5 }", "weight: 1001 }")),
        ("wrong type: weight", edit("weight: 5 }", "weight: heavy }")),
        ("unknown balance", edit("name: up,", "name: up, balance: random,")),
        ("missing targets", edit(", targets: [{ url: \"http://127.0.0.1:9\", weight: 5 }]", "")),
        ("no targets", edit("targets: [{ url: \"http://127.0.0.1:9\", weight: 5 }]", "targets: []")),
        ("missing target url", edit("url: \"http://127.0.0.1:9\", weight: 5", "weight: 5")),
        ("bad upstream name", edit("name: up,", "name: Up,")),
        ("bad upstream duration", edit("name: up,", "name: up, connect_timeout: soon,")),
        ("bad percentage", edit("name: up,", "name: up, retries: { max: 1, budget: lots },")),
        ("percentage over 100%", edit("name: up,", "name: up, health: { passive: { max_ejected: 100.5% } },")),
        (
            "call with url and upstream",
            edit("{ url: \"http://127.0.0.1:9/a\" }", "{ url: \"http://127.0.0.1:9/a\", upstream: up, path: /a }"),
        ),
        ("call with upstream and no path", edit("{ url: \"http://127.0.0.1:9/a\" }", "{ upstream: up }")),
        ("call with path and no upstream", edit("{ url: \"http://127.0.0.1:9/a\" }", "{ path: /a }")),
        (
            "max_items 0",
            edit("{ url: \"http://127.0.0.1:9/a\" }", "{ url: \"http://127.0.0.1:9/a\", for_each: $.request.body, max_items: 0 }"),
        ),
    ]
}

#[test]
fn schema_and_validate_agree() {
    let schema: Value = serde_json::from_str(&printed_schema()).unwrap();
    let validator = jsonschema::draft202012::new(&schema).expect("the schema compiles");
    let dir = tempfile::tempdir().unwrap();
    let mut disagree = Vec::new();

    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/compositions/demo.yaml")).unwrap();
    let mut valid: Vec<(String, String)> = vec![("compositions/demo.yaml".into(), demo)];
    valid.extend(VALID.iter().enumerate().map(|(i, d)| (format!("VALID[{i}]"), d.to_string())));
    valid.push(("BASE".into(), BASE.to_string()));
    let mut n = 0;
    for (label, doc) in &valid {
        n += 1;
        let by_schema = schema_errors(&validator, doc);
        let by_validate = validate_errors(dir.path(), n, doc);
        if !by_schema.is_empty() || by_validate.is_some() {
            disagree.push(format!("{label} should be valid:\n  schema: {by_schema:?}\n  validate: {by_validate:?}"));
        }
    }
    for (label, doc) in invalid() {
        n += 1;
        let by_schema = schema_errors(&validator, &doc);
        let by_validate = validate_errors(dir.path(), n, &doc);
        if std::env::var_os("SCHEMA_TEST_VERBOSE").is_some() {
            eprintln!("{label}:\n  schema: {by_schema:?}\n  validate: {by_validate:?}");
        }
        if by_schema.is_empty() || by_validate.is_none() {
            disagree.push(format!("{label} should be invalid:\n  schema: {by_schema:?}\n  validate: {by_validate:?}\n{doc}"));
        }
    }
    assert!(disagree.is_empty(), "{}", disagree.join("\n\n"));

    // Every policy type is among the valid documents.
    for kind in schema["$defs"]["PolicyKind"]["enum"].as_array().unwrap() {
        let kind = kind.as_str().unwrap();
        assert!(VALID.iter().any(|d| d.contains(&format!("type: {kind}"))), "no valid {kind} policy");
    }
}
