//! JSONPath queries (RFC 9535), parsed once at compile time. A singular
//! query (only names and indexes) gives its value or null, walked directly;
//! any other gives an array of matches, through jsonpath-rust.

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::answer::{Copies, Reads, Step as ReadStep};

static NULL: Value = Value::Null;

#[derive(Clone, Debug)]
pub enum Step {
    Name(String),
    Index(i64),
}

#[derive(Clone, Debug)]
pub enum Query {
    Singular(Vec<Step>),
    General(JpQuery),
}

impl Query {
    pub fn parse(text: &str) -> Result<Query, String> {
        let parsed = parse_json_path(text).map_err(|e| format!("invalid JSONPath {text:?}: {e}"))?;
        let steps: Option<Vec<Step>> = parsed
            .segments
            .iter()
            .map(|seg| match seg {
                Segment::Selector(Selector::Name(n)) => Some(Step::Name(n.clone())),
                Segment::Selector(Selector::Index(i)) => Some(Step::Index(*i)),
                _ => None,
            })
            .collect();
        Ok(match steps {
            Some(steps) => Query::Singular(steps),
            None => Query::General(parsed),
        })
    }

    /// Tells `reads` what this query reads of the document: a singular
    /// query its path (to copy it into the JSON response when `verbatim`);
    /// any other the value where its leading names end, or everything when
    /// it does not start with a name or a filter reads from the root.
    pub fn reads(&self, reads: &mut Reads, verbatim: bool) {
        match self {
            Query::Singular(steps) => reads.path(
                steps.iter().map(|s| match s {
                    Step::Name(n) => ReadStep::Name(n),
                    Step::Index(_) => ReadStep::Other,
                }),
                verbatim,
            ),
            Query::General(q) => {
                let names = q.segments.iter().take_while(|s| matches!(s, Segment::Selector(Selector::Name(_)))).count();
                // A filter's `$` reads from the root, wherever it is (the
                // model's Debug names such a query `Root` or `AbsQuery`;
                // a name holding those words only makes this cautious).
                let rest = format!("{:?}", &q.segments[names..]);
                if names == 0 || rest.contains("Root(") || rest.contains("AbsQuery(") {
                    return reads.everything();
                }
                let steps = q.segments[..names].iter().map(|s| match s {
                    Segment::Selector(Selector::Name(n)) => ReadStep::Name(n),
                    _ => ReadStep::Other,
                });
                reads.path(steps.chain([ReadStep::Other]), false)
            }
        }
    }

    /// The names a singular query walks (`None` for another query or one
    /// with an index).
    pub fn names(&self) -> Option<Vec<&str>> {
        let Query::Singular(steps) = self else { return None };
        steps
            .iter()
            .map(|s| match s {
                Step::Name(n) => Some(n.as_str()),
                Step::Index(_) => None,
            })
            .collect()
    }

    /// The value a singular query points at, borrowed.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let Query::Singular(steps) = self else {
            return None;
        };
        let mut cur = doc;
        for step in steps {
            cur = match (step, cur) {
                (Step::Name(n), Value::Object(map)) => map.get(n)?,
                (Step::Index(i), Value::Array(items)) => {
                    let idx = if *i < 0 { items.len() as i64 + i } else { *i };
                    items.get(usize::try_from(idx).ok()?)?
                }
                _ => return None,
            };
        }
        Some(cur)
    }

    /// The query's result as SPEC §2 defines it: a singular query's value or
    /// null; any other query's matches as an array.
    pub fn eval(&self, doc: &Value) -> Value {
        match self {
            Query::Singular(_) => self.get(doc).cloned().unwrap_or(Value::Null),
            Query::General(q) => match jsonpath_rust::query::js_path_process(q, doc) {
                Ok(refs) => Value::Array(refs.into_iter().map(|r| r.val().clone()).collect()),
                Err(_) => Value::Array(vec![]),
            },
        }
    }

    /// Writes the query's result (as [`Query::eval`] gives it) into a
    /// serializer, borrowing the values instead of copying them.
    pub fn serialize_eval<S: Serializer>(&self, doc: &Value, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Query::Singular(_) => self.get(doc).unwrap_or(&NULL).serialize(s),
            Query::General(q) => {
                let refs = jsonpath_rust::query::js_path_process(q, doc).unwrap_or_default();
                let mut seq = s.serialize_seq(Some(refs.len()))?;
                for r in refs {
                    seq.serialize_element(r.val())?;
                }
                seq.end()
            }
        }
    }

    /// The items a `for_each` runs over: a general query's matches, or the
    /// elements of the array a singular query points at.
    pub fn items(&self, doc: &Value) -> Vec<Value> {
        match self.eval(doc) {
            Value::Array(items) => items,
            Value::Null => vec![],
            other => vec![other],
        }
    }
}

