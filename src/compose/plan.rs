//! A composition compiled into its execution plan: call graph ordered,
//! templates and queries parsed, limits resolved. Built once per config;
//! nothing here is parsed per request.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::answer::{EntryFields, Need, Projection, Reads};
use super::cache::CachePlan;
use super::call::NodeCallStore;
use super::query::{JsonTemplate, Query};
use super::template::{Escape, Template};
use crate::config::refs::{jsonpath_root, template_refs};
use crate::config::validate::split_call_url;
use crate::config::{Composition, ConfigError};
use crate::snapshot::{Upstreams, DEFAULT_COMPOSITION_TIMEOUT};
use crate::upstream::UpstreamPlan;

/// Largest backend body a call accepts unless it says otherwise (SPEC §2).
pub const DEFAULT_MAX_BODY: usize = 10 << 20;
/// Most items a `for_each` expands to unless it says otherwise (SPEC §2).
pub const DEFAULT_MAX_ITEMS: usize = 100;
/// Concurrent requests of one `for_each` unless it says otherwise.
pub const DEFAULT_MAX_CONCURRENCY: usize = 8;

#[derive(Debug)]
pub struct CallPlan {
    pub name: Arc<str>,
    /// This call's duration histogram, resolved when the config compiles
    /// (`None` outside a running node: validation, unit tests).
    pub duration: Option<prometheus::Histogram>,
    pub method: Method,
    /// Where it goes: a url's one target on the node's connector, or a
    /// named upstream's targets; each request picks one, whose host is its
    /// `Host`.
    pub upstream: Arc<UpstreamPlan>,
    /// `scheme://host[:port]` of a url, or the upstream's name, for the
    /// `try` endpoint's report.
    pub origin: String,
    pub path: Template,
    /// The url's path ends with `/` as written (its one empty segment).
    pub path_trailing_slash: bool,
    pub query: Option<Template>,
    pub headers: Vec<(HeaderName, Template)>,
    pub forward_headers: Vec<HeaderName>,
    pub body: Option<JsonTemplate>,
    pub when: Option<Query>,
    pub for_each: Option<Query>,
    pub timeout: Option<Duration>,
    pub required: bool,
    pub retries: u32,
    pub max_body: usize,
    pub max_items: usize,
    pub max_concurrency: usize,
    /// `fallback`: the body of this optional call when it fails or is
    /// skipped (its dependents then run).
    pub fallback: Option<serde_json::Value>,
    /// A GET or HEAD of one request, and another such call of the
    /// composition goes to the same origin: their requests are compared
    /// per request, and one the same as another's is not sent twice.
    pub may_share: bool,
    /// `batch`: a `for_each` whose values go in groups.
    pub batch: Option<Arc<BatchPlan>>,
    /// `cache`: answers kept in the node's store.
    pub cache: Option<Arc<CachePlan>>,
    /// The node's store of shared calls, for a call with `cache` or
    /// `collapse: true` (set when the config compiles on a node; `None`
    /// for every other call, which then never touches it).
    pub store: Option<Arc<NodeCallStore>>,
    /// Redis, for a call with `cache.scope: cluster` on a node that has it.
    pub redis: Option<Arc<crate::policy::cluster::RedisLimiter>>,
    /// `manifold_call_cache_total` of this call, by [`Mark::ALL`]'s order.
    pub cache_counts: Option<[prometheus::IntCounter; 4]>,
    /// `manifold_call_collapsed_total` of this call (one with the store).
    pub collapsed: Option<prometheus::IntCounter>,
    /// Indexes of the calls this one reads; it starts when they are done.
    pub deps: Vec<usize>,
    /// Whether the answer's headers are read (a template or query, or the
    /// response's `forward_headers`); else only `Content-Type` is kept.
    pub keep_headers: bool,
    /// What of the answer's body the composition reads: its answers are
    /// parsed that far (`answer.rs`).
    pub answer: Arc<Projection>,
    /// The fields of its entry in the document besides `body` that
    /// something reads (only those are put there).
    pub entry: EntryFields,
}

/// A `for_each` call's `batch`, compiled.
#[derive(Debug)]
pub struct BatchPlan {
    pub size: usize,
    /// Evaluated on each element of the answer's array.
    pub key: Query,
    /// Where the array is in the answer (else the answer is the array).
    pub path: Option<Query>,
}

