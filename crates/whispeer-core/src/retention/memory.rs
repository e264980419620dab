//! The bound on all topics' history together ([`BrokerOptions::history_max_bytes`]).
//!
//! Each topic's log keeps what its own rule allows, and every log adds what it holds to one
//! count. Past the bound, the broker's oldest messages go first, whatever their topic: a trim
//! takes the logs' oldest entries in the order the broker accepted them (a heap of each log's
//! first acceptance number) until the count is an eighth under the bound, so trims come once
//! per eighth of the bound appended rather than at every append. A trim runs after the
//! publish that passed the bound, with no topic's lock held, and takes one log's lock at a
//! time; trims run one at a time (a publisher that passed the bound while one ran waits for it,
//! then finds the bound kept or trims again).
//!
//! [`BrokerOptions::history_max_bytes`]: crate::BrokerOptions::history_max_bytes

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{TopicLog, lock};

/// What every topic's history holds together, against the bound.
#[derive(Debug)]
pub(crate) struct Memory {
    /// Bytes held by all logs (payloads plus 256 a message, as each log counts them).
    held: AtomicUsize,
    max: usize,
    /// Where a trim stops.
    low: usize,
    /// Messages evicted by trims.
    evicted: AtomicU64,
    /// Held by the trim running, if one is.
    trimming: Mutex<()>,
}

impl Memory {
    /// A count bounded by `max` bytes (`usize::MAX`: unbounded).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max,
            low: max - max / 8,
            evicted: AtomicU64::new(0),
            trimming: Mutex::new(()),
        }
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

    /// Evicts the oldest messages across `logs` until they hold an eighth under the bound;
    /// returns how many. Call it with no log's lock held. Trims run one at a time: one that
    /// waited for another finds the bound kept, most often, and returns at once.
    pub(crate) fn trim(&self, logs: &[Arc<Mutex<TopicLog>>]) -> u64 {
        let _trimming = self.trimming.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.is_over() {
            return 0;
        }
        let mut fronts: BinaryHeap<Reverse<(u64, usize)>> = logs
            .iter()
            .enumerate()
            .filter_map(|(i, log)| lock(log).first_seq().map(|seq| Reverse((seq, i))))
            .collect();
        let mut evicted = 0;
        while self.held() > self.low {
            let Some(Reverse((_, i))) = fronts.pop() else { break };
            // This log's messages older than every other log's oldest go now, together.
            let until = fronts.peek().map_or(u64::MAX, |Reverse((seq, _))| *seq);
            let mut log = lock(&logs[i]);
            while self.held() > self.low && log.first_seq().is_some_and(|seq| seq <= until) {
                log.evict_one();
                evicted += 1;
            }
            log.shrink();
            if let Some(seq) = log.first_seq() {
                fronts.push(Reverse((seq, i)));
            }
        }
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        evicted
    }
}
