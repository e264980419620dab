//! Requests awaiting their answers, by correlation id.
//!
//! Acknowledged publishes are most of them — a pipelined publisher keeps thousands in flight —
//! and the outbox numbers publishes in turn, so their waiters are kept in a ring in that order:
//! a PUBACK mostly answers the oldest, at the front; one that overtakes others is found by a
//! binary search and its slot emptied, and emptied slots leave as the front reaches them (or
//! all at once when they are most of the ring: a publish left unanswered for long while later
//! ones are answered holds at most four slots per waiter). In a hash map of tens of thousands
//! of waiters each PUBACK cost a cache miss or two (12 % of the QoS 1 bench's client). Other
//! requests (subscribes, flushes) are few and stay in a map.

use std::collections::VecDeque;

use super::outbox::{AckWaiter, PUBLISH_BIT, is_publish};
use super::{Map, Pending};

#[derive(Default)]
pub(super) struct Requests {
    /// Publishes' waiters in the order of their correlation ids (wrapping below `PUBLISH_BIT`);
    /// `None` once answered, until the front passes it.
    publishes: VecDeque<(u32, Option<AckWaiter>)>,
    /// The slots of `publishes` still waiting.
    waiting: usize,
    others: Map<Pending>,
}

/// Below this many slots the ring is never compacted.
const COMPACT_FROM: usize = 1024;

impl Requests {
    pub(super) fn insert(&mut self, correlation: u32, pending: Pending) {
        match pending {
            Pending::Ack(ack) if is_publish(correlation) && self.after_the_last(correlation) => {
                self.publishes.push_back((correlation, Some(ack)));
                self.waiting += 1;
            }
            other => {
                self.others.insert(correlation, other);
            }
        }
    }

    /// Takes out the request `correlation` answers.
    pub(super) fn remove(&mut self, correlation: u32) -> Option<Pending> {
        if is_publish(correlation)
            && let Some(ack) = self.take_publish(correlation)
        {
            return Some(Pending::Ack(ack));
        }
        self.others.remove(&correlation)
    }

    /// Every request still waiting (the connection is gone).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.waiting = 0;
        let publishes = self.publishes.drain(..).filter_map(|(_, ack)| ack.map(Pending::Ack));
        publishes.chain(self.others.drain().map(|(_, pending)| pending))
    }

    /// How far past the ring's front `correlation` is, in the publishes' numbering.
    fn distance(&self, correlation: u32) -> u32 {
        let front = self.publishes.front().map_or(correlation, |&(first, _)| first);
        correlation.wrapping_sub(front) & !PUBLISH_BIT
    }

    /// Whether `correlation` comes after every publish in the ring (as the outbox numbers
    /// them; anything else waits in the map).
    fn after_the_last(&self, correlation: u32) -> bool {
        match self.publishes.back() {
            None => true,
            Some(&(last, _)) => {
                let (at, last) = (self.distance(correlation), self.distance(last));
                at > last && at < PUBLISH_BIT / 2
            }
        }
    }

    fn take_publish(&mut self, correlation: u32) -> Option<AckWaiter> {
        let at = match self.publishes.front() {
            Some(&(first, _)) if first == correlation => 0,
            _ => {
                let at = self.distance(correlation);
                let found = self.publishes.binary_search_by_key(&at, |&(c, _)| self.distance(c));
                found.ok()?
            }
        };
        let ack = self.publishes.get_mut(at)?.1.take()?;
        self.waiting -= 1;
        while self.publishes.front().is_some_and(|(_, ack)| ack.is_none()) {
            self.publishes.pop_front();
        }
        if self.publishes.len() > COMPACT_FROM.max(4 * self.waiting) {
            // In order still: the binary search holds.
            self.publishes.retain(|(_, ack)| ack.is_some());
        }
        Some(ack)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn waiter() -> (AckWaiter, oneshot::Receiver<Result<(), crate::ClientError>>) {
        let (told, answer) = oneshot::channel();
        (AckWaiter::Told(told), answer)
    }

    fn publish(n: u32) -> u32 {
        PUBLISH_BIT | (n & !PUBLISH_BIT)
    }

    #[test]
    fn publishes_are_answered_in_any_order_and_the_ring_empties() {
        let mut requests = Requests::default();
        let mut receivers = Vec::new();
        // Around the wrap of the publishes' numbering, with gaps (QoS 0 publishes between).
        let numbers = [PUBLISH_BIT - 3, PUBLISH_BIT - 1, 0, 1, 4];
        for n in numbers {
            let (ack, rx) = waiter();
            requests.insert(publish(n), Pending::Ack(ack));
            receivers.push(rx);
        }
        assert_eq!(requests.publishes.len(), 5);
        // An answer that overtakes the oldest, then the oldest: both found.
        for n in [0, PUBLISH_BIT - 3] {
            let Some(Pending::Ack(ack)) = requests.remove(publish(n)) else { panic!("{n}") };
            ack.send(Ok(()));
        }
        assert!(requests.remove(publish(0)).is_none(), "answered once");
        assert!(requests.remove(publish(2)).is_none(), "never asked");
        // The front moved past both answered slots.
        assert_eq!(requests.publishes.front().map(|&(c, _)| c), Some(publish(PUBLISH_BIT - 1)));
        for n in [4, PUBLISH_BIT - 1, 1] {
            assert!(matches!(requests.remove(publish(n)), Some(Pending::Ack(_))), "{n}");
        }
        assert!(requests.publishes.is_empty());
        let answered: Vec<_> = receivers.iter_mut().map(|rx| rx.try_recv().is_ok()).collect();
        assert_eq!(answered, [true, false, true, false, false]);
    }

    #[test]
    fn a_publish_left_unanswered_holds_a_bounded_ring() {
        let mut requests = Requests::default();
        let (ack, _stuck) = waiter();
        requests.insert(publish(0), Pending::Ack(ack));
        for n in 1..=100_000 {
            let (ack, _rx) = waiter();
            requests.insert(publish(n), Pending::Ack(ack));
            assert!(matches!(requests.remove(publish(n)), Some(Pending::Ack(_))));
            assert!(requests.publishes.len() <= COMPACT_FROM + 1, "{n}");
        }
        assert!(matches!(requests.remove(publish(0)), Some(Pending::Ack(_))), "still found");
        assert!(requests.publishes.is_empty());
    }

    #[test]
    fn other_requests_and_out_of_turn_publishes_wait_in_the_map_and_all_drain() {
        let mut requests = Requests::default();
        let (flush, _rx) = oneshot::channel();
        requests.insert(100, Pending::Flush(flush));
        let (ack, _first) = waiter();
        requests.insert(publish(10), Pending::Ack(ack));
        // Numbered before the last one in the ring: kept in the map, still found.
        let (ack, _late) = waiter();
        requests.insert(publish(5), Pending::Ack(ack));
        assert_eq!((requests.publishes.len(), requests.others.len()), (1, 2));
        assert!(matches!(requests.remove(publish(5)), Some(Pending::Ack(_))));
        assert!(matches!(requests.remove(100), Some(Pending::Flush(_))));
        let (ack, _next) = waiter();
        requests.insert(publish(11), Pending::Ack(ack));
        assert_eq!(requests.drain().count(), 2);
        assert!(requests.publishes.is_empty() && requests.others.is_empty());
    }
}
