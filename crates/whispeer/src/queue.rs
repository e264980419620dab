//! The bounded per-subscriber delivery queue and its slow-consumer policy.
//!
//! Many publishers push, one consumer pops. The queue is bounded twice: by message count
//! (`capacity`) and by bytes (`max_bytes`, payload bytes plus a fixed overhead per message). When
//! either bound would be exceeded, the subscriber's [`SlowConsumer`] policy decides what gives
//! way, and every such event is counted. A single message larger than `max_bytes` is still
//! accepted into an empty queue, so it can be delivered at all. Concurrent publishers can
//! overshoot the byte bound by at most one message each. Pushing never blocks and never awaits,
//! so it is safe under the router's read lock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// What a queued message counts against the byte bound: its payload and a fixed allowance for
/// the envelope and bookkeeping.
fn weight(message: &Message) -> usize {
    message.payload().len() + 256
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
    /// Bytes of the queued messages (see `weight`).
    bytes: AtomicUsize,
    max_bytes: usize,
    waker: AtomicWaker,
    closed: AtomicBool,
    policy: SlowConsumer,
    pub(crate) counters: Counters,
}

impl Queue {
    /// Creates a queue; `capacity` has been checked to be at least one.
    pub(crate) fn new(
        filter: Filter,
        capacity: usize,
        max_bytes: usize,
        policy: SlowConsumer,
    ) -> Self {
        Self {
            filter,
            items: ArrayQueue::new(capacity),
            bytes: AtomicUsize::new(0),
            max_bytes,
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
        let weight = weight(&message);
        let outcome = match self.policy {
            SlowConsumer::DropOldest => {
                let mut dropped = false;
                while self.over_bytes(weight) {
                    let Some(oldest) = self.items.pop() else { break };
                    self.release(&oldest);
                    dropped = true;
                    self.counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                }
                self.bytes.fetch_add(weight, Ordering::AcqRel);
                if let Some(oldest) = self.items.force_push(message) {
                    self.release(&oldest);
                    dropped = true;
                    self.counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                }
                if dropped { Pushed::DroppedOldest } else { Pushed::Queued }
            }
            policy => {
                let refused = if self.over_bytes(weight) {
                    true
                } else {
                    self.bytes.fetch_add(weight, Ordering::AcqRel);
                    let refused = self.items.push(message).is_err();
                    if refused {
                        self.bytes.fetch_sub(weight, Ordering::AcqRel);
                    }
                    refused
                };
                if refused {
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
                Pushed::Queued
            }
        };
        self.waker.wake();
        outcome
    }

    /// Whether adding `weight` bytes would pass the byte bound (never for an empty queue).
    fn over_bytes(&self, weight: usize) -> bool {
        let queued = self.bytes.load(Ordering::Acquire);
        queued > 0 && queued + weight > self.max_bytes
    }

    fn release(&self, message: &Message) {
        self.bytes.fetch_sub(weight(message), Ordering::AcqRel);
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
        self.release(&message);
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
