//! Spare message allocations, kept per thread for the next message made on it.
//!
//! Every publish makes one `Message` allocation and its last holder frees it. glibc's
//! per-thread cache keeps only seven freed blocks of a size, so a thread that makes a batch of
//! messages and then frees the batch (a runtime worker running a publisher and then the
//! subscriber it woke, a server connection's reader and then the writer it woke) went through
//! the allocator's arena, under its lock, for most of them. Here the last holder of a message
//! keeps its allocation, emptied, for the next message made on the same thread.
//!
//! Bound and policy: at most [`KEPT`] spares a thread (256 bytes each, 32 KiB in all); the
//! last holder of a message beyond it frees the allocation as before, so a thread that only
//! drops messages other threads made fills up once and then costs a length check. A spare holds nothing of its message but the topic (shared
//! text, dropped when the spare is reused): the payload, headers, opened plaintext, decoded
//! value and the broker's engines are dropped as the message is.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use whispeer_proto::{Envelope, Flags, MessageId, Topic};

use super::Inner;

/// Most spare allocations one thread keeps.
pub(super) const KEPT: usize = 128;

struct Spares {
    free: Vec<Arc<Inner>>,
    /// What a message being dropped holds for the moment its own allocation is taken out.
    stand_in: Option<Arc<Inner>>,
}

thread_local! {
    static SPARES: RefCell<Spares> = const {
        RefCell::new(Spares { free: Vec::new(), stand_in: None })
    };
}

/// A spare allocation of this thread's (the only reference to it), if it has one.
pub(super) fn take() -> Option<Arc<Inner>> {
    SPARES.try_with(|spares| spares.borrow_mut().free.pop()).ok().flatten()
}

/// Keeps `spare` (emptied, the only reference to it) for this thread's next message, unless
/// it keeps [`KEPT`] already or is ending; then `spare` is freed.
pub(super) fn keep(spare: Arc<Inner>) {
    let refused = SPARES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.free.len() < KEPT {
            spares.free.push(spare);
            None
        } else {
            Some(spare)
        }
    });
    // Freed outside the borrow.
    drop(refused);
}

/// This thread's stand-in: an empty message's allocation that a message being dropped holds
/// while its own is taken out to be kept. `None` when there is no room for another spare (a
/// thread that only drops messages others made fills up and then frees them, as without
/// spares), or while the thread is ending.
pub(super) fn stand_in() -> Option<Arc<Inner>> {
    SPARES
        .try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.free.len() >= KEPT {
                return None;
            }
            if spares.stand_in.is_none() {
                spares.stand_in = empty().map(Arc::new);
            }
            spares.stand_in.clone()
        })
        .ok()
        .flatten()
}

/// How many spares this thread keeps.
#[cfg(test)]
pub(super) fn kept() -> usize {
    SPARES.try_with(|spares| spares.borrow().free.len()).unwrap_or(0)
}

fn empty() -> Option<Inner> {
    let topic = Topic::parse("spare").ok()?;
    let envelope = Envelope::new(MessageId(0), topic, 0, Flags::default(), Bytes::new());
    Some(Inner::new(envelope, false, None, None, 0))
}
