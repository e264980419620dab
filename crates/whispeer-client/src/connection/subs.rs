//! What the connection task keeps per subscription: what to send again on reconnect, the ids
//! acknowledged lately, and the shapes of deliveries and acks on their way.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;
use whispeer_proto::{Body, Envelope, Filter, MessageId, Qos, StartAt};

/// What a subscription asks the server for; sent again on every reconnect.
#[derive(Clone, Debug)]
pub(crate) struct SubSpec {
    pub(crate) filter: Filter,
    pub(crate) qos: Qos,
    pub(crate) prefetch: u32,
    pub(crate) group: Option<String>,
    pub(crate) start: StartAt,
}

impl SubSpec {
    pub(super) fn frame(&self, sub: u32) -> Body {
        Body::Subscribe {
            sub,
            qos: self.qos,
            filter: self.filter.clone(),
            prefetch: self.prefetch,
            group: self.group.clone(),
            start: self.start,
        }
    }

    /// Where a re-subscription starts: after the last offset received on an exact topic, so
    /// nothing retained is missed or repeated; otherwise with new messages only (replaying
    /// from the original start again would repeat what was delivered).
    pub(super) fn resume(&mut self, last_offset: Option<u64>) {
        self.start = match last_offset {
            Some(offset) if self.filter.is_exact() => StartAt::Offset(offset + 1),
            _ => StartAt::Latest,
        };
    }
}

/// A delivery on its way to its subscription.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) envelope: Envelope,
    pub(crate) attempt: u32,
    pub(crate) offset: u64,
}

/// A QoS 1 delivery's settlement: `requeue: None` acks, `Some(r)` nacks.
#[derive(Debug)]
pub(crate) struct Settle {
    pub(crate) sub: u32,
    pub(crate) id: MessageId,
    pub(crate) requeue: Option<bool>,
}

/// Ids a subscription acked lately, oldest forgotten first.
#[derive(Debug, Default)]
pub(super) struct RecentIds {
    pub(super) order: VecDeque<MessageId>,
    pub(super) set: HashSet<MessageId>,
}

impl RecentIds {
    pub(super) fn remember(&mut self, id: MessageId, capacity: usize) {
        if capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// A live subscription as the connection task knows it.
pub(super) struct Sub {
    pub(super) spec: SubSpec,
    pub(super) deliver: mpsc::Sender<Incoming>,
    pub(super) acked: RecentIds,
    pub(super) buffer: Arc<Buffer>,
    /// The last history offset received, to resume after a reconnect.
    pub(super) last_offset: Option<u64>,
}

/// What the connection task and a subscription share: its buffer's bytes (bounded, so a burst is
/// held by bytes rather than by a small message count) and its counters.
#[derive(Debug)]
pub(crate) struct Buffer {
    bytes: AtomicUsize,
    max_bytes: usize,
    pub(crate) duplicates: AtomicU64,
    dropped: AtomicU64,
}

impl Buffer {
    pub(crate) fn new(max_bytes: usize) -> Self {
        let (bytes, duplicates, dropped) =
            (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0));
        Self { bytes, max_bytes, duplicates, dropped }
    }

    /// What a buffered message weighs: its payload and an allowance for the envelope.
    pub(crate) fn weight(incoming: &Incoming) -> usize {
        Self::weight_of(incoming.envelope.payload.len())
    }

    /// What a message with a payload of `len` bytes weighs.
    pub(crate) fn weight_of(len: usize) -> usize {
        len + 256
    }

    /// Messages dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Takes room for `weight` bytes; `false` (counted as dropped) when the buffer is full. A
    /// message always fits an empty buffer.
    pub(crate) fn admit(&self, weight: usize) -> bool {
        let held = self.bytes.load(Ordering::Acquire);
        if held > 0 && held + weight > self.max_bytes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.bytes.fetch_add(weight, Ordering::AcqRel);
        true
    }

    /// Gives back the room of a message taken off the buffer (or refused after all).
    pub(crate) fn release(&self, weight: usize) {
        self.bytes.fetch_sub(weight, Ordering::AcqRel);
    }

    /// Counts a message dropped for another reason (the count bound).
    pub(crate) fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}
