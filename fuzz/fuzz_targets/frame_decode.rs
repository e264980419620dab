//! The frame decoder on arbitrary bytes: never panics, never reserves past the limit, and every
//! frame it accepts encodes back to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use whispeer_proto::{Frame, Limits};

fuzz_target!(|data: &[u8]| {
    let mut limits = Limits::default();
    limits.max_frame_bytes = 4096;
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = Frame::decode(&mut buf, &limits) {
        assert!(buf.capacity() <= data.len() + 4096 + 4);
        let mut again = BytesMut::new();
        frame.encode(&mut again, usize::MAX).expect("a decoded frame encodes");
        let decoded = Frame::decode(&mut again, &limits).expect("re-decodes").expect("whole frame");
        assert_eq!(decoded, frame);
    }
});
