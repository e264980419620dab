//! The writer of the log: group commit under the fsync policy, zeroes laid ahead of the
//! records, segment roll-over with its checkpoint and marks, deletion past the size bound, and
//! the close mark. One thread holds it at a time; under fsync `always` two take turns, the
//! other one syncing (`sync.rs`).

use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::disk::{DiskFile, SyncFile};
use super::index::TopicIndex;
use super::record::{encode_close, encode_commit_as, encode_mark};
use super::sync::Syncs;
use super::{
    BATCH_RECORDS, FSYNC_SECONDS, FsyncPolicy, Health, KIND_CHECKPOINT, LatestCommits, Request,
    Segment, WRITE_SECONDS, WalOptions, segment_path,
};
use crate::store::backlog::{Backlog, CloseOnDrop};
use crate::store::looking::Looking;

/// The writer thread's state.
pub(super) struct Writer {
    options: WalOptions,
    segments: Vec<Segment>,
    file: Box<dyn DiskFile>,
    /// How long the current segment's file is: its records and the zeroes laid after them.
    zeroed: u64,
    written: u64,
    unsynced: u32,
    last_sync: Instant,
    /// How the writer waits for its next request under fsync `always`.
    looking: Looking,
    /// Syncs `file` from the thread not writing; keeps the durable watermark.
    sync_file: Arc<dyn SyncFile>,
    syncs: Arc<Syncs>,
    /// The latest commit of every group and topic, repeated at the start of each segment.
    commits: Arc<Mutex<LatestCommits>>,
    /// Every topic's latest offset, marked at the start of each segment.
    index: Arc<TopicIndex>,
    health: Arc<Health>,
}

/// What a turn of the writer came to.
enum Turn {
    /// Take the next batch.
    Next,
    /// Records up to this one were written, and await a sync (fsync `always`).
    Sync(u64),
    /// Stopped, or writing failed.
    End,
}

/// The writer, its requests and its batch: held by whichever thread writes.
type Role = Mutex<Option<(Writer, Receiver<Request>, Vec<Bytes>)>>;

/// One thread's share of the log's work: write while holding the writer, and sync what was
/// written when no other thread is syncing (`sync.rs`).
fn work(role: &Role, syncs: &Syncs, backlog: &Backlog) {
    loop {
        let mut held = role.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((writer, rx, batch)) = held.as_mut() else { return };
        match writer.turn(rx, batch, backlog) {
            Turn::Next => {}
            Turn::Sync(written) => {
                if syncs.note(written, Arc::clone(&writer.sync_file)) {
                    drop(held);
                    syncs.run();
                }
            }
            Turn::End => {
                *held = None;
                return;
            }
        }
    }
}

/// How long a writer waits for room on a full disk before it tries again (shorter in the
/// crate's tests, which fill the simulated disk at every operation).
const RETRY: Duration = Duration::from_millis(if cfg!(test) { 5 } else { 200 });

/// How far ahead of its records the writer lays zeroes in a segment's file (laid again once
/// the records come within half of it). A sync that grows a file commits its new size and
/// blocks to the file system's journal as well; one that writes over blocks the file has (and
/// whose size was synced) flushes the data alone, about half the time on ext4 here. One sync in
/// a few hundred pays for the zeroes. (Smaller in the crate's tests, whose simulated disk
/// copies files on every sync.)
pub(super) const ZERO_AHEAD: u64 = if cfg!(test) { 8 << 10 } else { 2 << 20 };

/// What zeroes are laid from.
static ZEROES: [u8; 256 << 10] = [0; 256 << 10];

/// A failed sync is never "no room, try again" (even `ENOSPC`): after it, nothing says what
/// reached the disk, so writing stops.
fn sync_failed(synced: io::Result<()>) -> io::Result<()> {
    synced.map_err(|err| io::Error::other(format!("sync failed: {err}")))
}

impl Writer {
    pub(super) fn new(
        options: WalOptions,
        mut segments: Vec<Segment>,
        written: u64,
        durable: watch::Sender<u64>,
        (commits, index, health): (Arc<Mutex<LatestCommits>>, Arc<TopicIndex>, Arc<Health>),
    ) -> io::Result<Self> {
        let disk = &options.disk;
        let (file, zeroed) = match segments.last() {
            Some(last) => (disk.open(&last.path, false)?, last.size),
            None => {
                let path = segment_path(&options.dir, written + 1);
                let file = disk.open(&path, true)?;
                // The new file's entry is on disk before anything in it is acknowledged.
                disk.sync_dir(&options.dir)?;
                segments.push(Segment { first: written + 1, path, len: 0, size: 0 });
                (file, 0)
            }
        };
        let last_sync = Instant::now();
        let unsynced = 0;
        let sync_file = file.syncer()?;
        let syncs = Arc::new(Syncs::new(durable, Arc::clone(&sync_file), Arc::clone(&health)));
        Ok(Self {
            options,
            segments,
            file,
            zeroed,
            written,
            unsynced,
            last_sync,
            looking: Looking::default(),
            sync_file,
            syncs,
            commits,
            index,
            health,
        })
    }

