//! Arbitrary bytes on one proxy connection: the gateway answers with
//! well-formed HTTP/1.1 answers (every refusal it makes itself is SPEC §4
//! JSON) or closes, and never panics (libfuzzer-sys turns a panic on any
//! thread, the gateway's included, into a crash).
//!
//! One gateway (one worker) and one backend run for the whole fuzzing
//! process; each input is a new connection whose write side is closed
//! after the input, so the gateway sees where the client's bytes end.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use manifold::config::load::config_from_text;
use manifold::config::Format;
use manifold::gateway::{Gateway, GatewayOptions};

/// A backend that answers every connection with one small JSON answer,
/// whatever it was sent, and closes.
fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a backend port");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                let mut buf = [0u8; 16 << 10];
                let mut seen = Vec::new();
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}");
            });
        }
    });
    addr
}

fn gateway() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let b = backend();
        let yaml = format!(
            r#"
routes:
  - {{ name: all, path: "/{{*rest}}", upstream: "http://{b}" }}
  - {{ name: upload, methods: [POST, PUT], path: /up, upstream: "http://{b}", timeout: 2s }}
compositions:
  - name: dash
    path: /c/{{id}}
    timeout: 2s
    calls:
      one: {{ url: "http://{b}/one/{{{{request.path.id}}}}?q={{{{request.query.q}}}}" }}
      two: {{ url: "http://{b}/two", required: false, headers: {{ x-v: "{{{{request.headers.x-v}}}}" }} }}
"#
        );
        let config = config_from_text(&yaml, Format::Yaml).expect("the fuzz config is valid");
        let mut opts = GatewayOptions::default();
        opts.server.workers = 1;
        let g = Gateway::start(opts, config).expect("the gateway starts");
        let addr = g.proxy_addr;
        // Runs for the life of the fuzzing process.
        std::mem::forget(g);
        addr
    })
}

/// Checks each answer on the connection, in order; the bytes after the
/// last whole answer may only be a cut-off answer (the gateway closed).
fn check_answers(mut out: &[u8], input: &[u8]) {
    let mut first = true;
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if !first => return,
            other => panic!("not an HTTP answer ({other:?}): {:?}\nfor input {:?}", String::from_utf8_lossy(out), String::from_utf8_lossy(input)),
        };
        first = false;
        // HTTP/1.1, or 1.0 to a 1.0 request (hyper answers in its version).
        assert!(matches!(resp.version, Some(0 | 1)), "an HTTP/1.x answer");
        let status = resp.code.unwrap();
        let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        let length = header("content-length").map(|v| std::str::from_utf8(v).unwrap().parse::<usize>().expect("a numeric content-length"));
        if status >= 400 {
            // The backend only ever answers 200: this answer is the gateway's.
            let ct = header("content-type").map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default();
            assert!(ct.starts_with("application/json"), "a {status} without a JSON body: {:?}", String::from_utf8_lossy(out));
            let request_id = header("x-request-id").expect("every answer carries a request id");
            let body = &out[head_len..];
            if let Some(n) = length {
                if body.len() >= n {
                    let v: serde_json::Value = serde_json::from_slice(&body[..n]).expect("a JSON error body");
                    assert!(v["error"]["code"].is_string(), "{v}");
                    assert_eq!(v["error"]["request_id"].as_str().map(str::as_bytes), Some(request_id), "{v}");
                }
            }
        }
        // Bodies of answers to HEAD and the like cannot be told apart
        // here: stop at the first answer with a body.
        match length {
            Some(0) if status != 200 => out = &out[head_len..],
            _ => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let addr = gateway();
    let mut conn = TcpStream::connect(addr).expect("the gateway accepts");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The gateway may close before it has read everything: not an error.
    let _ = conn.write_all(data);
    let _ = conn.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    // The HTTP/2 preface makes it an h2c connection: its answer is HTTP/2
    // frames, checked by hyper's own fuzzing, not here (no panic is all).
    if !data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
        check_answers(&out, data);
    }
});
