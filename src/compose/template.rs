//! Templates in call URLs, headers and responses (`{{...}}`, handlebars).
//!
//! Where a value lands decides how it is written: into a URL path it is
//! percent-encoded as exactly one segment, into a query as one query
//! component, into a header it is refused if it holds CR, LF or NUL. A
//! template made only of `{{path.to.value}}` expressions (almost all of
//! them) is rendered directly from the context document; anything else
//! (helpers, blocks) goes through handlebars with the same escaping.

use std::sync::Arc;

use handlebars::{Context, Handlebars};
use serde_json::Value;

use super::answer::{Reads, Step};

/// Where a rendered value goes, and so how it is escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    PathSegment,
    QueryComponent,
    /// Header values: not escaped, but CR, LF and NUL are refused.
    Header,
    Html,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986 §2.3), so
/// the value cannot leave its path segment or query component.
pub fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if is_unreserved(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    out
}

fn escape(kind: Escape, s: &str) -> String {
    match kind {
        Escape::PathSegment | Escape::QueryComponent => percent_encode(s),
        Escape::Header => s.to_string(),
        Escape::Html => handlebars::html_escape(s),
    }
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
}

#[derive(Clone, Debug)]
enum Part {
    Literal(String),
    Path(Vec<Seg>),
}

#[derive(Clone)]
enum Kind {
    Simple(Vec<Part>),
    /// `roots`: the top-level names the template may read; only those are
    /// copied into the handlebars context.
    Handlebars {
        registry: Arc<Handlebars<'static>>,
        name: String,
        roots: Vec<String>,
    },
}

#[derive(Clone)]
pub struct Template {
    kind: Kind,
    escape: Escape,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Template")
    }
}

/// `a.b-c.[0]` as keys; `None` when the expression is not a plain path.
fn parse_path(expr: &str) -> Option<Vec<Seg>> {
    let expr = expr.trim();
    if expr.is_empty() || expr.starts_with(['#', '/', '^', '!', '&', '>', '{', '@', '~']) || expr.contains(char::is_whitespace) {
        return None;
    }
    let mut segs = Vec::new();
    let mut rest = expr;
    while !rest.is_empty() {
        let (seg, next) = if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']')?;
            (&inner[..end], &inner[end + 1..])
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        if seg.is_empty() || (!rest.starts_with('[') && !seg.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '$')) {
            return None;
        }
        segs.push(Seg::Key(seg.to_string()));
        rest = next.strip_prefix('.').unwrap_or(next);
        if next.starts_with('.') && rest.is_empty() {
            return None;
        }
    }
    let first = match segs.first()? {
        Seg::Key(k) => k.as_str(),
    };
    if first == "this" || first == "else" {
        return None;
    }
    Some(segs)
}

fn parse_simple(text: &str) -> Option<Vec<Part>> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        parts.push(Part::Path(parse_path(&after[..close])?));
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Some(parts)
}

/// How a value is written into text: strings as they are, numbers and
/// booleans as JSON, null as nothing, arrays and objects as JSON.
pub fn value_text(v: &Value) -> std::borrow::Cow<'_, str> {
    match v {
        Value::String(s) => s.as_str().into(),
        Value::Null => "".into(),
        other => other.to_string().into(),
    }
}

