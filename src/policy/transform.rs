//! `request-transform` and `response-transform`: remove, rename, replace,
//! then add (Kong's request-transformer order) headers, query parameters
//! and top-level fields of a JSON object body. `replace` changes only what
//! is there, `add` sets only what is not. String values are templates over
//! the request context (`{{request.headers.x-tenant}}`).

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use crate::compose::template::{percent_encode, Escape, Template};
use crate::config::{TransformConfig, TransformTargets};

#[derive(Debug)]
enum BodyValue {
    Literal(Value),
    Template(Template),
}

#[derive(Debug, Default)]
struct Targets<T> {
    headers: Vec<T>,
    query: Vec<T>,
    body: Vec<T>,
}

#[derive(Debug, Default)]
pub struct Transform {
    remove: Targets<String>,
    rename: Targets<(String, String)>,
    replace: Sets,
    add: Sets,
    templated: bool,
}

#[derive(Debug, Default)]
struct Sets {
    headers: Vec<(HeaderName, Template)>,
    query: Vec<(String, Template)>,
    body: Vec<(String, BodyValue)>,
}

fn names(v: &Option<Value>) -> Vec<String> {
    v.as_ref().and_then(Value::as_array).map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn pairs(v: &Option<Value>) -> Vec<(String, Value)> {
    v.as_ref().and_then(Value::as_object).map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Transform {
    /// Compiles a (shape-checked) config; errors name the field.
    pub fn compile(c: &TransformConfig) -> Result<Transform, (String, String)> {
        let mut t = Transform::default();
        let empty = TransformTargets::default();
        let remove = c.remove.as_ref().unwrap_or(&empty);
        t.remove = Targets {
            headers: names(&remove.headers).into_iter().map(|h| h.to_ascii_lowercase()).collect(),
            query: names(&remove.query),
            body: names(&remove.body),
        };
        let rename = c.rename.as_ref().unwrap_or(&empty);
        let string_pairs = |v: &Option<Value>| pairs(v).into_iter().map(|(k, v)| (k, text(&v))).collect::<Vec<_>>();
        t.rename = Targets {
            headers: string_pairs(&rename.headers).into_iter().map(|(a, b)| (a.to_ascii_lowercase(), b.to_ascii_lowercase())).collect(),
            query: string_pairs(&rename.query),
            body: string_pairs(&rename.body),
        };
        for (op, targets, sets) in [("replace", &c.replace, &mut t.replace), ("add", &c.add, &mut t.add)] {
            let Some(targets) = targets else { continue };
            for (name, v) in pairs(&targets.headers) {
                let header = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| (format!("{op}.headers.{name}"), "not a valid header name".to_string()))?;
                let tpl = Template::compile(&text(&v), Escape::Header).map_err(|e| (format!("{op}.headers.{name}"), e))?;
                sets.headers.push((header, tpl));
            }
            for (name, v) in pairs(&targets.query) {
                let tpl = Template::compile(&text(&v), Escape::Header).map_err(|e| (format!("{op}.query.{name}"), e))?;
                sets.query.push((name, tpl));
            }
            for (name, v) in pairs(&targets.body) {
                let value = match &v {
                    Value::String(s) if s.contains("{{") => {
                        BodyValue::Template(Template::compile(s, Escape::Header).map_err(|e| (format!("{op}.body.{name}"), e))?)
                    }
                    other => BodyValue::Literal(other.clone()),
                };
                sets.body.push((name, value));
            }
        }
        let has_template = |s: &Sets| {
            s.headers.iter().any(|(_, t)| t.is_templated())
                || s.query.iter().any(|(_, t)| t.is_templated())
                || s.body.iter().any(|(_, v)| matches!(v, BodyValue::Template(_)))
        };
        t.templated = has_template(&t.replace) || has_template(&t.add);
        Ok(t)
    }

    /// Whether values read the request context (which is then built).
    pub fn needs_context(&self) -> bool {
        self.templated
    }

    pub fn touches_body(&self) -> bool {
        !(self.remove.body.is_empty() && self.rename.body.is_empty() && self.replace.body.is_empty() && self.add.body.is_empty())
    }

    pub fn apply_headers(&self, headers: &mut HeaderMap, ctx: &Value) {
        for name in &self.remove.headers {
            headers.remove(name.as_str());
        }
        for (from, to) in &self.rename.headers {
            let (Some(values), Ok(to)) =
                (headers.contains_key(from.as_str()).then(|| headers.get_all(from.as_str())), HeaderName::from_bytes(to.as_bytes()))
            else {
                continue;
            };
            let values: Vec<HeaderValue> = values.iter().cloned().collect();
            headers.remove(from.as_str());
            for v in values {
                headers.append(to.clone(), v);
            }
        }
        let render = |tpl: &Template| tpl.render(ctx).ok().and_then(|s| HeaderValue::from_str(&s).ok());
        for (name, tpl) in &self.replace.headers {
            if headers.contains_key(name) {
                if let Some(v) = render(tpl) {
                    headers.insert(name.clone(), v);
                }
            }
        }
        for (name, tpl) in &self.add.headers {
            if !headers.contains_key(name) {
                if let Some(v) = render(tpl) {
                    headers.insert(name.clone(), v);
                }
            }
        }
    }

    /// Rewrites a raw query string; `None` when nothing is left.
    pub fn apply_query(&self, query: Option<&str>, ctx: &Value) -> Option<String> {
        let no_ops =
            self.remove.query.is_empty() && self.rename.query.is_empty() && self.replace.query.is_empty() && self.add.query.is_empty();
        if no_ops {
            return query.map(str::to_string);
        }
        let decode = |k: &str| crate::compose::context::percent_decode(k, true);
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        pairs.retain(|(k, _)| !self.remove.query.contains(&decode(k)));
        for (from, to) in &self.rename.query {
            for (k, _) in pairs.iter_mut().filter(|(k, _)| decode(k) == *from) {
                *k = percent_encode(to);
            }
        }
        let render = |tpl: &Template| tpl.render(ctx).ok().map(|s| percent_encode(&s));
        for (name, tpl) in &self.replace.query {
            if pairs.iter().any(|(k, _)| decode(k) == *name) {
                if let Some(v) = render(tpl) {
                    for (_, val) in pairs.iter_mut().filter(|(k, _)| decode(k) == *name) {
                        *val = v.clone();
                    }
                }
            }
        }
        for (name, tpl) in &self.add.query {
            if !pairs.iter().any(|(k, _)| decode(k) == *name) {
                if let Some(v) = render(tpl) {
                    pairs.push((percent_encode(name), v));
                }
            }
        }
        if pairs.is_empty() {
            return None;
        }
        Some(pairs.iter().map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={v}") }).collect::<Vec<_>>().join("&"))
    }

    /// Changes a JSON object body in place; other bodies are left alone.
    pub fn apply_body(&self, body: &mut Value, ctx: &Value) {
        let Value::Object(map) = body else { return };
        for name in &self.remove.body {
            map.shift_remove(name);
        }
        for (from, to) in &self.rename.body {
            if let Some(v) = map.shift_remove(from) {
                map.insert(to.clone(), v);
            }
        }
        let render = |v: &BodyValue| match v {
            BodyValue::Literal(v) => Some(v.clone()),
            BodyValue::Template(t) => t.render(ctx).ok().map(Value::String),
        };
        for (name, v) in &self.replace.body {
            if map.contains_key(name) {
                if let Some(v) = render(v) {
                    map.insert(name.clone(), v);
                }
            }
        }
        for (name, v) in &self.add.body {
            if !map.contains_key(name) {
                if let Some(v) = render(v) {
                    map.insert(name.clone(), v);
                }
            }
        }
    }
}

/// The context transform templates read: `{"request": ...}`.
pub fn context(request: Value) -> Value {
    let mut m = Map::new();
    m.insert("request".into(), request);
    Value::Object(m)
}

/// Checks a transform's config (every error, each at its field) and
/// compiles it; `allow_query` is false for a response.
pub fn compile_checked(
    t: &TransformConfig,
    cx: &mut crate::policy::filter::Compile<'_>,
    allow_query: bool,
) -> Result<Transform, crate::policy::filter::Invalid> {
    let sections = [("add", &t.add), ("remove", &t.remove), ("rename", &t.rename), ("replace", &t.replace)];
    for (op, targets) in sections {
        let Some(targets) = targets else { continue };
        if !allow_query && targets.query.is_some() {
            cx.error(&format!("{op}.query"), "a response has no query to transform");
        }
        if op == "remove" {
            for (field, value) in [("headers", &targets.headers), ("query", &targets.query), ("body", &targets.body)] {
                string_list(cx, &format!("{op}.{field}"), value);
            }
        } else {
            string_map(cx, &format!("{op}.headers"), &targets.headers, true);
            string_map(cx, &format!("{op}.query"), &targets.query, false);
            if op == "rename" {
                string_map(cx, &format!("{op}.body"), &targets.body, false);
            } else if let Some(body) = &targets.body {
                if !body.is_object() {
                    cx.error(&format!("{op}.body"), "expected a map of field names to values");
                }
            }
        }
    }
    if cx.has_errors() {
        return Err(cx.invalid());
    }
    Transform::compile(t).map_err(|(path, message)| cx.fail(&path, message))
}

fn string_map(cx: &mut crate::policy::filter::Compile<'_>, field: &str, value: &Option<Value>, header_names: bool) {
    let Some(value) = value else { return };
    match value.as_object() {
        Some(map) => {
            for (k, v) in map {
                if header_names {
                    cx.header_name(&format!("{field}.{k}"), k);
                }
                if !v.is_string() {
                    cx.error(&format!("{field}.{k}"), "expected a string");
                }
            }
        }
        None => cx.error(field, "expected a map of names to values"),
    }
}

fn string_list(cx: &mut crate::policy::filter::Compile<'_>, field: &str, value: &Option<Value>) {
    let Some(value) = value else { return };
    match value.as_array() {
        Some(items) if items.iter().all(Value::is_string) => {}
        _ => cx.error(field, "expected a list of names"),
    }
}
