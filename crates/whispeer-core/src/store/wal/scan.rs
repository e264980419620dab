//! Reading segments back: record by record with their checks, the repair of damage, and the
//! recovery at start.
//!
//! Records are read as a stream while they are whole. At the first anomaly the rest of the
//! segment is read into memory and scanned with repair:
//! - a header with one flipped bit is read whole: a length one bit away from the stored one
//!   whose body matches the checksum, or a checksum one bit away from the body's;
//! - a damaged record whose length leads to a valid record is skipped (that record is lost,
//!   nothing after it);
//! - otherwise the segment ends there (a torn tail after a crash, garbage).
//!
//! A header of zeroes ends a segment's records: the writer lays zeroes ahead of what it writes
//! (`writer.rs`), so a segment's file is longer than its records. Recovery reads those zeroes
//! to the end of the file, and anything else there is damage (cut off with the rest); a read of
//! the live log stops at them.
//!
//! A forged record inside a payload is never read as a record: repair only follows lengths
//! stored in headers, never searches for the next header.

use std::io::{self, Read};
use std::ops::ControlFlow;
use std::path::Path;

use bytes::Bytes;

use super::disk::Disk;
use super::index::TopicIndex;
use super::{HEADER, Logged, MAX_RECORD, Recovered, Segment, decode_logged, list_segments};

/// The most of a damaged segment read into memory for repair; past it the segment ends at the
/// damage.
const MAX_REPAIR: u64 = 1 << 30;

/// How a scan of one segment ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScanEnd {
    /// Every record was read (damaged ones repaired or skipped).
    Whole,
    /// The visitor asked to stop.
    Stopped,
    /// Damage that could not be passed: the segment's valid part is this long.
    Damaged(u64),
}

/// What a scan does at a header of zeroes, where a segment's records end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Zeroes {
    /// Reads on to the end of the file: anything but zeroes there is damage (recovery).
    Check,
    /// Stops there (reads of the live log, which the writer extends meanwhile).
    Stop,
}

/// What a scan of one segment found.
#[derive(Debug)]
pub(super) struct Scanned {
    pub(super) end: ScanEnd,
    /// The length of the segment's records, up to the end or the damage (the zeroes after
    /// them not counted).
    pub(super) valid: u64,
    /// Damaged records skipped, with valid records after them.
    pub(super) skipped: u64,
    /// Records whose header had one flipped bit, read whole.
    pub(super) repaired: u64,
}

/// Reads the valid records of one segment in order, one at a time, handing each to `visit`
/// with its index in the segment, until the end, damage that cannot be passed, or `visit`
/// breaks.
pub(super) fn scan_each(
    disk: &dyn Disk,
    path: &Path,
    zeroes: Zeroes,
    visit: impl FnMut(u64, Logged) -> ControlFlow<()>,
) -> io::Result<Scanned> {
    scan_reader(disk.read(path)?, zeroes, visit)
}

/// The scan's position and visitor.
struct Cursor<V> {
    /// Bytes of the segment read and accounted for.
    good: u64,
    /// Numbered records visited.
    index: u64,
    visit: V,
    skipped: u64,
    repaired: u64,
}

impl<V: FnMut(u64, Logged) -> ControlFlow<()>> Cursor<V> {
    /// Hands a record to the visitor; `true` if it asked to stop.
    fn take(&mut self, logged: Logged, len: usize) -> bool {
        self.good += len as u64;
        let numbered = logged.is_numbered();
        if (self.visit)(self.index, logged).is_break() {
            return true;
        }
        self.index += u64::from(numbered);
        false
    }

    fn end(self, end: ScanEnd) -> Scanned {
        Scanned { end, valid: self.good, skipped: self.skipped, repaired: self.repaired }
    }
}

