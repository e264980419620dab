//! What the connection task keeps per subscription: what to send again on reconnect, the ids
//! acknowledged lately, and the shapes of deliveries and acks on their way.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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
    pub(super) duplicates: Arc<AtomicU64>,
    /// The last history offset received, to resume after a reconnect.
    pub(super) last_offset: Option<u64>,
}
