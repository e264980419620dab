//! The write-ahead log of durable topics: segment files of CRC32C-framed records, written by one
//! thread with group commit, scanned and repaired at start.
//!
//! ```text
//! segment file <first record number, 20 digits>.wal:
//!   record*: len u32 | crc32c(body) u32 | body
//!   body:    kind u8 = 1 (message) | offset u64 | accepted_ms u64 | envelope (wire layout)
//!         or kind u8 = 2 (a durable subscription's commit) | offset u64 | filter str |
//!            group str | topic str                              (str: u16 length | UTF-8)
//! ```
//!
//! Appending hands an encoded record to the writer thread and returns its number (a ticket).
//! The writer takes every record waiting, writes them with one `write`, and syncs them to disk
//! under the fsync policy — one `fsync` for all of them with `always` (group commit) — then
//! raises the durable watermark, which PUBACKs wait for. A segment rolls over past
//! `segment_bytes`; the oldest whole segments are deleted past `max_bytes`.
//!
//! Recovery reads every segment in order and checks each record's length (against
//! `MAX_RECORD` before allocating) and checksum. At the first bad record it stops: the rest of
//! that segment is cut off (a torn tail after a crash), later segments are set aside as
//! `.damaged`, and the counts are logged and returned. Every record before the damage is kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use whispeer_proto::{Envelope, Topic};

use crate::group::GroupKey;
// Topics stored were valid when written; limits may since have been lowered.
use crate::router::no_limits as unlimited;
use crate::store::{
    STORE_BATCH_RECORDS as BATCH_RECORDS, STORE_FSYNC_SECONDS as FSYNC_SECONDS,
    STORE_WRITE_SECONDS as WRITE_SECONDS,
};

/// Largest record accepted when reading: a message at the largest frame size, and then some.
const MAX_RECORD: usize = 64 << 20;
const HEADER: usize = 8;
const KIND_MESSAGE: u8 = 1;
const KIND_COMMIT: u8 = 2;

/// When appended records are forced to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// After every batch the writer takes (group commit): an acknowledged message survives a
    /// crash of the machine. The default.
    #[default]
    Always,
    /// After every `n` records: up to `n − 1` acknowledged messages may be lost with the machine.
    EveryN(u32),
    /// At most this often: messages of the last interval may be lost with the machine.
    Interval(Duration),
    /// Never (the operating system decides): survives a crash of the process, not of the
    /// machine.
    Never,
}

/// Where and how the log is kept.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WalOptions {
    /// The directory of the segment files; created if missing.
    pub dir: PathBuf,
    /// A segment rolls over past this size. Default: 64 MiB.
    pub segment_bytes: u64,
    /// The oldest whole segments are deleted while the log is larger. Default: 1 GiB.
    pub max_bytes: u64,
    /// When records are forced to disk.
    pub fsync: FsyncPolicy,
}

impl WalOptions {
    /// A log in `dir` with the defaults.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            fsync: FsyncPolicy::Always,
        }
    }

    /// This log with another fsync policy.
    pub fn fsync(mut self, fsync: FsyncPolicy) -> Self {
        self.fsync = fsync;
        self
    }

    /// This log with another segment size.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }
}

/// One message as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) accepted_ms: u64,
    pub(crate) envelope: Envelope,
}

/// Frames the record of `envelope` at `offset`.
pub(crate) fn encode_record(
    offset: u64,
    accepted_ms: u64,
    envelope: &Envelope,
) -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 64 + envelope.payload.len());
    framed.put_u64(0);
    framed.put_u8(KIND_MESSAGE);
    framed.put_u64(offset);
    framed.put_u64(accepted_ms);
    envelope.encode(&mut framed).map_err(io::Error::other)?;
    seal(framed)
}

/// Fills in the length and checksum of a record written after `HEADER` placeholder bytes.
fn seal(mut framed: BytesMut) -> io::Result<Bytes> {
    let len = u32::try_from(framed.len() - HEADER).map_err(io::Error::other)?;
    let crc = crc32c::crc32c(&framed[HEADER..]);
    framed[..4].copy_from_slice(&len.to_be_bytes());
    framed[4..HEADER].copy_from_slice(&crc.to_be_bytes());
    Ok(framed.freeze())
}