/// [`scan_each`] over any reader.
pub(super) fn scan_reader(
    mut reader: impl Read,
    zeroes: Zeroes,
    visit: impl FnMut(u64, Logged) -> ControlFlow<()>,
) -> io::Result<Scanned> {
    let mut cursor = Cursor { good: 0, index: 0, visit, skipped: 0, repaired: 0 };
    loop {
        let mut header = [0u8; HEADER];
        let read = read_full(&mut reader, &mut header)?;
        if read == 0 {
            return Ok(cursor.end(ScanEnd::Whole));
        }
        if header.iter().all(|&byte| byte == 0) {
            let only_zeroes = zeroes == Zeroes::Stop || only_zeroes(reader)?;
            let good = cursor.good;
            let end = if only_zeroes { ScanEnd::Whole } else { ScanEnd::Damaged(good) };
            return Ok(cursor.end(end));
        }
        let mut rest = header[..read].to_vec();
        if read == HEADER {
            let (len, crc) = split_header(&header);
            if len > 0 && len <= MAX_RECORD {
                let mut body = vec![0u8; len];
                let got = read_full(&mut reader, &mut body)?;
                if got == len && crc32c::crc32c(&body) == crc {
                    let body = Bytes::from(body);
                    // A valid checksum over a body that does not decode is treated as damage.
                    if let Some(logged) = decode_logged(body.clone()) {
                        if cursor.take(logged, HEADER + len) {
                            return Ok(cursor.end(ScanEnd::Stopped));
                        }
                        continue;
                    }
                    rest.extend_from_slice(&body);
                } else {
                    rest.extend_from_slice(&body[..got]);
                }
            }
        }
        return repair(rest, reader, cursor);
    }
}

/// Reads the rest of a damaged segment (after `read`) and scans it with repair.
fn repair<V: FnMut(u64, Logged) -> ControlFlow<()>>(
    mut read: Vec<u8>,
    reader: impl Read,
    mut cursor: Cursor<V>,
) -> io::Result<Scanned> {
    let limit = MAX_REPAIR.saturating_sub(read.len() as u64);
    let mut reader = reader.take(limit.saturating_add(1));
    reader.read_to_end(&mut read)?;
    if read.len() as u64 > MAX_REPAIR {
        tracing::warn!("a damaged log segment is too large to repair: it ends at the damage");
        let good = cursor.good;
        return Ok(cursor.end(ScanEnd::Damaged(good)));
    }
    let rest = Bytes::from(read);
    let mut pos = 0;
    while pos < rest.len() {
        if rest[pos..].iter().take(HEADER).all(|&byte| byte == 0) {
            // The records end here, if only zeroes follow.
            let good = cursor.good;
            let whole = rest[pos..].iter().all(|&byte| byte == 0);
            return Ok(cursor.end(if whole { ScanEnd::Whole } else { ScanEnd::Damaged(good) }));
        }
        if let Some((logged, len)) = parse_at(&rest, pos) {
            if cursor.take(logged, len) {
                return Ok(cursor.end(ScanEnd::Stopped));
            }
            pos += len;
        } else if let Some((logged, len)) = repair_header(&rest, pos) {
            cursor.repaired += 1;
            if cursor.take(logged, len) {
                return Ok(cursor.end(ScanEnd::Stopped));
            }
            pos += len;
        } else if let Some(next) = skip(&rest, pos) {
            cursor.skipped += 1;
            cursor.good += (next - pos) as u64;
            pos = next;
        } else {
            let good = cursor.good;
            return Ok(cursor.end(ScanEnd::Damaged(good)));
        }
    }
    Ok(cursor.end(ScanEnd::Whole))
}

fn split_header(header: &[u8]) -> (usize, u32) {
    let word = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    (word(0) as usize, word(4))
}

/// The body of `len` bytes after the header at `pos`, if `len` is allowed and there.
fn body(bytes: &Bytes, pos: usize, len: usize) -> Option<Bytes> {
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let start = pos + HEADER;
    (start + len <= bytes.len()).then(|| bytes.slice(start..start + len))
}

