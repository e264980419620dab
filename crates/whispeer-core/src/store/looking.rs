//! How a store's writer thread waits for its next request: while requests come back soon after
//! a sync, as a pipelined publisher's do (its next publish waits for the last one's PUBACK), it
//! looks for the next one a while before it sleeps, since a thread put to sleep meanwhile costs
//! each of them its wake-up: tens of µs on an idle core of a virtual machine, where a
//! request comes back 110–140 µs after the sync (see ARCHITECTURE.md). One that came later (a
//! trickle, or the first after a pause) puts it back to sleeping at once, so an idle or lightly
//! used store does not spin. The write-ahead log's writer waits so (fsync `always`); SQLite's
//! does not: there a look took the first request at once and began a smaller transaction, and
//! throughput fell (see ARCHITECTURE.md).

use std::sync::mpsc::{Receiver, RecvError, TryRecvError};
use std::time::{Duration, Instant};

/// How long a writer looks for its next request, yielding its core in between, before it
/// sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// Waits for a channel's next item, looking for it up to [`SPIN`] first when the last one came
/// that soon after the looking began.
#[derive(Debug, Default)]
pub(crate) struct Looking {
    spin: bool,
}

impl Looking {
    /// The channel's next item, or the end once every sender is gone.
    pub(crate) fn next<T>(&mut self, rx: &Receiver<T>) -> Result<T, RecvError> {
        let started = Instant::now();
        if self.spin {
            loop {
                match rx.try_recv() {
                    Ok(item) => return Ok(item),
                    Err(TryRecvError::Disconnected) => return Err(RecvError),
                    Err(TryRecvError::Empty) => {}
                }
                if started.elapsed() >= SPIN {
                    break;
                }
                // A thread with work on this core runs meanwhile.
                std::thread::yield_now();
            }
        }
        let next = rx.recv();
        self.spin = started.elapsed() < SPIN;
        next
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::{Looking, SPIN};

    #[test]
    fn the_writer_looks_before_sleeping_only_while_requests_come_soon() {
        let (tx, rx) = mpsc::channel();
        let mut looking = Looking::default();
        tx.send(1).unwrap_or_default();
        assert_eq!(looking.next(&rx), Ok(1));
        assert!(looking.spin, "a request already there: look for the next one first");
        // One that comes after the spin: found by the sleep, and the next is waited for.
        let late = std::thread::spawn({
            let tx = tx.clone();
            move || {
                std::thread::sleep(SPIN * 20);
                tx.send(2).unwrap_or_default();
            }
        });
        assert_eq!(looking.next(&rx), Ok(2));
        assert!(!looking.spin, "a request that came late: sleep at once next time");
        late.join().unwrap_or_default();
        let soon = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(10));
            tx.send(3).unwrap_or_default();
        });
        soon.join().unwrap_or_default();
        assert_eq!(looking.next(&rx), Ok(3));
        assert!(looking.spin);
        // The sender gone: the end, also while looking.
        assert!(looking.next(&rx).is_err());
    }
}
