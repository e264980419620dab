//! What waits for a store's writer thread, bounded by records and by bytes.
//!
//! Policy: **back-pressure**. A publisher of a durable topic whose record does not fit waits
//! until the writer has written enough (a record always fits an empty backlog); nothing is
//! dropped. The wait happens before the store's own locks are taken, so the writer never waits
//! on a publisher. When the writer stops (a failed disk), the backlog closes and nobody waits:
//! what is pushed after that is never acknowledged as durable.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Records waiting for a writer, at most.
pub(crate) const BACKLOG_RECORDS: usize = 65_536;
/// Bytes of records waiting for a writer, at most.
pub(crate) const BACKLOG_BYTES: usize = 64 << 20;

/// Where the record count starts in the `load` word; the bytes below can reach 1 TiB.
const RECORD_SHIFT: u32 = 40;
const RECORD_ONE: u64 = 1 << RECORD_SHIFT;
const BYTES_MASK: u64 = RECORD_ONE - 1;

/// See the module documentation. Admitting and releasing are one atomic operation each while
/// there is room: the lock and the condition variable are for publishers that wait, and a
/// release takes the lock only when one does (a durable publish costs no system call here).
#[derive(Debug)]
pub(crate) struct Backlog {
    /// The records (from `RECORD_SHIFT` up) and bytes (below) waiting for the writer.
    load: AtomicU64,
    closed: AtomicBool,
    /// Publishers waiting for room (counted under `lock`).
    waiters: AtomicUsize,
    lock: Mutex<()>,
    room: Condvar,
    max_records: usize,
    max_bytes: usize,
}

impl Default for Backlog {
    fn default() -> Self {
        Self::new(BACKLOG_RECORDS, BACKLOG_BYTES)
    }
}

impl Backlog {
    pub(crate) fn new(max_records: usize, max_bytes: usize) -> Self {
        Self {
            load: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            room: Condvar::new(),
            max_records,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a record of `len` bytes fits beside `load` (a record always fits an empty
    /// backlog, and anything fits a closed one).
    fn fits(&self, load: u64, len: u64) -> bool {
        let (records, bytes) = (load >> RECORD_SHIFT, load & BYTES_MASK);
        records == 0
            || (records < self.max_records as u64 && bytes + len <= self.max_bytes as u64)
            || self.closed.load(Ordering::SeqCst)
    }

    /// Waits until a record of `len` bytes fits, then counts it in.
    pub(crate) fn admit(&self, len: usize) {
        let len = (len as u64).min(BYTES_MASK);
        loop {
            let load = self.load.load(Ordering::SeqCst);
            if self.fits(load, len) {
                let counted = load.saturating_add(RECORD_ONE + len);
                if self
                    .load
                    .compare_exchange_weak(load, counted, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            // Counted as waiting before the last look: a release after that look sees the
            // count and notifies under the lock, which this waiter holds until it waits.
            let guard = self.lock();
            self.waiters.fetch_add(1, Ordering::SeqCst);
            if !self.fits(self.load.load(Ordering::SeqCst), len) {
                drop(self.room.wait(guard).unwrap_or_else(PoisonError::into_inner));
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The writer has written `records` records of `bytes` bytes.
    pub(crate) fn release(&self, records: usize, bytes: usize) {
        let (records, bytes) = (records as u64, (bytes as u64).min(BYTES_MASK));
        let _ = self.load.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |load| {
            let left_records = (load >> RECORD_SHIFT).saturating_sub(records);
            let left_bytes = (load & BYTES_MASK).saturating_sub(bytes);
            Some((left_records << RECORD_SHIFT) | left_bytes)
        });
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock();
            self.room.notify_all();
        }
    }

    /// The writer has stopped: nobody waits from now on.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.lock();
        self.room.notify_all();
    }
}

/// Closes the backlog when the writer thread ends, however it ends.
#[derive(Debug)]
pub(crate) struct CloseOnDrop<'a>(pub(crate) &'a Backlog);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_full_backlog_holds_publishers_until_the_writer_catches_up() {
        let backlog = Arc::new(Backlog::new(2, 100));
        backlog.admit(10);
        backlog.admit(10);
        let admitted = Arc::new(AtomicUsize::new(0));
        let (b, a) = (Arc::clone(&backlog), Arc::clone(&admitted));
        let publisher = std::thread::spawn(move || {
            b.admit(10);
            a.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(admitted.load(Ordering::SeqCst), 0, "past the record bound, it waits");
        backlog.release(1, 10);
        publisher.join().unwrap_or_else(|_| panic!("publisher panicked"));
        assert_eq!(admitted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn publishers_and_a_writer_racing_never_pass_the_bound_nor_lose_a_wake_up() {
        let backlog = Arc::new(Backlog::new(8, 1_000));
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let publishers: Vec<_> = (0..4)
            .map(|_| {
                let (backlog, tx) = (Arc::clone(&backlog), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let len = 10 + i % 90;
                        backlog.admit(len);
                        tx.send(len).unwrap_or_else(|_| panic!("the writer left"));
                    }
                })
            })
            .collect();
        drop(tx);
        let (mut held, mut bytes, mut taken) = (0, 0, 0);
        loop {
            let len = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(len) => len,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("a publisher waits for ever: lost wake-up")
                }
            };
            let load = backlog.load.load(Ordering::SeqCst);
            assert!(load >> RECORD_SHIFT <= 8, "past the record bound: {}", load >> RECORD_SHIFT);
            assert!(load & BYTES_MASK <= 1_000, "past the byte bound: {}", load & BYTES_MASK);
            (held, bytes, taken) = (held + 1, bytes + len, taken + 1);
            // The writer releases in batches of one to three, as a group commit does.
            if held == 3 || len % 2 == 0 {
                backlog.release(held, bytes);
                (held, bytes) = (0, 0);
            }
        }
        backlog.release(held, bytes);
        assert_eq!(taken, 80_000);
        for publisher in publishers {
            publisher.join().unwrap_or_else(|_| panic!("publisher panicked"));
        }
        assert_eq!(backlog.load.load(Ordering::SeqCst) >> RECORD_SHIFT, 0);
    }

    #[test]
    fn bytes_bound_too_but_one_record_always_fits_and_closing_frees_everyone() {
        let backlog = Arc::new(Backlog::new(100, 100));
        backlog.admit(1000); // larger than the bound, into an empty backlog
        let b = Arc::clone(&backlog);
        let publisher = std::thread::spawn(move || b.admit(1));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!publisher.is_finished(), "past the byte bound, it waits");
        backlog.close();
        publisher.join().unwrap_or_else(|_| panic!("publisher panicked"));
        backlog.admit(1_000_000); // closed: never waits
    }
}