/// The valid record at `pos` and its length.
fn parse_at(bytes: &Bytes, pos: usize) -> Option<(Logged, usize)> {
    let (len, crc) = split_header(bytes.get(pos..pos + HEADER)?);
    let body = body(bytes, pos, len)?;
    if crc32c::crc32c(&body) != crc {
        return None;
    }
    Some((decode_logged(body)?, HEADER + len))
}

/// The record at `pos` read whole although one bit of its header is flipped.
fn repair_header(bytes: &Bytes, pos: usize) -> Option<(Logged, usize)> {
    let (len, crc) = split_header(bytes.get(pos..pos + HEADER)?);
    // The checksum's bit: the body matches a checksum one bit away.
    if let Some(body) = body(bytes, pos, len)
        && (crc32c::crc32c(&body) ^ crc).count_ones() == 1
        && let Some(logged) = decode_logged(body)
    {
        return Some((logged, HEADER + len));
    }
    // The length's bit: a length one bit away whose body matches the checksum.
    (0..32).find_map(|bit| {
        let len = len ^ (1 << bit);
        let body = body(bytes, pos, len)?;
        (crc32c::crc32c(&body) == crc).then_some(())?;
        Some((decode_logged(body)?, HEADER + len))
    })
}

/// Where the record after the damaged one at `pos` starts, if its stored length leads to a
/// valid record.
fn skip(bytes: &Bytes, pos: usize) -> Option<usize> {
    let (len, _) = split_header(bytes.get(pos..pos + HEADER)?);
    let next = pos.checked_add(HEADER)?.checked_add(len)?;
    (len > 0 && len <= MAX_RECORD && parse_at(bytes, next).is_some()).then_some(next)
}

/// Whether the rest of `reader` is zeroes.
fn only_zeroes(mut reader: impl Read) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let read = read_full(&mut reader, &mut buf)?;
        if buf[..read].iter().any(|&byte| byte != 0) {
            return Ok(false);
        }
        if read < buf.len() {
            return Ok(true);
        }
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

/// Scans the log in `dir`, repairs it, and returns what it holds; notes every message and mark
/// in `index`.
pub(super) fn recover(
    disk: &dyn Disk,
    dir: &Path,
    index: &TopicIndex,
) -> io::Result<(Recovered, Vec<Segment>)> {
    let mut recovered = Recovered::default();
    let mut kept = Vec::new();
    let segments = list_segments(disk, dir)?;
    // A new log is clean; one that exists is clean if its last record is a close mark.
    recovered.clean = segments.is_empty();
    for segment in segments {
        let mut count = 0;
        let mut closed = false;
        let scanned = scan_each(disk, &segment.path, Zeroes::Check, |i, logged| {
            count += u64::from(logged.is_numbered());
            closed = matches!(logged, Logged::Close);
            match logged {
                Logged::Message(record) => {
                    index.note(&record.envelope.topic, record.offset, segment.first + i);
                    recovered.records.push(record);
                }
                Logged::Commit(commit) | Logged::Checkpoint(commit) => {
                    recovered.commits.push(commit);
                }
                Logged::Mark(topic, offset) => index.mark(&topic, offset),
                Logged::Close => {}
            }
            ControlFlow::Continue(())
        })?;
        recovered.clean = closed && scanned.end == ScanEnd::Whole;
        recovered.skipped_records += scanned.skipped;
        recovered.repaired_records += scanned.repaired;
        recovered.last_record = (segment.first + count).saturating_sub(1);
        let size = match scanned.end {
            ScanEnd::Whole | ScanEnd::Stopped => segment.size,
            ScanEnd::Damaged(valid) => {
                recovered.truncated_bytes += segment.size.saturating_sub(valid);
                disk.truncate(&segment.path, valid)?;
                valid
            }
        };
        kept.push(Segment { len: scanned.valid, size, ..segment });
    }
    recovered.marks = index.marks();
    Ok((recovered, kept))
}