impl CallPlan {
    /// Whether the call wants the node's store: `cache`, or `collapse` on
    /// a GET.
    pub fn wants_store(&self, collapse: bool) -> bool {
        self.method == Method::GET && (self.cache.is_some() || collapse)
    }
}

#[derive(Debug)]
pub enum ResponseBody {
    /// Each call's body under its name.
    Default,
    Json(JsonTemplate),
    Text {
        template: Template,
        content_type: HeaderValue,
    },
}

#[derive(Debug)]
pub struct ResponsePlan {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, Template)>,
    pub forward_headers: Vec<(usize, Vec<HeaderName>)>,
    pub body: ResponseBody,
}

#[derive(Debug)]
pub struct CompositionPlan {
    pub name: Arc<str>,
    pub method: Method,
    pub deadline: Duration,
    pub calls: Vec<CallPlan>,
    pub response: ResponsePlan,
    /// Whether any template or query may read `headers` (the request's or a
    /// call's); when none does, no headers are copied into the context
    /// document.
    pub reads_headers: bool,
}

/// Splits `path?query` at the first `?` outside a `{{...}}` expression.
fn split_path_query(rest: &str) -> (&str, Option<&str>) {
    let mut depth = 0usize;
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"{{") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"}}") {
            depth = depth.saturating_sub(1);
            i += 2;
        } else if b[i] == b'?' && depth == 0 {
            return (&rest[..i], Some(&rest[i + 1..]));
        } else {
            i += 1;
        }
    }
    (rest, None)
}

