//! The user documentation is tested like code: every ```yaml block in
//! README.md and docs/ is a config document that the real binary accepts
//! (or, fenced ```yaml invalid, rejects), and every relative link in the
//! repository's Markdown resolves to a file inside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/, sorted.
fn doc_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut files);
    files
}

/// Every Markdown file of the repository: tracked, or new and not ignored.
fn repo_markdown() -> Vec<PathBuf> {
    let out = Command::new("git")
        .args(["ls-files", "--cached", "--others", "--exclude-standard", "*.md"])
        .current_dir(root())
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git ls-files failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut files: Vec<PathBuf> = String::from_utf8(out.stdout).unwrap().lines().map(|l| root().join(l)).filter(|p| p.is_file()).collect();
    files.sort();
    files.dedup();
    files
}

struct Block {
    file: PathBuf,
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    text: String,
}

/// Fenced code blocks (``` fences) with their info strings.
fn blocks(file: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((i + 1, info.trim().to_string(), String::new()));
                }
            }
            Some((start, info, body)) => {
                if trimmed.starts_with("```") {
                    out.push(Block { file: file.to_path_buf(), line: *start, info: std::mem::take(info), text: std::mem::take(body) });
                    open = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "{}: a code fence is never closed", file.display());
    out
}

fn where_(b: &Block) -> String {
    format!("{}:{}", b.file.strip_prefix(root()).unwrap_or(&b.file).display(), b.line)
}

