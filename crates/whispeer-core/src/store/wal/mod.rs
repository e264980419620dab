//! The write-ahead log of durable topics: segment files of CRC32C-framed records, written with
//! group commit, scanned and repaired at start.
//!
//! ```text
//! segment file <first record number, 20 digits>.wal:
//!   record*: len u32 | crc32c(body) u32 | body
//!   body:    kind u8 = 1 (message) | offset u64 | accepted_ms u64 | envelope (wire layout)
//!         or kind u8 = 2 (a durable subscription's commit) | offset u64 | filter str |
//!            group str | topic str                              (str: u16 length | UTF-8)
//!         or kind u8 = 3 (a checkpoint: a commit repeated at a segment's start; not numbered)
//!         or kind u8 = 4 (a mark: a topic's latest offset at a segment's start; not numbered) |
//!            offset u64 | topic str
//!         or kind u8 = 5 (the log was closed cleanly; not numbered)
//! ```
//!
//! Appending hands an encoded record to the writer thread and returns its number (a ticket).
//! The writer takes every record waiting, writes them with one `write`, and syncs them to disk
//! under the fsync policy — one `fsync` for all of them with `always` (group commit) — then
//! raises the durable watermark, which PUBACKs wait for. With `always` a second thread shares
//! the work: while one syncs a batch, the other writes the next, which the following sync
//! covers (`sync.rs`). It lays zeroes ahead of its records
//! (up to `ZERO_AHEAD`, synced with them), so most syncs write over blocks the file already
//! has and the file system has no size or allocation to commit with them: about half the
//! cost of a sync that grows the file, on ext4 here. A header of zeroes ends a segment's
//! records. A segment rolls over past
//! `segment_bytes`, starting with a checkpoint of every latest commit and a mark of every topic's
//! latest offset, so the oldest whole segments can be deleted past `max_bytes` without losing a
//! durable subscription's position or starting a topic's offsets again. A new segment's
//! directory entry is synced before anything in it is acknowledged. All file operations go
//! through the [`Disk`] seam (`disk.rs`), which the tests replace with a disk that loses power;
//! on Linux the segments are written around the page cache (`direct.rs`).
//!
//! Recovery reads every segment in order and checks each record's length (against
//! `MAX_RECORD` before allocating) and checksum (`scan.rs`). A header with one flipped bit is
//! repaired (the checksum says which length is right); a damaged record followed by a valid one
//! is skipped; otherwise the rest of the segment is cut off (a torn tail after a crash). Later
//! segments are kept. What was repaired, skipped and cut is logged and returned, and the broker
//! continues every topic's offsets past anything that may have been lost, so no offset is
//! given twice.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use whispeer_proto::Topic;

use crate::store::GroupKey;
// Topics stored were valid when written; limits may since have been lowered.
use crate::message::no_limits as unlimited;
use crate::store::PageBound;
use crate::store::backlog::{BACKLOG_RECORDS, Backlog};
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
/// A topic's latest offset at the start of a segment (not numbered): see `Writer::roll`.
const KIND_MARK: u8 = 4;
/// The log was closed cleanly: the last record when nothing was in flight (not numbered).
const KIND_CLOSE: u8 = 5;

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
    /// The file system the log is on: the operating system's, or a simulated one in tests.
    pub(crate) disk: Arc<dyn Disk>,
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
            disk: Arc::new(OsDisk),
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
    /// Records skipped because they were damaged, with valid records after them.
    pub(crate) skipped_records: u64,
    /// Records whose damaged header was repaired (a single flipped bit); none of them lost.
    pub(crate) repaired_records: u64,
    /// The latest offset of every topic the log has held, from the segments' marks and the
    /// records: offsets continue after these even when the messages are gone.
    pub(crate) marks: Vec<(Topic, u64)>,
    /// The log was new, or ended with a close mark (its writer stopped cleanly).
    pub(crate) clean: bool,
    /// Offsets of topics the log knows nothing of start after this: raised by what may have
    /// been lost at each start after damage or a stop that was not clean, and kept in the log
    /// (a mark of `FLOOR_TOPIC`).
    pub(crate) floor: u64,
    /// The number of the last record kept (records are numbered from 1 across segments, and
    /// keep their numbers when older segments are deleted).
    pub(crate) last_record: u64,
}