fn json_roots(t: &serde_json::Value, out: &mut Vec<String>) {
    match t {
        serde_json::Value::String(s) if s.starts_with('$') && !s.starts_with("$$") => {
            if let Ok(Some(root)) = jsonpath_root(s) {
                out.push(root);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_roots(i, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| json_roots(v, out)),
        _ => {}
    }
}

/// Conservative: any expression mentioning `headers`, a query with a
/// wildcard, descendants or a filter (`$.user.*`, `$..x`, `[?...]`), or a
/// handlebars block, helper or `this`/`@key` may read headers.
fn reads_headers(comp: &Composition) -> bool {
    fn in_json(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.starts_with('$') && mentions(s),
            serde_json::Value::Array(items) => items.iter().any(in_json),
            serde_json::Value::Object(map) => map.values().any(in_json),
            _ => false,
        }
    }
    fn mentions(s: &str) -> bool {
        ["headers", "*", "..", "[?", "#", "lookup", "this", "@"].iter().any(|m| s.contains(m))
    }
    let calls = comp.calls.values().any(|c| {
        c.url.as_deref().or(c.path.as_deref()).is_some_and(mentions)
            || c.headers.values().any(|v| mentions(v))
            || c.when.as_deref().is_some_and(mentions)
            || c.for_each.as_deref().is_some_and(mentions)
            || c.body.as_ref().is_some_and(in_json)
    });
    let response = comp.response.as_ref().is_some_and(|r| {
        r.headers.values().any(|v| mentions(v)) || r.template.as_deref().is_some_and(mentions) || r.body.as_ref().is_some_and(in_json)
    });
    calls || response
}

/// Decides how far each call's answer is parsed (`answer.rs`): from every
/// template and query that reads it, and the response; the response's
/// singular queries whose value is only copied then write it from the
/// answer's text. A call whose answer is shared beyond this request
/// (`cache`, `collapse`) or is a list of answers (`for_each`) is parsed
/// whole.
fn project_answers(
    comp: &Composition,
    names: &[&str],
    calls: &mut [CallPlan],
    headers: &[(HeaderName, Template)],
    body: &mut ResponseBody,
) {
    // Calls whose requests may be one (the same GET to the same origin)
    // take each other's answers: one projection for them all.
    let group: Vec<usize> = (calls.iter().enumerate())
        .map(|(i, c)| match c.may_share {
            true => calls.iter().position(|o| o.may_share && o.origin == c.origin && o.method == c.method).unwrap_or(i),
            false => i,
        })
        .collect();
    let mut reads = Reads::new(names, group);
    for (i, call) in calls.iter().enumerate() {
        let collapse = comp.calls.get(&*call.name).is_some_and(|c| c.collapse);
        if call.for_each.is_some() || call.cache.is_some() || collapse {
            reads.whole(i);
        }
        call.path.reads(&mut reads);
        call.query.iter().for_each(|q| q.reads(&mut reads));
        call.headers.iter().for_each(|(_, t)| t.reads(&mut reads));
        call.body.iter().for_each(|t| t.reads(&mut reads, false));
        call.when.iter().chain(&call.for_each).for_each(|q| q.reads(&mut reads, false));
    }
    headers.iter().for_each(|(_, t)| t.reads(&mut reads));
    match &*body {
        ResponseBody::Default => reads.everything(),
        ResponseBody::Json(t) => t.reads(&mut reads, true),
        ResponseBody::Text { template, .. } => template.reads(&mut reads),
    }
    for (i, call) in calls.iter_mut().enumerate() {
        call.entry = reads.fields(i);
    }
    let answers = reads.finish();
    if let ResponseBody::Json(t) = body {
        t.use_copies(&|q| {
            let path = q.names()?;
            let [root, "body", rest @ ..] = &path[..] else { return None };
            let i = names.iter().position(|n| n == root)?;
            Some((i, answers[i].slot(rest)?))
        });
    }
    for (call, answer) in calls.iter_mut().zip(answers) {
        call.answer = answer;
    }
}

/// A url's path and query, or an upstream call's `path`, compiled: the
/// path's template (escaped per segment, `/` when empty), the query's
/// (escaped per component), and whether the path ends with `/`.
fn compile_rest(rest: &str) -> Result<(Template, Option<Template>, bool), String> {
    let (path_text, query_text) = split_path_query(rest);
    let path_text = if path_text.is_empty() { "/" } else { path_text };
    let path = Template::compile(path_text, Escape::PathSegment)?;
    let query = query_text.map(|q| Template::compile(q, Escape::QueryComponent)).transpose()?;
    Ok((path, query, path_text.ends_with('/')))
}

/// Compiles one composition; its calls naming an upstream take it from
/// `upstreams` (a name not there was reported by validate, or by the
/// upstream's own compile).
pub fn compile(comp: &Composition, upstreams: &Upstreams) -> Result<CompositionPlan, Vec<ConfigError>> {
    let base = format!("compositions.{}", comp.name);
    let mut errors = Vec::new();
    let mut fail = |path: String, message: String| errors.push(ConfigError { file: None, path, message });
    let names: Vec<&str> = comp.calls.keys().map(String::as_str).collect();
    let deadline = comp.timeout.map_or(DEFAULT_COMPOSITION_TIMEOUT, |d| d.0);
    let mut calls = Vec::with_capacity(comp.calls.len());

    for (name, call) in &comp.calls {
        let cbase = format!("{base}.calls.{name}");
        let (field, upstream, origin, rest) = match (call.url.as_deref(), call.upstream.as_deref()) {
            (Some(url), _) => {
                let (origin, rest) = match split_call_url(url) {
                    Ok(parts) => parts,
                    Err(e) => {
                        fail(format!("{cbase}.url"), e);
                        continue;
                    }
                };
                let origin_uri: http::Uri = match origin.parse() {
                    Ok(u) => u,
                    Err(e) => {
                        fail(format!("{cbase}.url"), format!("{e}"));
                        continue;
                    }
                };
                let (Some(scheme), Some(authority)) = (origin_uri.scheme().cloned(), origin_uri.authority().cloned()) else {
                    fail(format!("{cbase}.url"), "expected http(s)://host[:port]/path".into());
                    continue;
                };
                ("url", Arc::new(UpstreamPlan::single(scheme, authority)), origin.to_string(), rest)
            }
            (None, Some(name)) => {
                let Some(upstream) = upstreams.get(name) else {
                    fail(format!("{cbase}.upstream"), format!("no upstream named {name:?} compiled"));
                    continue;
                };
                ("path", upstream.clone(), format!("upstream {name}"), call.path.as_deref().unwrap_or("/"))
            }
            (None, None) => {
                fail(format!("{cbase}.url"), "a call needs url, or upstream with path".into());
                continue;
            }
        };
        let (path, query, path_trailing_slash) = match compile_rest(rest) {
            Ok(parts) => parts,
            Err(e) => {
                fail(format!("{cbase}.{field}"), e);
                continue;
            }
        };
        let mut roots: Vec<String> = template_refs(rest).into_iter().map(|r| r.root).collect();
        let mut headers = Vec::new();
        for (h, v) in &call.headers {
            roots.extend(template_refs(v).into_iter().map(|r| r.root));
            match (HeaderName::from_bytes(h.as_bytes()), Template::compile(v, Escape::Header)) {
                (Ok(n), Ok(t)) => headers.push((n, t)),
                (Err(e), _) => fail(format!("{cbase}.headers.{h}"), e.to_string()),
                (_, Err(e)) => fail(format!("{cbase}.headers.{h}"), e),
            }
        }
        let body = match &call.body {
            Some(b) => {
                json_roots(b, &mut roots);
                match JsonTemplate::compile(b) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        fail(format!("{cbase}.body"), e);
                        None
                    }
                }
            }
            None => None,
        };
        let mut query_of = |field: &str, q: &Option<String>| -> Option<Query> {
            let q = q.as_ref()?;
            if let Ok(Some(root)) = jsonpath_root(q) {
                roots.push(root);
            }
            Query::parse(q).map_err(|e| fail(format!("{cbase}.{field}"), e)).ok()
        };
        let when = query_of("when", &call.when);
        let for_each = query_of("for_each", &call.for_each);
        let batch = match &call.batch {
            Some(b) => {
                let key = Query::parse(&b.key).map_err(|e| fail(format!("{cbase}.batch.key"), e)).ok();
                let path = b.path.as_deref().map(Query::parse).transpose().map_err(|e| fail(format!("{cbase}.batch.path"), e)).ok();
                match (key, path) {
                    (Some(key), Some(path)) => Some(Arc::new(BatchPlan { size: (b.size as usize).max(1), key, path })),
                    _ => None,
                }
            }
            None => None,
        };
        let cache = call.cache.as_ref().map(|c| {
            Arc::new(CachePlan {
                ttl: c.ttl.0,
                stale_while_revalidate: c.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0),
                stale_if_error: c.stale_if_error.map_or(Duration::ZERO, |d| d.0),
                vary_headers: c
                    .vary_headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                    .collect(),
            })
        });
        let mut deps: Vec<usize> = roots.iter().filter_map(|r| names.iter().position(|n| n == r)).collect();
        deps.sort_unstable();
        deps.dedup();
        let method = Method::from_bytes(call.method.as_deref().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
        calls.push(CallPlan {
            name: name.as_str().into(),
            duration: None,
            method,
            upstream,
            origin,
            path,
            path_trailing_slash,
            query,
            headers,
            forward_headers: call.forward_headers.iter().filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()).collect(),
            body,
            when,
            for_each,
            timeout: call.timeout.map(|d| d.0),
            required: call.required,
            retries: call.retries.unwrap_or(0),
            max_body: call.max_body_bytes.map_or(DEFAULT_MAX_BODY, |b| b.0 as usize),
            max_items: call.max_items.map_or(DEFAULT_MAX_ITEMS, |n| n as usize),
            max_concurrency: call.max_concurrency.map_or(DEFAULT_MAX_CONCURRENCY, |n| n as usize).max(1),
            fallback: call.fallback.clone().filter(|_| !call.required),
            may_share: false,
            batch,
            cache,
            store: None,
            cache_counts: None,
            redis: None,
            collapsed: None,
            deps,
            keep_headers: false,
            answer: Arc::new(Projection { need: Need::Whole, slots: 0 }),
            entry: EntryFields::ALL,
        });
    }

    let spec = comp.response.clone().unwrap_or_default();
    let rbase = format!("{base}.response");
    let status = StatusCode::from_u16(spec.status.unwrap_or(200)).unwrap_or(StatusCode::OK);
    let mut headers = Vec::new();
    for (h, v) in &spec.headers {
        match (HeaderName::from_bytes(h.as_bytes()), Template::compile(v, Escape::Header)) {
            (Ok(n), Ok(t)) => headers.push((n, t)),
            (Err(e), _) => fail(format!("{rbase}.headers.{h}"), e.to_string()),
            (_, Err(e)) => fail(format!("{rbase}.headers.{h}"), e),
        }
    }
    let forward_headers = spec
        .forward_headers
        .iter()
        .filter_map(|(call, names_)| {
            let idx = names.iter().position(|n| n == call)?;
            Some((idx, names_.iter().filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()).collect()))
        })
        .collect();
    let mut body = match (&spec.body, &spec.template) {
        (Some(b), _) => match JsonTemplate::compile(b) {
            Ok(t) => ResponseBody::Json(t),
            Err(e) => {
                fail(format!("{rbase}.body"), e);
                ResponseBody::Default
            }
        },
        (None, Some(t)) => {
            let content_type = spec.content_type.as_deref().unwrap_or("text/html; charset=utf-8");
            match (Template::compile(t, Escape::Html), HeaderValue::from_str(content_type)) {
                (Ok(template), Ok(content_type)) => ResponseBody::Text { template, content_type },
                (Err(e), _) => {
                    fail(format!("{rbase}.template"), e);
                    ResponseBody::Default
                }
                (_, Err(e)) => {
                    fail(format!("{rbase}.content_type"), e.to_string());
                    ResponseBody::Default
                }
            }
        }
        (None, None) => ResponseBody::Default,
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let reads_headers = reads_headers(comp);
    for call in &mut calls {
        call.keep_headers = reads_headers || spec.forward_headers.contains_key(&*call.name);
    }
    let single_safe = |c: &CallPlan| c.for_each.is_none() && matches!(c.method, Method::GET | Method::HEAD);
    let shared: Vec<bool> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            single_safe(c)
                && calls.iter().enumerate().any(|(j, o)| j != i && single_safe(o) && o.origin == c.origin && o.method == c.method)
        })
        .collect();
    for (call, s) in calls.iter_mut().zip(shared) {
        call.may_share = s;
    }
    project_answers(comp, &names, &mut calls, &headers, &mut body);
    Ok(CompositionPlan {
        reads_headers,
        name: comp.name.as_str().into(),
        method: Method::from_bytes(comp.method.as_deref().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET),
        deadline,
        calls,
        response: ResponsePlan { status, headers, forward_headers, body },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(calls: &str, response: &str) -> bool {
        let yaml = format!("name: c\npath: /c\ncalls:\n{calls}\nresponse: {response}\n");
        let comp: Composition = serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        reads_headers(&comp)
    }

    #[test]
    fn headers_are_copied_only_when_something_may_read_them() {
        let plain = "  a: { url: \"http://x/a/{{request.path.id}}?q={{request.query.q}}\", body: { q: $.request.query.q } }";
        assert!(!reads(plain, "{ body: { id: $.a.body.id } }"));
        assert!(!reads(plain, "{ template: \"<p>{{a.body.name}}</p>\" }"));
        for (calls, response) in [
            ("  a: { url: \"http://x/a/{{request.headers.x-t}}\" }", "{}"),
            ("  a: { url: \"http://x/a\", headers: { x-t: \"{{request.headers.x-t}}\" } }", "{}"),
            ("  a: { url: \"http://x/a\", when: \"$.request['headers']\" }", "{}"),
            ("  a: { url: \"http://x/a\", when: $.request.* }", "{}"),
            (plain, "{ body: { all: $.a.* } }"),
            (plain, "{ body: { all: $..x } }"),
            (plain, "{ body: { h: \"$.a[?@.status == 200]\" } }"),
            (plain, "{ template: \"{{#each a}}{{@key}}{{/each}}\" }"),
            (plain, "{ template: \"{{lookup a 'headers'}}\" }"),
            (plain, "{ headers: { x-h: \"{{a.headers.etag}}\" } }"),
        ] {
            assert!(reads(calls, response), "{calls} / {response}");
        }
    }

    fn needs(calls: &str, response: &str) -> (Vec<Need>, CompositionPlan) {
        let yaml = format!("name: c\npath: /c\ncalls:\n{calls}\nresponse: {response}\n");
        let comp: Composition = serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let plan = compile(&comp, &Upstreams::new()).unwrap_or_else(|e| panic!("{yaml}: {e:?}"));
        (plan.calls.iter().map(|c| c.answer.need.clone()).collect(), plan)
    }

    fn fields(f: &[(&str, Need)]) -> Need {
        Need::Fields(f.iter().map(|(k, n)| (k.to_string(), n.clone())).collect())
    }

    #[test]
    fn answers_are_parsed_as_far_as_they_are_read() {
        use Need::{Copy, Whole};
        let three = "  u: { url: \"http://u/u/{{request.path.id}}\" }\n  o: { url: \"http://o/o?seller={{u.body.seller.id}}\" }\n  r: { url: \"http://r/r\", required: false }";
        // The dashboard: everything the response reads is copied.
        let (n, plan) = needs(three, "{ body: { id: $.u.body.id, orders: $.o.body.items, r: $.r.body.average, s: $.r.status } }");
        let entries: Vec<EntryFields> = plan.calls.iter().map(|c| c.entry).collect();
        assert_eq!(entries, [EntryFields::default(), EntryFields::default(), EntryFields(EntryFields::STATUS)]);
        assert_eq!(n[0], fields(&[("seller", fields(&[("id", Whole)])), ("id", Copy(0))]));
        assert_eq!(n[1], fields(&[("items", Copy(0))]));
        assert_eq!(n[2], fields(&[("average", Copy(0))]));
        let ResponseBody::Json(t) = &plan.response.body else { panic!() };
        assert!(format!("{t:?}").matches("Copy {").count() == 3, "{t:?}");
        // Read whole and by a sub-path, or also as a value: parsed whole.
        let (n, _) = needs(
            three,
            "{ body: { a: $.o.body.items, b: \"$.o.body.items[0].id\", c: $.u.body.seller, d: $.r.body.x.y, e: $.r.body.x } }",
        );
        assert_eq!(n[0], fields(&[("seller", Whole)]));
        assert_eq!(n[1], fields(&[("items", Whole)]));
        assert_eq!(n[2], fields(&[("x", Whole)]));
        let (n, _) = needs(three, "{ body: { a: $.o.body.items }, headers: { x-n: \"{{o.body.items}}\" } }");
        assert_eq!(n[1], fields(&[("items", Whole)]));
        // What reads a whole body, or every call's.
        let (n, _) = needs(three, "{ body: { a: $.o.body, u: $.u } }");
        assert_eq!((&n[0], &n[1], &n[2]), (&Whole, &Copy(0), &fields(&[])));
        let (_, plan) = needs(three, "{ body: { u: $.u, e: $.r.error.kind }, headers: { x: \"{{o.duration_ms}}\" } }");
        let entries: Vec<EntryFields> = plan.calls.iter().map(|c| c.entry).collect();
        assert_eq!(entries, [EntryFields::ALL, EntryFields(EntryFields::DURATION), EntryFields(EntryFields::ERROR)]);
        for response in [
            "{}",
            "{ body: { all: $..id } }",
            "{ body: { all: $.* } }",
            "{ body: $ }",
            "{ template: \"{{#each u.body}}{{this}}{{/each}}{{o.status}}\" }",
        ] {
            let (n, _) = needs(three, response);
            // A handlebars template reads whole each root it names.
            let whole = if response.contains("each") { vec![Whole, Whole, fields(&[])] } else { vec![Whole; 3] };
            assert_eq!(n, whole, "{response}");
        }
        let (n, _) = needs(three, "{ body: { a: $.o.*, b: $.u..x, c: \"$.r['body', 'status']\" } }");
        assert_eq!(n, vec![Whole; 3]);
        let (n, _) = needs(three, "{ body: { a: \"$.o.body.items[?@.id == $.u.body.id]\" } }");
        assert_eq!(n, vec![Whole; 3]);
        let (n, _) = needs(three, "{ body: { a: \"$.o.body.items[?@.id == 'x'].id\" } }");
        assert_eq!(n[1], fields(&[("items", Whole)]));
        // for_each, cache and collapse: whole.
        let calls = "  u: { url: \"http://u/u\" }\n  o: { url: \"http://o/o/{{item}}\", for_each: $.u.body.ids }\n  c: { url: \"http://c/c\", collapse: true }";
        let (n, _) = needs(calls, "{ body: { a: $.u.body.x, o: $.o.body, c: $.c.body.x } }");
        assert_eq!(n, vec![fields(&[("ids", Whole), ("x", Copy(0))]), Whole, Whole]);
        // Two calls that may share one request share one projection.
        let calls = "  a: { url: \"http://s/x\" }\n  b: { url: \"http://s/x\" }";
        let (n, plan) = needs(calls, "{ body: { a: $.a.body.p, b: $.b.body.q, c: $.b.body.p } }");
        assert_eq!(n[0], fields(&[("p", Copy(0)), ("q", Copy(1))]));
        assert!(Arc::ptr_eq(&plan.calls[0].answer, &plan.calls[1].answer));
    }
}
