//! The slow-consumer policy: what gives way when a message meets a full queue.

use std::sync::atomic::Ordering;

use super::{Pushed, Queue};

/// What happens when a message arrives for a subscriber whose queue is full.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Drop the oldest queued message to make room; counted in `dropped_oldest`.
    #[default]
    DropOldest,
    /// Hold the publishers back: the message is queued past the bound, and the publisher waits
    /// for room before it publishes more ([`Broker::room`](crate::Broker::room); a server
    /// stops reading the publishing connection). Nothing is dropped while publishers wait. A
    /// subscriber that gives no room within `BrokerOptions::back_pressure_timeout` is closed
    /// as under `Disconnect`, so one stalled reader cannot stop publishers for ever; a queue
    /// whose publishers never wait drops its oldest past its bounds and as much again (at least
    /// 65,536 messages and 16 MiB more).
    BackPressure,
    /// Drop the new message; counted in `dropped_newest`.
    DropNewest,
    /// Refuse the new message and make `publish` return `PublishError::QueueFull`; counted in
    /// `rejected_full`. Other subscribers still get the message.
    FailPublish,
    /// Close the subscription: its stream ends and its callback task stops; counted in
    /// `disconnected`.
    Disconnect,
}

impl Queue {
    /// Whether a push of `weight` must first drop the oldest message: past the bounds under
    /// `DropOldest`, past its hard bound under `BackPressure` (`pressure.rs`).
    pub(super) fn must_drop(&self, weight: usize) -> bool {
        match self.policy {
            SlowConsumer::BackPressure => self.past_hard_bound(weight),
            _ => self.is_full(weight),
        }
    }

    /// Whether pushes to this queue may be held back and made together ([`crate::PushBatch`]):
    /// under `DropOldest` and `BackPressure` a push always queues, so its publisher needs no
    /// answer from it (but whether to wait for room, which the batch notes).
    pub(crate) fn takes_batches(&self) -> bool {
        // The two policies come first (one comparison).
        matches!(self.policy, SlowConsumer::DropOldest | SlowConsumer::BackPressure)
    }

    /// A message refused by a full queue, under a policy other than `DropOldest`.
    pub(super) fn refuse(&self) -> Pushed {
        match self.policy {
            SlowConsumer::DropNewest => {
                self.counters.dropped_newest.fetch_add(1, Ordering::Relaxed);
                Pushed::DroppedNewest
            }
            SlowConsumer::FailPublish => {
                self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                Pushed::Full
            }
            _ => {
                self.close();
                Pushed::Disconnected
            }
        }
    }
}
