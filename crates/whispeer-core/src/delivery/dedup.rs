//! Idempotent publishing: the keys seen within the de-duplication window.
//!
//! A publish carrying an `idempotency-key` header is routed only if no publish to the same
//! topic carried the same key within the window; a repeat is acknowledged and dropped. Keys are
//! remembered in arrival order and forgotten when the window passes them, or earlier, oldest
//! first, when more than `max_keys` are held — the window is then shorter than configured, and
//! each such early eviction is counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// What one key check found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time within the window: route it.
    New,
    /// A repeat within the window: drop it.
    Repeat,
}

#[derive(Debug, Default)]
struct State {
    seen: HashMap<Box<[u8]>, Instant>,
    order: VecDeque<(Instant, Box<[u8]>)>,
}

/// Keys are per topic: the topic, a zero byte (never part of a topic), the key.
fn full_key(topic: &str, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(topic.len() + 1 + key.len());
    full.extend_from_slice(topic.as_bytes());
    full.push(0);
    full.extend_from_slice(key);
    full
}

/// The de-duplication window of a broker.
#[derive(Debug)]
pub(crate) struct Dedup {
    window: Duration,
    max_keys: usize,
    state: Mutex<State>,
}

impl Dedup {
    pub(crate) fn new(window: Duration, max_keys: usize) -> Self {
        Self { window, max_keys: max_keys.max(1), state: Mutex::default() }
    }

    /// Records `key` for `topic` at `now`; returns whether it is new, and how many keys were
    /// forgotten early to stay within `max_keys`.
    pub(crate) fn check(&self, topic: &str, key: &[u8], now: Instant) -> (Seen, u64) {
        let full = full_key(topic, key);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        while let Some((at, _)) = state.order.front() {
            if *at + self.window > now {
                break;
            }
            if let Some((at, old)) = state.order.pop_front()
                && state.seen.get(&old) == Some(&at)
            {
                state.seen.remove(&old);
            }
        }
        if let Some(at) = state.seen.get(full.as_slice())
            && *at + self.window > now
        {
            return (Seen::Repeat, 0);
        }
        let mut evicted = 0;
        while state.seen.len() >= self.max_keys {
            let Some((at, old)) = state.order.pop_front() else { break };
            if state.seen.get(&old) == Some(&at) {
                state.seen.remove(&old);
                evicted += 1;
            }
        }
        let full: Box<[u8]> = full.into();
        state.seen.insert(full.clone(), now);
        state.order.push_back((now, full));
        (Seen::New, evicted)
    }

    /// Forgets `key` for `topic`: its publish failed, so a retry must go through.
    pub(crate) fn forget(&self, topic: &str, key: &[u8]) {
        let full = full_key(topic, key);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.seen.remove(full.as_slice());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_only_and_per_topic() {
        let dedup = Dedup::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(dedup.check("a", b"k", t0).0, Seen::New);
        assert_eq!(dedup.check("a", b"k", t0 + Duration::from_secs(9)).0, Seen::Repeat);
        assert_eq!(dedup.check("b", b"k", t0 + Duration::from_secs(9)).0, Seen::New);
        assert_eq!(dedup.check("a", b"k", t0 + Duration::from_secs(10)).0, Seen::New);
        dedup.forget("a", b"k");
        assert_eq!(dedup.check("a", b"k", t0 + Duration::from_secs(11)).0, Seen::New);
    }

    #[test]
    fn holds_at_most_max_keys_forgetting_the_oldest_and_counting() {
        let dedup = Dedup::new(Duration::from_secs(60), 3);
        let now = Instant::now();
        for key in [b"1", b"2", b"3"] {
            assert_eq!(dedup.check("t", key, now), (Seen::New, 0));
        }
        assert_eq!(dedup.check("t", b"4", now), (Seen::New, 1));
        assert_eq!(dedup.check("t", b"1", now).0, Seen::New, "the oldest was forgotten");
        assert_eq!(dedup.check("t", b"4", now).0, Seen::Repeat);
    }
}
