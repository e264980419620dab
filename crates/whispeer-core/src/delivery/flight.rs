//! A QoS 1 tracker's in-flight table: delivered, unacknowledged messages by id.
//!
//! Acknowledgements come back mostly in the order of delivery, and a subscription's first
//! deliveries mostly come in ascending id order (a broker's ids are a per-broker prefix and a
//! counter). So those are kept in a deque in delivery order and found by binary search, where
//! an acknowledgement touches the memory its predecessor just touched; a hash table spreads
//! them at random, and with thousands in flight each lookup was a cache miss (half the time
//! of taking an entry, in a profile of a queue group of 8). Anything delivered out of order
//! (a redelivery, or ids from elsewhere) goes to a hash table beside it. An entry taken from
//! the middle of the deque leaves a hole that goes when it reaches the front; when holes
//! outnumber the entries (one member far behind the others), the deque is compacted.

use std::collections::VecDeque;

use whispeer_proto::MessageId;

use crate::hash::FastMap;

/// Delivered, unacknowledged entries by message id.
#[derive(Debug)]
pub(super) struct Flight<E> {
    /// Ascending ids in delivery order; `None` where the entry was taken.
    ordered: VecDeque<(MessageId, Option<E>)>,
    /// Entries whose ids were not above every id in `ordered` when delivered.
    others: FastMap<MessageId, E>,
    /// Entries in `ordered` (not holes).
    in_order: usize,
}

impl<E> Default for Flight<E> {
    fn default() -> Self {
        Self { ordered: VecDeque::new(), others: FastMap::default(), in_order: 0 }
    }
}

impl<E> Flight<E> {
    pub(super) fn len(&self) -> usize {
        self.in_order + self.others.len()
    }

    fn position(&self, id: MessageId) -> Option<usize> {
        let (first, last) = (self.ordered.front()?.0, self.ordered.back()?.0);
        if id < first || id > last {
            return None;
        }
        self.ordered.binary_search_by(|(at, _)| at.cmp(&id)).ok()
    }

    pub(super) fn contains(&self, id: MessageId) -> bool {
        self.get(id).is_some()
    }

    pub(super) fn get(&self, id: MessageId) -> Option<&E> {
        // A hole's id may be in flight again, beside the deque (a redelivery).
        match self.position(id).and_then(|at| self.ordered[at].1.as_ref()) {
            Some(entry) => Some(entry),
            None => self.others.get(&id),
        }
    }

    /// Adds `entry` under `id`, which is not in flight (see [`contains`](Self::contains)).
    /// The deque holds one source's ids (the high 64 bits: a broker's or a client's prefix),
    /// so an id from another source falls outside its range and is looked up in the hash
    /// table at once, without a binary search.
    pub(super) fn insert(&mut self, id: MessageId, entry: E) {
        let follows = |&(last, _): &(MessageId, Option<E>)| last < id && last.0 >> 64 == id.0 >> 64;
        if self.ordered.back().is_none_or(follows) {
            self.ordered.push_back((id, Some(entry)));
            self.in_order += 1;
        } else {
            self.others.insert(id, entry);
        }
    }

    pub(super) fn remove(&mut self, id: MessageId) -> Option<E> {
        let at = self.position(id).filter(|&at| self.ordered[at].1.is_some());
        let Some(entry) = at.and_then(|at| self.ordered[at].1.take()) else {
            return self.others.remove(&id);
        };
        self.in_order -= 1;
        while matches!(self.ordered.front(), Some((_, None))) {
            self.ordered.pop_front();
        }
        let holes = self.ordered.len() - self.in_order;
        if holes > 64 && holes > self.in_order {
            self.ordered.retain(|(_, entry)| entry.is_some());
        }
        Some(entry)
    }