impl Recovered {
    /// At most how many messages of a topic may have been given an offset (and delivered
    /// live) without being found here: each skipped record, as many as the smallest record fits
    /// into the bytes cut off, and after a stop that was not clean everything the writer's
    /// backlog can hold (with `FsyncPolicy::Always`, nothing else can be in flight).
    pub(crate) fn offsets_maybe_lost(&self) -> u64 {
        let in_flight = if self.clean { 0 } else { BACKLOG_RECORDS as u64 };
        in_flight + self.skipped_records + self.truncated_bytes.div_ceil(MIN_RECORD)
    }
}

/// The topic whose mark keeps the floor of offsets (reserved: no client can publish to it).
const FLOOR_TOPIC: &str = "$wal/floor";

/// The smallest record: a header and a body's kind, offset and time (an envelope adds more).
const MIN_RECORD: u64 = (HEADER + 17) as u64;

struct Segment {
    first: u64,
    path: PathBuf,
    /// The length of its records: where the next one is written. (As listed, before a scan,
    /// the length of its file.)
    len: u64,
    /// The length of its file: its records and the zeroes laid ahead of them.
    size: u64,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

fn list_segments(disk: &dyn Disk, dir: &Path) -> io::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for (path, len) in disk.list(dir)? {
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            segments.push(Segment { first, path, len, size: len });
        }
    }
    segments.sort_by_key(|s| s.first);
    Ok(segments)
}

enum Request {
    Append(Bytes),
    Stop,
}

/// The latest commit of every durable subscription and topic.
type LatestCommits = HashMap<(GroupKey, Topic), u64>;

/// The write-ahead log: a handle on the writer thread.
pub(crate) struct Wal {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    /// Holds the directory's lock: one broker per log.
    _lock: Box<dyn Send + Sync>,
    tx: Mutex<Sender<Request>>,
    /// The writer thread, joined on drop so a reopened log sees everything written.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Records durable under the policy: every ticket up to this one.
    durable: watch::Receiver<u64>,
    /// The next ticket: records appended so far + 1.
    next: Mutex<u64>,
    /// Where each topic's messages are, roughly, and each topic's latest offset.
    index: Arc<TopicIndex>,
    /// The latest commits, shared with the writer for its checkpoints.
    commits: Arc<Mutex<LatestCommits>>,
    /// What waits for the writer, bounded (back-pressure to publishers).
    backlog: Arc<Backlog>,
    /// Whether the writer writes, waits for room on a full disk, or has failed.
    health: Arc<Health>,
}

/// Whether the writer writes: shared by the log's handle and its writer thread.
#[derive(Debug, Default)]
pub(super) struct Health(AtomicU8);