/// `when`'s truth: false for null, false, 0, "" and [].
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

/// A JSON template: literal JSON with JSONPath leaves (strings starting with
/// `$`; `$$` escapes a literal `$`).
#[derive(Clone, Debug)]
pub enum JsonTemplate {
    Literal(Value),
    Query(Query),
    /// A singular query whose value only this copies: the call's answer
    /// keeps it as text in its [`Copies`] slot, written from there (see
    /// [`JsonTemplate::write`]); an answer without it leaves the query to
    /// read the document.
    Copy {
        query: Query,
        call: usize,
        slot: usize,
    },
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    pub fn compile(v: &Value) -> Result<JsonTemplate, String> {
        let t = match v {
            Value::String(s) if s.starts_with("$$") => JsonTemplate::Literal(Value::String(s[1..].to_string())),
            Value::String(s) if s.starts_with('$') => JsonTemplate::Query(Query::parse(s)?),
            Value::Array(items) => JsonTemplate::Array(items.iter().map(JsonTemplate::compile).collect::<Result<_, _>>()?),
            Value::Object(map) => {
                JsonTemplate::Object(map.iter().map(|(k, v)| Ok((k.clone(), JsonTemplate::compile(v)?))).collect::<Result<_, String>>()?)
            }
            other => JsonTemplate::Literal(other.clone()),
        };
        // A subtree without queries is one literal, cloned whole.
        Ok(match &t {
            JsonTemplate::Array(items) if items.iter().all(|i| matches!(i, JsonTemplate::Literal(_))) => JsonTemplate::Literal(fold(&t)),
            JsonTemplate::Object(fields) if fields.iter().all(|(_, i)| matches!(i, JsonTemplate::Literal(_))) => {
                JsonTemplate::Literal(fold(&t))
            }
            _ => t,
        })
    }

    /// Tells `reads` what rendering reads; `verbatim`: the result is only
    /// written into JSON (a response body), so a value it copies whole may
    /// stay text.
    pub fn reads(&self, reads: &mut Reads, verbatim: bool) {
        match self {
            JsonTemplate::Literal(_) => {}
            JsonTemplate::Query(q) | JsonTemplate::Copy { query: q, .. } => q.reads(reads, verbatim),
            JsonTemplate::Array(items) => items.iter().for_each(|t| t.reads(reads, verbatim)),
            JsonTemplate::Object(fields) => fields.iter().for_each(|(_, t)| t.reads(reads, verbatim)),
        }
    }

    /// Turns each singular query into a [`JsonTemplate::Copy`] when the
    /// answer it reads keeps that value as text: `slot(query)` says where.
    pub fn use_copies(&mut self, slot: &impl Fn(&Query) -> Option<(usize, usize)>) {
        match self {
            JsonTemplate::Literal(_) | JsonTemplate::Copy { .. } => {}
            JsonTemplate::Query(q) => {
                if let Some((call, slot)) = slot(q) {
                    *self = JsonTemplate::Copy { query: q.clone(), call, slot };
                }
            }
            JsonTemplate::Array(items) => items.iter_mut().for_each(|t| t.use_copies(slot)),
            JsonTemplate::Object(fields) => fields.iter_mut().for_each(|(_, t)| t.use_copies(slot)),
        }
    }

