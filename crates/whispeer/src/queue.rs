//! The bounded per-subscriber delivery queue and its slow-consumer policy.
//!
//! Many publishers push, one consumer pops. The queue never grows past its capacity: when it is
//! full, the subscriber's [`SlowConsumer`] policy decides what gives way, and every such event is
//! counted. Pushing never blocks and never awaits, so it is safe under the router's read lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

use whispeer_proto::Filter;

use crate::Message;

/// What happens when a message arrives for a subscriber whose queue is full.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Drop the oldest queued message to make room; counted in `dropped_oldest`.
    #[default]
    DropOldest,
    /// Drop the new message; counted in `dropped_newest`.
    DropNewest,
    /// Refuse the new message and make `publish` return `PublishError::QueueFull`; counted in
    /// `rejected_full`. Other subscribers still get the message.
    FailPublish,
    /// Close the subscription: its stream ends and its callback task stops; counted in
    /// `disconnected`.
    Disconnect,
}

/// The result of offering one message to one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued without loss.
    Queued,
    /// Queued after dropping the oldest message.
    DroppedOldest,
    /// Not queued; dropped by policy.
    DroppedNewest,
    /// Not queued; the publish must report it.
    Full,
    /// Not queued; the subscription has just been closed by policy.
    Disconnected,
    /// Not queued; the subscription was already closed.
    Closed,
}

/// Counters of one subscription. Relaxed atomics: they are statistics, not synchronisation.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) dropped_newest: AtomicU64,
    pub(crate) rejected_full: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) open_errors: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
}

/// A bounded multi-producer, single-consumer queue of messages with a wake-up for its consumer.
#[derive(Debug)]
pub(crate) struct Queue {
    /// The subscription's filter, kept here so the queue alone can find its route.
    pub(crate) filter: Filter,
    items: ArrayQueue<Message>,
    waker: AtomicWaker,
    closed: AtomicBool,
    policy: SlowConsumer,
    pub(crate) counters: Counters,
}

impl Queue {
    /// Creates a queue; `capacity` has been checked to be at least one.
    pub(crate) fn new(filter: Filter, capacity: usize, policy: SlowConsumer) -> Self {
        Self {
            filter,
            items: ArrayQueue::new(capacity),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(false),
            policy,
            counters: Counters::default(),
        }
    }

    /// Offers a message, applying the slow-consumer policy when full.
    pub(crate) fn push(&self, message: Message) -> Pushed {
        if self.is_closed() {
            return Pushed::Closed;
        }
        let outcome = match self.policy {
            SlowConsumer::DropOldest => match self.items.force_push(message) {
                None => Pushed::Queued,
                Some(_oldest) => {
                    self.counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                    Pushed::DroppedOldest
                }
            },
            policy => match self.items.push(message) {
                Ok(()) => Pushed::Queued,
                Err(_rejected) => {
                    return match policy {
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
                    };
                }
            },
        };
        self.waker.wake();
        outcome
    }

    /// Takes the next message, or learns that there is none yet (`Pending`, with the waker
    /// registered) or ever again (`Ready(None)`, once closed). Messages queued before the
    /// close are discarded: closing means the subscriber is gone.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if self.is_closed() {
            return Poll::Ready(None);
        }
        if let Some(message) = self.items.pop() {
            return Poll::Ready(Some(self.received(message)));
        }
        self.waker.register(cx.waker());
        // A push between the first pop and the registration would otherwise go unnoticed.
        if let Some(message) = self.items.pop() {
            return Poll::Ready(Some(self.received(message)));
        }
        if self.is_closed() { Poll::Ready(None) } else { Poll::Pending }
    }

    /// Takes the next message without waiting.
    pub(crate) fn try_pop(&self) -> Option<Message> {
        if self.is_closed() {
            return None;
        }
        self.items.pop().map(|m| self.received(m))
    }

    fn received(&self, message: Message) -> Message {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        message
    }

    /// Closes the queue and wakes the consumer so it can see the end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }
}
