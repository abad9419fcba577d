//! The manifest parser and validator, and the daemon config parser, on arbitrary input: they
//! must answer (a module or an error with a position), never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = modvisor::manifest::parse_manifest(Path::new("fuzz.toml"), text, "fuzz") {
        // The error always points inside the input.
        assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1, "{e}");
        let _ = e.to_string();
    }
    let _ = modvisor::config::Config::parse(Path::new("/etc/modvisor/fuzz.toml"), text);
    let _ = modvisor::manifest::validate_name(text);
});
