//! From text to a [`Config`]: YAML or JSON documents, one entity at a time so
//! that one bad entity does not hide the errors of the others.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{validate, Config, ConfigError, ConfigErrors, Validated};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// The admin API's rule for a body: JSON when `Content-Type` says so,
    /// YAML otherwise (JSON is YAML too).
    pub fn from_content_type(content_type: Option<&str>) -> Format {
        if content_type.is_some_and(|v| v.contains("json")) {
            Format::Json
        } else {
            Format::Yaml
        }
    }

    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// A merged config and, for each entity, the file it came from.
#[derive(Clone, Debug, Default)]
pub struct LoadedConfig {
    pub config: Config,
    pub origins: Origins,
}

/// Parallel to the entity lists of a [`Config`]: where each entity came from.
#[derive(Clone, Debug, Default)]
pub struct Origins {
    pub routes: Vec<Option<Arc<str>>>,
    pub compositions: Vec<Option<Arc<str>>>,
    pub consumers: Vec<Option<Arc<str>>>,
    pub policies: Vec<Option<Arc<str>>>,
    pub upstreams: Vec<Option<Arc<str>>>,
    pub certificates: Vec<Option<Arc<str>>>,
    /// Entities that could not be parsed at all, whose names are still
    /// known: they are checked for duplicates and may be referred to.
    pub unparsed: Vec<Unparsed>,
    /// Objects (`routes.r`, `compositions.c.calls.a`) kept without a field
    /// whose value was wrong: their semantic errors are not reported, and
    /// a route or composition among them claims no path.
    pub partial: Vec<String>,
}

/// An entity that does not parse, by kind (`routes`, ...) and name.
#[derive(Clone, Debug)]
pub struct Unparsed {
    pub kind: &'static str,
    pub name: String,
    pub file: Option<Arc<str>>,
}

impl Origins {
    fn list_mut(&mut self, kind: &str) -> &mut Vec<Option<Arc<str>>> {
        match kind {
            "routes" => &mut self.routes,
            "compositions" => &mut self.compositions,
            "consumers" => &mut self.consumers,
            "upstreams" => &mut self.upstreams,
            "certificates" => &mut self.certificates,
            _ => &mut self.policies,
        }
    }

    /// Names of entities of `kind` that exist, though they do not parse.
    pub fn unparsed_names<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (&'a str, &'a Option<Arc<str>>)> + 'a {
        self.unparsed.iter().filter(move |u| u.kind == kind).map(|u| (u.name.as_str(), &u.file))
    }

    /// Whether `path` is at or under an object marked partial.
    pub fn is_partial(&self, path: &str) -> bool {
        self.partial
            .iter()
            .any(|p| path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')))
    }
}

impl LoadedConfig {
    pub fn from_config(config: Config) -> Self {
        let origins = Origins {
            routes: vec![None; config.routes.len()],
            compositions: vec![None; config.compositions.len()],
            consumers: vec![None; config.consumers.len()],
            policies: vec![None; config.policies.len()],
            upstreams: vec![None; config.upstreams.len()],
            certificates: vec![None; config.certificates.len()],
            ..Origins::default()
        };
        LoadedConfig { config, origins }
    }

    fn append(&mut self, other: LoadedConfig) {
        let LoadedConfig { config, origins } = other;
        self.config.routes.extend(config.routes);
        self.config.compositions.extend(config.compositions);
        self.config.consumers.extend(config.consumers);
        self.config.policies.extend(config.policies);
        self.config.upstreams.extend(config.upstreams);
        self.config.certificates.extend(config.certificates);
        self.origins.routes.extend(origins.routes);
        self.origins.compositions.extend(origins.compositions);
        self.origins.consumers.extend(origins.consumers);
        self.origins.policies.extend(origins.policies);
        self.origins.upstreams.extend(origins.upstreams);
        self.origins.certificates.extend(origins.certificates);
        self.origins.unparsed.extend(origins.unparsed);
        self.origins.partial.extend(origins.partial);
    }

