//! Counters of the broker and of each subscription, and their snapshots.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::queue::Counters;

/// Broker-wide counters. Relaxed atomics: statistics, not synchronisation.
#[derive(Debug, Default)]
pub(crate) struct BrokerCounters {
    pub(crate) published: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) dropped_newest: AtomicU64,
    pub(crate) rejected_full: AtomicU64,
    pub(crate) disconnected: AtomicU64,
    pub(crate) held_back: AtomicU64,
    /// Shared with every routed queue, which adds what it still holds when it is dropped.
    pub(crate) discarded: Arc<AtomicU64>,
    pub(crate) rejected_by_plugins: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) open_errors: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) duplicates: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A snapshot of the broker's counters since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Messages accepted by `publish`.
    pub published: u64,
    /// Messages queued for a subscriber (one message to three subscribers counts three).
    pub deliveries: u64,
    /// Published messages that matched no subscriber.
    pub unrouted: u64,
    /// Queued messages dropped to make room (`SlowConsumer::DropOldest`).
    pub dropped_oldest: u64,
    /// New messages dropped at a full queue (`SlowConsumer::DropNewest`).
    pub dropped_newest: u64,
    /// New messages refused at a full queue, failing the publish (`SlowConsumer::FailPublish`).
    pub rejected_full: u64,
    /// Subscriptions closed at a full queue (`SlowConsumer::Disconnect`), or under
    /// `SlowConsumer::BackPressure` after making no room for a waiting publisher within
    /// `BrokerOptions::back_pressure_timeout`.
    pub disconnected: u64,
    /// Times a publisher waited for room in a full queue (`SlowConsumer::BackPressure`): one a
    /// queue each time [`Room::wait`](crate::Room::wait) found it past its bounds.
    pub held_back: u64,
    /// Messages still queued when their subscription closed (unsubscribed, its connection
    /// gone, disconnected as a slow consumer, or a lingering group removed): queued, never
    /// taken. With the other counters, every queued message is accounted for:
    /// `deliveries = taken + dropped_oldest + expired + discarded + still queued`.
    pub discarded: u64,
    /// Publishes refused by a plugin.
    pub rejected_by_plugins: u64,
    /// Messages a subscriber could not decode into its type.
    pub decode_errors: u64,
    /// Messages a subscriber could not open: wrong or unknown key, tampering, corruption.
    pub open_errors: u64,
    /// Callback invocations that panicked (the subscriber goes on).
    pub callback_panics: u64,
    /// Messages dropped unseen because their time to live ran out.
    pub expired: u64,
    /// QoS 1 deliveries acknowledged.
    pub acked: u64,
    /// QoS 1 deliveries refused by their subscriber (with or without requeue).
    pub nacked: u64,
    /// QoS 1 redeliveries (after a timeout, a nack with requeue or a member leaving a group).
    pub redelivered: u64,
    /// Messages given up and published to `$dlq/<topic>`.
    pub dead_lettered: u64,
    /// Duplicates dropped: publishes with an idempotency key seen within the window, and
    /// copies of a message whose id was already in flight to the same subscription.
    pub duplicates: u64,
    /// Live subscriptions (a queue group counts once).
    pub subscriptions: usize,
    /// Bytes of history all topics keep in memory (payloads plus 256 a message).
    pub history_bytes: usize,
    /// Messages evicted from history before their topic's own bound, because all topics'
    /// history together passed `BrokerOptions::history_max_bytes`.
    pub history_evicted: u64,
}

impl BrokerCounters {
    pub(crate) fn snapshot(&self, subscriptions: usize) -> BrokerStats {
        BrokerStats {
            published: get(&self.published),
            deliveries: get(&self.deliveries),
            unrouted: get(&self.unrouted),
            dropped_oldest: get(&self.dropped_oldest),
            dropped_newest: get(&self.dropped_newest),
            rejected_full: get(&self.rejected_full),
            disconnected: get(&self.disconnected),
            held_back: get(&self.held_back),
            discarded: get(&self.discarded),
            rejected_by_plugins: get(&self.rejected_by_plugins),
            decode_errors: get(&self.decode_errors),
            open_errors: get(&self.open_errors),
            callback_panics: get(&self.callback_panics),
            expired: get(&self.expired),
            acked: get(&self.acked),
            nacked: get(&self.nacked),
            redelivered: get(&self.redelivered),
            dead_lettered: get(&self.dead_lettered),
            duplicates: get(&self.duplicates),
            subscriptions,
            history_bytes: 0,
            history_evicted: 0,
        }
    }
}

/// A snapshot of one subscription's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Messages taken off the queue by the subscriber.
    pub received: u64,
    /// Messages waiting in the queue.
    pub queued: usize,
    /// Queued messages dropped to make room.
    pub dropped_oldest: u64,
    /// New messages dropped because the queue was full.
    pub dropped_newest: u64,
    /// New messages refused because the queue was full, failing their publish.
    pub rejected_full: u64,
    /// Received messages that did not decode into the subscriber's type.
    pub decode_errors: u64,
    /// Received messages that did not open (wrong or unknown key, tampering, corruption).
    pub open_errors: u64,
    /// Callback invocations that panicked.
    pub callback_panics: u64,
    /// Messages dropped unseen because their time to live ran out.
    pub expired: u64,
    /// QoS 1 deliveries acknowledged.
    pub acked: u64,
    /// QoS 1 deliveries refused (nack).
    pub nacked: u64,
    /// QoS 1 redeliveries.
    pub redelivered: u64,
    /// Messages of this subscription given up to `$dlq/<topic>`.
    pub dead_lettered: u64,
    /// QoS 1 messages delivered and not yet acknowledged, or waiting for redelivery.
    pub unacked: usize,
}

impl Counters {
    pub(crate) fn snapshot(&self, queued: usize, unacked: usize) -> SubscriptionStats {
        SubscriptionStats {
            received: get(&self.received),
            queued,
            dropped_oldest: get(&self.dropped_oldest),
            dropped_newest: get(&self.dropped_newest),
            rejected_full: get(&self.rejected_full),
            decode_errors: get(&self.decode_errors),
            open_errors: get(&self.open_errors),
            callback_panics: get(&self.callback_panics),
            expired: get(&self.expired),
            acked: get(&self.acked),
            nacked: get(&self.nacked),
            redelivered: get(&self.redelivered),
            dead_lettered: get(&self.dead_lettered),
            unacked,
        }
    }
}
