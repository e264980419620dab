//! The writer thread of the log: group commit under the fsync policy, segment roll-over with
//! its checkpoint and marks, deletion past the size bound, and the close mark.

use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::disk::DiskFile;
use super::index::TopicIndex;
use super::record::{encode_close, encode_commit_as, encode_mark};
use super::{
    BATCH_RECORDS, FSYNC_SECONDS, FsyncPolicy, KIND_CHECKPOINT, LatestCommits, Request, Segment,
    WRITE_SECONDS, WalOptions, segment_path,
};
use crate::store::backlog::{Backlog, CloseOnDrop};

/// The writer thread's state.
pub(super) struct Writer {
    options: WalOptions,
    segments: Vec<Segment>,
    file: Box<dyn DiskFile>,
    written: u64,
    unsynced: u32,
    last_sync: Instant,
    durable: watch::Sender<u64>,
    /// The latest commit of every group and topic, repeated at the start of each segment.
    commits: Arc<Mutex<LatestCommits>>,
    /// Every topic's latest offset, marked at the start of each segment.
    index: Arc<TopicIndex>,
}

impl Writer {
    pub(super) fn new(
        options: WalOptions,
        mut segments: Vec<Segment>,
        written: u64,
        durable: watch::Sender<u64>,
        (commits, index): (Arc<Mutex<LatestCommits>>, Arc<TopicIndex>),
    ) -> io::Result<Self> {
        let disk = &options.disk;
        let file = match segments.last() {
            Some(last) => disk.append(&last.path, false)?,
            None => {
                let path = segment_path(&options.dir, written + 1);
                let file = disk.append(&path, true)?;
                // The new file's entry is on disk before anything in it is acknowledged.
                disk.sync_dir(&options.dir)?;
                segments.push(Segment { first: written + 1, path, len: 0 });
                file
            }
        };
        let last_sync = Instant::now();
        let unsynced = 0;
        Ok(Self { options, segments, file, written, unsynced, last_sync, durable, commits, index })
    }

    pub(super) fn run(mut self, rx: Receiver<Request>, backlog: &Backlog) {
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
                if let Err(err) = self.close() {
                    tracing::warn!(%err, "write-ahead log: the close mark was not written");
                }
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

    /// Ends the log with a close mark: the next start knows nothing was in flight.
    fn close(&mut self) -> io::Result<()> {
        self.append_synced(&encode_close()?)
    }

    /// Appends a record that is not numbered (a mark), and syncs it.
    pub(super) fn append_synced(&mut self, record: &[u8]) -> io::Result<()> {
        self.file.append(record)?;
        self.file.sync_data()?;
        if let Some(segment) = self.segments.last_mut() {
            segment.len += record.len() as u64;
        }
        Ok(())
    }

    /// Writes `pending` (`count` records) to the current segment.
    fn flush(&mut self, pending: &mut BytesMut, count: &mut u64) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        self.file.append(pending)?;
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
    /// subscription and topic, and every topic's latest offset, synced (with the new file's
    /// directory entry) before any old segment is deleted, so deleting segments never loses a
    /// commit and never lets a topic's offsets start again. (It may repeat commits still
    /// waiting to be written; the last record of a group and topic is always its latest
    /// commit.)
    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        // Named after its first record; past the current segment's name even when damage
        // left that one without records.
        let after = self.segments.last().map_or(0, |s| s.first + 1);
        let first = (self.written + 1).max(after);
        let path = segment_path(&self.options.dir, first);
        let disk = Arc::clone(&self.options.disk);
        self.file = disk.append(&path, true)?;
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
        if !checkpoint.is_empty() {
            self.file.append(&checkpoint)?;
            self.file.sync_data()?;
        }
        disk.sync_dir(&self.options.dir)?;
        let len = checkpoint.len() as u64;
        self.segments.push(Segment { first, path, len });
        let mut total: u64 = self.segments.iter().map(|s| s.len).sum();
        while total > self.options.max_bytes && self.segments.len() > 1 {
            let oldest = self.segments.remove(0);
            total -= oldest.len;
            disk.remove(&oldest.path)?;
            tracing::info!(segment = %oldest.path.display(), "oldest log segment deleted");
        }
        Ok(())
    }
}
