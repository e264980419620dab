//! The MQTT listener's packet decoder and its translation to native frames, on arbitrary bytes
//! as a client's packets (3.1.1, or 5 when the first byte is odd): never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_server::fuzzing::mqtt_packets;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    mqtt_packets(rest, first & 1 == 1);
});
