//! The checks of a composition: its calls (url or upstream and path,
//! headers, `when`, `for_each`, body, `batch`/`cache`/`collapse`), what
//! their templates and JSONPath queries read, the cycles between calls,
//! and its response.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::Value;

use super::upstreams::check_upstream_ref;
use super::{check_duration, check_header_name, check_method, holds_template, Errors, RESERVED_CALL_NAMES};
use crate::config::model::{Call, Composition};
use crate::config::pattern::is_identifier;
use crate::config::refs::{has_unescaped_output, jsonpath_root, template_refs};

/// Where a composition's template or query reads from.
struct Reads {
    path: String,
    roots: Vec<(String, bool)>,
}

fn template_reads(errs: &mut Errors, path: String, template: &str) -> Reads {
    // Output in urls and headers is always escaped for where it lands;
    // only a response template may print raw text.
    if !path.ends_with(".template") && has_unescaped_output(template) {
        errs.push(path.clone(), "unescaped output ({{{...}}} or {{&...}}) is allowed only in response.template");
    }
    if let Err(e) = handlebars::Template::compile(template) {
        // handlebars lists every token it expected; the reason and place say enough.
        let reason = e.reason().to_string();
        let reason = reason.split(": expected").next().unwrap_or(&reason);
        let place = e.pos().map(|(line, col)| format!(" at line {line} column {col}")).unwrap_or_default();
        errs.push(path.clone(), format!("invalid template: {reason}{place}"));
    }
    let roots = template_refs(template).into_iter().map(|r| (r.root, r.certain)).collect();
    Reads { path, roots }
}

fn query_reads(errs: &mut Errors, path: String, query: &str, anchored: bool) -> Reads {
    let mut roots = Vec::new();
    match jsonpath_root(query) {
        Ok(Some(root)) => roots.push((root, true)),
        Ok(None) if anchored => errs.push(path.clone(), format!("{query:?} must start with the name it reads, such as $.user.body")),
        Ok(None) => {}
        Err(e) => errs.push(path.clone(), e),
    }
    Reads { path, roots }
}

/// The error for a template written where none is rendered (a body's
/// values, `when`, `for_each`): where templates work, and the JSONPath
/// that reads what the template meant to.
fn not_rendered(text: &str, build_text: Option<&str>) -> String {
    let base = "templates are not rendered here, only in url, headers and response.template";
    let open = text.find("{{").unwrap_or(0);
    let after = &text[open + 2..];
    let inner =
        after[..after.find("}}").unwrap_or(after.len())].trim_matches(|c: char| matches!(c, '{' | '}' | '~' | '&') || c.is_whitespace());
    let is_path = inner.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && inner.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
    let whole = text.trim().starts_with("{{") && text.trim().ends_with("}}") && text.matches("{{").count() == 1;
    match (is_path, whole, build_text) {
        (true, true, _) => format!("{base}: write the JSONPath $.{inner} instead"),
        (true, false, Some(hint)) => format!("{base}: a value here is a JSONPath such as $.{inner} or literal JSON; {hint}"),
        (true, false, None) => format!("{base}: a value here is a JSONPath such as $.{inner} or literal JSON"),
        (false, _, _) => format!("{base}: use a JSONPath such as $.user.body.id"),
    }
}

/// JSONPath leaves of a body template: strings starting with `$` (not `$$`).
/// A `{{...}}` in a leaf is an error: a body is never rendered.
fn body_reads(errs: &mut Errors, path: String, body: &Value, anchored: bool, out: &mut Vec<Reads>) {
    match body {
        Value::String(s) if holds_template(s) && !s.starts_with("$$") => {
            let hint = (!anchored).then_some("to build text, use response.template");
            errs.push(path, not_rendered(s, hint));
        }
        Value::String(s) if s.starts_with('$') && !s.starts_with("$$") => out.push(query_reads(errs, path, s, anchored)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                body_reads(errs, format!("{path}[{i}]"), v, anchored, out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                body_reads(errs, format!("{path}.{k}"), v, anchored, out);
            }
        }
        _ => {}
    }
}

/// Headers the gateway sets itself on a backend call, or that describe one
/// connection: a call may not set or forward them.
const CALL_MANAGED_HEADERS: [&str; 10] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "expect"];

/// Headers of a composition's own answer that only the gateway can set:
/// its framing (a backend's `content-length` would not fit the new body)
/// and hop-by-hop headers.
fn check_response_header(errs: &mut Errors, path: String, name: &str) {
    let lower = name.to_ascii_lowercase();
    if lower != "host" && lower != "expect" && CALL_MANAGED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        errs.push(path, format!("{name} is set by the gateway for the answer it builds and cannot be configured"));
    } else {
        check_header_name(errs, path, name);
    }
}