    /// Validates the whole config, then replaces plain secrets by digests.
    pub fn validated(self) -> Result<Validated, ConfigErrors> {
        self.validated_against(None)
    }

    /// Like [`LoadedConfig::validated`]; passwords `previous` already holds
    /// keep their hashes.
    pub fn validated_against(mut self, previous: Option<&Config>) -> Result<Validated, ConfigErrors> {
        // A redacted secret sent back keeps the stored one (secrets.rs).
        super::secrets::restore(&mut self.config, previous);
        let (errors, plan) = validate::validate_compiling(&self.config, &self.origins);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        if let Some(plan) = &plan {
            plan.record_in(&mut self.config);
        }
        // The policies do not depend on the secrets: consumers' credentials
        // reach them when the snapshot binds them (`policy::compile`).
        super::secrets::hash_secrets(&mut self.config, previous);
        validate::log_warnings(&self.config);
        Ok(Validated { config: self.config, plan })
    }
}

fn entity_label(kind: &str, index: usize, value: &Value) -> String {
    match value.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => format!("{kind}.{name}"),
        _ => format!("{kind}[{index}]"),
    }
}

/// One step of a path into a JSON value: an object key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

fn steps_of(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// `label.a.b[0].c`, the way every config error names a field.
fn join_path(label: &str, steps: &[Step]) -> String {
    let mut out = label.to_string();
    for step in steps {
        match step {
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn value_at_mut<'v>(value: &'v mut Value, steps: &[Step]) -> Option<&'v mut Value> {
    steps.iter().try_fold(value, |v, step| match step {
        Step::Key(k) => v.as_object_mut()?.get_mut(k),
        Step::Index(i) => v.as_array_mut()?.get_mut(*i),
    })
}

/// Removes the object field at `steps`; false when there is none (a list
/// element is never removed: the indexes after it would name other items).
fn remove_field(value: &mut Value, steps: &[Step]) -> bool {
    let Some((Step::Key(key), parent)) = steps.split_last() else { return false };
    value_at_mut(value, parent).and_then(Value::as_object_mut).is_some_and(|m| m.shift_remove(key).is_some())
}

/// The name in serde's "unknown field `x`, expected ..." or "missing field `x`".
/// serde's words for what was expected, in the config's: a Rust type's
/// name (`expected struct UpstreamRetries`, `expected u32`) means nothing
/// to someone writing YAML.
fn readable(message: String) -> String {
    let mut out = message;
    if let Some(at) = out.find("expected struct ") {
        let end = out[at + 16..].find(|c: char| !c.is_alphanumeric() && c != '_').map_or(out.len(), |e| at + 16 + e);
        out.replace_range(at..end, "expected a map of fields");
    }
    for (rust, words) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
    ] {
        if let Some(rest) = out.strip_suffix(rust).map(str::to_string) {
            return rest + words;
        }
        out = out.replace(&format!("{rust} "), &format!("{words} "));
    }
    out
}

fn quoted_field<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.strip_prefix('`')?.split('`').next()
}

/// At most this many fields are taken out of one entity before it is given up.
const MAX_REPAIRS: usize = 32;

/// One entity of a document, parsed as far as it can be.
pub struct ParsedEntity<T> {
    /// `None` when the entity cannot be built (a required field is missing
    /// or unusable); its errors say why.
    pub entity: Option<T>,
    pub errors: Vec<ConfigError>,
    /// Paths (`compositions.c.calls.a`) of the objects that lost a field with
    /// a wrong value: their defaults stand in for what was written, so the
    /// semantic checks of these objects are not trusted (see [`Origins`]).
    pub partial: Vec<String>,
}

