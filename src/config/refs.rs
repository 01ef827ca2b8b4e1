//! What a template or a JSONPath query reads: the first name of each path,
//! which is how a call's dependencies are found.

/// A name a template reads. `certain` is false for a name that may be a
/// helper or a block-local name (first word of a multi-word mustache, or
/// anything inside a block), which is not an error when unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRef {
    pub root: String,
    pub certain: bool,
}

fn path_root(token: &str) -> Option<&str> {
    let end = token.find(['.', '[', '/']).unwrap_or(token.len());
    let root = &token[..end];
    let mut chars = root.chars();
    let first = chars.next()?;
    if !(first.is_ascii_alphabetic() || first == '_') {
        return None;
    }
    if matches!(root, "this" | "else" | "true" | "false" | "null" | "undefined") {
        return None;
    }
    Some(root)
}

/// The roots of the paths in the `{{...}}` expressions of a template.
pub fn template_refs(template: &str) -> Vec<TemplateRef> {
    let mut refs = Vec::new();
    let mut depth = 0usize;
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        let inner = after[..close].trim_matches(|c| c == '{' || c == '}' || c == '~').trim();
        rest = &after[close + 2..];
        if inner.starts_with('!') {
            continue;
        }
        let (block_open, block_close) = (inner.starts_with('#'), inner.starts_with('/'));
        if block_close {
            depth = depth.saturating_sub(1);
            continue;
        }
        let body = inner.trim_start_matches(['#', '^', '&', '>', '*']);
        let tokens: Vec<&str> = body.split(|c: char| c.is_whitespace() || c == '(' || c == ')').filter(|t| !t.is_empty()).collect();
        for (i, token) in tokens.iter().enumerate() {
            let token = token.rsplit('=').next().unwrap_or(token);
            // `@root.user.body` reads `user` like `user.body` does.
            let token = token.strip_prefix("@root.").unwrap_or(token);
            if token.starts_with(['"', '\'', '@']) {
                continue;
            }
            if let Some(root) = path_root(token) {
                let helper_position = i == 0 && (tokens.len() > 1 || block_open);
                refs.push(TemplateRef { root: root.to_string(), certain: !helper_position && depth == 0 });
            }
        }
        if block_open {
            depth += 1;
        }
    }
    refs
}

/// Whether a template prints a value unescaped: `{{{x}}}`, `{{&x}}`, also
/// with whitespace control (`{{~{x}}}`, `{{~&x}}`).
pub fn has_unescaped_output(template: &str) -> bool {
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = rest[open + 2..].trim_start_matches('~');
        if after.starts_with('{') || after.starts_with('&') {
            return true;
        }
        rest = &rest[open + 2..];
    }
    false
}

/// The call a JSONPath query reads (`$.user.body` and `$['user']` read
/// `user`), `Ok(None)` for a query not anchored on one name (`$..x`, `$[*]`).
/// The query itself must parse (RFC 9535).
pub fn jsonpath_root(query: &str) -> Result<Option<String>, String> {
    jsonpath_rust::parser::parse_json_path(query).map_err(|e| {
        // pest's messages are drawings over several lines; keep the gist.
        let text = e.to_string();
        let column =
            text.split("--> ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.split(':').nth(1).map(str::to_string));
        let what = text.lines().rev().find_map(|l| l.trim().strip_prefix("= ").map(str::to_string));
        match (what, column) {
            (Some(what), Some(column)) => {
                format!("invalid JSONPath {query:?}: {what} at column {column}")
            }
            _ => format!("invalid JSONPath {query:?}: {}", text.split_whitespace().collect::<Vec<_>>().join(" ")),
        }
    })?;
    let rest = &query[1..];
    if let Some(after) = rest.strip_prefix('.') {
        if after.starts_with('.') || after.starts_with('*') {
            return Ok(None);
        }
        let end = after.find(['.', '[']).unwrap_or(after.len());
        return Ok(Some(after[..end].to_string()));
    }
    for quote in ['\'', '"'] {
        if let Some(after) = rest.strip_prefix('[').and_then(|r| r.strip_prefix(quote)) {
            if let Some(end) = after.find(quote) {
                return Ok(Some(after[..end].to_string()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(t: &str) -> Vec<(String, bool)> {
        template_refs(t).into_iter().map(|r| (r.root, r.certain)).collect()
    }

    #[test]
    fn template_roots() {
        assert_eq!(roots("/users/{{request.path.id}}?x={{ user.body.id }}"), [("request".into(), true), ("user".into(), true)]);
        assert_eq!(
            roots("{{#each orders.body.items}}{{name}}{{/each}}{{lookup user.body 'x'}}"),
            [("each".into(), false), ("orders".into(), true), ("name".into(), false), ("lookup".into(), false), ("user".into(), true)]
        );
        assert_eq!(roots("{{! comment user }}{{@index}}{{this}}"), []);
        assert_eq!(roots("{{@root.user.body.id}}"), [("user".into(), true)]);
        for raw in ["{{{x}}}", "{{&x}}", "{{~{x}}}", "{{~&x}}", "a {{~&x~}} b"] {
            assert!(has_unescaped_output(raw), "{raw}");
        }
        assert!(has_unescaped_output("{{~{x}~}}"));
        assert!(!has_unescaped_output("{{x}} {{~x~}} {{#if a}}{{/if}}"));
    }

    #[test]
    fn jsonpath_roots() {
        assert_eq!(jsonpath_root("$.user.body.id").unwrap().as_deref(), Some("user"));
        assert_eq!(jsonpath_root("$['orders'].body").unwrap().as_deref(), Some("orders"));
        assert_eq!(jsonpath_root("$.orders.body.items[*].product_id").unwrap().as_deref(), Some("orders"));
        assert_eq!(jsonpath_root("$..id").unwrap(), None);
        assert!(jsonpath_root("$.user[").is_err());
    }
}
