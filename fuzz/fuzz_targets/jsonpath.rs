//! JSONPath: any query text compiles or is refused, and a compiled query
//! evaluates against any JSON document without panicking; a singular
//! query's value is the one its general evaluation finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifold::compose::query::{truthy, Query};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The first line is the query, the rest the document.
    let text = String::from_utf8_lossy(data);
    let (query, doc) = text.split_once('\n').unwrap_or((&text, "{}"));
    let doc: Value = serde_json::from_str(doc).unwrap_or(Value::Null);
    if let Ok(q) = Query::parse(query) {
        let v = q.eval(&doc);
        let _ = truthy(&v);
        let _ = q.items(&doc);
        let _ = q.get(&doc);
        let mut out = Vec::new();
        let _ = q.serialize_eval(&doc, &mut serde_json::Serializer::new(&mut out));
        if !out.is_empty() {
            // Compared as text: serde_json's float parsing is not exact
            // enough for a round trip through text.
            let built = serde_json::to_vec(&v).unwrap();
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&built), "serialize_eval and eval agree for {query}");
        }
    }
});