/// Frames the record of a durable subscription's commit: group `key` has settled everything up
/// to `offset` of `topic`.
pub(crate) fn encode_commit(key: &GroupKey, topic: &str, offset: u64) -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 64);
    framed.put_u64(0);
    framed.put_u8(KIND_COMMIT);
    framed.put_u64(offset);
    for text in [&*key.0, &*key.1, topic] {
        let len = u16::try_from(text.len()).map_err(io::Error::other)?;
        framed.put_u16(len);
        framed.put_slice(text.as_bytes());
    }
    seal(framed)
}

/// A durable subscription's commit read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) key: GroupKey,
    pub(crate) topic: Topic,
    pub(crate) offset: u64,
}

impl Commit {
    fn decode(mut body: &[u8]) -> Option<Self> {
        let offset = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
        body = &body[8..];
        let mut text = || -> Option<String> {
            let len = usize::from(u16::from_be_bytes(body.get(..2)?.try_into().ok()?));
            let value = std::str::from_utf8(body.get(2..2 + len)?).ok()?.to_string();
            body = &body[2 + len..];
            Some(value)
        };
        let (filter, group, topic) = (text()?, text()?, text()?);
        let topic = Topic::parse_with(&topic, &unlimited()).ok()?;
        body.is_empty().then(|| Self { key: (filter.into(), group.into()), topic, offset })
    }
}

/// One record of the log.
enum Logged {
    Message(Record),
    Commit(Commit),
}

fn decode_logged(body: Bytes) -> Option<Logged> {
    match *body.first()? {
        KIND_MESSAGE => Record::decode(body).map(Logged::Message),
        KIND_COMMIT => Commit::decode(&body[1..]).map(Logged::Commit),
        _ => None,
    }
}

impl Record {
    /// The framed record.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> io::Result<Bytes> {
        encode_record(self.offset, self.accepted_ms, &self.envelope)
    }

    fn decode(body: Bytes) -> Option<Self> {
        let (&kind, rest) = body.split_first()?;
        if kind != KIND_MESSAGE || rest.len() < 16 {
            return None;
        }
        let offset = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let accepted_ms = u64::from_be_bytes(rest[8..16].try_into().ok()?);
        let envelope = Envelope::decode(body.slice(17..), &unlimited()).ok()?;
        Some(Self { offset, accepted_ms, envelope })
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Every valid message record, in the order written.
    pub(crate) records: Vec<Record>,
    /// Every valid commit record, in the order written.
    pub(crate) commits: Vec<Commit>,
    /// Bytes cut off a segment at the first bad record.
    pub(crate) truncated_bytes: u64,
    /// Segments after the damage, set aside as `.damaged`.
    pub(crate) damaged_segments: usize,
    /// The number of the last record kept (records are numbered from 1 across segments, and
    /// keep their numbers when older segments are deleted).
    pub(crate) last_record: u64,
}

struct Segment {
    first: u64,
    path: PathBuf,
    len: u64,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            let len = fs::metadata(&path)?.len();
            segments.push(Segment { first, path, len });
        }
    }
    segments.sort_by_key(|s| s.first);
    Ok(segments)
}

enum Request {
    Append(Bytes),
    Stop,
}

