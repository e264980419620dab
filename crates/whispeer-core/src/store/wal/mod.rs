//! The write-ahead log of durable topics: segment files of CRC32C-framed records, written by one
//! thread with group commit, scanned and repaired at start.
//!
//! ```text
//! segment file <first record number, 20 digits>.wal:
//!   record*: len u32 | crc32c(body) u32 | body
//!   body:    kind u8 = 1 (message) | offset u64 | accepted_ms u64 | envelope (wire layout)
//!         or kind u8 = 2 (a durable subscription's commit) | offset u64 | filter str |
//!            group str | topic str                              (str: u16 length | UTF-8)
//!         or kind u8 = 3 (a checkpoint: a commit repeated at a segment's start; not numbered)
//! ```
//!
//! Appending hands an encoded record to the writer thread and returns its number (a ticket).
//! The writer takes every record waiting, writes them with one `write`, and syncs them to disk
//! under the fsync policy — one `fsync` for all of them with `always` (group commit) — then
//! raises the durable watermark, which PUBACKs wait for. A segment rolls over past
//! `segment_bytes`, starting with a checkpoint of every latest commit, so the oldest whole
//! segments can be deleted past `max_bytes` without losing a durable subscription's position.
//!
//! Recovery reads every segment in order and checks each record's length (against
//! `MAX_RECORD` before allocating) and checksum. At the first bad record it stops: the rest of
//! that segment is cut off (a torn tail after a crash), later segments are set aside as
//! `.damaged`, and the counts are logged and returned. Every record before the damage is kept.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use whispeer_proto::Topic;

use crate::store::GroupKey;
// Topics stored were valid when written; limits may since have been lowered.
use crate::message::no_limits as unlimited;
use crate::store::PageBound;
use crate::store::backlog::{Backlog, CloseOnDrop};
use crate::store::{
    STORE_BATCH_RECORDS as BATCH_RECORDS, STORE_FSYNC_SECONDS as FSYNC_SECONDS,
    STORE_WRITE_SECONDS as WRITE_SECONDS,
};

/// Largest record accepted when reading: a message at the largest frame size, and then some.
const MAX_RECORD: usize = 64 << 20;
const HEADER: usize = 8;
const KIND_MESSAGE: u8 = 1;
const KIND_COMMIT: u8 = 2;
/// A commit repeated at the start of a segment (not numbered): see `Writer::roll`.
const KIND_CHECKPOINT: u8 = 3;

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
    /// The latest commits, shared with the writer for its checkpoints.
    commits: Arc<Mutex<LatestCommits>>,
    /// What waits for the writer, bounded (back-pressure to publishers).
    backlog: Arc<Backlog>,
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
        let latest = recovered.commits.iter().map(|c| ((c.key.clone(), c.topic.clone()), c.offset));
        let commits = Arc::new(Mutex::new(latest.collect::<LatestCommits>()));
        let writer =
            Writer::new(options.clone(), segments, written, durable_tx, Arc::clone(&commits))?;
        let backlog = Arc::new(Backlog::default());
        let writer_backlog = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("whispeer-wal".into())
            .spawn(move || writer.run(rx, &writer_backlog))?;
        let thread = Mutex::new(Some(thread));
        let next = Mutex::new(written + 1);
        let dir = options.dir.clone();
        let tx = Mutex::new(tx);
        let wal = Self { dir, _lock: lock, tx, thread, durable, next, index, commits, backlog };
        Ok((Arc::new(wal), recovered))
    }

    /// Hands a framed record to the writer; returns its ticket. Call it in the order the
    /// records must be in the log (under the topic's lock). Waits while the writer's backlog
    /// is full (back-pressure).
    pub(crate) fn push(&self, record: Bytes) -> u64 {
        self.backlog.admit(record.len());
        self.push_admitted(record)
    }

    /// `push` of a record the backlog has admitted already.
    fn push_admitted(&self, record: Bytes) -> u64 {
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

    /// Appends the commit of group `key` in `topic` at `offset`, and remembers it as the
    /// latest for the writer's checkpoints.
    pub(crate) fn push_commit(&self, key: &GroupKey, topic: &Topic, offset: u64) -> io::Result<()> {
        let record = encode_commit(key, topic.as_str(), offset)?;
        // Room first: the writer takes the commits' lock to write checkpoints, so nothing may
        // wait for it while holding that lock.
        self.backlog.admit(record.len());
        let mut commits = self.commits.lock().unwrap_or_else(PoisonError::into_inner);
        commits.insert((key.clone(), topic.clone()), offset);
        // Pushed under the same lock, so the map and the log agree on which commit is last.
        self.push_admitted(record);
        Ok(())
    }

    /// Up to `max` message records of `topic` from `offset` on, as the log holds them now (up
    /// to any incomplete tail). Starts at the segment the index points to, streams, and stops
    /// once it has `max`: memory stays at what it returns.
    pub(crate) fn read_topic(
        &self,
        topic: &Topic,
        from: u64,
        mut bound: PageBound,
    ) -> io::Result<Vec<Record>> {
        let mut records = Vec::new();
        let Some(start) = self.index.start(topic, from) else { return Ok(records) };
        if bound.max == 0 {
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
                    if !bound.admit_len(record.envelope.payload.len()) {
                        return ControlFlow::Break(());
                    }
                    records.push(record);
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
    /// The latest commit of every group and topic, repeated at the start of each segment.
    commits: Arc<Mutex<LatestCommits>>,
}

/// The latest commit of every durable subscription and topic.
type LatestCommits = HashMap<(GroupKey, Topic), u64>;

impl Writer {
    fn new(
        options: WalOptions,
        mut segments: Vec<Segment>,
        written: u64,
        durable: watch::Sender<u64>,
        commits: Arc<Mutex<LatestCommits>>,
    ) -> io::Result<Self> {
        if segments.is_empty() {
            let path = segment_path(&options.dir, written + 1);
            File::create(&path)?;
            segments.push(Segment { first: written + 1, path, len: 0 });
        }
        let path = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let file = OpenOptions::new().append(true).open(path)?;
        let last_sync = Instant::now();
        Ok(Self { options, segments, file, written, unsynced: 0, last_sync, durable, commits })
    }

    fn run(mut self, rx: Receiver<Request>, backlog: &Backlog) {
        let _close = CloseOnDrop(backlog);
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
            backlog.release(batch.len(), batch.iter().map(Bytes::len).sum());
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
    ///
    /// The new segment starts with a checkpoint: the latest commit of every durable
    /// subscription and topic, synced before any old segment is deleted, so deleting segments
    /// never loses a commit. (It may repeat commits still waiting to be written; the last
    /// record of a group and topic is always its latest commit.)
    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let first = self.written + 1;
        let path = segment_path(&self.options.dir, first);
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut checkpoint = BytesMut::new();
        let commits = self.commits.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for ((key, topic), offset) in &commits {
            checkpoint.extend_from_slice(&encode_commit_as(
                KIND_CHECKPOINT,
                key,
                topic.as_str(),
                *offset,
            )?);
        }
        if !checkpoint.is_empty() {
            self.file.write_all(&checkpoint)?;
            self.file.sync_data()?;
        }
        let len = checkpoint.len() as u64;
        self.segments.push(Segment { first, path, len });
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
mod record;
mod scan;
#[cfg(test)]
mod tests;

use crate::store::{Commit, Record};
use index::TopicIndex;
use record::{Logged, decode_logged, encode_commit_as};
pub(crate) use record::{encode_commit, encode_record};
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
