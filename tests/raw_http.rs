//! The raw-socket suite: every file in `tests/raw/` is one case, sent byte
//! for byte on a new connection to a real gateway in front of two real
//! backends, so the next case is one new file. See `tests/raw/README.md`
//! for the format.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{backend, gateway, Backend};
use serde_json::Value;

/// One case file, parsed.
#[derive(Debug, Default)]
struct Case {
    send: Vec<u8>,
    /// Half-close the connection after sending.
    send_eof: bool,
    /// `None`: the gateway closes without an answer. Else each answer's
    /// status and, for the gateway's own errors, its code.
    expect: Option<Vec<(u16, Option<String>)>>,
    closed: bool,
    /// Checks on the last answer: `request_id`, `header.NAME`.
    answer: Vec<(String, String)>,
    /// Checks on what a backend saw during the case: `a.hits`, `b.path`...
    backends: Vec<(String, String)>,
}

/// The bytes of a `send:` line: `\r`, `\n`, `\t`, `\0`, `\\`, `\xHH`, and
/// `\{TEXT*N}` for TEXT repeated N times.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let next = *b.get(i + 1).unwrap_or_else(|| panic!("a lone backslash ends {s:?}"));
        i += 2;
        match next {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                out.push(u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("bad \\x escape in {s:?}")));
                i += 2;
            }
            b'{' => {
                let end = s[i..].find('}').unwrap_or_else(|| panic!("unclosed \\{{ in {s:?}")) + i;
                let (text, n) = s[i..end].rsplit_once('*').unwrap_or_else(|| panic!("\\{{TEXT*N}} needs a count in {s:?}"));
                let text = unescape(text);
                for _ in 0..n.parse::<usize>().unwrap() {
                    out.extend_from_slice(&text);
                }
                i = end + 1;
            }
            other => panic!("unknown escape \\{} in {s:?}", other as char),
        }
    }
    out
}

fn parse(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap();
    let mut case = Case::default();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(':').unwrap_or_else(|| panic!("{}: not `key: value`: {line:?}", path.display()));
        // Only the first space after the colon is the separator: a send
        // line may start with spaces of its own.
        let value = value.strip_prefix(' ').unwrap_or(value);
        match key {
            "send" => case.send.extend(unescape(value)),
            "send_eof" => case.send_eof = value.trim() == "yes",
            "expect" if value.trim() == "close" => case.expect = None,
            "expect" => {
                case.expect = Some(
                    value
                        .split(',')
                        .map(|a| {
                            let mut parts = a.split_whitespace();
                            let status =
                                parts.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{}: bad expect", path.display()));
                            (status, parts.next().map(str::to_string))
                        })
                        .collect(),
                )
            }
            "closed" => case.closed = value.trim() == "yes",
            k if k == "request_id" || k.starts_with("header.") => case.answer.push((k.to_string(), value.trim().to_string())),
            k if k.starts_with("a.") || k.starts_with("b.") => case.backends.push((k.to_string(), value.trim().to_string())),
            other => panic!("{}: unknown key {other:?}", path.display()),
        }
    }
    assert!(!case.send.is_empty(), "{}: nothing to send", path.display());
    assert!(text.contains("\nexpect:") || text.starts_with("expect:"), "{}: no expect line", path.display());
    case
}

/// One answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Reads one answer from `buf` + the stream; `None` at a clean end.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Answer>, String> {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if !fill(s, buf)? {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(format!("the answer ended in its head: {:?}", String::from_utf8_lossy(buf)))
            };
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1 status line: {status_line:?}"))?;
    let mut headers = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let body = if status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad content-length {len:?}"))?;
        while buf.len() < len {
            if !fill(s, buf)? {
                return Err("the answer's body ended early".into());
            }
        }
        buf.drain(..len).collect()
    } else if headers.get("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                if !fill(s, buf)? {
                    return Err("the chunked answer ended early".into());
                }
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&buf[..line_end]).split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size in the answer".to_string())?;
            while buf.len() < line_end + 2 + size + 2 {
                if !fill(s, buf)? {
                    return Err("the chunked answer ended early".into());
                }
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        while fill(s, buf)? {}
        std::mem::take(buf)
    };
    Ok(Some(Answer { status, headers, body }))
}

