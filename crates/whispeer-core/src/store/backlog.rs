//! What waits for a store's writer thread, bounded by records and by bytes.
//!
//! Policy: **back-pressure**. A publisher of a durable topic whose record does not fit waits
//! until the writer has written enough (a record always fits an empty backlog); nothing is
//! dropped. The wait happens before the store's own locks are taken, so the writer never waits
//! on a publisher. When the writer stops (a failed disk), the backlog closes and nobody waits:
//! what is pushed after that is never acknowledged as durable.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Records waiting for a writer, at most.
pub(crate) const BACKLOG_RECORDS: usize = 65_536;
/// Bytes of records waiting for a writer, at most.
pub(crate) const BACKLOG_BYTES: usize = 64 << 20;

#[derive(Debug, Default)]
struct State {
    records: usize,
    bytes: usize,
    closed: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Backlog {
    state: Mutex<State>,
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
        Self { state: Mutex::default(), room: Condvar::new(), max_records, max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a record of `len` bytes fits, then counts it in.
    pub(crate) fn admit(&self, len: usize) {
        let mut state = self.lock();
        while !state.closed
            && state.records > 0
            && (state.records >= self.max_records || state.bytes + len > self.max_bytes)
        {
            state = self.room.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.records += 1;
        state.bytes += len;
    }

    /// The writer has written `records` records of `bytes` bytes.
    pub(crate) fn release(&self, records: usize, bytes: usize) {
        let mut state = self.lock();
        state.records = state.records.saturating_sub(records);
        state.bytes = state.bytes.saturating_sub(bytes);
        self.room.notify_all();
    }

    /// The writer has stopped: nobody waits from now on.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
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