/// Parses one entity, reporting every structural error it has, not only
/// the first: each field serde rejects is recorded, taken out of the value
/// and the parse retried, so the entity is still checked and still counts
/// for the checks across entities (duplicate names, references, cycles).
///
/// - An unknown field means nothing, so taking it out changes nothing else.
/// - A field with a wrong value (type, duration, variant) is taken out too;
///   when it was optional, the entity parses with its default, and the
///   object holding it is marked partial: errors that default could cause
///   (a `for_each` gone makes `item` look misplaced) are not reported.
/// - A missing required field gives the entity up, without a "missing field"
///   error for a field taken out here (its own error was reported).
pub fn parse_entity<T: DeserializeOwned>(label: &str, value: Value, file: &Option<Arc<str>>) -> ParsedEntity<T> {
    let mut value = value;
    let mut errors = Vec::new();
    let mut partial = Vec::new();
    let mut taken: Vec<Vec<Step>> = Vec::new();
    let error = |path: String, message: String| ConfigError { file: file.clone(), path, message };
    for _ in 0..=MAX_REPAIRS {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(entity) => return ParsedEntity { entity: Some(entity), errors, partial },
            Err(e) => e,
        };
        let mut steps = steps_of(e.path());
        let message = readable(e.into_inner().to_string());
        if let Some(field) = quoted_field(&message, "unknown field ") {
            // Structs name the unknown field in the path; an internally
            // tagged enum (a credential) names only the object holding it.
            if steps.last() != Some(&Step::Key(field.to_string())) {
                steps.push(Step::Key(field.to_string()));
            }
            errors.push(error(join_path(label, &steps), message));
            if remove_field(&mut value, &steps) {
                continue;
            }
            break;
        }
        if let Some(field) = quoted_field(&message, "missing field ") {
            steps.push(Step::Key(field.to_string()));
            if !taken.contains(&steps) {
                errors.push(error(join_path(label, &steps), message));
            }
            break;
        }
        errors.push(error(join_path(label, &steps), message));
        if !remove_field(&mut value, &steps) {
            break;
        }
        partial.push(join_path(label, &steps[..steps.len() - 1]));
        taken.push(steps);
    }
    ParsedEntity { entity: None, errors, partial: Vec::new() }
}

fn parse_entities<T: DeserializeOwned>(
    kind: &'static str,
    value: Value,
    file: &Option<Arc<str>>,
    out: &mut Vec<T>,
    origins: &mut Origins,
    errors: &mut Vec<ConfigError>,
) {
    let items = match value {
        Value::Array(items) => items,
        Value::Null => return,
        _ => {
            errors.push(ConfigError { file: file.clone(), path: kind.to_string(), message: "expected a list".into() });
            return;
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let label = entity_label(kind, index, &item);
        if !item.is_object() {
            errors.push(ConfigError { file: file.clone(), path: label, message: "expected an object".into() });
            continue;
        }
        let name = item.get("name").and_then(Value::as_str).map(str::to_string);
        let parsed = parse_entity::<T>(&label, item, file);
        errors.extend(parsed.errors);
        match parsed.entity {
            Some(entity) => {
                out.push(entity);
                origins.list_mut(kind).push(file.clone());
                origins.partial.extend(parsed.partial);
            }
            // Still a name others refer to and that must be unique.
            None => {
                if let Some(name) = name {
                    origins.unparsed.push(Unparsed { kind, name, file: file.clone() });
                }
            }
        }
    }
}

/// Parses one document. Structural errors (wrong types, unknown fields) are
/// collected per entity; semantic checks come later, over the merged config.
/// One document's text as a JSON value (`invalid JSON: ...`/`invalid YAML: ...`).
pub fn parse_value(text: &str, format: Format) -> Result<Value, String> {
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}")),
        Format::Yaml => serde_norway::from_str(text).map_err(|e| format!("invalid YAML: {e}")),
    }
}

/// The top-level keys of a config document, for messages.
const TOP_LEVEL_KEYS: &str = "routes, compositions, consumers, policies, upstreams or certificates";