/// `unknown call "usr"`, with the closest name when one is a likely typo
/// (at most two edits away).
fn unknown_call<'a>(name: &str, calls: impl Iterator<Item = &'a String>) -> String {
    unknown("call", name, calls.map(String::as_str).chain(["request"]))
}

/// `unknown KIND "NAME"`, with the closest of `known` when one is a likely
/// typo (at most two edits away).
pub(super) fn unknown<'a>(kind: &str, name: &str, known: impl Iterator<Item = &'a str>) -> String {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
                prev = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    }
    let best = known.map(|c| (distance(name, c), c)).filter(|(d, c)| *d <= 2 && *d < c.chars().count().min(name.chars().count())).min();
    match best {
        Some((_, c)) => format!("unknown {kind} {name:?} (did you mean {c:?}?)"),
        None => format!("unknown {kind} {name:?}"),
    }
}

fn check_call_header(errs: &mut Errors, path: String, name: &str) {
    let lower = name.to_ascii_lowercase();
    if CALL_MANAGED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        errs.push(path, format!("{name} is set by the gateway for each call and cannot be configured"));
    } else {
        check_header_name(errs, path, name);
    }
}

/// Splits a call URL into its fixed origin (`scheme://host[:port]`) and the
/// templated rest. Templates in the origin are an error: they would let a
/// request choose where the gateway connects.
pub fn split_call_url(url: &str) -> Result<(&str, &str), String> {
    let Some(scheme_end) = url.find("://") else {
        return Err(format!("invalid url {url:?}: expected http(s)://host[:port]/path"));
    };
    let after = &url[scheme_end + 3..];
    let origin_end = scheme_end + 3 + after.find(['/', '?']).unwrap_or(after.len());
    let (origin, rest) = url.split_at(origin_end);
    if origin.contains("{{") || origin.contains("}}") {
        return Err("the scheme, host and port of a url are fixed text: templates are allowed only in its path and query".into());
    }
    let uri: http::Uri = origin.parse().map_err(|e| format!("invalid url {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) || origin.contains('@') {
        return Err(format!("invalid url {url:?}: expected http(s)://host[:port]/path"));
    }
    check_call_rest(rest, "a url")?;
    Ok((origin, rest))
}

/// What a url's path and query, or an upstream call's `path`, may not hold
/// literally: a fragment, an empty segment, a `.` or `..` segment. `what`
/// names it in the message ("a url", "a path").
fn check_call_rest(rest: &str, what: &str) -> Result<(), String> {
    let literal = strip_templates(rest);
    if literal.contains('#') {
        return Err(format!("{what} cannot hold a fragment"));
    }
    if literal.split('?').next().unwrap_or("").contains("//") {
        return Err(format!("{} cannot hold an empty segment (//)", path_of(what)));
    }
    Ok(())
}

fn path_of(what: &str) -> &'static str {
    if what == "a url" {
        "a url path"
    } else {
        "a path"
    }
}

