//! A queue under `SlowConsumer::BackPressure`: past its bounds it still queues, and the
//! publishers that pushed it there wait for room before they publish more
//! ([`Room`](crate::Room)), so its consumer's pace becomes theirs and nothing is dropped.
//!
//! Room is signalled, not polled: a waiting publisher marks the queue as waited on, and the
//! consumer that gives back room below the bounds ([`Queue::give_back`]) wakes every waiter.
//! The mark and the queue's load are each written by one side and read by the other with a
//! full fence between (as a lock would order them), so a waiter either sees the room or is
//! woken. A bound shared with other queues (a connection's budget) is freed by those queues'
//! consumers too, who do not know of this queue's waiters: a waiter also looks again every
//! [`LOOK_AGAIN`].
//!
//! Publishers that do not wait (an embedded publish whose caller never asks for room) meet a
//! hard bound, where the oldest messages give way as under `DropOldest`, counted there: memory
//! stays bounded whoever publishes. It lies past the queue's bounds by as much again, and by at
//! least [`SLACK_MESSAGES`] and [`SLACK_BYTES`]: publishers that do wait each go past the
//! bounds by what one of their reads brought (a server reads 64 KiB at a time, about 430
//! messages of 128 bytes), and many that fill one queue at once must not meet it.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BYTES_MASK, COUNT_SHIFT, Queue, SlowConsumer};

/// Messages past its count bound that a queue under back-pressure holds at least before its
/// oldest give way.
const SLACK_MESSAGES: u64 = 65_536;
/// Bytes past its byte bound, likewise (payloads plus 256 a message).
const SLACK_BYTES: usize = 16 << 20;

/// How often a waiting publisher looks at the queue again without a signal (room made in a
/// bound the queue shares with others).
const LOOK_AGAIN: Duration = Duration::from_millis(5);

/// What a queue under back-pressure keeps for the publishers waiting on it.
#[derive(Debug, Default)]
pub(crate) struct Pressure {
    /// A publisher waits for room (set by it; cleared by the consumer that wakes it).
    waited_on: AtomicBool,
    wake: Notify,
}

impl Pressure {
    /// Wakes every waiting publisher (the queue was closed).
    pub(super) fn wake_all(&self) {
        self.waited_on.store(false, Ordering::Relaxed);
        self.wake.notify_waiters();
    }
}

impl Queue {
    /// Whether the queue is past its hard bound for a message of `weight` (see the module's
    /// text): only there does a queue under back-pressure drop its oldest.
    pub(super) fn past_hard_bound(&self, weight: usize) -> bool {
        let load = self.load.load(Ordering::Acquire);
        let (count, queued) = (load >> COUNT_SHIFT, (load & BYTES_MASK) as usize);
        let capacity = self.capacity as u64;
        let max_bytes = self.max_bytes.saturating_add(self.max_bytes.max(SLACK_BYTES));
        count >= capacity + capacity.max(SLACK_MESSAGES)
            || (queued > 0 && queued.saturating_add(weight) > max_bytes)
    }

    /// Whether a publisher would be held back by this queue now: under back-pressure, open, and
    /// past a bound.
    #[inline]
    pub(crate) fn holds_back(&self) -> bool {
        // The policy lies beside the load, where a push looks; the signal, further on, is
        // touched only under back-pressure.
        self.policy == SlowConsumer::BackPressure && !self.is_closed() && self.is_full(0)
    }

    /// After room was given back: wakes the waiting publishers once the queue is within its
    /// bounds.
    #[inline]
    pub(super) fn room_made(&self) {
        if self.policy == SlowConsumer::BackPressure {
            self.wake_waiters();
        }
    }

    /// [`Queue::room_made`] under back-pressure, out of the common path's way.
    #[cold]
    #[inline(never)]
    fn wake_waiters(&self) {
        let Some(pressure) = self.pressure.as_deref() else { return };
        // Orders the load given back before the look at the mark (see the module's text).
        fence(Ordering::SeqCst);
        if pressure.waited_on.load(Ordering::Relaxed) && !self.is_full(0) {
            pressure.wake_all();
        }
    }

    /// Waits until the queue is within its bounds or closed (`true`), or `deadline` passes
    /// first (`false`).
    pub(crate) async fn room(&self, deadline: Instant) -> bool {
        let Some(pressure) = self.pressure.as_deref() else { return true };
        loop {
            let woken = pressure.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            pressure.waited_on.store(true, Ordering::Relaxed);
            // Orders the mark before the look at the load (see the module's text).
            fence(Ordering::SeqCst);
            if !self.holds_back() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(LOOK_AGAIN.min(deadline - now), woken).await;
        }
    }
}
