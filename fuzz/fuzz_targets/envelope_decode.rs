//! The envelope decoder (dead-letter payloads, write-ahead log records) on arbitrary bytes:
//! never panics, and every envelope it accepts encodes back to the same bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use whispeer_proto::{Envelope, Limits};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(envelope) = Envelope::decode(bytes, &Limits::default()) {
        let mut again = BytesMut::new();
        envelope.encode(&mut again).expect("a decoded envelope encodes");
        assert_eq!(&again[..], data);
    }
});
