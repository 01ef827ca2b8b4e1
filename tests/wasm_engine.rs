//! The proxy-wasm host driven through its API with real modules: the
//! filters in fixtures/wasm/*.wat, compiled to WebAssembly by `wat`.
//! Needs the `wasm` feature, on by default: `cargo test` runs these.
#![cfg(feature = "wasm")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use manifold::wasm::{Action, Callback, Limits, RequestInfo, WasmError, WasmPlugin};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/wasm/{name}.wat", env!("CARGO_MANIFEST_DIR"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compile(name: &str, config: &[u8], limits: Limits) -> Result<Arc<WasmPlugin>, WasmError> {
    WasmPlugin::compile(name, &fixture(name), config.to_vec(), limits)
}

fn plugin(name: &str) -> Arc<WasmPlugin> {
    compile(name, b"", Limits::default()).unwrap()
}

fn module_error(wat: &str) -> String {
    let bytes = wat::parse_str(wat).unwrap();
    match WasmPlugin::compile("inline", &bytes, Vec::new(), Limits::default()) {
        Err(WasmError::Module(m)) => m,
        other => panic!("expected a module error, got {other:?}"),
    }
}

fn info(method: Method, path: &str) -> RequestInfo {
    RequestInfo { method, path: path.into(), scheme: "http", authority: None }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    map
}

fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    map.get(name).map(|v| v.to_str().unwrap())
}

/// The start of every fixture-like inline module: ABI version, memory,
/// allocator, context creation.
const PRELUDE: &str = r#"
  (memory (export "memory") 1)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
"#;

/// One compiled plugin, four threads at once (more than wasmi's default
/// stack pool): each thread starts its own instance of the one module and
/// every request gets its own answer.
#[test]
fn threads_share_the_compiled_module_and_each_runs_its_own_instance() {
    let plugin = plugin("headers");
    std::thread::scope(|scope| {
        for t in 0..4 {
            let plugin = &plugin;
            scope.spawn(move || {
                for i in 0..200 {
                    let path = format!("/t{t}/{i}");
                    let mut ctx = plugin.http_context(info(Method::GET, &path));
                    let mut req = headers(&[("x-remove-me", "1")]);
                    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
                    assert_eq!(get(&req, "x-path"), Some(path.as_str()));
                    assert_eq!(get(&req, "x-remove-me"), None);
                }
            });
        }
    });
    assert_eq!(plugin.instances_started(), 4, "one instance per thread");
}

#[test]
fn a_filter_adds_and_removes_headers_and_reads_pseudo_headers() {
    let plugin = compile("headers", b"", Limits::default()).unwrap();
    let phases = plugin.phases();
    assert!(phases.request_headers && phases.response_headers);
    assert!(!phases.request_body && !phases.response_body && !phases.log);

    let mut ctx = plugin.http_context(info(Method::POST, "/orders?id=7"));
    let mut req = headers(&[("host", "shop.test"), ("x-remove-me", "secret"), ("accept", "*/*")]);
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-wasm"), Some("hello"));
    assert_eq!(get(&req, "x-remove-me"), None);
    assert_eq!(get(&req, "x-path"), Some("/orders?id=7"));
    assert_eq!(get(&req, "x-method"), Some("POST"));
    assert_eq!(get(&req, "x-plugin"), Some("headers"));
    assert_eq!(get(&req, "accept"), Some("*/*"));
    assert_eq!(get(&req, "host"), Some("shop.test"));

    let mut status = StatusCode::CREATED;
    let mut res = headers(&[("content-type", "application/json")]);
    assert_eq!(ctx.on_response_headers(&mut status, &mut res, false), Ok(Action::Continue));
    assert_eq!(get(&res, "x-wasm-response"), Some("1"));
    assert_eq!(get(&res, "x-status"), Some("201"));
    assert_eq!(status, StatusCode::CREATED);
    // Callbacks the module does not export are no-ops.
    let mut body = Bytes::from_static(b"{}");
    assert_eq!(ctx.on_response_body(&mut status, &mut res, &mut body), Ok(Action::Continue));
    assert_eq!(ctx.on_log(), Ok(()));
    assert_eq!(&body[..], b"{}");
}