    /// Writes until the log stops or fails. Under fsync `always` a second thread shares the
    /// work, syncing beside the writer (`sync.rs`).
    pub(super) fn run(self, rx: Receiver<Request>, backlog: &Backlog) {
        let _close = CloseOnDrop(backlog);
        let beside = self.options.fsync == FsyncPolicy::Always;
        let syncs = Arc::clone(&self.syncs);
        let role = Mutex::new(Some((self, rx, Vec::new())));
        std::thread::scope(|scope| {
            if beside {
                let second = std::thread::Builder::new()
                    .name("whispeer-wal".into())
                    .spawn_scoped(scope, || work(&role, &syncs, backlog));
                if let Err(err) = second {
                    // One thread does it all, syncing in line.
                    tracing::warn!(%err, "write-ahead log: no second thread; syncing in line");
                }
            }
            work(&role, &syncs, backlog);
        });
        // Whoever still waits for a record hears now that the writer is gone.
        syncs.fail();
    }

    /// Takes a batch and writes it: one turn of the writer.
    fn turn(&mut self, rx: &Receiver<Request>, batch: &mut Vec<Bytes>, backlog: &Backlog) -> Turn {
        if self.health.get() == Health::FAILED {
            return Turn::End;
        }
        let first = match self.options.fsync {
            FsyncPolicy::Interval(every) if self.unsynced > 0 => {
                match rx.recv_timeout(every.saturating_sub(self.last_sync.elapsed())) {
                    Ok(request) => Some(request),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(Request::Stop),
                }
            }
            FsyncPolicy::Always => Some(self.looking.next(rx).unwrap_or(Request::Stop)),
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
        let first = self.written;
        let mut written = self.write(batch, stop);
        let mut stopping_tries = 0;
        while let Err(err) = &written {
            // A full disk: what did not fit is cut off and written again once there is
            // room. Anything else (and a sync that failed) ends writing: after a failed
            // fsync nothing says what reached the disk.
            if err.kind() != io::ErrorKind::StorageFull || stopping_tries > 1 {
                tracing::error!(%err, "write-ahead log write failed; durable publishing stops");
                self.health.set(Health::FAILED);
                return Turn::End;
            }
            if self.health.get() != Health::FULL {
                tracing::error!(%err, "write-ahead log: the disk is full; durable publishes are refused until it has room");
                self.health.set(Health::FULL);
            }
            if let Err(err) = self.wait_for_room(rx, batch, &mut stop) {
                tracing::error!(%err, "write-ahead log: repair after a full disk failed");
                self.health.set(Health::FAILED);
                return Turn::End;
            }
            stopping_tries += u32::from(stop);
            let done = usize::try_from(self.written - first).unwrap_or(usize::MAX);
            written = self.write(batch.get(done..).unwrap_or_default(), stop);
        }
        if !batch.is_empty() {
            metrics::histogram!(WRITE_SECONDS, "store" => "wal").record(started.elapsed());
            metrics::histogram!(BATCH_RECORDS, "store" => "wal").record(batch.len() as f64);
        }
        backlog.release(batch.len(), batch.iter().map(Bytes::len).sum());
        batch.clear();
        if stop {
            if let Err(err) = self.close() {
                tracing::warn!(%err, "write-ahead log: the close mark was not written");
            }
            return Turn::End;
        }
        if self.options.fsync == FsyncPolicy::Always && self.written > first {
            return Turn::Sync(self.written);
        }
        Turn::Next
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
            // Synced beside the next write (`Turn::Sync`), unless stopping.
            FsyncPolicy::Always => false,
            FsyncPolicy::EveryN(n) => self.unsynced >= n.max(1),
            FsyncPolicy::Interval(every) => self.unsynced > 0 && self.last_sync.elapsed() >= every,
            FsyncPolicy::Never => false,
        } || (stopping && self.unsynced > 0);
        if sync {
            let started = Instant::now();
            sync_failed(self.file.sync_data())?;
            metrics::histogram!(FSYNC_SECONDS, "store" => "wal").record(started.elapsed());
            self.unsynced = 0;
            self.last_sync = Instant::now();
        }
        if self.health.get() == Health::FULL {
            // Healthy again before anything waiting is acknowledged.
            tracing::info!("write-ahead log: the disk has room again; writing resumes");
            self.health.set(Health::WRITING);
        }
        // What is durable under the policy: everything synced, or everything written when the
        // policy accepts the risk. (A sync beside the writer raises it for `always`.)
        if self.unsynced == 0 || self.options.fsync != FsyncPolicy::Always {
            self.syncs.raise(self.written);
        }
        Ok(())
    }