    /// Writes the rendered JSON into `out`: the bytes `serde_json::to_vec`
    /// of [`JsonTemplate::render`] would give, with copied values (each
    /// call's [`Copies`], by call index) spliced in as they are.
    pub fn write(&self, doc: &Value, copies: &[Option<std::sync::Arc<Copies>>], out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            JsonTemplate::Literal(v) => serde_json::to_writer(&mut *out, v),
            JsonTemplate::Query(q) => q.serialize_eval(doc, &mut serde_json::Serializer::new(&mut *out)),
            JsonTemplate::Copy { query, call, slot } => match copies.get(*call).and_then(Option::as_deref).and_then(|c| c.get(*slot)) {
                Some(text) => {
                    out.extend_from_slice(text);
                    Ok(())
                }
                None => query.serialize_eval(doc, &mut serde_json::Serializer::new(&mut *out)),
            },
            JsonTemplate::Array(items) => {
                out.push(b'[');
                for (i, t) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    t.write(doc, copies, out)?;
                }
                out.push(b']');
                Ok(())
            }
            JsonTemplate::Object(fields) => {
                out.push(b'{');
                for (i, (k, t)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k)?;
                    out.push(b':');
                    t.write(doc, copies, out)?;
                }
                out.push(b'}');
                Ok(())
            }
        }
    }

    pub fn render(&self, doc: &Value) -> Value {
        match self {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Query(q) | JsonTemplate::Copy { query: q, .. } => q.eval(doc),
            JsonTemplate::Array(items) => Value::Array(items.iter().map(|i| i.render(doc)).collect()),
            JsonTemplate::Object(fields) => Value::Object(fields.iter().map(|(k, t)| (k.clone(), t.render(doc))).collect()),
        }
    }
}

/// A JSON template rendered straight into a serializer: what it reads is
/// borrowed from the document, never copied into an intermediate `Value`.
/// `serde_json::to_vec(&Rendered { .. })` gives the bytes `render` would.
pub struct Rendered<'a> {
    pub template: &'a JsonTemplate,
    pub doc: &'a Value,
}

impl Serialize for Rendered<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let doc = self.doc;
        match self.template {
            JsonTemplate::Literal(v) => v.serialize(s),
            JsonTemplate::Query(q) | JsonTemplate::Copy { query: q, .. } => q.serialize_eval(doc, s),
            JsonTemplate::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for template in items {
                    seq.serialize_element(&Rendered { template, doc })?;
                }
                seq.end()
            }
            JsonTemplate::Object(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (k, template) in fields {
                    map.serialize_entry(k, &Rendered { template, doc })?;
                }
                map.end()
            }
        }
    }
}

fn fold(t: &JsonTemplate) -> Value {
    t.render(&Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries() {
        let doc = json!({"user": {"body": {"id": 7, "tags": ["a", "b"], "items": [{"p": 1}, {"p": 2}]}}});
        let cases = [
            ("$.user.body.id", json!(7)),
            ("$.user.body.missing", Value::Null),
            ("$.user.body.tags[1]", json!("b")),
            ("$.user.body.tags[-1]", json!("b")),
            ("$['user']['body']['id']", json!(7)),
            ("$.user.body.items[*].p", json!([1, 2])),
            ("$.user.body.nothing[*]", json!([])),
            ("$..p", json!([1, 2])),
        ];
        for (q, want) in cases {
            assert_eq!(Query::parse(q).unwrap().eval(&doc), want, "{q}");
        }
        assert_eq!(Query::parse("$.user.body.tags").unwrap().items(&doc), vec![json!("a"), json!("b")]);
        assert_eq!(Query::parse("$.user.body.id").unwrap().items(&doc), vec![json!(7)]);
    }

    #[test]
    fn templates() {
        let doc = json!({"a": {"body": {"x": 1}}});
        let t =
            JsonTemplate::compile(&json!({"x": "$.a.body.x", "lit": "$$dollars", "n": [1, "$.a.body.x"], "fixed": {"k": "v"}})).unwrap();
        assert_eq!(t.render(&doc), json!({"x": 1, "lit": "$dollars", "n": [1, 1], "fixed": {"k": "v"}}));
        // Written straight into bytes, the same document.
        let doc = json!({"a": {"body": {"x": 1, "items": [{"p": 1}, {"p": 2}]}}});
        let t =
            JsonTemplate::compile(&json!({"x": "$.a.body.x", "m": "$.a.body.nope", "ps": "$.a.body.items[*].p", "n": [1, "$.a.body.x"]}))
                .unwrap();
        let bytes = serde_json::to_vec(&Rendered { template: &t, doc: &doc }).unwrap();
        assert_eq!(bytes, serde_json::to_vec(&t.render(&doc)).unwrap());
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"x": 1, "m": null, "ps": [1, 2], "n": [1, 1]}));
    }

    #[test]
    fn truth() {
        for (v, t) in [
            (json!(null), false),
            (json!(false), false),
            (json!(0), false),
            (json!(""), false),
            (json!([]), false),
            (json!({}), true),
            (json!("x"), true),
            (json!(2), true),
        ] {
            assert_eq!(truthy(&v), t, "{v}");
        }
    }
}
