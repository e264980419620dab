//! What a subscription that starts in history delivers before its live queue.
//!
//! Memory keeps a bounded tail of each retained topic. A durable topic's store keeps more: a
//! subscription that starts before memory's first offset (`StartAt::Earliest`, an older
//! offset, or a durable subscription resuming after an old commit) reads that older part from
//! the store, one page at a time as it is consumed, and then the in-memory part it took when it
//! subscribed. Nothing is skipped in between: memory's first offset at subscription time is
//! where the stored range ends.
//!
//! Order: the stored ranges topic by topic, each in offset order, then the in-memory part in
//! the order the broker accepted it (across topics).

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use whispeer_engines::Engines;
use whispeer_proto::Topic;

use crate::message::Message;
use crate::message::now_ms;
use crate::retention::expiry_of_stored;
use crate::store::{PageBound, Store};

/// Messages read from the store at a time, at most.
const PAGE: usize = 1024;
/// Payload bytes read from the store at a time, at most (a page always holds one message).
const PAGE_BYTES: usize = 4 << 20;

/// A part of a durable topic's history to read from the store: offsets `next..end`.
#[derive(Debug)]
pub(crate) struct StoredRange {
    pub(crate) topic: Topic,
    pub(crate) next: u64,
    pub(crate) end: u64,
}

/// The history a subscription delivers before its queue; see the module documentation. Most
/// subscriptions have none: then this is one empty pointer.
#[derive(Debug, Default)]
pub(crate) struct Replay(Option<Box<Pending>>);

struct Pending {
    store: Option<Arc<dyn Store>>,
    engines: Option<Arc<Engines>>,
    ranges: VecDeque<StoredRange>,
    /// The page being delivered.
    page: VecDeque<Message>,
    /// The in-memory history, delivered after the ranges.
    tail: Vec<Message>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("ranges", &self.ranges)
            .field("page", &self.page.len())
            .field("tail", &self.tail.len())
            .finish_non_exhaustive()
    }
}

impl Replay {
    pub(crate) fn new(
        store: Option<Arc<dyn Store>>,
        engines: Option<Arc<Engines>>,
        ranges: Vec<StoredRange>,
        tail: Vec<Message>,
    ) -> Self {
        let ranges: VecDeque<StoredRange> = ranges.into_iter().filter(|r| r.next < r.end).collect();
        if ranges.is_empty() && tail.is_empty() {
            return Self::default();
        }
        Self(Some(Box::new(Pending { store, engines, ranges, page: VecDeque::new(), tail })))
    }

    /// Whether nothing is left to deliver.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|pending| pending.is_empty())
    }

    /// The next message, reading the next page from the store when the last one is delivered;
    /// the history is let go once delivered.
    pub(crate) fn pop(&mut self) -> Option<Message> {
        let pending = self.0.as_mut()?;
        let next = pending.pop();
        if next.is_none() {
            self.0 = None;
        }
        next
    }
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.page.is_empty() && self.ranges.is_empty() && self.tail.is_empty()
    }

    fn pop(&mut self) -> Option<Message> {
        loop {
            if let Some(message) = self.page.pop_front() {
                return Some(message);
            }
            if !self.refill() {
                return None;
            }
        }
    }

    /// Loads the next page; `false` when nothing is left.
    fn refill(&mut self) -> bool {
        while let Some(range) = self.ranges.front_mut() {
            let Some(store) = &self.store else {
                self.ranges.clear();
                break;
            };
            let want = usize::try_from(range.end - range.next).unwrap_or(PAGE).min(PAGE);
            let records = match store.read(
                &range.topic,
                range.next,
                PageBound::new(want, PAGE_BYTES),
            ) {
                Ok(records) => records,
                Err(err) => {
                    // A disk that fails to read: said loudly, and the replay goes on with what
                    // can still be read rather than stalling the subscription for good.
                    tracing::error!(topic = %range.topic, from = range.next, %err, "cannot read stored history; this part of the replay is skipped");
                    self.ranges.pop_front();
                    continue;
                }
            };
            let (now, now_wall) = (Instant::now(), now_ms());
            let before = range.next;
            let mut page = VecDeque::with_capacity(records.len());
            for record in records {
                if record.offset >= range.end {
                    break;
                }
                if record.offset > range.next {
                    tracing::warn!(topic = %range.topic, from = range.next, to = record.offset - 1, "stored history has a gap (segments removed past the store's size bound)");
                }
                range.next = record.offset + 1;
                let Some(expires_at) =
                    expiry_of_stored(&record.envelope.headers, record.accepted_ms, now, now_wall)
                else {
                    continue;
                };
                let engines = self.engines.clone();
                page.push_back(Message::retained(
                    record.envelope,
                    true,
                    engines,
                    expires_at,
                    record.offset,
                ));
            }
            if range.next == before || range.next >= range.end {
                // The store holds nothing more below memory's first offset.
                self.ranges.pop_front();
            }
            if !page.is_empty() {
                self.page = page;
                return true;
            }
        }
        if self.tail.is_empty() {
            return false;
        }
        self.page = std::mem::take(&mut self.tail).into();
        true
    }
}
