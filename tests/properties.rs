//! Property tests of the invariants the fuzz targets (fuzz/) also check,
//! run on every `cargo test`: the path normaliser and the escaping of
//! templated values.

use manifold::compose::template::{Escape, Template};
use manifold::server::hygiene::normalize_path;
use proptest::prelude::*;
use serde_json::json;

/// Paths built from the pieces that make normalising hard.
fn tricky_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E".to_string()),
        Just("%2F".to_string()),
        Just("%25".to_string()),
        "[a-z0-9._~-]{1,4}",
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|p| format!("/{}", p.concat()))
}

proptest! {
    #[test]
    fn a_normalised_path_has_no_dot_segment_and_is_stable(raw in tricky_path()) {
        let path = normalize_path(&raw).expect("only valid escapes were used");
        prop_assert!(path.starts_with('/'));
        prop_assert!(!path.contains("//"), "{raw} -> {path}");
        for segment in path.split('/').skip(1) {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            prop_assert!(decoded != "." && decoded != "..", "{raw} -> {path}");
        }
        let again = normalize_path(&path).expect("a normalised path is valid");
        prop_assert_eq!(&*again, &*path);
    }

    #[test]
    fn any_path_is_refused_or_normalised_without_panic(raw in "/[ -~]{0,40}") {
        if let Ok(path) = normalize_path(&raw) {
            prop_assert!(path.starts_with('/'));
        }
    }

    #[test]
    fn a_value_stays_in_its_path_segment(value in any::<String>()) {
        let t = Template::compile("/users/{{request.path.id}}/orders", Escape::PathSegment).unwrap();
        let out = t.render(&json!({"request": {"path": {"id": value}}})).unwrap();
        let middle = out.strip_prefix("/users/").and_then(|s| s.strip_suffix("/orders")).expect("literal text kept");
        prop_assert!(middle.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{out}");
        // Only a value that is itself `.` or `..` renders as a dot segment
        // (they need no escape); the executor refuses such a path before
        // sending it (compose/call.rs `prepare`, tests/compose.rs), as
        // fuzz/fuzz_targets/template_escape.rs also holds.
        if middle == "." || middle == ".." {
            prop_assert_eq!(middle, value.as_str(), "{}", out);
        }
        prop_assert_eq!(out.split('/').count(), 4);
    }

    #[test]
    fn a_value_stays_in_its_query_component(value in any::<String>()) {
        let t = Template::compile("user={{request.query.q}}&limit=5", Escape::QueryComponent).unwrap();
        let out = t.render(&json!({"request": {"query": {"q": value}}})).unwrap();
        let middle = out.strip_prefix("user=").and_then(|s| s.strip_suffix("&limit=5")).expect("literal text kept");
        prop_assert!(middle.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{out}");
    }

    #[test]
    fn a_header_value_with_a_line_break_is_refused(value in any::<String>()) {
        let t = Template::compile("{{request.headers.x}}", Escape::Header).unwrap();
        match t.render(&json!({"request": {"headers": {"x": value.clone()}}})) {
            Ok(v) => prop_assert_eq!(v, value),
            Err(_) => prop_assert!(value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)),
        }
    }
}
