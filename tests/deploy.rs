//! The Kubernetes manifests under deploy/k8s, validated against the
//! Kubernetes schemas (no cluster runs here) by `deploy/validate.sh`, which
//! installs the PyPI package `kubernetes-validate` on first use. Part of the
//! test suite, so CI checks them with everything else.

use std::process::Command;

fn validate(files: &[&std::path::Path]) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/deploy/validate.sh"))
        .args(files)
        .env("MANIFOLD_BIN", env!("CARGO_BIN_EXE_manifold"))
        .current_dir(root)
        .output()
        .expect("bash runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_shipped_manifests_are_valid_kubernetes() {
    let (ok, out) = validate(&[]);
    assert!(ok, "deploy/validate.sh failed:\n{out}");
}

#[test]
fn an_invalid_manifest_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("deployment.yaml");
    // `replica` is not a field of a DeploymentSpec; strict validation refuses it.
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: broken }\nspec:\n  replica: 2\n  selector: { matchLabels: { app: x } }\n  template:\n    metadata: { labels: { app: x } }\n    spec:\n      containers: [{ name: x, image: x }]\n",
    )
    .unwrap();
    let (ok, out) = validate(&[&bad]);
    assert!(!ok, "a manifest with an unknown field passed:\n{out}");
    assert!(out.contains("deployment.yaml"), "the failed file is named:\n{out}");
}