pub fn parse_document(file: Option<Arc<str>>, text: &str, format: Format) -> (LoadedConfig, Vec<ConfigError>) {
    let mut loaded = LoadedConfig::default();
    let mut errors = Vec::new();
    let doc = match parse_value(text, format) {
        Ok(doc) => doc,
        Err(message) => {
            errors.push(ConfigError { file, path: String::new(), message });
            return (loaded, errors);
        }
    };
    let map = match doc {
        Value::Object(map) => map,
        Value::Null => return (loaded, errors),
        _ => {
            errors.push(ConfigError { file, path: String::new(), message: format!("expected an object with {TOP_LEVEL_KEYS}") });
            return (loaded, errors);
        }
    };
    let (c, o) = (&mut loaded.config, &mut loaded.origins);
    for (key, value) in map {
        match key.as_str() {
            "routes" => parse_entities("routes", value, &file, &mut c.routes, o, &mut errors),
            "compositions" => parse_entities("compositions", value, &file, &mut c.compositions, o, &mut errors),
            "consumers" => parse_entities("consumers", value, &file, &mut c.consumers, o, &mut errors),
            "policies" => parse_entities("policies", value, &file, &mut c.policies, o, &mut errors),
            "upstreams" => parse_entities("upstreams", value, &file, &mut c.upstreams, o, &mut errors),
            "certificates" => parse_entities("certificates", value, &file, &mut c.certificates, o, &mut errors),
            _ => errors.push(ConfigError {
                file: file.clone(),
                path: key.clone(),
                message: format!("unknown key: expected {TOP_LEVEL_KEYS}"),
            }),
        }
    }
    // A wasm policy's `module` path is relative to its file: made absolute
    // here, since the snapshot compiles the policies without file names,
    // and a path relative to this process's working directory would mean
    // another file to a gateway that `sync` sends it to, or to the file
    // an `export` is written into.
    if let Some(dir) = file.as_deref().and_then(|f| std::path::Path::new(f).parent()) {
        for p in c.policies.iter_mut().filter(|p| p.kind == super::PolicyKind::Wasm) {
            if let Some(Value::String(m)) = p.config.get_mut("module") {
                if std::path::Path::new(m.as_str()).is_relative() {
                    let joined = dir.join(m.as_str());
                    *m = lexically_normal(&std::path::absolute(&joined).unwrap_or(joined)).to_string_lossy().into_owned();
                }
            }
        }
    }
    (loaded, errors)
}

/// Parses a request body (the admin API's `POST /config`) and validates it.
pub fn config_from_text(text: &str, format: Format) -> Result<Validated, ConfigErrors> {
    config_from_text_against(text, format, None)
}

/// Like [`config_from_text`]; passwords `previous` holds keep their hashes.
pub fn config_from_text_against(text: &str, format: Format, previous: Option<&Config>) -> Result<Validated, ConfigErrors> {
    let (loaded, errors) = parse_document(None, text, format);
    finish(loaded, errors, previous)
}

/// Validates `loaded` and returns its errors after the parse `errors`, all
/// of them; the config when there are none. What files, `POST /config` and
/// (with [`parse_entity`]) one entity's write share.
pub fn finish(mut loaded: LoadedConfig, mut errors: Vec<ConfigError>, previous: Option<&Config>) -> Result<Validated, ConfigErrors> {
    // Semantic checks still run when some entities failed to parse, so the
    // user sees every problem at once; but no secrets are hashed (argon2)
    // for a config that is refused anyway.
    if !errors.is_empty() {
        super::secrets::restore(&mut loaded.config, previous);
        errors.extend(validate::validate(&loaded.config, &loaded.origins));
        return Err(ConfigErrors(errors));
    }
    loaded.validated_against(previous)
}