fn lookup<'a>(doc: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut cur = doc;
    for Seg::Key(k) in path {
        cur = match cur {
            Value::Object(map) => map.get(k)?,
            Value::Array(items) => items.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn is_items(path: &[Seg]) -> bool {
    matches!(path, [Seg::Key(k)] if k == "items")
}

impl Template {
    pub fn compile(text: &str, escape_kind: Escape) -> Result<Template, String> {
        if escape_kind != Escape::Html && crate::config::refs::has_unescaped_output(text) {
            return Err("unescaped output ({{{...}}} or {{&...}}) is not allowed here".into());
        }
        if let Some(parts) = parse_simple(text) {
            return Ok(Template { kind: Kind::Simple(parts), escape: escape_kind });
        }
        let mut registry = Handlebars::new();
        registry.register_escape_fn(move |s| escape(escape_kind, s));
        registry.register_template_string("t", text).map_err(|e| format!("invalid template: {}", e.reason()))?;
        let mut roots: Vec<String> = crate::config::refs::template_refs(text).into_iter().map(|r| r.root).collect();
        roots.sort();
        roots.dedup();
        Ok(Template { kind: Kind::Handlebars { registry: Arc::new(registry), name: "t".into(), roots }, escape: escape_kind })
    }

    /// Tells `reads` what rendering reads of the document: each
    /// `{{path}}`'s value, or the whole of each root a handlebars template
    /// names (only those reach its context).
    pub fn reads(&self, reads: &mut Reads) {
        match &self.kind {
            Kind::Simple(parts) => {
                for part in parts {
                    if let Part::Path(path) = part {
                        reads.path(path.iter().map(|Seg::Key(k)| Step::Name(k)), false);
                    }
                }
            }
            Kind::Handlebars { roots, .. } => roots.iter().for_each(|r| reads.path([Step::Name(r)], false)),
        }
    }

    /// Whether rendering reads the context at all.
    pub fn is_templated(&self) -> bool {
        match &self.kind {
            Kind::Simple(parts) => parts.iter().any(|p| matches!(p, Part::Path(_))),
            Kind::Handlebars { .. } => true,
        }
    }

    /// Renders against the context document. Literal text is the author's
    /// and is kept as written; values are escaped for where they land.
    pub fn render(&self, doc: &Value) -> Result<String, String> {
        let out = match &self.kind {
            Kind::Simple(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Literal(s) => out.push_str(s),
                        Part::Path(path) => match lookup(doc, path).unwrap_or(&Value::Null) {
                            // A batch's `{{items}}`: its values comma-joined,
                            // each escaped on its own.
                            Value::Array(values) if is_items(path) && self.escape != Escape::Header => {
                                for (i, v) in values.iter().enumerate() {
                                    if i > 0 {
                                        out.push(',');
                                    }
                                    out.push_str(&escape(self.escape, &value_text(v)));
                                }
                            }
                            v => out.push_str(&escape(self.escape, &value_text(v))),
                        },
                    }
                }
                out
            }
            Kind::Handlebars { registry, name, roots } => {
                // Copy only what the template reads, not every backend body.
                let part: serde_json::Map<String, Value> =
                    roots.iter().filter_map(|r| doc.get(r).map(|v| (r.clone(), v.clone()))).collect();
                let ctx = Context::from(Value::Object(part));
                registry.render_with_context(name, &ctx).map_err(|e| format!("template failed: {e}"))?
            }
        };
        if self.escape == Escape::Header && out.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err("a header value would hold CR, LF or NUL".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_values_stay_in_their_segment() {
        let t = Template::compile("/users/{{request.path.id}}/x", Escape::PathSegment).unwrap();
        let cases = [
            ("42", "/users/42/x"),
            ("../admin", "/users/..%2Fadmin/x"),
            ("%2e%2e", "/users/%252e%252e/x"),
            ("a/b", "/users/a%2Fb/x"),
            ("?x=1#", "/users/%3Fx%3D1%23/x"),
            ("@evil.com", "/users/%40evil.com/x"),
            ("a\r\nb", "/users/a%0D%0Ab/x"),
            ("é", "/users/%C3%A9/x"),
        ];
        for (value, want) in cases {
            let doc = json!({"request": {"path": {"id": value}}});
            assert_eq!(t.render(&doc).unwrap(), want, "{value}");
        }
        let q = Template::compile("user={{request.query.u}}&limit=5", Escape::QueryComponent).unwrap();
        assert_eq!(q.render(&json!({"request": {"query": {"u": "1&admin=true"}}})).unwrap(), "user=1%26admin%3Dtrue&limit=5");
    }

    #[test]
    fn batch_items_are_joined_and_each_escaped() {
        let q = Template::compile("ids={{items}}&x=1", Escape::QueryComponent).unwrap();
        let doc = json!({"items": [1, "a,b", "c&d=e", "é"]});
        assert_eq!(q.render(&doc).unwrap(), "ids=1,a%2Cb,c%26d%3De,%C3%A9&x=1");
        let p = Template::compile("/p/{{items}}", Escape::PathSegment).unwrap();
        assert_eq!(p.render(&json!({"items": ["a/b", ".."]})).unwrap(), "/p/a%2Fb,..");
    }

    #[test]
    fn values_render_like_handlebars() {
        let t = Template::compile("{{a.n}}-{{a.b}}-{{a.missing}}-{{a.s}}-{{a.list.[1]}}-{{a.list.0}}-{{x-y.z}}", Escape::Header).unwrap();
        let doc = json!({"a": {"n": 1.5, "b": true, "s": "str", "list": ["p", "q"]}, "x-y": {"z": "h"}});
        assert_eq!(t.render(&doc).unwrap(), "1.5-true--str-q-p-h");
    }

    #[test]
    fn helpers_go_through_handlebars_with_the_same_escaping() {
        let t = Template::compile("/a/{{#if x.ok}}{{x.v}}{{else}}none{{/if}}", Escape::PathSegment).unwrap();
        assert_eq!(t.render(&json!({"x": {"ok": true, "v": "a/b"}})).unwrap(), "/a/a%2Fb");
        assert_eq!(t.render(&json!({"x": {"ok": false}})).unwrap(), "/a/none");
        assert!(Template::compile("/a/{{{x.v}}}", Escape::PathSegment).is_err());
    }

    #[test]
    fn header_values_refuse_line_breaks() {
        let t = Template::compile("{{request.headers.x}}", Escape::Header).unwrap();
        assert!(t.render(&json!({"request": {"headers": {"x": "a\r\nInjected: 1"}}})).is_err());
        assert_eq!(t.render(&json!({"request": {"headers": {"x": "fine"}}})).unwrap(), "fine");
    }
}
