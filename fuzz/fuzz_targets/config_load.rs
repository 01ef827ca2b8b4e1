//! Any text as a config file, YAML and JSON: loading and validation answer
//! a config or a list of errors, and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifold::config::load::config_from_text;
use manifold::config::Format;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for format in [Format::Yaml, Format::Json] {
        if let Err(errors) = config_from_text(text, format) {
            // Every error can be printed as `manifold validate` prints it.
            let _ = errors.to_string();
        }
    }
});
