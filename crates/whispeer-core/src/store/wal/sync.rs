//! Group commit with the sync beside the write (fsync `always`): while one thread syncs what
//! was written, the other writes what came in meanwhile, and the next sync covers it.
//!
//! Written around the page cache, a batch costs the disk two requests: the write, and then the
//! flush of the disk's cache that `fdatasync` sends. On this project's virtual disk each took
//! 50–70 µs alone and 120–150 µs one after the other, and a thread writing beside another one
//! syncing got 11–14 k of each done a second, against 6.6–8.4 k pairs from one thread (runs of
//! 2 s). With publishes arriving while a sync runs, the next batch no longer waits for it.
//!
//! Two threads share the log and either may hold either role: the one that holds the writer
//! ([`Writer`](super::writer::Writer), under a lock) takes a batch and writes it; if no sync is
//! running it lets the writer go and syncs the batch itself, so one publish in flight costs no
//! hand-over between threads. If a sync is running, it leaves a note of what it wrote and takes
//! the next batch; the syncing thread, done, syncs again for what the note says, until nothing
//! is left, and only then goes back to wait for the writer.
//!
//! A sync covers every write that returned before it started: the note is taken under the same
//! lock the writer leaves it under, after its write returned. So the durable watermark never
//! passes a record whose write had not returned when the sync covering it began. It only
//! rises: a thread that synced inline (stopping) may have raised it past what a slower sync
//! reports after.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

use super::disk::SyncFile;
use super::{FSYNC_SECONDS, Health};

/// The durable watermark and the sync running beside the writer; see the module documentation.
pub(super) struct Syncs {
    state: Mutex<State>,
    health: Arc<Health>,
}

struct State {
    /// Raised once records are durable; dropped when a sync fails (waiters learn it at once).
    durable: Option<watch::Sender<u64>>,
    /// The writer's note: records written so far, and a handle on the file they end in (a
    /// segment's roll syncs the one before, so syncing the last file covers them all).
    written: u64,
    file: Arc<dyn SyncFile>,
    /// A thread is syncing.
    syncing: bool,
}

impl Syncs {
    pub(super) fn new(
        durable: watch::Sender<u64>,
        file: Arc<dyn SyncFile>,
        health: Arc<Health>,
    ) -> Self {
        let written = *durable.borrow();
        let state = State { durable: Some(durable), written, file, syncing: false };
        Self { state: Mutex::new(state), health }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Raises the durable watermark to `to` (never lowers it).
    pub(super) fn raise(&self, to: u64) {
        self.lock().raise(to);
    }

    /// Drops the watermark's sender: whoever waits for a record learns it may not be durable.
    pub(super) fn fail(&self) {
        self.lock().durable = None;
    }

    /// The writer's note after a write that leaves records up to `written` unsynced, in
    /// `file`. `true`: no sync was running, and the caller is now the syncing thread (let the
    /// writer go, then [`Syncs::run`]). `false`: the running sync will cover them.
    pub(super) fn note(&self, written: u64, file: Arc<dyn SyncFile>) -> bool {
        let mut state = self.lock();
        state.written = written;
        state.file = file;
        if state.syncing || state.durable.is_none() {
            return false;
        }
        state.syncing = true;
        true
    }

    /// Syncs until every record noted is durable, raising the watermark after each sync. A
    /// failed sync stops it all: nothing says what reached the disk.
    pub(super) fn run(&self) {
        loop {
            let (to, file) = {
                let state = self.lock();
                (state.written, Arc::clone(&state.file))
            };
            let started = Instant::now();
            let synced = file.sync_data();
            metrics::histogram!(FSYNC_SECONDS, "store" => "wal").record(started.elapsed());
            let mut state = self.lock();
            if let Err(err) = synced {
                tracing::error!(%err, "write-ahead log sync failed; durable publishing stops");
                self.health.set(Health::FAILED);
                state.durable = None;
                state.syncing = false;
                return;
            }
            state.raise(to);
            if state.written <= to {
                state.syncing = false;
                return;
            }
        }
    }
}

impl State {
    fn raise(&self, to: u64) {
        if let Some(durable) = &self.durable {
            durable.send_if_modified(|done| {
                let higher = to > *done;
                *done = (*done).max(to);
                higher
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::damage::options_on;
    use super::super::sim::SimDisk;
    use super::super::{Record, Wal};
    use bytes::Bytes;
    use whispeer_proto::{ContentType, Envelope, Flags, MessageId, Topic};

    fn record(n: u64) -> Bytes {
        let topic = Topic::parse("a").unwrap();
        let flags = Flags::with_content(ContentType::Raw);
        let payload = Bytes::from(format!("message {n}"));
        let envelope = Envelope::new(MessageId(u128::from(n)), topic, n, flags, payload);
        Record { offset: n, accepted_ms: n, envelope }.encode().unwrap()
    }

    /// Polls `done` for up to five seconds.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Lets syncs through when dropped, also when the test fails (the log's drop waits for them).
    struct Release(Arc<SimDisk>);

    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_syncs(false);
        }
    }

    #[test]
    fn a_batch_is_written_while_the_last_one_syncs_and_neither_is_durable_before_its_sync() {
        let disk = SimDisk::new();
        let (wal, _) = Wal::open(&options_on(&disk)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        disk.hold_syncs(true);
        let release = Release(Arc::clone(&disk));
        let first = wal.push(record(1));
        assert!(eventually(|| disk.syncs_waiting() == 1), "the first record's sync started");
        let writes = disk.writes();
        let second = wal.push(record(2));
        assert!(
            eventually(|| disk.writes() > writes),
            "the second record is written while the first one's sync waits"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(*wal.durable.borrow() < first, "nothing is durable before its sync returns");
        assert_eq!(disk.syncs_waiting(), 1, "one sync at a time");
        drop(release);
        assert!(runtime.block_on(wal.wait_durable(second)), "the next sync covers the second");
    }
}
