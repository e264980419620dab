//! The chat listener's request parser on arbitrary text: never panics, and every refusal has
//! one of the documented codes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_server::fuzzing::chat_request;

const CODES: [&str; 4] = ["malformed", "invalid_name", "unknown_type", "too_large"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(code) = chat_request(text) {
        assert!(CODES.contains(&code), "undocumented code {code}");
    }
});