/// Reads more into `buf`: false at the end of the stream (a reset counts
/// as an end: the gateway closed with bytes of ours unread).
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<bool, String> {
    let mut chunk = [0u8; 16 << 10];
    match s.read(&mut chunk) {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

/// At most 300 characters of a body, for a failure's message.
fn shown(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(300).collect()
}

/// What a backend saw during one case.
struct Seen<'a> {
    hits: usize,
    last: Option<&'a Value>,
}

fn check_backend(name: &str, key: &str, want: &str, seen: &Seen<'_>) -> Result<(), String> {
    let field = key.strip_prefix(name).and_then(|k| k.strip_prefix('.')).unwrap_or(key);
    if field == "hits" {
        return if seen.hits.to_string() == want { Ok(()) } else { Err(format!("{key}: {} requests, not {want}", seen.hits)) };
    }
    let last = seen.last.ok_or_else(|| format!("{key}: backend {name} saw no request"))?;
    let got = if let Some(header) = field.strip_prefix("header.") {
        match last["headers"][header].as_array() {
            Some(values) => values.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
            None => "(none)".into(),
        }
    } else {
        match &last[field] {
            Value::String(s) => s.clone(),
            Value::Null => "(none)".into(),
            other => other.to_string(),
        }
    };
    if got == want {
        Ok(())
    } else {
        Err(format!("{key}: {got:?}, not {want:?} (the request: {last})"))
    }
}

fn run_case(addr: SocketAddr, case: &Case, a: &Backend, b: &Backend) -> Result<(), String> {
    let before =
        [(a.hits.load(Ordering::SeqCst), a.seen.lock().unwrap().len()), (b.hits.load(Ordering::SeqCst), b.seen.lock().unwrap().len())];
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A refused head closes the connection: the rest may not be read.
    let _ = s.write_all(&case.send);
    if case.send_eof {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    let mut last = None;
    match &case.expect {
        None => {
            if let Some(answer) = read_answer(&mut s, &mut buf)? {
                return Err(format!("expected a close, got {} {:?}", answer.status, shown(&answer.body)));
            }
        }
        Some(expected) => {
            for (i, (status, code)) in expected.iter().enumerate() {
                let answer = read_answer(&mut s, &mut buf)?.ok_or_else(|| format!("answer {}: the connection closed", i + 1))?;
                if answer.status != *status {
                    return Err(format!("answer {}: {} {:?}, not {status}", i + 1, answer.status, shown(&answer.body)));
                }
                // Every error the gateway makes is SPEC §4 JSON with the
                // request ID, also in X-Request-ID.
                if answer.status >= 400 && !answer.headers.contains_key("x-backend") {
                    let body: Value = serde_json::from_slice(&answer.body)
                        .map_err(|_| format!("answer {}: not JSON: {:?}", i + 1, shown(&answer.body)))?;
                    let id = body["error"]["request_id"].as_str().unwrap_or_default();
                    if id.is_empty()
                        || answer.headers.get("x-request-id").map(String::as_str) != Some(id)
                        || !body["error"]["message"].is_string()
                    {
                        return Err(format!("answer {}: not a SPEC §4 error with its X-Request-ID: {body} {:?}", i + 1, answer.headers));
                    }
                    if let Some(code) = code {
                        if body["error"]["code"] != code.as_str() {
                            return Err(format!("answer {}: code {}, not {code}", i + 1, body["error"]["code"]));
                        }
                    }
                } else if code.is_some() {
                    return Err(format!("answer {}: expected a gateway error {code:?}, got the backend's answer", i + 1));
                }
                last = Some(answer);
            }
        }
    }
    if case.closed {
        let mut more = Vec::new();
        if fill(&mut s, &mut more)? {
            return Err(format!("expected the connection closed, got more: {:?}", shown(&more)));
        }
    }
    for (key, want) in &case.answer {
        let answer = last.as_ref().ok_or("no answer to check")?;
        let got = if key == "request_id" {
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
            body["error"]["request_id"].as_str().map(str::to_string).or_else(|| answer.headers.get("x-request-id").cloned())
        } else {
            answer.headers.get(&key["header.".len()..].to_ascii_lowercase()).cloned()
        };
        if got.as_deref() != Some(want.as_str()) {
            return Err(format!("{key}: {got:?}, not {want:?}"));
        }
    }
    for (key, want) in &case.backends {
        let (backend, (hits_before, seen_before)) = if key.starts_with("a.") { (a, before[0]) } else { (b, before[1]) };
        let seen = backend.seen.lock().unwrap();
        let hits = backend.hits.load(Ordering::SeqCst) - hits_before;
        let last = seen.get(seen_before..).and_then(|s| s.last());
        check_backend(&key[..1], key, want, &Seen { hits, last })?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_http_cases() {
    let (a, b, c) = (backend().run().await, backend().run().await, backend().run().await);
    let g = gateway(&format!(
        "routes:\n  - {{ name: root, path: /, upstream: \"{a}\" }}\n  - {{ name: a, path: \"/{{*rest}}\", upstream: \"{a}\" }}\n  - {{ name: b, hosts: [b.test], path: \"/{{*rest}}\", upstream: \"{b}\" }}\n  - {{ name: late, hosts: [late.test], path: \"/{{*rest}}\", upstream: \"{c}\" }}\n",
        a = a.url(),
        b = b.url(),
        c = c.url()
    ));
    let addr = g.proxy_addr;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/raw");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "case")).collect();
    files.sort();
    assert!(files.len() >= 50, "the suite lost its cases: {}", files.len());
    let results = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for file in &files {
            let case = parse(file);
            if let Err(e) = run_case(addr, &case, &a, &b) {
                failures.push(format!("{}: {e}", file.file_name().unwrap().to_string_lossy()));
            }
        }
        (failures, files.len())
    })
    .await
    .unwrap();
    let (failures, count) = results;
    assert!(failures.is_empty(), "{} of {count} raw cases failed:\n{}", failures.len(), failures.join("\n"));
    g.shutdown();
}

#[test]
fn unescaping() {
    assert_eq!(unescape(r"GET /\x41 HTTP/1.1\r\n\0\\\t"), b"GET /A HTTP/1.1\r\n\0\\\t");
    assert_eq!(unescape(r"x: \{ab*3}\r\n"), b"x: ababab\r\n");
    assert_eq!(unescape(r"\{x-h: v\r\n*2}"), b"x-h: v\r\nx-h: v\r\n");
}
