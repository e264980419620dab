//! The bound on all topics' history together ([`BrokerOptions::history_max_bytes`]).
//!
//! Each topic's log keeps what its own rule allows, and every log adds what it holds to one
//! count. Past the bound, the broker's oldest messages go first, whatever their topic, until
//! the count is back within it: a publish that passed it evicts a message or two, so no
//! publish pays for many. Which log holds the oldest comes from `order`, a heap of each
//! non-empty log's oldest acceptance number, kept as a lower bound: a log enters it when its
//! first message comes, and an entry that evictions by the log's own rule made stale (the log's
//! oldest is newer by now) is put back with the right number when it comes up. So finding the
//! oldest costs a heap's step, not a look at every topic.
//!
//! Locks: a trim runs after the publish that passed the bound, with no log's lock held, and
//! trims run one at a time (`trimming`). A log's lock is taken before `order`'s, never after
//! (an append puts its log in `order` under its own lock).
//!
//! [`BrokerOptions::history_max_bytes`]: crate::BrokerOptions::history_max_bytes

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};

use super::{TopicLog, lock};

/// What every topic's history holds together, against the bound.
#[derive(Debug)]
pub(crate) struct Memory {
    /// Bytes held by all logs (payloads plus 256 a message, as each log counts them).
    held: AtomicUsize,
    max: usize,
    /// Messages evicted by trims.
    evicted: AtomicU64,
    /// Held by the trim running, if one is.
    trimming: Mutex<()>,
    /// (oldest acceptance number, log) of the logs that hold messages; a lower bound.
    order: Mutex<BinaryHeap<Reverse<(u64, usize)>>>,
    /// Every log, by its number (logs are never removed).
    logs: RwLock<Vec<Weak<Mutex<TopicLog>>>>,
}

impl Memory {
    /// A count bounded by `max` bytes (`usize::MAX`: unbounded).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max,
            evicted: AtomicU64::new(0),
            trimming: Mutex::new(()),
            order: Mutex::new(BinaryHeap::new()),
            logs: RwLock::new(Vec::new()),
        }
    }

    /// Registers the log `make` makes with the number it is given.
    pub(super) fn register(
        &self,
        make: impl FnOnce(usize) -> Arc<Mutex<TopicLog>>,
    ) -> Arc<Mutex<TopicLog>> {
        let mut logs = self.logs.write().unwrap_or_else(PoisonError::into_inner);
        let log = make(logs.len());
        logs.push(Arc::downgrade(&log));
        log
    }

    fn order(&self) -> MutexGuard<'_, BinaryHeap<Reverse<(u64, usize)>>> {
        self.order.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Log `id`, whose oldest message is now `seq`, is in the order (call it under the log's
    /// lock).
    pub(super) fn ordered(&self, id: usize, seq: u64) {
        self.order().push(Reverse((seq, id)));
    }

    pub(super) fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn sub(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes all topics' history holds now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Messages evicted so far because all history together passed the bound.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Whether all history together holds more than the bound.
    pub(crate) fn is_over(&self) -> bool {
        self.held() > self.max
    }

    /// Evicts the oldest messages across all logs until they are within the bound; returns
    /// how many. Call it with no log's lock held.
    pub(crate) fn trim(&self) -> u64 {
        let _trimming = self.trimming.lock().unwrap_or_else(PoisonError::into_inner);
        let mut evicted = 0;
        while self.is_over() {
            let Some(Reverse((_, id))) = self.order().pop() else { break };
            let logs = self.logs.read().unwrap_or_else(PoisonError::into_inner);
            let Some(log) = logs.get(id).and_then(Weak::upgrade) else { continue };
            drop(logs);
            let mut log = lock(&log);
            // Its messages older than every other log's oldest (as far as the order knows) go
            // now, while the bound is passed.
            let until = self.order().peek().map_or(u64::MAX, |Reverse((seq, _))| *seq);
            while self.is_over() && log.first_seq().is_some_and(|seq| seq <= until) {
                log.evict_one();
                evicted += 1;
            }
            log.shrink();
            match log.first_seq() {
                Some(seq) => self.ordered(id, seq),
                None => log.ordered = false,
            }
        }
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        evicted
    }
}
