//! Opening arbitrary bytes as a sealed box: never panics, never opens (the fuzzer cannot sign
//! for the identity's context).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_engines::{Identity, open_sealed, sealed_sender};

fuzz_target!(|data: &[u8]| {
    static ME: OnceLock<Identity> = OnceLock::new();
    let me = ME.get_or_init(|| Identity::generate().expect("entropy"));
    let _ = sealed_sender(data);
    assert!(open_sealed(me, data, b"fuzz", None).is_err());
});