/// The write-ahead log: a handle on the writer thread.
pub(crate) struct Wal {
    dir: PathBuf,
    /// Holds the directory's lock: one broker per log.
    _lock: File,
    tx: Mutex<Sender<Request>>,
    /// The writer thread, joined on drop so a reopened log sees everything written.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Records durable under the policy: every ticket up to this one.
    durable: watch::Receiver<u64>,
    /// The next ticket: records appended so far + 1.
    next: Mutex<u64>,
    /// Where each topic's messages are, roughly.
    index: TopicIndex,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("durable", &*self.durable.borrow()).finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (and repairs) the log in `options.dir` and starts its writer.
    pub(crate) fn open(options: &WalOptions) -> io::Result<(Arc<Self>, Recovered)> {
        fs::create_dir_all(&options.dir)?;
        let lock = File::create(options.dir.join("LOCK"))?;
        if let Err(err) = lock.try_lock() {
            let message = format!("the log is in use by another broker ({err})");
            return Err(io::Error::new(io::ErrorKind::WouldBlock, message));
        }
        let index = TopicIndex::default();
        let (recovered, segments) = recover(&options.dir, &index)?;
        if recovered.truncated_bytes > 0 || recovered.damaged_segments > 0 {
            tracing::warn!(
                kept = recovered.records.len(),
                truncated_bytes = recovered.truncated_bytes,
                damaged_segments = recovered.damaged_segments,
                "write-ahead log repaired: records after the first bad one were dropped"
            );
        }
        let written = recovered.last_record;
        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable) = watch::channel(written);
        let writer = Writer::new(options.clone(), segments, written, durable_tx)?;
        let thread = std::thread::Builder::new()
            .name("whispeer-wal".into())
            .spawn(move || writer.run(rx))?;
        let thread = Mutex::new(Some(thread));
        let next = Mutex::new(written + 1);
        let dir = options.dir.clone();
        let wal = Self { dir, _lock: lock, tx: Mutex::new(tx), thread, durable, next, index };
        Ok((Arc::new(wal), recovered))
    }

    /// Hands a framed record to the writer; returns its ticket. Call it in the order the
    /// records must be in the log (under the topic's lock).
    pub(crate) fn push(&self, record: Bytes) -> u64 {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = *next;
        *next += 1;
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if tx.send(Request::Append(record)).is_err() {
            tracing::error!("write-ahead log writer is gone: record not written");
        }
        ticket
    }

    /// Appends the record of the message at `offset` of `topic`; returns its ticket.
    pub(crate) fn push_message(&self, topic: &Topic, offset: u64, record: Bytes) -> u64 {
        let ticket = self.push(record);
        // The ticket is the record's number in the log.
        self.index.note(topic, offset, ticket);
        ticket
    }

    /// Up to `max` message records of `topic` from `offset` on, as the log holds them now (up
    /// to any incomplete tail). Starts at the segment the index points to, streams, and stops
    /// once it has `max`: memory stays at what it returns.
    pub(crate) fn read_topic(
        &self,
        topic: &Topic,
        from: u64,
        max: usize,
    ) -> io::Result<Vec<Record>> {
        let mut records = Vec::new();
        let Some(start) = self.index.start(topic, from) else { return Ok(records) };
        if max == 0 {
            return Ok(records);
        }
        let segments = list_segments(&self.dir)?;
        let begin = segments.iter().rposition(|s| s.first <= start).unwrap_or(0);
        for segment in &segments[begin..] {
            let end = scan_each(&segment.path, |_, logged| {
                if let Logged::Message(record) = logged
                    && record.envelope.topic == *topic
                    && record.offset >= from
                {
                    records.push(record);
                    if records.len() >= max {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            })?;
            if end != ScanEnd::Whole {
                break;
            }
        }
        Ok(records)
    }

    /// Whether the writer thread is still running: it stops at the first failed write.
    pub(crate) fn writing(&self) -> bool {
        self.durable.has_changed().is_ok()
    }

    /// Waits until record `ticket` is durable under the fsync policy. Returns `false` if the
    /// writer stopped first (a failed disk): the record may not be durable.
    pub(crate) async fn wait_durable(&self, ticket: u64) -> bool {
        let mut durable = self.durable.clone();
        durable.wait_for(|&done| done >= ticket).await.is_ok()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let _ = self.tx.lock().unwrap_or_else(PoisonError::into_inner).send(Request::Stop);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    options: WalOptions,
    segments: Vec<Segment>,
    file: File,
    written: u64,
    unsynced: u32,
    last_sync: Instant,
    durable: watch::Sender<u64>,
}

impl Writer {
    fn new(
        options: WalOptions,
        mut segments: Vec<Segment>,
        written: u64,
        durable: watch::Sender<u64>,
    ) -> io::Result<Self> {
        if segments.is_empty() {
            let path = segment_path(&options.dir, written + 1);
            File::create(&path)?;
            segments.push(Segment { first: written + 1, path, len: 0 });
        }
        let path = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let file = OpenOptions::new().append(true).open(path)?;
        let last_sync = Instant::now();
        Ok(Self { options, segments, file, written, unsynced: 0, last_sync, durable })
    }

    fn run(mut self, rx: Receiver<Request>) {
        let mut batch: Vec<Bytes> = Vec::new();
        loop {
            let first = match self.options.fsync {
                FsyncPolicy::Interval(every) if self.unsynced > 0 => {
                    match rx.recv_timeout(every.saturating_sub(self.last_sync.elapsed())) {
                        Ok(request) => Some(request),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(Request::Stop),
                    }
                }
                _ => Some(rx.recv().unwrap_or(Request::Stop)),
            };
            let mut stop = false;
            for request in first.into_iter().chain(rx.try_iter()) {
                match request {
                    Request::Append(record) => batch.push(record),
                    Request::Stop => stop = true,
                }
            }
            let started = Instant::now();
            let written = self.write(&batch, stop);
            if !batch.is_empty() {
                metrics::histogram!(WRITE_SECONDS, "store" => "wal").record(started.elapsed());
                metrics::histogram!(BATCH_RECORDS, "store" => "wal").record(batch.len() as f64);
            }
            if let Err(err) = written {
                tracing::error!(%err, "write-ahead log write failed; durable publishing stops");
                return;
            }
            batch.clear();
            if stop {
                return;
            }
        }
    }

    /// Writes a batch of records, as few writes as segment boundaries allow, and syncs under
    /// the policy.
    fn write(&mut self, batch: &[Bytes], stopping: bool) -> io::Result<()> {
        let mut pending = BytesMut::new();
        let mut count = 0u64;
        for record in batch {
            let len = self.segments.last().map_or(0, |s| s.len) + pending.len() as u64;
            if len > 0 && len + record.len() as u64 > self.options.segment_bytes {
                self.flush(&mut pending, &mut count)?;
                self.roll()?;
            }
            pending.extend_from_slice(record);
            count += 1;
        }
        self.flush(&mut pending, &mut count)?;
        let sync = match self.options.fsync {
            FsyncPolicy::Always => self.unsynced > 0,
            FsyncPolicy::EveryN(n) => self.unsynced >= n.max(1),
            FsyncPolicy::Interval(every) => self.unsynced > 0 && self.last_sync.elapsed() >= every,
            FsyncPolicy::Never => false,
        } || (stopping && self.unsynced > 0);
        if sync {
            let started = Instant::now();
            self.file.sync_data()?;
            metrics::histogram!(FSYNC_SECONDS, "store" => "wal").record(started.elapsed());
            self.unsynced = 0;
            self.last_sync = Instant::now();
        }
        // What is durable under the policy: everything synced, or everything written when the
        // policy accepts the risk.
        if self.unsynced == 0 || self.options.fsync != FsyncPolicy::Always {
            self.durable.send_replace(self.written);
        }
        Ok(())
    }

    /// Writes `pending` (`count` records) to the current segment.
    fn flush(&mut self, pending: &mut BytesMut, count: &mut u64) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(pending)?;
        self.written += *count;
        self.unsynced = self.unsynced.saturating_add(u32::try_from(*count).unwrap_or(u32::MAX));
        if let Some(segment) = self.segments.last_mut() {
            segment.len += pending.len() as u64;
        }
        pending.clear();
        *count = 0;
        Ok(())
    }

    /// Starts a new segment and deletes the oldest ones past `max_bytes`.
    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let first = self.written + 1;
        let path = segment_path(&self.options.dir, first);
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.segments.push(Segment { first, path, len: 0 });
        let mut total: u64 = self.segments.iter().map(|s| s.len).sum();
        while total > self.options.max_bytes && self.segments.len() > 1 {
            let oldest = self.segments.remove(0);
            total -= oldest.len;
            fs::remove_file(&oldest.path)?;
            tracing::info!(segment = %oldest.path.display(), "oldest log segment deleted");
        }
        Ok(())
    }
}

mod index;
mod scan;
#[cfg(test)]
mod tests;

use index::TopicIndex;
use scan::{ScanEnd, recover, scan_each};

/// Reads `bytes` as a segment file would be read: returns the valid records' (message and
/// commit) count, and the length of the valid prefix if a bad record ended it.
#[cfg(feature = "fuzzing")]
pub(crate) fn scan_bytes(bytes: &[u8]) -> (usize, Option<u64>) {
    let mut count = 0;
    let end = scan::scan_reader(bytes, |_, _| {
        count += 1;
        ControlFlow::Continue(())
    });
    match end {
        Ok(ScanEnd::Damaged(good)) => (count, Some(good)),
        _ => (count, None),
    }
}
