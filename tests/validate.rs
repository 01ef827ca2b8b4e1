//! `manifold validate` and the config checks behind it. Each file under
//! `fixtures/invalid/` is one case: its `# expect:` lines are the errors it
//! must produce, every one of them and no others.

use std::path::PathBuf;
use std::process::Command;

use manifold::config::load_paths;

fn errors_of(file: &str) -> Vec<String> {
    match load_paths(&[PathBuf::from(file)]).and_then(|c| manifold::snapshot::compile(c, 1, &manifold::policy::Services::new(None))) {
        Ok(_) => vec![],
        Err(errors) => errors.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn every_invalid_fixture_reports_exactly_its_expected_errors() {
    let mut files: Vec<_> = std::fs::read_dir("fixtures/invalid").unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 10, "the fixtures are there");
    let mut failures = Vec::new();
    for path in files {
        let file = path.to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).map(|e| format!("{file}: {e}")).collect();
        assert!(!expected.is_empty(), "{file} has no # expect: lines");
        let got = errors_of(&file);
        for want in &expected {
            if !got.iter().any(|g| g.starts_with(want.trim_end())) {
                failures.push(format!("{file}: missing error\n  want: {want}\n  got:  {got:#?}"));
            }
        }
        if got.len() != expected.len() {
            failures.push(format!("{file}: {} errors, {} expected:\n{got:#?}", got.len(), expected.len()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_shipped_config_is_valid() {
    assert_eq!(errors_of("compositions"), Vec::<String>::new());
}

#[test]
fn the_cli_prints_every_error_and_exits_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(["validate", "fixtures/invalid/many-errors.yaml", "fixtures/invalid/cycle.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fixtures/invalid/many-errors.yaml: routes.Bad_Name.name: invalid name"), "{stderr}");
    assert!(stderr.contains("fixtures/invalid/cycle.yaml: compositions.loop.calls: calls depend on each other in a cycle"), "{stderr}");
    assert!(stderr.contains("8 error(s)"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_manifold")).args(["validate", "compositions"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    // `--config-dir`, as `serve` spells it, is a path like the others.
    let out = Command::new(env!("CARGO_BIN_EXE_manifold")).args(["validate", "--config-dir", "fixtures/invalid"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixtures/invalid/cycle.yaml: compositions.loop.calls"));
}

#[test]
fn secrets_in_files_are_hashed_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "consumers:\n  - name: app\n    credentials:\n      - { type: key-auth, key: hello }\n      - { type: basic-auth, username: app, password: pw }\n",
    )
    .unwrap();
    let config = load_paths(&[file]).unwrap();
    let shown = serde_json::to_string(&config.config).unwrap();
    assert!(!shown.contains("\"hello\"") && !shown.contains("\"pw\""), "{shown}");
    // SHA-256("hello")
    assert!(shown.contains("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"), "{shown}");
    assert!(shown.contains("$argon2id$"), "{shown}");
}

#[test]
fn yaml_and_json_files_in_a_directory_are_merged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "policies: [{ name: ids, type: correlation-id }]\n").unwrap();
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    std::fs::write(
        dir.path().join("nested/b.json"),
        r#"{"routes": [{"name": "r", "path": "/r", "upstream": "http://127.0.0.1:9", "policies": ["ids"]}]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("ignored.txt"), "not config").unwrap();
    let config = load_paths(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.policies.len(), 1);
}

#[test]
fn tls_verify_false_is_accepted_and_warned_about_at_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.yaml");
    std::fs::write(&file, "upstreams:\n  - { name: legacy, targets: [{ url: \"https://legacy.internal\" }], tls: { verify: false } }\n")
        .unwrap();
    let config = load_paths(std::slice::from_ref(&file)).expect("allowed");
    let warnings: Vec<String> = manifold::config::validate::warnings(&config).iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("upstreams.legacy.tls.verify: upstream \"legacy\": certificate verification is off"), "{warnings:?}");
    // `manifold validate` logs it, as every load does, and still says ok.
    let out = Command::new(env!("CARGO_BIN_EXE_manifold")).arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("WARN") && said.contains("certificate verification is off"), "{said}");
    assert!(said.contains("ok: 0 routes, 0 compositions, 0 consumers, 0 policies, 1 upstreams"), "{said}");
    // Verification on (the default) says nothing.
    std::fs::write(&file, "upstreams:\n  - { name: legacy, targets: [{ url: \"https://legacy.internal\" }], tls: { verify: true } }\n")
        .unwrap();
    assert!(manifold::config::validate::warnings(&load_paths(std::slice::from_ref(&file)).unwrap()).is_empty());
    // A tls block with only http:// targets is not used: said, not refused.
    std::fs::write(&file, "upstreams:\n  - { name: plain, targets: [{ url: \"http://10.0.0.1\" }], tls: { server_name: x.internal } }\n")
        .unwrap();
    let warnings: Vec<String> = manifold::config::validate::warnings(&load_paths(&[file]).unwrap()).iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("upstreams.plain.tls: upstream \"plain\": a tls block, but every target is http://"), "{warnings:?}");
}

/// A route and a composition call naming an upstream validate and compile
/// for a node, with every upstream field: DNS re-resolution, health checks,
/// retries and the circuit breaker.
#[test]
fn naming_an_upstream_compiles_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.yaml");
    std::fs::write(
        &file,
        "upstreams:\n  - { name: users, targets: [{ url: \"http://127.0.0.1:9\", weight: 3 }, { url: \"http://127.0.0.1:10\" }], balance: round-robin, connect_timeout: 2s }\nroutes:\n  - { name: r, path: /r, upstream: users }\ncompositions:\n  - { name: c, path: /c, calls: { me: { upstream: users, path: \"/me/{{request.query.id}}?x={{request.query.x}}\" } } }\n",
    )
    .unwrap();
    let config = load_paths(std::slice::from_ref(&file)).expect("the format and references are valid");
    assert_eq!(config.compositions[0].calls["me"].path.as_deref(), Some("/me/{{request.query.id}}?x={{request.query.x}}"));
    assert_eq!(errors_of(file.to_str().unwrap()), Vec::<String>::new());

    std::fs::write(
        &file,
        "upstreams:\n  - name: users\n    targets: [{ url: \"http://127.0.0.1:9\" }]\n    balance: least-requests\n    resolve_every: 30s\n    health: { passive: { failures: 5 } }\n    retries: { max: 2 }\n    circuit_breaker: { max_in_flight: 10 }\n  - { name: hashed, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash, hash_on: path }\nroutes:\n  - { name: r, path: /r, upstream: users }\n",
    )
    .unwrap();
    let errors = errors_of(file.to_str().unwrap());
    assert_eq!(errors, Vec::<String>::new());

    std::fs::write(
        &file,
        "upstreams:\n  - { name: least, targets: [{ url: \"http://127.0.0.1:9\" }, { url: \"http://127.0.0.1:10\", weight: 300 }], balance: least-requests }\n  - { name: h1, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash, hash_on: consumer }\n  - { name: h2, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash, hash_on: ip }\n  - { name: h3, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash, hash_on: \"header:X-User\" }\n  - { name: h4, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash, hash_on: path }\n  - { name: unkeyed, targets: [{ url: \"http://127.0.0.1:9\" }], balance: consistent-hash }\nroutes:\n  - { name: r, path: /r, upstream: least }\n",
    )
    .unwrap();
    let errors = errors_of(file.to_str().unwrap());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("upstreams.unkeyed.hash_on: balance: consistent-hash needs hash_on: consumer, ip, header:NAME or path"),
        "{errors:#?}"
    );
}

/// An upstream's TLS files are read when the config is compiled: one that
/// cannot be read is an error at its field.
#[test]
fn an_unreadable_upstream_tls_file_is_an_error_at_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.yaml");
    let missing = dir.path().join("nope.pem");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    std::fs::write(
        &file,
        format!(
            "upstreams:\n  - {{ name: a, targets: [{{ url: \"https://127.0.0.1:9\" }}], tls: {{ ca_file: {:?} }} }}\n  - {{ name: b, targets: [{{ url: \"https://127.0.0.1:9\" }}], tls: {{ client_cert_file: {:?}, client_key_file: {:?} }} }}\n",
            missing.display(),
            junk.display(),
            junk.display()
        ),
    )
    .unwrap();
    let errors = errors_of(file.to_str().unwrap());
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with("upstreams.a.tls.ca_file: ") && errors[0].contains("nope.pem"), "{errors:#?}");
    assert!(errors[1].starts_with("upstreams.b.tls.client_cert_file: ") && errors[1].contains("junk.pem"), "{errors:#?}");
}
