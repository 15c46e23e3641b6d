//! A config dump someone hands to `meshlet --file`, and `meshlet check --file` on it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(dump) = meshlet_agent::cli::parse_dump(text) else {
        return;
    };
    let _ = meshlet_agent::cli::check_from_dump(&dump, "default/web", "default/api:8080");
});
