//! What changes between two configs, entity by entity and, for an updated
//! entity, field by field: the answer of `POST /config?dry_run=true`, what
//! `manifold sync` prints, and what the playground shows before applying.

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntityRef {
    pub kind: &'static str,
    pub name: String,
    /// For an updated entity: every field that changes, deepest first
    /// differing path (`calls.user.timeout`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
}

/// One changed field. `before` absent: the field is added; `after` absent:
/// removed. Values under a consumer's `credentials` are never shown (they
/// are digests, hashes or secrets): only that they change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub created: Vec<EntityRef>,
    pub updated: Vec<EntityRef>,
    pub deleted: Vec<EntityRef>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Walks two JSON values and records every differing leaf (objects are
/// compared key by key, in order; arrays and scalars as wholes, except that
/// arrays of equal length are compared element by element).
fn field_changes(path: &str, old: Option<&Value>, new: Option<&Value>, hide: bool, out: &mut Vec<FieldChange>) {
    // A certificate's `key` is a secret too (its key_sha256 shows it changes).
    let hide = hide || path == "credentials" || path.starts_with("credentials.") || path == "key";
    match (old, new) {
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let before = out.len();
            for (k, nv) in n {
                field_changes(&join(path, k), o.get(k), Some(nv), hide, out);
            }
            for (k, ov) in o {
                if !n.contains_key(k) {
                    field_changes(&join(path, k), Some(ov), None, hide, out);
                }
            }
            // Same keys and values, another order: the served JSON changes.
            if out.len() == before && o == n && !o.keys().eq(n.keys()) {
                out.push(FieldChange { path: path.to_string(), before: None, after: Some(Value::String("(keys reordered)".into())) });
            }
        }
        (Some(Value::Array(o)), Some(Value::Array(n))) if o.len() == n.len() => {
            for (i, (ov, nv)) in o.iter().zip(n).enumerate() {
                field_changes(&format!("{path}[{i}]"), Some(ov), Some(nv), hide, out);
            }
        }
        (o, n) if o == n => {}
        (o, n) => {
            let shown = |v: Option<&Value>| v.map(|v| if hide { Value::String("(hidden)".into()) } else { v.clone() });
            out.push(FieldChange { path: path.to_string(), before: shown(o), after: shown(n) });
        }
    }
}

fn diff_list<T: Serialize>(kind: &'static str, old: &[T], new: &[T], name: impl Fn(&T) -> &str, out: &mut ConfigDiff) {
    let value = |e: &T| serde_json::to_value(e).unwrap_or(Value::Null);
    for n in new {
        match old.iter().find(|o| name(o) == name(n)) {
            None => out.created.push(EntityRef { kind, name: name(n).to_string(), fields: vec![] }),
            Some(o) => {
                let mut fields = Vec::new();
                field_changes("", Some(&value(o)), Some(&value(n)), false, &mut fields);
                if !fields.is_empty() {
                    out.updated.push(EntityRef { kind, name: name(n).to_string(), fields });
                }
            }
        }
    }
    for o in old {
        if !new.iter().any(|n| name(n) == name(o)) {
            out.deleted.push(EntityRef { kind, name: name(o).to_string(), fields: vec![] });
        }
    }
}

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let mut d = ConfigDiff::default();
        diff_list("routes", &old.routes, &new.routes, |e| &e.name, &mut d);
        diff_list("compositions", &old.compositions, &new.compositions, |e| &e.name, &mut d);
        diff_list("consumers", &old.consumers, &new.consumers, |e| &e.name, &mut d);
        diff_list("policies", &old.policies, &new.policies, |e| &e.name, &mut d);
        diff_list("upstreams", &old.upstreams, &new.upstreams, |e| &e.name, &mut d);
        diff_list("certificates", &old.certificates, &new.certificates, |e| &e.name, &mut d);
        d
    }

    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes(old: Value, new: Value) -> Vec<FieldChange> {
        let mut out = Vec::new();
        field_changes("", Some(&old), Some(&new), false, &mut out);
        out
    }

    #[test]
    fn names_each_changed_added_and_removed_field() {
        let got = changes(
            json!({"name": "d", "timeout": "2s", "calls": {"user": {"url": "a"}, "old": {"url": "x"}}}),
            json!({"name": "d", "timeout": "3s", "calls": {"user": {"url": "b", "required": false}}}),
        );
        let paths: Vec<_> = got.iter().map(|c| (c.path.as_str(), c.before.clone(), c.after.clone())).collect();
        assert_eq!(
            paths,
            vec![
                ("timeout", Some(json!("2s")), Some(json!("3s"))),
                ("calls.user.url", Some(json!("a")), Some(json!("b"))),
                ("calls.user.required", None, Some(json!(false))),
                ("calls.old", Some(json!({"url": "x"})), None),
            ]
        );
    }

    #[test]
    fn credentials_are_never_shown_and_reordering_is_a_change() {
        let got = changes(json!({"credentials": [{"key_sha256": "aa"}]}), json!({"credentials": [{"key_sha256": "bb"}]}));
        assert_eq!(
            got,
            vec![FieldChange { path: "credentials[0].key_sha256".into(), before: Some(json!("(hidden)")), after: Some(json!("(hidden)")) }]
        );
        let got = changes(json!({"body": {"a": 1, "b": 2}}), json!({"body": {"b": 2, "a": 1}}));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "body");
        assert!(changes(json!({"a": [1, 2]}), json!({"a": [1, 2]})).is_empty());
    }
}
