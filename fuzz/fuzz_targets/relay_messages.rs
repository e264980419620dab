//! The relay's wire and the mesh's messages on arbitrary bytes: never panic, and every relay
//! message read encodes back to the same bytes' meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_proto::relay::{RelayMessage, decode_data};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = RelayMessage::decode(data) {
        assert_eq!(RelayMessage::decode(&message.encode()), Ok(message));
    }
    let _ = decode_data(data);
    whispeer_sync::fuzz_mesh_message(data);
});
