//! The path normaliser: never panics; what it returns starts with `/`,
//! holds no dot segment (also not as `%2e`) and no empty segment, and
//! normalising it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifold::server::hygiene::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(path) = normalize_path(raw) else { return };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    for segment in path.split('/').skip(1) {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        assert!(decoded != "." && decoded != "..", "{raw:?} -> {path:?}");
    }
    assert!(!path.contains("//"), "{raw:?} -> {path:?}");
    let again = normalize_path(&path).expect("a normalised path is valid");
    assert_eq!(again, path, "normalising twice changed {raw:?}");
});
