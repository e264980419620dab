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
use whispeer_proto::MessageId;

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
    /// Keys of publishes accepted but not yet confirmed (a store's sync, a cluster engine's
    /// answer), by message id: a failed confirmation forgets the key, so the retry goes
    /// through. Dropped with the window if nobody asks.
    pending: HashMap<MessageId, Box<[u8]>>,
    pending_order: VecDeque<(Instant, MessageId)>,
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

    /// Notes that the publish `id` with `key` for `topic` waits for a confirmation: see
    /// [`Dedup::confirmed`].
    pub(crate) fn pending(&self, id: MessageId, topic: &str, key: &[u8], now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        while let Some((at, old)) = state.pending_order.front() {
            if *at + self.window > now && state.pending_order.len() < self.max_keys {
                break;
            }
            state.pending.remove(old);
            state.pending_order.pop_front();
        }
        state.pending.insert(id, full_key(topic, key).into());
        state.pending_order.push_back((now, id));
    }

    /// The publish `id` was confirmed (`kept`), or not: then its key is forgotten, so that a
    /// retry with it is not taken for a repeat of a message that was never kept.
    pub(crate) fn confirmed(&self, id: MessageId, kept: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(full) = state.pending.remove(&id)
            && !kept
        {
            state.seen.remove(&full);
        }
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
    fn a_key_whose_publish_was_not_confirmed_is_forgotten() {
        let dedup = Dedup::new(Duration::from_secs(10), 100);
        let now = Instant::now();
        for (n, key) in [b"kept", b"lost"].iter().enumerate() {
            assert_eq!(dedup.check("t", *key, now).0, Seen::New);
            dedup.pending(MessageId(n as u128), "t", *key, now);
        }
        dedup.confirmed(MessageId(0), true);
        dedup.confirmed(MessageId(1), false);
        assert_eq!(dedup.check("t", b"kept", now).0, Seen::Repeat);
        assert_eq!(dedup.check("t", b"lost", now).0, Seen::New, "the retry goes through");
        // Nobody asked: the pending entry goes with the window.
        dedup.pending(MessageId(2), "t", b"late", now);
        dedup.pending(MessageId(3), "t", b"later", now + Duration::from_secs(10));
        assert!(!dedup.state.lock().unwrap().pending.contains_key(&MessageId(2)));
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
