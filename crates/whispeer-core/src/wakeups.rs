//! Wake-ups of queue consumers held back while a thread publishes a batch
//! ([`PushBatch`](crate::PushBatch), `staging.rs`), made when it ends.
//!
//! A server connection's reader pushes a QoS 1 message at once (its queue must say whether it
//! took it), then hands the PUBACK to its own connection's writer: two tasks woken on one
//! worker, and the runtime moves the first woken to another worker. Woken last, the subscriber
//! connection's writer runs next on the reader's worker, with the message still in its cache,
//! and the PUBACK crosses instead (see ARCHITECTURE.md).
//!
//! Its own module, apart from `staging.rs`: the queue wakes through it, and the batch (which
//! pushes to queues) holds it.

use std::cell::RefCell;
use std::task::Waker;

/// Most wake-ups held back at once; past it, a wake-up is made at once.
const MOST: usize = 64;

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held { depth: 0, wakers: Vec::new() }) };
}

/// The thread's held wake-ups, and how many holds are begun and not ended.
struct Held {
    depth: usize,
    wakers: Vec<Waker>,
}

/// Begins holding back this thread's wake-ups (holds nest: the outermost [`release`] wakes).
pub(crate) fn hold() {
    HELD.with(|held| held.borrow_mut().depth += 1);
}

/// Ends a hold; the outermost wakes what was held, in the order it was held.
pub(crate) fn release() {
    let mut wakers = HELD.with(|held| {
        let mut held = held.borrow_mut();
        held.depth -= 1;
        // Taken only when there is something to wake: an empty list keeps its room here.
        if held.depth > 0 || held.wakers.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut held.wakers)
        }
    });
    if wakers.is_empty() {
        return;
    }
    wakers.drain(..).for_each(Waker::wake);
    // The list keeps its room for the next hold.
    HELD.with(|held| {
        if let Ok(mut held) = held.try_borrow_mut()
            && held.wakers.is_empty()
        {
            held.wakers = wakers;
        }
    });
}

/// Wakes `waker`, a queue's consumer after a push: at once, or, while a hold is begun on this
/// thread, when it ends (up to [`MOST`] of them; past that, at once).
pub(crate) fn wake(waker: Waker) {
    let now = HELD.with(|held| {
        let Ok(mut held) = held.try_borrow_mut() else { return Some(waker) };
        if held.depth == 0 || held.wakers.len() >= MOST {
            return Some(waker);
        }
        held.wakers.push(waker);
        None
    });
    if let Some(waker) = now {
        waker.wake();
    }
}