#[test]
fn a_filter_refuses_with_a_local_response() {
    let plugin = plugin("deny");
    let mut ctx = plugin.http_context(info(Method::GET, "/admin"));
    let mut req = headers(&[("host", "shop.test")]);
    let Ok(Action::LocalResponse(answer)) = ctx.on_request_headers(&mut req, true) else {
        panic!("expected a local response");
    };
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(get(&answer.headers, "content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body, serde_json::json!({"error": "forbidden"}));
    assert_eq!(answer.details, "denied by wasm");

    let mut ctx = plugin.http_context(info(Method::GET, "/admin"));
    let mut req = headers(&[("x-allow", "yes")]);
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
}

#[test]
fn a_filter_rewrites_json_request_and_response_bodies() {
    let plugin = plugin("body");
    assert!(plugin.phases().request_body && plugin.phases().response_body);
    let mut ctx = plugin.http_context(info(Method::POST, "/orders"));
    let mut req = headers(&[("content-type", "application/json"), ("content-length", "14")]);
    assert_eq!(ctx.on_request_headers(&mut req, false), Ok(Action::Continue));
    assert_eq!(get(&req, "content-length"), None);
    let mut body = Bytes::from_static(br#"{"item":"tea"}"#);
    assert_eq!(ctx.on_request_body(&mut req, &mut body), Ok(Action::Continue));
    let wrapped: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(wrapped, serde_json::json!({"wrapped": {"item": "tea"}}));

    let mut status = StatusCode::OK;
    let mut res = headers(&[("content-length", "11")]);
    assert_eq!(ctx.on_response_headers(&mut status, &mut res, false), Ok(Action::Continue));
    assert_eq!(get(&res, "content-length"), None);
    let mut answer = Bytes::from_static(br#"{"id":1234}"#);
    assert_eq!(ctx.on_response_body(&mut status, &mut res, &mut answer), Ok(Action::Continue));
    assert_eq!(&answer[..], br#"{"rewritten":true}"#);

    // A body that is no JSON object is refused by the module.
    let mut ctx = plugin.http_context(info(Method::POST, "/orders"));
    let mut body = Bytes::from_static(b"[1,2]");
    let Ok(Action::LocalResponse(refusal)) = ctx.on_request_body(&mut req, &mut body) else {
        panic!("expected a local response");
    };
    assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
    assert_eq!(&refusal.body[..], br#"{"error":"not an object"}"#);
    // An empty body has no first byte: refused too, without a trap.
    let mut empty = Bytes::new();
    assert!(matches!(ctx.on_request_body(&mut req, &mut empty), Ok(Action::LocalResponse(_))));
}

#[test]
fn a_filter_reads_its_plugin_configuration() {
    let config = br#"{"tenant":"acme"}"#;
    let plugin = compile("config", config, Limits::default()).unwrap();
    for _ in 0..3 {
        let mut ctx = plugin.http_context(RequestInfo::default());
        let mut req = HeaderMap::new();
        assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
        assert_eq!(get(&req, "x-config"), Some(r#"{"tenant":"acme"}"#));
    }
    // The module refuses an empty configuration: a compile error, not a
    // failure of every request later.
    let err = compile("config", b"", Limits::default()).unwrap_err();
    assert!(matches!(&err, WasmError::Configure(m) if m.contains("proxy_on_configure returned false")), "{err}");
}

#[test]
fn a_looping_filter_runs_out_of_fuel_and_the_next_request_works() {
    let plugin = plugin("loop");
    let mut ctx = plugin.http_context(RequestInfo::default());
    let mut req = headers(&[("x-loop", "1")]);
    let started = Instant::now();
    let err = ctx.on_request_headers(&mut req, true).unwrap_err();
    assert_eq!(err, WasmError::OutOfFuel { callback: Callback::RequestHeaders, fuel: Limits::DEFAULT_FUEL });
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(ctx.fuel_left(), 0);
    // The headers lent to the call came back.
    assert_eq!(get(&req, "x-loop"), Some("1"));
    // Its later callbacks fail at once, without running.
    let again = ctx.on_request_headers(&mut HeaderMap::new(), true);
    assert_eq!(again, Err(WasmError::OutOfFuel { callback: Callback::RequestHeaders, fuel: Limits::DEFAULT_FUEL }));
    drop(ctx);

    // Same thread, next request: a fresh instance serves it.
    let mut ctx = plugin.http_context(RequestInfo::default());
    let mut req = HeaderMap::new();
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-ok"), Some("1"));
    assert_eq!(plugin.instances_started(), 2);

    // A smaller limit stops it sooner, and says which.
    let small = compile("loop", b"", Limits { fuel: 10_000, ..Limits::default() }).unwrap();
    let err = small.http_context(RequestInfo::default()).on_request_headers(&mut headers(&[("x-loop", "1")]), true);
    assert_eq!(err, Err(WasmError::OutOfFuel { callback: Callback::RequestHeaders, fuel: 10_000 }));
    assert_eq!(err.unwrap_err().to_string(), "proxy_on_request_headers ran out of fuel (limit 10000 per request)");
}

#[test]
fn fuel_is_per_request_across_its_callbacks() {
    // headers.wat spends some fuel per callback: a limit that covers one
    // request's callbacks but not two requests' shows the budget is the
    // request's, not the instance's.
    let plugin = plugin("headers");
    let mut ctx = plugin.http_context(RequestInfo::default());
    ctx.on_request_headers(&mut HeaderMap::new(), true).unwrap();
    let used_by_request_headers = Limits::DEFAULT_FUEL - ctx.fuel_left();
    assert!(used_by_request_headers > 0);
    let mut status = StatusCode::OK;
    ctx.on_response_headers(&mut status, &mut HeaderMap::new(), true).unwrap();
    assert!(Limits::DEFAULT_FUEL - ctx.fuel_left() > used_by_request_headers);

    let tight = compile("headers", b"", Limits { fuel: used_by_request_headers + 10, ..Limits::default() }).unwrap();
    for _ in 0..3 {
        let mut ctx = tight.http_context(RequestInfo::default());
        assert_eq!(ctx.on_request_headers(&mut HeaderMap::new(), true), Ok(Action::Continue));
        let err = ctx.on_response_headers(&mut status, &mut HeaderMap::new(), true).unwrap_err();
        assert!(matches!(err, WasmError::OutOfFuel { callback: Callback::ResponseHeaders, .. }), "{err}");
    }
}

#[test]
fn memory_past_the_cap_fails_the_request_cleanly() {
    let plugin = plugin("grow");
    let mut req = headers(&[("x-grow", "1")]);
    let err = plugin.http_context(RequestInfo::default()).on_request_headers(&mut req, true).unwrap_err();
    assert!(matches!(&err, WasmError::Trap { callback: Callback::RequestHeaders, message } if message.contains("unreachable")), "{err}");
    let mut req = HeaderMap::new();
    assert_eq!(plugin.http_context(RequestInfo::default()).on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-grown"), None);

    // Under a larger cap the same growth succeeds.
    let roomy = compile("grow", b"", Limits { memory_bytes: 128 << 20, ..Limits::default() }).unwrap();
    let mut req = headers(&[("x-grow", "1")]);
    assert_eq!(roomy.http_context(RequestInfo::default()).on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-grown"), Some("1"));

    // A cap below the module's own minimum memory is a compile error.
    let err = compile("grow", b"", Limits { memory_bytes: 32 << 10, ..Limits::default() }).unwrap_err();
    assert!(matches!(&err, WasmError::Module(m) if m.contains("cannot be instantiated")), "{err}");
}

#[test]
fn whole_header_maps_round_trip_and_can_be_replaced() {
    let plugin = plugin("pairs");
    let mut ctx = plugin.http_context(RequestInfo { authority: Some("api.test".into()), ..info(Method::PUT, "/a?b=c") });
    let original = headers(&[("accept", "text/plain"), ("x-many", "1"), ("x-many", "2"), ("x-empty", "")]);
    let mut req = original.clone();
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(req, original);
    assert_eq!(ctx.path(), "/a?b=c");
    assert_eq!(ctx.method(), Method::PUT);

    let mut ctx = plugin.http_context(info(Method::GET, "/a"));
    let mut req = headers(&[("x-replace", "1"), ("accept", "*/*")]);
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(req, headers(&[("x-only", "1")]));
    assert_eq!(ctx.path(), "/rewritten");
}

#[test]
fn stubbed_imports_load_and_answer_unimplemented() {
    let plugin = plugin("stubs");
    let mut ctx = plugin.http_context(RequestInfo::default());
    let mut req = HeaderMap::new();
    assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-http-call"), Some("unimplemented"));
    assert_eq!(get(&req, "x-metric"), Some("unimplemented"));
    assert_eq!(get(&req, "x-effective"), Some("ok"));
}

#[test]
fn modules_that_cannot_run_are_refused_with_their_reason() {
    let err = WasmPlugin::compile("junk", b"\0asm not really", Vec::new(), Limits::default()).unwrap_err();
    assert!(matches!(&err, WasmError::Module(m) if m.contains("not a valid WebAssembly module")), "{err}");

    let m = module_error(r#"(module (memory (export "memory") 1))"#);
    assert!(m.contains("not a proxy-wasm module"), "{m}");

    let m = module_error(r#"(module (func (export "proxy_abi_version_0_1_0")))"#);
    assert!(m.contains("ABI 0.1.0"), "{m}");

    let m = module_error(&format!("(module {PRELUDE})"));
    assert_eq!(m, "does not export proxy_on_context_create");

    let m = module_error(&format!(
        r#"(module (import "env" "proxy_fly_to_the_moon" (func (param i32) (result i32))) {PRELUDE}
           (func (export "proxy_on_context_create") (param i32 i32)))"#
    ));
    assert!(m.contains("proxy_fly_to_the_moon"), "{m}");

    // A known import with the wrong signature is named too.
    let m = module_error(&format!(
        r#"(module (import "env" "proxy_log" (func (param i32) (result i32))) {PRELUDE}
           (func (export "proxy_on_context_create") (param i32 i32)))"#
    ));
    assert!(m.contains("proxy_log"), "{m}");

    let m = module_error(&format!(
        r#"(module {PRELUDE} (func (export "proxy_on_context_create") (param i32 i32))
           (func (export "proxy_on_request_headers") (param i64) (result i32) (i32.const 0)))"#
    ));
    assert!(m.contains("proxy_on_request_headers with the wrong signature"), "{m}");

    // proxy_on_vm_start trapping is a start-up error.
    let bytes = wat::parse_str(format!(
        r#"(module {PRELUDE} (func (export "proxy_on_context_create") (param i32 i32))
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32) unreachable))"#
    ))
    .unwrap();
    let err = WasmPlugin::compile("trap", &bytes, Vec::new(), Limits::default()).unwrap_err();
    assert!(matches!(&err, WasmError::Configure(m) if m.starts_with("proxy_on_vm_start trapped")), "{err}");
}

/// An answer a module makes as its request is cleaned up (proxy_on_done)
/// has no request to go to, and must not become the next request's.
#[test]
fn an_answer_made_at_clean_up_never_reaches_the_next_request() {
    let bytes = wat::parse_str(format!(
        r#"(module
           (import "env" "proxy_send_local_response" (func $respond (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
           {PRELUDE}
           (func (export "proxy_on_context_create") (param i32 i32))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
           (func (export "proxy_on_done") (param i32) (result i32)
             (drop (call $respond (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
             (i32.const 1)))"#
    ))
    .unwrap();
    let plugin = WasmPlugin::compile("late", &bytes, Vec::new(), Limits::default()).unwrap();
    for _ in 0..2 {
        let mut ctx = plugin.http_context(RequestInfo::default());
        assert_eq!(ctx.on_request_headers(&mut HeaderMap::new(), true), Ok(Action::Continue));
    }
    assert_eq!(plugin.instances_started(), 1);
}

#[test]
fn a_filter_built_with_the_assemblyscript_sdk_runs() {
    // fixtures/wasm/assemblyscript: source, lock file and the built module.
    let path = format!("{}/fixtures/wasm/assemblyscript/filter.wasm", env!("CARGO_MANIFEST_DIR"));
    let module = std::fs::read(path).unwrap();
    let plugin = WasmPlugin::compile("as", &module, Vec::new(), Limits::default()).unwrap();
    for _ in 0..3 {
        let mut req = headers(&[("x-remove-me", "1"), ("accept", "*/*")]);
        let mut ctx = plugin.http_context(RequestInfo::default());
        assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
        assert_eq!(get(&req, "x-as-filter"), Some("hello"));
        assert_eq!(get(&req, "x-remove-me"), None);
        assert_eq!(get(&req, "accept"), Some("*/*"));
    }
    assert_eq!(plugin.instances_started(), 1);
    // The SDK's onConfigure passes the configuration's size where the
    // address for the returned size belongs, so its getConfiguration() is
    // empty on any host: a configuration changes nothing, and breaks nothing.
    let configured = WasmPlugin::compile("as", &module, b"acme".to_vec(), Limits::default()).unwrap();
    let mut req = HeaderMap::new();
    configured.http_context(RequestInfo::default()).on_request_headers(&mut req, true).unwrap();
    assert_eq!(get(&req, "x-as-filter"), Some("hello"));
}

#[test]
fn each_worker_thread_has_its_own_instance_reused_by_its_requests() {
    let plugin = plugin("headers");
    let run = |plugin: Arc<WasmPlugin>| {
        for _ in 0..5 {
            let mut req = HeaderMap::new();
            plugin.http_context(RequestInfo::default()).on_request_headers(&mut req, true).unwrap();
            assert_eq!(get(&req, "x-wasm"), Some("hello"));
        }
    };
    run(plugin.clone());
    assert_eq!(plugin.instances_started(), 1);
    let other = plugin.clone();
    std::thread::spawn(move || run(other)).join().unwrap();
    assert_eq!(plugin.instances_started(), 2);
    run(plugin.clone());
    assert_eq!(plugin.instances_started(), 2);
}

#[test]
fn a_context_outlives_a_trap_of_another_request_in_its_instance() {
    // Two requests in flight on one worker; the second's trap restarts the
    // instance; the first's next callback runs in the new one.
    let plugin = plugin("loop");
    let mut first = plugin.http_context(RequestInfo::default());
    let mut req = HeaderMap::new();
    assert_eq!(first.on_request_headers(&mut req, true), Ok(Action::Continue));
    let mut second = plugin.http_context(RequestInfo::default());
    assert!(second.on_request_headers(&mut headers(&[("x-loop", "1")]), true).is_err());
    drop(second);
    let mut req = HeaderMap::new();
    assert_eq!(first.on_request_headers(&mut req, true), Ok(Action::Continue));
    assert_eq!(get(&req, "x-ok"), Some("1"));
    assert_eq!(plugin.instances_started(), 2);
}

/// What one request through a header-adding filter costs (context,
/// request headers, drop: `proxy_on_context_create`,
/// `proxy_on_request_headers`, `proxy_on_done`, `proxy_on_delete`).
/// Prints the figure; `WASM_COST_ITERATIONS` makes the run longer, e.g.
/// `WASM_COST_ITERATIONS=200000 cargo test --release --test wasm_engine
/// header_filter_cost -- --nocapture`.
#[test]
fn header_filter_cost() {
    let plugin = compile("config", b"acme", Limits::default()).unwrap();
    let n: u32 = std::env::var("WASM_COST_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let template = headers(&[("host", "shop.test"), ("accept", "*/*"), ("user-agent", "bench/1.0")]);
    let one = || {
        let mut req = template.clone();
        let mut ctx = plugin.http_context(info(Method::GET, "/orders/1"));
        assert_eq!(ctx.on_request_headers(&mut req, true), Ok(Action::Continue));
        req
    };
    assert_eq!(get(&one(), "x-config"), Some("acme"));
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(one());
    }
    let per = started.elapsed() / n;
    println!("header-adding wasm filter: {per:?} per request ({n} requests)");
    // One instance for all of them: nothing is instantiated per request.
    assert_eq!(plugin.instances_started(), 1);
    assert!(per < Duration::from_millis(2), "{per:?} per request");
}
