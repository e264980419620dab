//! The write-ahead log's record reader on arbitrary bytes, as a segment file after a crash or
//! a disk fault might hold: never panics, never allocates past the record limit, and a valid
//! prefix it reports is never longer than the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_core::fuzzing::wal_segment;

fuzz_target!(|data: &[u8]| {
    let (records, valid) = wal_segment(data);
    if let Some(valid) = valid {
        assert!(valid <= data.len() as u64);
    }
    // Every record takes at least its 8-byte header and a byte of body.
    assert!(records * 9 <= data.len());
});