#[test]
fn every_yaml_example_is_judged_by_manifold_validate() {
    let dir = tempfile::tempdir().unwrap();
    let (mut valid, mut invalid, mut failures) = (0, 0, Vec::new());
    for file in doc_files() {
        for b in blocks(&file) {
            let mut words = b.info.split_whitespace();
            if words.next() != Some("yaml") {
                assert!(!b.info.starts_with("yml"), "{}: fence the example as ```yaml", where_(&b));
                continue;
            }
            let expect_valid = match words.next() {
                None => true,
                Some("invalid") => false,
                Some(other) => panic!("{}: unknown fence word {other:?} (use ```yaml or ```yaml invalid)", where_(&b)),
            };
            let path = dir.path().join(format!("block-{}.yaml", valid + invalid));
            std::fs::write(&path, &b.text).unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_manifold"))
                .arg("validate")
                .arg(&path)
                .env("MANIFOLD_REDIS_URL", "redis://127.0.0.1:6379")
                .env_remove("MANIFOLD_CONFIG_DIR")
                .output()
                .unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let code = out.status.code();
            if expect_valid {
                valid += 1;
                if code != Some(0) {
                    failures.push(format!("{}: this example should be valid, but manifold validate said:\n{said}", where_(&b)));
                }
            } else {
                invalid += 1;
                if code != Some(1) {
                    failures
                        .push(format!("{}: this example is marked invalid, but manifold validate exited {code:?}:\n{said}", where_(&b)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} example(s) failed:\n\n{}", failures.len(), failures.join("\n"));
    // The docs hold dozens of examples: finding few means the search broke.
    assert!(valid >= 30, "only {valid} valid yaml examples found in README.md and docs/");
    assert!(invalid >= 2, "only {invalid} invalid yaml examples found");
}

/// `[text](target)` links outside code, with their 1-based lines.
fn links(file: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut in_fence = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        // Drop inline code spans, where `](` is not a link.
        let mut plain = String::new();
        for (j, part) in line.split('`').enumerate() {
            if j % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("").to_string();
            out.push((i + 1, target));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn markdown_links_stay_inside_the_repository_and_resolve() {
    let files = repo_markdown();
    assert!(files.len() >= 10, "only {} Markdown files found", files.len());
    let root = root().canonicalize().unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for file in &files {
        let name = file.strip_prefix(&root).unwrap_or(file).display().to_string();
        for (line, target) in links(file) {
            if target.contains("../shared") || target.contains("SPEC.md") {
                failures.push(format!("{name}:{line}: {target} is not part of the repository"));
                continue;
            }
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") || target.starts_with('#') {
                continue;
            }
            checked += 1;
            let path = target.split('#').next().unwrap_or("");
            if path.starts_with('/') || path.contains("://") {
                failures.push(format!("{name}:{line}: {target}: use a link relative to the file"));
                continue;
            }
            let resolved = file.parent().unwrap().join(path);
            match resolved.canonicalize() {
                Ok(p) if p.starts_with(&root) => {}
                Ok(p) => failures.push(format!("{name}:{line}: {target} leaves the repository ({})", p.display())),
                Err(_) => failures.push(format!("{name}:{line}: {target} does not exist")),
            }
        }
    }
    assert!(failures.is_empty(), "broken links:\n{}", failures.join("\n"));
    assert!(checked >= 20, "only {checked} relative links checked");
}

#[test]
fn the_readme_points_into_the_docs() {
    let readme = root().join("README.md");
    let targets: Vec<String> = links(&readme).into_iter().map(|(_, t)| t).collect();
    assert!(targets.iter().any(|t| t == "docs/README.md"), "README.md should link to docs/README.md: {targets:?}");
    assert!(targets.iter().filter(|t| t.starts_with("docs/")).count() >= 3, "README.md links into docs/ only {targets:?}");
}

#[test]
fn the_link_finder_finds_links() {
    // A guard for the checks above: the finder sees links, skips code.
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("x.md");
    std::fs::write(&md, "see [a](b.md) and [c](../d.md#e)\n`[no](code.md)`\n```\n[no](fence.md)\n```\n").unwrap();
    assert_eq!(links(&md), vec![(1, "b.md".to_string()), (1, "../d.md#e".to_string())]);
}

/// The variants a serde enum accepts, read from its "expected one of" error.
fn variants<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let err = serde_json::from_value::<T>(serde_json::json!("no-such-variant")).err().expect("not a variant").to_string();
    err.split('`').skip(1).step_by(2).filter(|v| *v != "no-such-variant").map(str::to_string).collect()
}

#[test]
fn every_policy_type_has_its_section() {
    let page = std::fs::read_to_string(root().join("docs/policies.md")).unwrap();
    let kinds = variants::<manifold::config::PolicyKind>();
    assert!(kinds.len() >= 13, "{kinds:?}");
    let missing: Vec<&String> = kinds.iter().filter(|k| !page.contains(&format!("\n### {k}\n"))).collect();
    assert!(missing.is_empty(), "docs/policies.md has no `### TYPE` section for {missing:?}");
}

#[test]
fn every_subcommand_and_flag_is_in_the_cli_page() {
    use clap::CommandFactory;
    let page = std::fs::read_to_string(root().join("docs/cli.md")).unwrap();
    let cli = manifold::cli::Cli::command();
    let mut missing = Vec::new();
    let mut seen = 0;
    for arg in cli.get_arguments() {
        if let Some(long) = arg.get_long() {
            if !page.contains(&format!("--{long}")) && !matches!(long, "help" | "version") {
                missing.push(format!("--{long}"));
            }
        }
    }
    for sub in cli.get_subcommands() {
        seen += 1;
        if !page.contains(&format!("## `manifold {}", sub.get_name())) {
            missing.push(format!("manifold {}", sub.get_name()));
        }
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                if !page.contains(&format!("--{long}")) && long != "help" {
                    missing.push(format!("manifold {} --{long}", sub.get_name()));
                }
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                if !page.contains(&*env) {
                    missing.push(format!("{env} (manifold {})", sub.get_name()));
                }
            }
        }
    }
    assert!(seen >= 5, "only {seen} subcommands");
    assert!(missing.is_empty(), "docs/cli.md does not mention {missing:?}");
}

/// The field names of a config type, from the schema derived from it.
fn fields<T: utoipa::PartialSchema>() -> Vec<String> {
    let schema = serde_json::to_value(T::schema()).unwrap();
    let props = schema["properties"].as_object().unwrap_or_else(|| panic!("no properties in {schema}"));
    props.keys().cloned().collect()
}

#[test]
fn every_config_field_is_in_a_table() {
    use manifold::config::{
        ActiveHealthCheck, Batch, Call, CallCache, Certificate, CircuitBreaker, Composition, Consumer, PassiveHealthCheck, Policy,
        ResponseSpec, Route, Upstream, UpstreamRetries, UpstreamTarget, UpstreamTls,
    };
    let pages = [
        ("routes.md", fields::<Route>()),
        ("compositions.md", fields::<Composition>()),
        ("compositions.md", fields::<Call>()),
        ("compositions.md", fields::<ResponseSpec>()),
        ("compositions.md", fields::<Batch>()),
        ("compositions.md", fields::<CallCache>()),
        ("consumers.md", fields::<Consumer>()),
        ("policies.md", fields::<Policy>()),
        ("upstreams.md", fields::<Upstream>()),
        ("upstreams.md", fields::<UpstreamTarget>()),
        ("upstreams.md", fields::<UpstreamTls>()),
        ("upstreams.md", fields::<ActiveHealthCheck>()),
        ("upstreams.md", fields::<PassiveHealthCheck>()),
        ("upstreams.md", fields::<UpstreamRetries>()),
        ("upstreams.md", fields::<CircuitBreaker>()),
        ("certificates.md", fields::<Certificate>()),
    ];
    let mut missing = Vec::new();
    let mut seen = 0;
    for (page, names) in pages {
        let text = std::fs::read_to_string(root().join("docs").join(page)).unwrap();
        for name in names {
            seen += 1;
            if !text.contains(&format!("| `{name}` |")) {
                missing.push(format!("docs/{page}: {name}"));
            }
        }
    }
    assert!(seen >= 40, "only {seen} fields found");
    assert!(missing.is_empty(), "fields without a row in their page's table: {missing:?}");
}