    /// After a write failed for want of room: cuts off whatever part of it reached the current
    /// segment, then waits `RETRY`, taking in what is sent meanwhile.
    fn wait_for_room(
        &mut self,
        rx: &Receiver<Request>,
        batch: &mut Vec<Bytes>,
        stop: &mut bool,
    ) -> io::Result<()> {
        if let Some(segment) = self.segments.last() {
            self.options.disk.truncate(&segment.path, segment.len)?;
            self.zeroed = segment.len;
        }
        let first = match rx.recv_timeout(RETRY) {
            Ok(request) => Some(request),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Request::Stop),
        };
        for request in first.into_iter().chain(rx.try_iter()) {
            match request {
                Request::Append(record) => batch.push(record),
                Request::Stop => *stop = true,
            }
        }
        Ok(())
    }

    /// Ends the log with a close mark: the next start knows nothing was in flight.
    fn close(&mut self) -> io::Result<()> {
        self.append_synced(&encode_close()?)
    }

    /// Appends a record that is not numbered (a mark), and syncs it.
    pub(super) fn append_synced(&mut self, record: &[u8]) -> io::Result<()> {
        self.put(record)?;
        sync_failed(self.file.sync_data())
    }

    /// Writes `bytes` after the current segment's records, and zeroes ahead of them when due.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(segment) = self.segments.last_mut() else {
            return Err(io::Error::other("the log has no segment to write to"));
        };
        self.file.write_at(bytes, segment.len)?;
        segment.len += bytes.len() as u64;
        let end = segment.len;
        self.lay_zeroes(end)
    }

    /// Lays zeroes up to `ZERO_AHEAD` past `end` (the records' end in the current segment),
    /// within the segment's size, once the records come within half of that.
    fn lay_zeroes(&mut self, end: u64) -> io::Result<()> {
        self.zeroed = self.zeroed.max(end);
        if end + ZERO_AHEAD / 2 <= self.zeroed {
            return Ok(());
        }
        let to = (end + ZERO_AHEAD).min(self.options.segment_bytes);
        while self.zeroed < to {
            let len = (to - self.zeroed).min(ZEROES.len() as u64);
            match self.file.write_at(&ZEROES[..len as usize], self.zeroed) {
                Ok(()) => self.zeroed += len,
                // They only make syncs cheaper: a full disk takes none, and writing goes on.
                Err(err) if err.kind() == io::ErrorKind::StorageFull => return Ok(()),
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Writes `pending` (`count` records) to the current segment.
    fn flush(&mut self, pending: &mut BytesMut, count: &mut u64) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        self.put(pending)?;
        self.written += *count;
        self.unsynced = self.unsynced.saturating_add(u32::try_from(*count).unwrap_or(u32::MAX));
        pending.clear();
        *count = 0;
        Ok(())
    }

    /// Starts a new segment and deletes the oldest ones past `max_bytes`.
    ///
    /// The new segment starts with a checkpoint: the latest commit of every durable
    /// subscription and topic, and every topic's latest offset, synced (with the new file's
    /// directory entry) before any old segment is deleted, so deleting segments never loses a
    /// commit and never lets a topic's offsets start again. (It may repeat commits still
    /// waiting to be written; the last record of a group and topic is always its latest
    /// commit.)
    fn roll(&mut self) -> io::Result<()> {
        sync_failed(self.file.sync_data())?;
        // Named after its first record; past the current segment's name even when damage
        // left that one without records.
        let after = self.segments.last().map_or(0, |s| s.first + 1);
        let first = (self.written + 1).max(after);
        let path = segment_path(&self.options.dir, first);
        let disk = Arc::clone(&self.options.disk);
        self.file = disk.open(&path, true)?;
        self.sync_file = self.file.syncer()?;
        // Empty, also when an earlier try at this roll failed half-way (a full disk).
        disk.truncate(&path, 0)?;
        self.zeroed = 0;
        let mut checkpoint = BytesMut::new();
        for (topic, offset) in self.index.marks() {
            checkpoint.extend_from_slice(&encode_mark(&topic, offset)?);
        }
        let commits = self.commits.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for ((key, topic), offset) in &commits {
            checkpoint.extend_from_slice(&encode_commit_as(
                KIND_CHECKPOINT,
                key,
                topic.as_str(),
                *offset,
            )?);
        }
        let len = checkpoint.len() as u64;
        if !checkpoint.is_empty() {
            self.file.write_at(&checkpoint, 0)?;
        }
        self.lay_zeroes(len)?;
        sync_failed(self.file.sync_data())?;
        sync_failed(disk.sync_dir(&self.options.dir))?;
        self.segments.push(Segment { first, path, len, size: self.zeroed });
        let mut total: u64 = self.segments.iter().map(|s| s.len).sum();
        while total > self.options.max_bytes && self.segments.len() > 1 {
            // Forgotten only once removed: a failed removal is tried again at the next roll,
            // before any newer segment goes.
            disk.remove(&self.segments[0].path)?;
            let oldest = self.segments.remove(0);
            total -= oldest.len;
            tracing::info!(segment = %oldest.path.display(), "oldest log segment deleted");
        }
        Ok(())
    }
}
