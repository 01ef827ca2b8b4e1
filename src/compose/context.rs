//! The `request` entry of a composition's context document (SPEC §2).

use std::sync::Arc;

use http::{HeaderMap, Method};
use serde_json::{Map, Value};

/// Largest client body a composition reads (it is parsed as JSON).
pub const MAX_REQUEST_BODY: usize = 10 << 20;

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes (lossy UTF-8); `+` is a space in query strings.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match (b.get(i + 1).copied().and_then(hex_val), b.get(i + 2).copied().and_then(hex_val)) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Each query parameter's first value, percent-decoded.
pub fn query_map(query: Option<&str>) -> Map<String, Value> {
    let mut map = Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true);
        if !map.contains_key(&k) {
            map.insert(k, Value::String(percent_decode(v, true)));
        }
    }
    map
}

/// Header names in lower case; several values joined with ", ".
pub fn headers_map(headers: &HeaderMap) -> Map<String, Value> {
    let mut map = Map::new();
    for name in headers.keys() {
        let joined =
            headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect::<Vec<_>>().join(", ");
        map.insert(name.as_str().to_string(), Value::String(joined));
    }
    map
}

/// The `request` entry. `headers: None` leaves `request.headers` empty: a
/// composition none of whose templates can read it skips the copy.
pub fn request_context(
    method: &Method,
    params: &[(Arc<str>, String)],
    query: Option<&str>,
    headers: Option<&HeaderMap>,
    body: Value,
) -> Value {
    let path: Map<String, Value> = params.iter().map(|(k, v)| (k.to_string(), Value::String(percent_decode(v, false)))).collect();
    let mut req = Map::with_capacity(5);
    req.insert("method".into(), Value::String(method.as_str().to_string()));
    req.insert("path".into(), Value::Object(path));
    req.insert("query".into(), Value::Object(query_map(query)));
    req.insert("headers".into(), Value::Object(headers.map(headers_map).unwrap_or_default()));
    req.insert("body".into(), body);
    Value::Object(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b%2Fc+d", false), "a b/c+d");
        assert_eq!(percent_decode("a+b%", true), "a b%");
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
        assert_eq!(percent_decode("%C3%A9", false), "é");
        let q = query_map(Some("a=1&a=2&b=x%26y&flag"));
        assert_eq!(q["a"], "1");
        assert_eq!(q["b"], "x&y");
        assert_eq!(q["flag"], "");
    }
}