    /// Every entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (MessageId, &E)> {
        let ordered = self.ordered.iter().filter_map(|(id, entry)| Some((*id, entry.as_ref()?)));
        ordered.chain(self.others.iter().map(|(id, entry)| (*id, entry)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(flight: &Flight<u32>) -> Vec<u128> {
        let mut ids: Vec<u128> = flight.iter().map(|(id, _)| id.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn entries_in_and_out_of_order_are_found_and_taken_once() {
        let mut flight = Flight::default();
        for id in [10, 11, 12, 20] {
            flight.insert(MessageId(id), id as u32);
        }
        // Below the last: out of order, beside the deque.
        flight.insert(MessageId(15), 15);
        flight.insert(MessageId(5), 5);
        assert_eq!(flight.len(), 6);
        assert!(flight.contains(MessageId(15)) && flight.contains(MessageId(5)));
        assert!(!flight.contains(MessageId(13)) && !flight.contains(MessageId(30)));
        assert_eq!(flight.get(MessageId(12)), Some(&12));
        assert_eq!(flight.remove(MessageId(11)), Some(11), "from the middle");
        assert_eq!(flight.remove(MessageId(11)), None, "taken once");
        assert_eq!(flight.remove(MessageId(15)), Some(15));
        assert_eq!(flight.remove(MessageId(13)), None, "never in flight");
        assert_eq!(ids(&flight), [5, 10, 12, 20]);
        assert_eq!(flight.len(), 4);
        // The front's removal takes the hole behind it too.
        assert_eq!(flight.remove(MessageId(10)), Some(10));
        assert_eq!(flight.ordered.len(), 2, "12 and 20 left in order");
        for id in [5, 12, 20] {
            assert_eq!(flight.remove(MessageId(id)), Some(id as u32));
        }
        assert_eq!(flight.len(), 0);
        assert!(flight.ordered.is_empty() && flight.others.is_empty());
    }

    #[test]
    fn an_id_in_flight_again_where_it_left_a_hole_is_found_beside_the_deque() {
        let mut flight = Flight::default();
        for id in [10, 11, 12] {
            flight.insert(MessageId(id), id as u32);
        }
        assert_eq!(flight.remove(MessageId(11)), Some(11));
        assert!(!flight.contains(MessageId(11)), "a hole");
        // Delivered again (a redelivery): below the last id, so beside the deque.
        flight.insert(MessageId(11), 111);
        assert_eq!(flight.get(MessageId(11)), Some(&111));
        assert_eq!(flight.len(), 3);
        assert_eq!(flight.remove(MessageId(11)), Some(111));
        assert_eq!(flight.remove(MessageId(11)), None);
        assert_eq!(ids(&flight), [10, 12]);
    }

    #[test]
    fn ids_of_another_source_go_beside_the_deque() {
        let (a, b) = (1u128 << 64, 2u128 << 64);
        let mut flight = Flight::default();
        for n in 0..3 {
            flight.insert(MessageId(a | n), n as u32);
            flight.insert(MessageId(b | n), 10 + n as u32);
        }
        assert_eq!(flight.ordered.len(), 3, "one source in order");
        assert_eq!(flight.others.len(), 3);
        for n in 0..3 {
            assert_eq!(flight.remove(MessageId(b | n)), Some(10 + n as u32));
            assert_eq!(flight.remove(MessageId(a | n)), Some(n as u32));
        }
        assert_eq!(flight.len(), 0);
        // Empty, it takes the next source's ids in order.
        flight.insert(MessageId(b | 7), 7);
        flight.insert(MessageId(b | 8), 8);
        assert_eq!(flight.ordered.len(), 2);
    }

    #[test]
    fn holes_behind_an_entry_held_at_the_front_are_compacted() {
        let mut flight = Flight::default();
        for id in 0..1_000u32 {
            flight.insert(MessageId(u128::from(id)), id);
        }
        // 0 stays in flight (a member far behind); the rest are taken in order.
        for id in 1..1_000u32 {
            assert_eq!(flight.remove(MessageId(u128::from(id))), Some(id));
        }
        assert_eq!(flight.len(), 1);
        assert!(flight.ordered.len() <= 2 * 64 + 2, "holes kept: {}", flight.ordered.len());
        assert_eq!(flight.get(MessageId(0)), Some(&0));
        // New deliveries go on after it, in order.
        flight.insert(MessageId(5_000), 5_000);
        assert_eq!(ids(&flight), [0, 5_000]);
        assert_eq!(flight.remove(MessageId(0)), Some(0));
        assert_eq!(flight.remove(MessageId(5_000)), Some(5_000));
        assert_eq!(flight.len(), 0);
    }
}
