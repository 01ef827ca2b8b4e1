//! The strict request-head check (src/server/head.rs): never panics; a
//! head it passes is one complete, strictly parsed HTTP/1.x request head
//! within the limits, with one Host and unambiguous framing; a refusal's
//! answer is a well-formed SPEC §4 JSON answer; the chunked-body follower
//! takes any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifold::server::head::{answer, check, Checked, ChunkedBody};
use manifold::server::hygiene::Limits;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    match check(data, &limits) {
        Checked::Partial => {}
        Checked::Head(head) => {
            assert!(head.len <= data.len());
            let bytes = &data[..head.len];
            assert!(!bytes.contains(&0), "a NUL passed");
            let mut fields = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut fields);
            let parsed = req.parse(bytes).expect("a passed head parses strictly");
            assert!(parsed.is_complete(), "a passed head is complete");
            let headers = &*req.headers;
            assert!(headers.len() <= limits.max_header_count, "too many fields passed");
            let count = |name: &str| headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            if req.version == Some(1) {
                assert_eq!(count("host"), 1, "HTTP/1.1 without exactly one Host passed");
            }
            assert!(!(count("content-length") > 0 && count("transfer-encoding") > 0), "CL with TE passed");
            let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap_or(bytes.len());
            assert!(line_end <= limits.max_uri_bytes, "a request line over the limit passed");
        }
        Checked::Refused(refusal) => {
            let out = answer(&refusal, data);
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut fields);
            let n = match resp.parse(&out) {
                Ok(httparse::Status::Complete(n)) => n,
                other => panic!("the refusal is not an HTTP answer: {other:?}"),
            };
            assert!(resp.code.is_some_and(|c| (400..600).contains(&c)));
            let v: serde_json::Value = serde_json::from_slice(&out[n..]).expect("a JSON body");
            assert!(v["error"]["code"].is_string());
            let id = resp.headers.iter().find(|h| h.name == "x-request-id").map(|h| h.value).expect("a request id");
            assert_eq!(v["error"]["request_id"].as_str().map(str::as_bytes), Some(id));
        }
    }
    let mut body = ChunkedBody::default();
    let mut rest = data;
    while !rest.is_empty() {
        match body.feed(rest) {
            Ok((used, done)) => {
                assert!(used <= rest.len());
                if done || used == 0 {
                    break;
                }
                rest = &rest[used..];
            }
            Err(_) => break,
        }
    }
});
