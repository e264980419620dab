//! The WebSocket JSON form's parser on arbitrary text: never panics, and every request it
//! accepts becomes a frame that encodes within the frame limit or is refused cleanly.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use whispeer_server::fuzzing::json_request;
use whispeer_proto::{Frame, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = Limits::default();
    if let Ok(frame) = json_request(text, &limits) {
        let mut buf = BytesMut::new();
        if frame.encode(&mut buf, limits.max_frame_bytes).is_ok() {
            let decoded = Frame::decode(&mut buf, &limits).expect("decodes").expect("whole frame");
            assert_eq!(decoded, frame);
        }
    }
});
