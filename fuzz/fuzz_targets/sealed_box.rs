//! Opening arbitrary bytes as a sealed box and as a pairwise box: never panics, never opens
//! (the fuzzer cannot sign for the identity's context, nor knows a pair key).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_engines::{Identity, PairKeys, open_pairwise, open_sealed, pairwise_sender, sealed_sender};

fuzz_target!(|data: &[u8]| {
    static ME: OnceLock<Identity> = OnceLock::new();
    let me = ME.get_or_init(|| Identity::generate().expect("entropy"));
    let _ = sealed_sender(data);
    assert!(open_sealed(me, data, b"fuzz", None).is_err());
    let _ = pairwise_sender(data);
    assert!(open_pairwise(me, &mut PairKeys::default(), data, b"fuzz").is_err());
});
