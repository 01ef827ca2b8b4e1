//! The `wasm` policy type (docs/plugins.md): proxy-wasm filters from
//! `fixtures/wasm/` (WebAssembly text, compiled here) run by a real gateway
//! in front of a real backend, checked through what the backend saw and
//! what the client got; and the config errors a module can cause. Without
//! the cargo feature `wasm`, only the last test runs: the type is refused.

mod common;

#[cfg(not(feature = "wasm"))]
#[test]
fn without_the_feature_a_wasm_policy_is_a_config_error() {
    let yaml = "policies:\n  - { name: plugin, type: wasm, config: { module_base64: AGFzbQEAAAA= } }\n";
    let err = manifold::config::load::config_from_text(yaml, manifold::config::Format::Yaml).unwrap_err().to_string();
    assert!(err.contains("policies.plugin.config: this build has no wasm support"), "{err}");
}

#[cfg(feature = "wasm")]
mod with_wasm {
    use super::common;

    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use common::{backend, client, gateway, send, GatewayProcess};
    use serde_json::{json, Value};

    fn module(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/wasm/{name}.wat", env!("CARGO_MANIFEST_DIR"));
        wat::parse_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn base64_of(name: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(module(name))
    }

    /// A config with one route to `upstream` behind one wasm policy, whose
    /// `config` is `policy` (YAML flow mapping contents).
    fn config(upstream: &str, policy: &str) -> String {
        format!(
        "policies:\n  - {{ name: plugin, type: wasm, config: {{ {policy} }} }}\nroutes:\n  - {{ name: r, path: \"/r/{{*rest}}\", upstream: \"{upstream}\", policies: [plugin] }}\n"
    )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_filter_adds_and_removes_headers_both_ways() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}", base64_of("headers"))));
        let url = format!("http://{}/r/a?q=1", g.proxy_addr);
        let (s, h, echo) = send("GET", &url, None, &[("x-remove-me", "1"), ("x-keep", "2")]).await;
        assert_eq!(s, 200, "{echo}");
        let seen = &echo["headers"];
        assert_eq!(seen["x-wasm"], json!(["hello"]));
        assert!(seen.get("x-remove-me").is_none(), "{seen}");
        assert_eq!(seen["x-keep"], json!(["2"]));
        assert_eq!(seen["x-path"], json!(["/r/a?q=1"]), "the :path pseudo-header");
        assert_eq!(seen["x-method"], json!(["GET"]));
        assert_eq!(seen["x-plugin"], json!(["plugin"]), "plugin_name is the policy's name");
        assert_eq!(h["x-wasm-response"], "1");
        assert_eq!(h["x-status"], "200");
        assert_eq!(h["x-backend"], "yes");
        g.shutdown();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_local_response_answers_and_the_backend_is_not_called() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}", base64_of("deny"))));
        let resp = client().get(format!("http://{}/r/x", g.proxy_addr)).send().await.unwrap();
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert!(resp.headers().get("x-request-id").is_some(), "the gateway's headers are on the module's answer");
        let len: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
        let body = resp.bytes().await.unwrap();
        assert_eq!(len, body.len());
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"error": "forbidden"}));
        assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the backend was not called");

        let (s, _, echo) = send("GET", &format!("http://{}/r/x", g.proxy_addr), None, &[("x-allow", "1")]).await;
        assert_eq!(s, 200, "{echo}");
        assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        g.shutdown();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn request_and_response_bodies_are_rewritten_whole() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}", base64_of("body"))));
        let url = format!("http://{}/r/b", g.proxy_addr);
        let resp = client().post(&url).json(&json!({"a": 1})).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let len: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
        let body = resp.bytes().await.unwrap();
        assert_eq!(len, body.len(), "Content-Length is the rewritten body's");
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"rewritten": true}));
        let seen = b.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen["json"], json!({"wrapped": {"a": 1}}), "the backend got the module's body");
        let sent = serde_json::to_vec(&json!({"wrapped": {"a": 1}})).unwrap().len();
        assert_eq!(seen["body_bytes"], json!(sent));

        // A body that is not a JSON object is refused by the module (400).
        let resp = client().post(&url).header("content-type", "application/json").body("[1]").send().await.unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.headers().contains_key("x-request-id"), "the chain's headers are added");
        assert_eq!(resp.text().await.unwrap(), r#"{"error":"not an object"}"#, "the module's own answer, as it made it");
        assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 1, "the refused body did not go on");
        g.shutdown();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_module_reads_its_plugin_config() {
        let b = backend().run().await;
        let yaml = format!(
        "policies:\n  - {{ name: text, type: wasm, config: {{ module_base64: {m}, config: acme }} }}\n  - {{ name: doc, type: wasm, config: {{ module_base64: {m}, config: {{ tenant: acme }} }} }}\nroutes:\n  - {{ name: a, path: /a, upstream: \"{u}\", policies: [text] }}\n  - {{ name: b, path: /b, upstream: \"{u}\", policies: [doc] }}\n",
        m = base64_of("config"),
        u = b.url()
    );
        let g = gateway(&yaml);
        let (s, _, echo) = send("GET", &format!("http://{}/a", g.proxy_addr), None, &[]).await;
        assert_eq!(s, 200, "{echo}");
        assert_eq!(echo["headers"]["x-config"], json!(["acme"]), "a string is passed as its bytes");
        let (_, _, echo) = send("GET", &format!("http://{}/b", g.proxy_addr), None, &[]).await;
        assert_eq!(echo["headers"]["x-config"], json!([r#"{"tenant":"acme"}"#]), "any other value as JSON");
        g.shutdown();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_looping_filter_fails_its_request_and_the_gateway_goes_on() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}, fuel: 200000", base64_of("loop"))));
        let url = format!("http://{}/r/l", g.proxy_addr);
        // More requests than workers: every worker meets the loop, and each
        // serves on after it.
        for _ in 0..4 {
            let started = Instant::now();
            let (s, h, body) = common::within(10, "the looping request", send("GET", &url, None, &[("x-loop", "1")])).await;
            assert!(started.elapsed() < Duration::from_secs(5), "answered promptly: {:?}", started.elapsed());
            assert_eq!(s, 500, "{body}");
            assert_eq!(body["error"]["code"], "internal", "{body}");
            assert_eq!(body["error"]["request_id"], h["x-request-id"].to_str().unwrap(), "{body}");
            let (s, _, echo) = common::within(10, "the next request", send("GET", &url, None, &[])).await;
            assert_eq!(s, 200, "{echo}");
            assert_eq!(echo["headers"]["x-ok"], json!(["1"]));
        }
        assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 4, "no looping request reached the backend");
        // Each failure is counted by policy and callback.
        let metrics = client().get(format!("http://{}/metrics", g.admin_addr)).send().await.unwrap().text().await.unwrap();
        let line = r#"manifold_wasm_failures_total{callback="proxy_on_request_headers",policy="plugin"} 4"#;
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{}",
            metrics.lines().filter(|l| l.contains("wasm")).collect::<Vec<_>>().join("\n")
        );
        g.shutdown();
    }

    /// A config directory: `gateway.yaml` and `plugins/headers.wasm`.
    fn config_dir(yaml: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("plugins/headers.wasm"), module("headers")).unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_module_path_is_relative_to_the_config_file() {
        let b = backend().run().await;
        let dir = config_dir(&config(&b.url(), "module: plugins/headers.wasm"));
        // Run from elsewhere: the path is the file's, not the process's.
        let mut p = GatewayProcess::start(dir.path(), &[]);
        let (s, _, echo) = send("GET", &format!("http://{}/r/z", p.proxy), None, &[]).await;
        assert_eq!(s, 200, "{echo}");
        assert_eq!(echo["headers"]["x-wasm"], json!(["hello"]));
        p.child.kill().unwrap();
        let _ = p.child.wait();
    }

    /// How many log lines of the gateway's contain `text`.
    fn count(p: &GatewayProcess, text: &str) -> usize {
        p.log.lock().unwrap().iter().filter(|l| l.contains(text)).count()
    }

    /// Until `n` requests have been logged by headers.wat.
    async fn logged_requests(p: &GatewayProcess, n: usize) {
        common::within(10, "the requests logged", async {
            while count(p, "request headers seen") < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_module_is_compiled_once_per_config_and_instantiated_once_per_worker() {
        let b = backend().run().await;
        let dir = config_dir(&config(&b.url(), "module: plugins/headers.wasm"));
        // headers.wat logs "instance configured" from proxy_on_configure:
        // once for the trial start when the config compiles, then once per
        // worker that serves a request. Validation, the start-up checks and
        // the snapshot share that one compile.
        let mut p = GatewayProcess::start(dir.path(), &["--workers", "1"]);
        for _ in 0..5 {
            let (s, _, echo) = send("GET", &format!("http://{}/r/z", p.proxy), None, &[]).await;
            assert_eq!(s, 200, "{echo}");
        }
        logged_requests(&p, 5).await;
        assert_eq!(count(&p, "instance configured"), 2, "one trial start, one worker's instance: {:?}", p.log.lock().unwrap());

        // A config posted to the admin API: compiled once more (its trial),
        // and the worker starts the new config's instance on first use.
        let admin = format!("http://{}", p.admin);
        let yaml = std::fs::read_to_string(dir.path().join("gateway.yaml")).unwrap().replace("/r/{*rest}", "/s/{*rest}");
        let yaml = yaml.replace("plugins/headers.wasm", &dir.path().join("plugins/headers.wasm").display().to_string());
        let resp = client().post(format!("{admin}/config")).header("content-type", "application/yaml").body(yaml).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let (s, _, echo) = send("GET", &format!("http://{}/s/z", p.proxy), None, &[]).await;
        assert_eq!(s, 200, "{echo}");
        logged_requests(&p, 6).await;
        assert_eq!(count(&p, "instance configured"), 4, "{:?}", p.log.lock().unwrap());
        p.child.kill().unwrap();
        let _ = p.child.wait();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn proxy_on_log_ends_every_request_also_one_the_backend_never_answered() {
        let b = backend().run().await;
        // log.wat logs the request's path from proxy_on_log.
        let policy = format!("{{ name: plugin, type: wasm, config: {{ module_base64: {} }} }}", base64_of("log"));
        let yaml = format!(
            "policies:\n  - {policy}\nroutes:\n  - {{ name: up, path: \"/up/{{*rest}}\", upstream: \"{}\", policies: [plugin] }}\n  - {{ name: down, path: \"/down/{{*rest}}\", upstream: \"http://127.0.0.1:9\", policies: [plugin] }}\n",
            b.url()
        );
        let dir = config_dir(&yaml);
        let mut p = GatewayProcess::start(dir.path(), &[]);
        let (s, _, _) = send("GET", &format!("http://{}/up/a", p.proxy), None, &[]).await;
        assert_eq!(s, 200);
        let (s, _, body) = send("GET", &format!("http://{}/down/b", p.proxy), None, &[]).await;
        assert_eq!(s, 502, "{body}");
        let logged = |path: &str| {
            let message = format!("\"message\":\"{path}\"");
            p.log.lock().unwrap().iter().filter(|l| l.contains(&message) && l.contains("manifold::wasm")).count()
        };
        common::within(10, "both requests logged by the module", async {
            while logged("/down/b") == 0 || logged("/up/a") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!((logged("/up/a"), logged("/down/b")), (1, 1), "once each: {:?}", p.log.lock().unwrap());
        p.child.kill().unwrap();
        let _ = p.child.wait();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_module_rebuilt_under_the_same_path_is_a_change_and_its_digest_is_checked() {
        let b = backend().run().await;
        let dir = config_dir("");
        let wasm = dir.path().join("plugins/headers.wasm");
        // Posted with an absolute path: the admin API has no file to be
        // relative to.
        let yaml = config(&b.url(), &format!("module: {}", wasm.display()));
        let g = gateway(&yaml);
        let admin = format!("http://{}", g.admin_addr);
        let digest = |bytes: &[u8]| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(bytes))
        };
        // The running config names the module's digest.
        let policy: Value = client().get(format!("{admin}/policies/plugin")).send().await.unwrap().json().await.unwrap();
        assert_eq!(policy["config"]["module_sha256"], json!(digest(&module("headers"))), "{policy}");

        let post = |body: String, dry: bool| {
            let url = format!("{admin}/config{}", if dry { "?dry_run=true" } else { "" });
            async move {
                let resp = client().post(url).header("content-type", "application/yaml").body(body).send().await.unwrap();
                (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
            }
        };
        // The same text, the same file: nothing to change.
        let (s, plan) = post(yaml.clone(), true).await;
        assert_eq!(s, 200, "{plan}");
        assert_eq!(plan["changes"]["updated"], json!([]), "{plan}");

        // The module rebuilt in place (deny.wat refuses every request with
        // 403): the same text is now a change to the policy.
        std::fs::write(&wasm, module("deny")).unwrap();
        let (s, plan) = post(yaml.clone(), true).await;
        assert_eq!(s, 200, "{plan}");
        let updated = &plan["changes"]["updated"];
        assert_eq!((&updated[0]["kind"], &updated[0]["name"]), (&json!("policies"), &json!("plugin")), "{plan}");
        assert_eq!(updated[0]["fields"][0]["path"], "config.module_sha256", "{plan}");
        assert_eq!(updated[0]["fields"][0]["after"], json!(digest(&module("deny"))), "{plan}");
        let (s, body) = post(yaml.clone(), false).await;
        assert_eq!(s, 200, "{body}");
        let (s, _, _) = send("GET", &format!("http://{}/r/a", g.proxy_addr), None, &[]).await;
        assert_eq!(s, 403, "the rebuilt module runs");

        // A config naming other bytes than the file holds is refused, with
        // both digests, and the running config stays.
        let stale = config(&b.url(), &format!("module: {}, module_sha256: {}", wasm.display(), digest(&module("headers"))));
        let (s, body) = post(stale, false).await;
        assert_eq!(s, 400, "{body}");
        let text = body.to_string();
        assert!(text.contains("policies.plugin.config.module_sha256"), "{text}");
        assert!(text.contains(&digest(&module("deny"))), "{text}");
        let (s, _, _) = send("GET", &format!("http://{}/r/a", g.proxy_addr), None, &[]).await;
        assert_eq!(s, 403);
        let (s, body) = post(config(&b.url(), &format!("module: {}, module_sha256: xyz", wasm.display())), true).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.to_string().contains("not a SHA-256 digest"), "{body}");
        g.shutdown();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failure_is_logged_with_the_policy_and_the_callback() {
        let b = backend().run().await;
        let dir = config_dir(&config(&b.url(), &format!("module_base64: {}, fuel: 100000", base64_of("loop"))));
        let mut p = GatewayProcess::start(dir.path(), &[]);
        let (s, _, body) = send("GET", &format!("http://{}/r/z", p.proxy), None, &[("x-loop", "1")]).await;
        assert_eq!(s, 500, "{body}");
        let line = common::within(10, "the error line", async {
            loop {
                let found = p.log.lock().unwrap().iter().find(|l| l.contains("wasm policy failed")).cloned();
                if let Some(l) = found {
                    break l;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let line: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["level"], "ERROR", "{line}");
        assert_eq!(line["policy"], "plugin", "{line}");
        assert_eq!(line["callback"], "proxy_on_request_headers", "{line}");
        assert!(line["error"].as_str().unwrap().contains("fuel"), "{line}");
        p.child.kill().unwrap();
        let _ = p.child.wait();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_path_the_module_sets_is_the_one_the_backend_gets() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}", base64_of("pairs"))));
        let (s, _, echo) = send("GET", &format!("http://{}/r/original?q=1", g.proxy_addr), None, &[("x-replace", "1")]).await;
        assert_eq!(s, 200, "{echo}");
        assert_eq!(echo["path"], "/rewritten", "{echo}");
        assert_eq!(echo["query"], Value::Null, "the query went with the old :path");
        assert_eq!(echo["headers"]["x-only"], json!(["1"]));
        assert!(echo["headers"].get("x-replace").is_none(), "the whole map was replaced");
        g.shutdown();
    }

    fn validate(file: &Path) -> (Option<i32>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_manifold")).arg("validate").arg(file).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    #[test]
    fn module_errors_are_config_errors_with_file_and_path() {
        let dir = config_dir("");
        let file: PathBuf = dir.path().join("gateway.yaml");
        let shown = file.display().to_string();
        let cases = [
            ("module: plugins/headers.wasm, module_base64: AGFzbQEAAAA=", "policies.plugin.config: give one of module and module_base64"),
            ("config: x", "policies.plugin.config: a module is required"),
            ("module: plugins/missing.wasm", "policies.plugin.config.module: cannot read "),
            ("module_base64: bm90IHdhc20=", "policies.plugin.config.module_base64: module: "),
            ("module_base64: '!!'", "policies.plugin.config.module_base64: not base64"),
            // `(module)`: the text format, with a hint to compile it.
            ("module_base64: KG1vZHVsZSk=", "policies.plugin.config.module_base64: this is the WebAssembly text format"),
            ("module: plugins/headers.wasm, phase: nowhere", "policies.plugin.config.phase: unknown phase"),
            ("module: plugins/headers.wasm, phase: ip-restriction", "policies.plugin.config.phase: ip-restriction is an admission phase"),
            ("module: plugins/headers.wasm, phase: authentication", "policies.plugin.config.phase: authentication is an admission phase"),
            ("module: plugins/headers.wasm, fuel: 0", "policies.plugin.config.fuel: must be above zero"),
        ];
        for (policy, want) in cases {
            std::fs::write(&file, config("http://127.0.0.1:9", policy)).unwrap();
            let (code, stderr) = validate(&file);
            assert_eq!(code, Some(1), "{policy}: {stderr}");
            assert!(stderr.contains(&format!("{shown}: {want}")), "{policy}: want {want:?} in\n{stderr}");
        }
        // The missing file is named.
        std::fs::write(&file, config("http://127.0.0.1:9", "module: plugins/missing.wasm")).unwrap();
        let (_, stderr) = validate(&file);
        assert!(stderr.contains("plugins/missing.wasm"), "{stderr}");

        // A module whose start-up refuses: config.wat wants a configuration.
        std::fs::write(dir.path().join("plugins/config.wasm"), module("config")).unwrap();
        std::fs::write(&file, config("http://127.0.0.1:9", "module: plugins/config.wasm")).unwrap();
        let (code, stderr) = validate(&file);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{shown}: policies.plugin.config.config: the module would not start")), "{stderr}");

        // The text format given by its file: the hint, also for a file that
        // starts with a comment (as the fixtures do).
        std::fs::copy(format!("{}/fixtures/wasm/headers.wat", env!("CARGO_MANIFEST_DIR")), dir.path().join("plugins/headers.wat")).unwrap();
        std::fs::write(&file, config("http://127.0.0.1:9", "module: plugins/headers.wat")).unwrap();
        let (code, stderr) = validate(&file);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("policies.plugin.config.module: ") && stderr.contains("this is the WebAssembly text format"), "{stderr}");

        // And the valid one passes. headers.wat logs as it starts: that goes
        // to stderr, and stdout is only the answer.
        std::fs::write(&file, config("http://127.0.0.1:9", "module: plugins/headers.wasm")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_manifold")).arg("validate").arg(&file).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stdout.starts_with("ok: ") && stdout.lines().count() == 1, "{stdout}");
        assert!(stderr.contains("instance configured"), "{stderr}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_module_posted_to_the_admin_api_is_refused_with_its_path() {
        let b = backend().run().await;
        let g = gateway(&config(&b.url(), &format!("module_base64: {}", base64_of("headers"))));
        let bad = config(&b.url(), "module_base64: bm90IHdhc20=");
        let resp = client()
            .post(format!("http://{}/config", g.admin_addr))
            .header("content-type", "application/yaml")
            .body(bad)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(body.to_string().contains("policies.plugin.config.module_base64"), "{body}");
        // The running config is untouched.
        let (s, _, echo) = send("GET", &format!("http://{}/r/a", g.proxy_addr), None, &[]).await;
        assert_eq!(s, 200);
        assert_eq!(echo["headers"]["x-wasm"], json!(["hello"]));
        g.shutdown();
    }
}