impl Health {
    const WRITING: u8 = 0;
    /// The disk is full: the writer waits for room and tries again.
    const FULL: u8 = 1;
    /// A write or a sync failed otherwise: nothing more is written.
    const FAILED: u8 = 2;

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("durable", &*self.durable.borrow()).finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (and repairs) the log in `options.dir` and starts its writer.
    pub(crate) fn open(options: &WalOptions) -> io::Result<(Arc<Self>, Recovered)> {
        let disk = Arc::clone(&options.disk);
        disk.create_dir_all(&options.dir)?;
        let lock = disk.lock(&options.dir)?;
        let index = Arc::new(TopicIndex::default());
        let (mut recovered, segments) = recover(&*disk, &options.dir, &index)?;
        if recovered.truncated_bytes > 0 || recovered.skipped_records > 0 {
            tracing::warn!(
                kept = recovered.records.len(),
                truncated_bytes = recovered.truncated_bytes,
                skipped_records = recovered.skipped_records,
                "write-ahead log repaired: damaged records were dropped"
            );
        }
        if recovered.repaired_records > 0 {
            tracing::warn!(
                repaired = recovered.repaired_records,
                "write-ahead log: records with a flipped bit in their header were read whole"
            );
        }
        let floor_topic = Topic::parse(FLOOR_TOPIC).map_err(io::Error::other)?;
        let old_floor = recovered.marks.iter().find(|(t, _)| *t == floor_topic).map_or(0, |m| m.1);
        recovered.marks.retain(|(topic, _)| *topic != floor_topic);
        recovered.floor = old_floor + recovered.offsets_maybe_lost();
        let floor = (recovered.floor > old_floor).then(|| {
            index.mark(&floor_topic, recovered.floor);
            (floor_topic, recovered.floor)
        });
        let written = recovered.last_record;
        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable) = watch::channel(written);
        let latest = recovered.commits.iter().map(|c| ((c.key.clone(), c.topic.clone()), c.offset));
        let commits = Arc::new(Mutex::new(latest.collect::<LatestCommits>()));
        let health = Arc::new(Health::default());
        let shared = (Arc::clone(&commits), Arc::clone(&index), Arc::clone(&health));
        let mut writer = Writer::new(options.clone(), segments, written, durable_tx, shared)?;
        if let Some((topic, offset)) = floor {
            writer.append_synced(&encode_mark(&topic, offset)?)?;
        }
        let backlog = Arc::new(Backlog::default());
        let writer_backlog = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("whispeer-wal".into())
            .spawn(move || writer.run(rx, &writer_backlog))?;
        let thread = Mutex::new(Some(thread));
        let next = Mutex::new(written + 1);
        let dir = options.dir.clone();
        let tx = Mutex::new(tx);
        let _lock = lock;
        let wal =
            Self { dir, disk, _lock, tx, thread, durable, next, index, commits, backlog, health };
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
        let segments = list_segments(&*self.disk, &self.dir)?;
        let begin = segments.iter().rposition(|s| s.first <= start).unwrap_or(0);
        for segment in &segments[begin..] {
            let scanned = scan_each(&*self.disk, &segment.path, Zeroes::Stop, |_, logged| {
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
            if scanned.end == ScanEnd::Stopped {
                break;
            }
        }
        Ok(records)
    }

    /// Whether the writer thread is still running: it stops at the first failed write.
    pub(crate) fn writing(&self) -> bool {
        self.health.get() == Health::WRITING && self.durable.has_changed().is_ok()
    }

    /// `Ok` while the writer writes; otherwise why a durable publish is refused now.
    pub(crate) fn check_writing(&self) -> io::Result<()> {
        match self.health.get() {
            Health::FULL => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the write-ahead log's disk is full: durable publishes are refused until it has room",
            )),
            _ if !self.writing() => Err(io::Error::other(
                "the write-ahead log failed to write (a disk error): durable publishes are refused until the broker is restarted",
            )),
            _ => Ok(()),
        }
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

#[cfg(target_os = "linux")]
mod direct;
mod disk;
mod sync;
mod writer;
use writer::Writer;
#[cfg(test)]
mod damage;
mod index;
#[cfg(test)]
mod power;
mod record;
mod scan;
#[cfg(test)]
pub(crate) mod sim;
#[cfg(test)]
mod tests;

use crate::store::{Commit, Record};
pub(crate) use disk::{Disk, OsDisk};
use index::TopicIndex;
use record::{Logged, decode_logged, encode_mark};
pub(crate) use record::{encode_commit, encode_record};
use scan::{ScanEnd, Zeroes, recover, scan_each};

/// Reads `bytes` as a segment file would be read: returns the valid records' (message and
/// commit) count, and the length of the valid prefix if a bad record ended it.
#[cfg(feature = "fuzzing")]
pub(crate) fn scan_bytes(bytes: &[u8]) -> (usize, Option<u64>) {
    let mut count = 0;
    let scanned = scan::scan_reader(bytes, scan::Zeroes::Check, |_, _| {
        count += 1;
        ControlFlow::Continue(())
    });
    match scanned.map(|s| s.end) {
        Ok(ScanEnd::Damaged(good)) => (count, Some(good)),
        _ => (count, None),
    }
}
