//! Reading segments back: record by record with their checks, and the repair at start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::ops::ControlFlow;
use std::path::Path;

use bytes::Bytes;

use super::index::TopicIndex;
use super::{HEADER, Logged, MAX_RECORD, Recovered, Segment, decode_logged, list_segments};

/// How a scan of one segment ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScanEnd {
    /// Every record was valid.
    Whole,
    /// The visitor asked to stop.
    Stopped,
    /// A bad record: the valid prefix is this long.
    Damaged(u64),
}

/// Reads the valid records of one segment in order, one at a time, handing each to `visit`
/// with its index in the segment, until the end, a bad record, or `visit` breaks.
pub(super) fn scan_each(
    path: &Path,
    visit: impl FnMut(u64, Logged) -> ControlFlow<()>,
) -> io::Result<ScanEnd> {
    scan_reader(BufReader::new(File::open(path)?), visit)
}

/// [`scan_each`] over any reader.
pub(super) fn scan_reader(
    mut reader: impl Read,
    mut visit: impl FnMut(u64, Logged) -> ControlFlow<()>,
) -> io::Result<ScanEnd> {
    let (mut good, mut index): (u64, u64) = (0, 0);
    loop {
        let mut header = [0u8; HEADER];
        match read_full(&mut reader, &mut header)? {
            0 => return Ok(ScanEnd::Whole),
            n if n < HEADER => return Ok(ScanEnd::Damaged(good)),
            _ => {}
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD {
            return Ok(ScanEnd::Damaged(good));
        }
        let mut body = vec![0u8; len];
        if read_full(&mut reader, &mut body)? < len || crc32c::crc32c(&body) != crc {
            return Ok(ScanEnd::Damaged(good));
        }
        let Some(record) = decode_logged(Bytes::from(body)) else {
            return Ok(ScanEnd::Damaged(good));
        };
        good += (HEADER + len) as u64;
        let numbered = record.is_numbered();
        if visit(index, record).is_break() {
            return Ok(ScanEnd::Stopped);
        }
        index += u64::from(numbered);
    }
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match reader.read(&mut buf[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(read)
}

/// Scans the log in `dir`, repairs it, and returns what it holds; notes every message in
/// `index`.
pub(super) fn recover(dir: &Path, index: &TopicIndex) -> io::Result<(Recovered, Vec<Segment>)> {
    let mut recovered = Recovered::default();
    let mut kept = Vec::new();
    let mut damaged = false;
    for segment in list_segments(dir)? {
        if damaged {
            let aside = segment.path.with_extension("wal.damaged");
            fs::rename(&segment.path, &aside)?;
            recovered.damaged_segments += 1;
            continue;
        }
        let mut count = 0;
        let end = scan_each(&segment.path, |i, logged| {
            count += u64::from(logged.is_numbered());
            match logged {
                Logged::Message(record) => {
                    index.note(&record.envelope.topic, record.offset, segment.first + i);
                    recovered.records.push(record);
                }
                Logged::Commit(commit) | Logged::Checkpoint(commit) => {
                    recovered.commits.push(commit);
                }
            }
            ControlFlow::Continue(())
        })?;
        recovered.last_record = (segment.first + count).saturating_sub(1);
        let len = match end {
            ScanEnd::Whole | ScanEnd::Stopped => segment.len,
            ScanEnd::Damaged(valid) => {
                damaged = true;
                recovered.truncated_bytes += segment.len - valid;
                OpenOptions::new().write(true).open(&segment.path)?.set_len(valid)?;
                valid
            }
        };
        kept.push(Segment { len, ..segment });
    }
    Ok((recovered, kept))
}
