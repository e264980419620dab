//! Codec decoding of arbitrary bytes never panics; whatever decodes re-encodes and decodes to
//! the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use whispeer_engines::Codec;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    id: i64,
    tags: Vec<u16>,
    nested: Option<(bool, Vec<u8>)>,
}

fuzz_target!(|data: &[u8]| {
    for codec in [Codec::Postcard, Codec::Json] {
        if let Ok(value) = codec.decode::<Sample>(data) {
            let again = codec.encode(&value).expect("a decoded value encodes");
            assert_eq!(codec.decode::<Sample>(&again).expect("round trip"), value);
        }
    }
});
