//! The proxy-wasm ABI's numbers (version 0.2.1) and its one wire format,
//! the serialized header map.
//!
//! A map is `u32 count`, then `count` pairs of `u32 key length, u32 value
//! length`, then each key and value followed by a NUL byte; every integer is
//! little-endian. The same layout carries `proxy_send_local_response`'s extra
//! headers.

/// What a host function returns (`proxy_result_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    InvalidMemoryAccess = 6,
    Unimplemented = 12,
}

// proxy_buffer_type_t
pub const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
pub const BUFFER_HTTP_RESPONSE_BODY: i32 = 1;
pub const BUFFER_VM_CONFIGURATION: i32 = 6;
pub const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

// proxy_map_type_t
pub const MAP_HTTP_REQUEST_HEADERS: i32 = 0;
pub const MAP_HTTP_RESPONSE_HEADERS: i32 = 2;

// proxy_stream_type_t
pub const STREAM_HTTP_REQUEST: i32 = 0;
pub const STREAM_HTTP_RESPONSE: i32 = 1;

/// Appends the serialized map of `pairs` to `out`.
pub fn write_map(out: &mut Vec<u8>, pairs: &[(&[u8], &[u8])]) {
    let start = out.len();
    let size = 4 + pairs.iter().map(|(k, v)| 8 + k.len() + 1 + v.len() + 1).sum::<usize>();
    out.resize(start + size, 0);
    let out = &mut out[start..];
    out[..4].copy_from_slice(&(pairs.len() as u32).to_le_bytes());
    let mut at = 4;
    for (k, v) in pairs {
        out[at..at + 4].copy_from_slice(&(k.len() as u32).to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&(v.len() as u32).to_le_bytes());
        at += 8;
    }
    for (k, v) in pairs {
        out[at..at + k.len()].copy_from_slice(k);
        at += k.len();
        out[at] = 0;
        at += 1;
        out[at..at + v.len()].copy_from_slice(v);
        at += v.len();
        out[at] = 0;
        at += 1;
    }
}

/// Reads a serialized map; `None` if the bytes are not one.
pub fn read_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = word(0)?;
    // Each pair takes at least 10 bytes: a count past that is a lie.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut data = 4 + count.checked_mul(8)?;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let (k, v) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = bytes.get(data..data + k)?;
        data += k + 1;
        let value = bytes.get(data..data + v)?;
        data += v + 1;
        if data > bytes.len() {
            return None;
        }
        pairs.push((key, value));
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_reads_back_as_written() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"content-type", b"application/json"), (b"x-empty", b"")];
        let mut out = Vec::new();
        write_map(&mut out, &pairs);
        assert_eq!(read_map(&out), Some(pairs));
        assert_eq!(read_map(&[]), Some(vec![]));
    }

    #[test]
    fn a_truncated_or_lying_map_is_refused() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"b")];
        let mut out = Vec::new();
        write_map(&mut out, &pairs);
        assert_eq!(read_map(&out[..out.len() - 1]), None);
        let mut lying = out.clone();
        lying[0] = 200;
        assert_eq!(read_map(&lying), None);
    }
}