/// `path` without `.` and with each `..` taking its parent away (as text:
/// symbolic links are not followed), so `cfg/../plugins/f.wasm` is shown
/// and compared as `plugins/f.wasm`.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Every `*.yaml`, `*.yml` and `*.json` file under `dir`, sorted, recursively.
fn config_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        // Hidden entries are not config: editors' swap files, and the
        // `..data`/`..2026_...` copies Kubernetes makes of a ConfigMap
        // mounted as a directory (they would load every file twice).
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            config_files(&path, out)?;
        } else if Format::from_path(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads and merges the config files named by `paths` (files or
/// directories) without the semantic checks: the entities as written.
pub fn parse_paths(paths: &[PathBuf]) -> (LoadedConfig, Vec<ConfigError>) {
    let mut loaded = LoadedConfig::default();
    let mut errors = Vec::new();
    for path in paths {
        let mut files = Vec::new();
        let label: Arc<str> = path.display().to_string().into();
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                if let Err(e) = config_files(path, &mut files) {
                    errors.push(ConfigError { file: Some(label), path: String::new(), message: format!("cannot read directory: {e}") });
                }
            }
            Ok(_) => files.push(path.clone()),
            Err(e) => errors.push(ConfigError { file: Some(label), path: String::new(), message: format!("cannot read: {e}") }),
        }
        for file in files {
            let label: Arc<str> = file.display().to_string().into();
            let format = Format::from_path(&file).unwrap_or(Format::Yaml);
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let (part, errs) = parse_document(Some(label), &text, format);
                    loaded.append(part);
                    errors.extend(errs);
                }
                Err(e) => errors.push(ConfigError { file: Some(label), path: String::new(), message: format!("cannot read: {e}") }),
            }
        }
    }
    (loaded, errors)
}

/// Loads, merges and validates the config files named by `paths` (files or
/// directories).
pub fn load_paths(paths: &[PathBuf]) -> Result<Validated, ConfigErrors> {
    let (loaded, errors) = parse_paths(paths);
    finish(loaded, errors, None)
}

