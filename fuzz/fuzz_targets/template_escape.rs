//! Hostile values in call URLs: whatever a client puts in a path
//! parameter or a query value, the rendered path keeps exactly the
//! template's segments and the query exactly its components, and no byte
//! that could change where the request goes (`/`, `?`, `#`, `%` as
//! itself, whitespace, controls) comes from the value; a value that is
//! itself `.`, `..` or empty is left for the executor to refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifold::compose::template::{Escape, Template};
use serde_json::json;

fn value_is_contained(rendered: &str, prefix: &str, suffix: &str) -> Option<String> {
    let middle = rendered.strip_prefix(prefix)?.strip_suffix(suffix)?;
    Some(middle.to_string())
}

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    let doc = json!({"request": {"path": {"id": &*value}, "query": {"q": &*value}}});

    let path = Template::compile("/users/{{request.path.id}}/orders", Escape::PathSegment).unwrap();
    let out = path.render(&doc).unwrap();
    let middle = value_is_contained(&out, "/users/", "/orders").expect("the literal text is kept around the value");
    assert!(!middle.contains('/') && !middle.contains('?') && !middle.contains('#'), "{out}");
    // A value that is itself empty, `.` or `..` stays what it is (these
    // characters need no escape); the executor refuses such a path before
    // sending it (compose/call.rs `prepare`), so it never reaches a backend.
    if middle.is_empty() || middle == "." || middle == ".." {
        assert_eq!(middle, value, "only the value itself renders as a dot segment");
    }
    assert!(middle.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{out}");
    // Every % starts an escape of two hex digits.
    let bytes = middle.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            assert!(bytes.len() > i + 2 && bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit(), "{out}");
        }
    }
    assert_eq!(out.split('/').count(), 4, "{out}");

    let query = Template::compile("user={{request.query.q}}&limit=5", Escape::QueryComponent).unwrap();
    let out = query.render(&doc).unwrap();
    let middle = value_is_contained(&out, "user=", "&limit=5").expect("the literal text is kept around the value");
    assert!(!middle.contains('&') && !middle.contains('=') && !middle.contains('#') && !middle.contains('+'), "{out}");
    assert!(middle.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{out}");

    // Headers: a value with CR, LF or NUL is refused, any other is kept as it is.
    let header = Template::compile("{{request.path.id}}", Escape::Header).unwrap();
    match header.render(&doc) {
        Ok(v) => assert_eq!(v, value),
        Err(_) => assert!(value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)),
    }
});