/// A `.` or `..` segment written in a call's path (also as `%2e`): the
/// error to report beside the path's other checks.
fn dot_segments(rest: &str, what: &str) -> Option<String> {
    let path_part = strip_templates(rest.split('?').next().unwrap_or(""));
    path_part
        .split('/')
        .any(|seg| matches!(seg.to_ascii_lowercase().as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."))
        .then(|| format!("{} cannot hold . or .. segments", path_of(what)))
}

/// A call's path and query, after a url's origin or as an upstream call's
/// `path`: the same checks, the same template rules.
fn check_call_path(errs: &mut Errors, field: String, rest: &str, what: &str, reads: &mut Vec<Reads>) {
    if let Some(e) = dot_segments(rest, what) {
        errs.push(field.clone(), e);
    }
    reads.push(template_reads(errs, field, rest));
}

/// The text of a template with each `{{...}}` expression replaced by `x`,
/// for checks of what the author wrote literally.
fn strip_templates(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        match rest[open..].find("}}") {
            Some(close) => {
                out.push('x');
                rest = &rest[open + close + 2..];
            }
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// `batch`, `cache` and `collapse` of one call (SPEC §8).
fn check_sharing(errs: &mut Errors, cbase: &str, call: &Call, method: &str) {
    if let Some(b) = &call.batch {
        if call.for_each.is_none() {
            errs.push(format!("{cbase}.batch"), "batch goes with for_each: it groups the for_each's values into requests");
        }
        if b.size == 0 {
            errs.push(format!("{cbase}.batch.size"), "must be at least 1");
        }
        for (field, q) in [("key", Some(&b.key)), ("path", b.path.as_ref())] {
            let Some(q) = q else { continue };
            if !q.starts_with('$') {
                errs.push(format!("{cbase}.batch.{field}"), "expected a JSONPath query starting with $");
            } else if let Err(e) = jsonpath_root(q) {
                errs.push(format!("{cbase}.batch.{field}"), e);
            }
        }
    }
    if let Some(c) = &call.cache {
        if method != "GET" {
            errs.push(format!("{cbase}.cache"), format!("cache is for GET calls only, not {method}"));
        }
        if c.ttl.0.is_zero() {
            errs.push(format!("{cbase}.cache.ttl"), "must be more than 0");
        }
        for (i, h) in c.vary_headers.iter().enumerate() {
            check_header_name(errs, format!("{cbase}.cache.vary_headers[{i}]"), h);
        }
    }
    if call.collapse && method != "GET" {
        errs.push(format!("{cbase}.collapse"), format!("collapse is for GET calls only, not {method}"));
    }
}

pub(super) fn check_composition(errs: &mut Errors, base: &str, comp: &Composition, upstreams: &HashSet<&str>) {
    if comp.calls.is_empty() {
        errs.push(format!("{base}.calls"), "a composition needs at least one call");
    }
    let mut deps: IndexMap<&str, Vec<String>> = IndexMap::new();
    for (name, call) in &comp.calls {
        let cbase = format!("{base}.calls.{name}");
        if !is_identifier(name) {
            errs.push(cbase.clone(), format!("invalid call name {name:?}: letters, digits and _, not starting with a digit"));
        }
        if RESERVED_CALL_NAMES.contains(&name.as_str()) {
            errs.push(cbase.clone(), format!("{name:?} is reserved"));
        }
        let method = call.method.clone().unwrap_or_else(|| "GET".into());
        check_method(errs, format!("{cbase}.method"), &method);
        check_duration(errs, format!("{cbase}.timeout"), call.timeout);
        if call.retries.unwrap_or(0) > 0 && !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE") {
            errs.push(format!("{cbase}.retries"), format!("retries are allowed only for idempotent methods, not {method}"));
        }
        if call.max_concurrency == Some(0) {
            errs.push(format!("{cbase}.max_concurrency"), "must be at least 1");
        }
        if call.max_items == Some(0) {
            errs.push(format!("{cbase}.max_items"), "must be at least 1");
        }
        if call.max_body_bytes.is_some_and(|b| b.0 == 0) {
            errs.push(format!("{cbase}.max_body_bytes"), "must be more than 0");
        }
        if call.fallback.is_some() && call.required {
            // A required call's failure fails the composition: a fallback
            // would never be used.
            errs.push(format!("{cbase}.fallback"), "fallback goes with required: false (a required call that fails fails the composition)");
        }
        if call.for_each.is_none() && (call.max_concurrency.is_some() || call.max_items.is_some()) {
            errs.push(cbase.clone(), "max_concurrency and max_items apply only to a for_each call");
        }
        check_sharing(errs, &cbase, call, &method);
        let mut reads = Vec::new();
        match (&call.url, &call.upstream, &call.path) {
            (Some(url), None, None) => match split_call_url(url) {
                Ok((_, rest)) => check_call_path(errs, format!("{cbase}.url"), rest, "a url", &mut reads),
                Err(e) => errs.push(format!("{cbase}.url"), e),
            },
            (Some(_), Some(_), _) => errs.push(cbase.clone(), "a call has url, or upstream with path, not both"),
            (Some(_), None, Some(_)) => errs.push(format!("{cbase}.path"), "path goes with upstream: a url holds its own path and query"),
            (None, None, None) => errs.push(cbase.clone(), "a call needs url, or upstream with path"),
            (None, None, Some(_)) => errs.push(format!("{cbase}.path"), "path goes with upstream: name the upstream the call goes to"),
            (None, Some(upstream), path) => {
                check_upstream_ref(errs, format!("{cbase}.upstream"), upstream, upstreams);
                match path {
                    None => errs.push(format!("{cbase}.path"), "a call to an upstream needs a path, such as /users/{{request.path.id}}"),
                    Some(p) if !p.starts_with('/') => {
                        errs.push(format!("{cbase}.path"), format!("invalid path {p:?}: expected /path[?query]"))
                    }
                    Some(p) => match check_call_rest(p, "a path") {
                        Ok(()) => check_call_path(errs, format!("{cbase}.path"), p, "a path", &mut reads),
                        Err(e) => errs.push(format!("{cbase}.path"), e),
                    },
                }
            }
        }
        for (h, v) in &call.headers {
            check_call_header(errs, format!("{cbase}.headers.{h}"), h);
            reads.push(template_reads(errs, format!("{cbase}.headers.{h}"), v));
        }
        for (i, h) in call.forward_headers.iter().enumerate() {
            check_call_header(errs, format!("{cbase}.forward_headers[{i}]"), h);
        }
        for (field, query) in [("when", &call.when), ("for_each", &call.for_each)] {
            if let Some(q) = query {
                if holds_template(q) {
                    errs.push(format!("{cbase}.{field}"), not_rendered(q, None));
                } else if q.starts_with('$') {
                    reads.push(query_reads(errs, format!("{cbase}.{field}"), q, true));
                } else {
                    errs.push(format!("{cbase}.{field}"), "expected a JSONPath query starting with $");
                }
            }
        }
        if let Some(body) = &call.body {
            body_reads(errs, format!("{cbase}.body"), body, true, &mut reads);
        }
        let mut mine = Vec::new();
        for r in reads {
            for (root, certain) in r.roots {
                if comp.calls.contains_key(&root) {
                    mine.push(root);
                } else if root == "item" {
                    if call.for_each.is_none() || r.path.ends_with(".for_each") || r.path.ends_with(".when") {
                        errs.push(r.path.clone(), "`item` is only available in the url, headers and body of a for_each call");
                    } else if call.batch.is_some() {
                        errs.push(
                            r.path.clone(),
                            "a batch call sends its values as `items` (comma-joined in the url, an array in the body), not `item`",
                        );
                    }
                } else if root == "items" {
                    let place = r.path.ends_with(".url") || r.path.ends_with(".path") || r.path.contains(".body");
                    if call.batch.is_none() || !place {
                        errs.push(r.path.clone(), "`items` is only available in the url and body of a call with batch");
                    }
                } else if root != "request" && certain {
                    errs.push(r.path.clone(), unknown_call(&root, comp.calls.keys()));
                }
            }
        }
        mine.dedup();
        deps.insert(name.as_str(), mine);
    }
    if let Some(cycle) = find_cycle(&deps) {
        errs.push(format!("{base}.calls"), format!("calls depend on each other in a cycle: {}", cycle.join(" -> ")));
    }

    let Some(resp) = &comp.response else { return };
    let rbase = format!("{base}.response");
    if let Some(status) = resp.status {
        if !(100..=599).contains(&status) {
            errs.push(format!("{rbase}.status"), "expected a status from 100 to 599");
        }
    }
    if resp.body.is_some() && resp.template.is_some() {
        errs.push(rbase.clone(), "a response has body or template, not both");
    }
    if resp.content_type.is_some() && resp.template.is_none() {
        errs.push(format!("{rbase}.content_type"), "content_type goes with template (a body is always JSON)");
    }
    let mut reads = Vec::new();
    for (h, v) in &resp.headers {
        check_response_header(errs, format!("{rbase}.headers.{h}"), h);
        reads.push(template_reads(errs, format!("{rbase}.headers.{h}"), v));
    }
    for (call, names) in &resp.forward_headers {
        if !comp.calls.contains_key(call) {
            errs.push(format!("{rbase}.forward_headers.{call}"), unknown_call(call, comp.calls.keys()));
        }
        for (i, h) in names.iter().enumerate() {
            check_response_header(errs, format!("{rbase}.forward_headers.{call}[{i}]"), h);
        }
    }
    if let Some(body) = &resp.body {
        body_reads(errs, format!("{rbase}.body"), body, false, &mut reads);
    }
    if let Some(t) = &resp.template {
        reads.push(template_reads(errs, format!("{rbase}.template"), t));
    }
    for r in reads {
        for (root, certain) in r.roots {
            if certain && !comp.calls.contains_key(&root) && root != "request" {
                errs.push(r.path.clone(), unknown_call(&root, comp.calls.keys()));
            }
        }
    }
}

/// A cycle in the call graph, as the names along it, first repeated last.
fn find_cycle(deps: &IndexMap<&str, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        deps: &'a IndexMap<&str, Vec<String>>,
        marks: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(node).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Active => {
                let start = stack.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(node, Mark::Active);
        stack.push(node);
        for dep in deps.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep.as_str(), deps, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for node in deps.keys() {
        if let Some(cycle) = visit(node, deps, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod unknown_call_tests {
    use super::{unknown, unknown_call};

    #[test]
    fn suggests_a_close_call_name_only() {
        let calls = ["user".to_string(), "orders".to_string()];
        assert_eq!(unknown_call("usr", calls.iter()), "unknown call \"usr\" (did you mean \"user\"?)");
        assert_eq!(unknown_call("reqest", calls.iter()), "unknown call \"reqest\" (did you mean \"request\"?)");
        assert_eq!(unknown("upstream", "userz", ["users", "orders"].into_iter()), "unknown upstream \"userz\" (did you mean \"users\"?)");
        assert_eq!(unknown("upstream", "billing", ["users"].into_iter()), "unknown upstream \"billing\"");
        assert_eq!(unknown_call("reviews", calls.iter()), "unknown call \"reviews\"");
        assert_eq!(unknown_call("ab", calls.iter()), "unknown call \"ab\"");
    }
}