/// Names the file of each error that has none, from the entity its path
/// starts with (`policies.limits.config.scope` -> the file that defines the
/// policy `limits`). Errors found after loading (compiling the config for a
/// node: routing conflicts, `scope: cluster` without Redis) know the entity,
/// not the file; the files are read again, which only failures pay for.
pub fn name_files(paths: &[PathBuf], errors: &mut ConfigErrors) {
    if errors.0.iter().all(|e| e.file.is_some()) {
        return;
    }
    let (LoadedConfig { config, origins }, _) = parse_paths(paths);
    for e in errors.0.iter_mut().filter(|e| e.file.is_none()) {
        let mut parts = e.path.splitn(3, '.');
        let (Some(kind), Some(name)) = (parts.next(), parts.next()) else { continue };
        let find = |names: Vec<&str>, files: &[Option<Arc<str>>]| {
            names.iter().position(|n| *n == name).and_then(|i| files.get(i).cloned().flatten())
        };
        e.file = match kind {
            "routes" => find(config.routes.iter().map(|r| r.name.as_str()).collect(), &origins.routes),
            "compositions" => find(config.compositions.iter().map(|c| c.name.as_str()).collect(), &origins.compositions),
            "consumers" => find(config.consumers.iter().map(|c| c.name.as_str()).collect(), &origins.consumers),
            "policies" => find(config.policies.iter().map(|p| p.name.as_str()).collect(), &origins.policies),
            "upstreams" => find(config.upstreams.iter().map(|u| u.name.as_str()).collect(), &origins.upstreams),
            "certificates" => find(config.certificates.iter().map(|u| u.name.as_str()).collect(), &origins.certificates),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wasm_module_path_is_made_absolute_from_its_file() {
        let yaml = "policies:\n  - { name: p, type: wasm, config: { module: plugins/f.wasm } }\n  - { name: q, type: wasm, config: { module: /opt/g.wasm } }\n";
        let (loaded, _) = parse_document(Some(Arc::from("cfg/gateway.yaml")), yaml, Format::Yaml);
        let module = |i: usize| loaded.config.policies[i].config["module"].as_str().unwrap().to_string();
        let expected = std::env::current_dir().unwrap().join("cfg/plugins/f.wasm");
        assert_eq!(module(0), expected.to_string_lossy(), "relative to the file, then absolute");
        assert_eq!(module(1), "/opt/g.wasm");
        let (loaded, _) = parse_document(
            Some(Arc::from("cfg/./gateway.yaml")),
            "policies:\n  - { name: p, type: wasm, config: { module: ../plugins/f.wasm } }\n",
            Format::Yaml,
        );
        let expected = std::env::current_dir().unwrap().join("plugins/f.wasm");
        assert_eq!(loaded.config.policies[0].config["module"], expected.to_string_lossy().as_ref(), "no . or .. left");
        // A request body has no file: its path stays as sent.
        let (loaded, _) = parse_document(None, yaml, Format::Yaml);
        assert_eq!(loaded.config.policies[0].config["module"], "plugins/f.wasm");
    }

    #[test]
    fn hidden_entries_of_a_config_dir_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "routes:\n  - { name: r, path: /r, upstream: \"http://127.0.0.1:9\" }\n";
        std::fs::write(dir.path().join("a.yaml"), yaml).unwrap();
        // What a ConfigMap mounted as a directory looks like.
        std::fs::create_dir(dir.path().join("..2026_11_26_07_00_00.1")).unwrap();
        std::fs::write(dir.path().join("..2026_11_26_07_00_00.1").join("a.yaml"), yaml).unwrap();
        std::fs::write(dir.path().join(".a.yaml.swp"), "not yaml").unwrap();
        let config = load_paths(&[dir.path().to_path_buf()]).expect("loads once, without duplicates");
        assert_eq!(config.routes.len(), 1);
    }

    fn errors(yaml: &str) -> Vec<String> {
        let (loaded, errors) = parse_document(None, yaml, Format::Yaml);
        match finish(loaded, errors, None) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn an_unknown_field_in_a_credential_names_the_field() {
        let got = errors("consumers:\n  - name: app\n    credentials:\n      - { type: key-auth, key: k, extra: 1 }\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("consumers.app.credentials[0].extra: unknown field `extra`"), "{got:?}");
    }

    #[test]
    fn rust_type_names_become_the_configs_words() {
        assert_eq!(
            readable("invalid type: integer `2`, expected struct UpstreamRetries".into()),
            "invalid type: integer `2`, expected a map of fields"
        );
        assert_eq!(
            readable("invalid type: string \"x\", expected u32".into()),
            "invalid type: string \"x\", expected a whole number, 0 or more"
        );
        assert_eq!(
            readable("invalid value: integer `-1`, expected u32 at line 3".into()),
            "invalid value: integer `-1`, expected a whole number, 0 or more at line 3"
        );
        assert_eq!(readable("unknown field `x`, expected one of `a`, `b`".into()), "unknown field `x`, expected one of `a`, `b`");
    }

    #[test]
    fn a_wrong_optional_value_does_not_cause_errors_of_its_default() {
        // Without its for_each, the call would seem to misuse `item`.
        let yaml = "compositions:\n  - name: c\n    path: /c\n    policies: [nope]\n    calls:\n      a: { url: \"http://127.0.0.1:9/{{item}}\", for_each: [1], max_items: 3 }\n";
        let got = errors(yaml);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("compositions.c.calls.a.for_each: invalid type: sequence"), "{got:?}");
        assert_eq!(got[1], "compositions.c.policies[0]: unknown policy \"nope\"");
    }

    #[test]
    fn an_entity_that_does_not_parse_is_still_referred_to() {
        let yaml = "policies:\n  - { name: p, type: magic }\nroutes:\n  - { name: r, path: /r, upstream: \"http://127.0.0.1:9\", policies: [p] }\n";
        let got = errors(yaml);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("policies.p.type: unknown variant `magic`"), "{got:?}");
    }
}
