//! Durable subscriptions: a QoS 1 queue group's committed offsets, per retained topic.
//!
//! A group's committed offset in a topic is the highest offset up to which every message has
//! been settled (acknowledged, or given up to the dead-letter topic); messages settled out of
//! order wait above it until the gap closes. Offsets that no message has (a durable topic's
//! log skips past the offsets a crash may have handed out unsynced) do not hold it back: the
//! topic's history says they are empty. Each advance is remembered by the broker — and, for
//! a durable topic, written to the write-ahead log — so a group created again under the same
//! filter and name, after its linger or after a restart, starts right after its commits.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use whispeer_proto::Topic;

use crate::delivery::GroupKey;
use crate::message::Message;

/// One topic's commit state.
#[derive(Debug, Default)]
struct Mark {
    committed: u64,
    above: BTreeSet<u64>,
    /// Offsets `from..to` the topic's history was found to hold a message in: any range from
    /// `from` to `to` or beyond holds one too, and is not asked about again. Members settle
    /// out of order, so a gap below the lowest settled offset is the common case, and asking
    /// takes the topic's log lock, which its publishers hold.
    held: Option<(u64, u64)>,
}

/// The commit state of one group.
#[derive(Debug)]
pub(crate) struct Commits {
    pub(crate) key: GroupKey,
    marks: Mutex<HashMap<Topic, Mark>>,
}

impl Commits {
    /// State starting at `start`: per topic, the offset committed so far (the offset before the
    /// first one this group delivers). Topics not listed start at 0 (offsets start at 1).
    pub(crate) fn new(key: GroupKey, start: HashMap<Topic, u64>) -> Self {
        let marks = start
            .into_iter()
            .map(|(topic, committed)| (topic, Mark { committed, ..Mark::default() }))
            .collect();
        Self { key, marks: Mutex::new(marks) }
    }

    /// Records each of `settled` as settled, under one take of the state; for each topic whose
    /// committed offset advanced, calls `record` once with the new offset while still holding
    /// the state, so the group's commits are recorded in order (one record for a batch of
    /// acknowledgements, not one per message). `empty(topic, from, to)` says whether the topic
    /// has no message at offsets `from..to` (asked only when a settled message waits above
    /// offsets that were never settled).
    pub(crate) fn settled_then<'m>(
        &self,
        settled: impl IntoIterator<Item = &'m Message>,
        empty: impl Fn(&Topic, u64, u64) -> bool,
        mut record: impl FnMut(&Topic, u64),
    ) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        // Mostly one topic a batch.
        let mut advanced: Vec<(&Topic, u64)> = Vec::new();
        for message in settled {
            let topic = message.topic();
            let Some(offset) = Self::settle(&mut marks, message, |from, to| empty(topic, from, to))
            else {
                continue;
            };
            match advanced.iter_mut().find(|(t, _)| *t == topic) {
                Some(entry) => entry.1 = offset,
                None => advanced.push((topic, offset)),
            }
        }
        for (topic, offset) in advanced {
            record(topic, offset);
        }
    }

    /// Records `message` as settled; returns the topic's new committed offset if it advanced.
    #[cfg(test)]
    fn settled(&self, message: &Message, empty: impl Fn(u64, u64) -> bool) -> Option<(Topic, u64)> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        Self::settle(&mut marks, message, empty).map(|offset| (message.topic().clone(), offset))
    }

    fn settle(
        marks: &mut HashMap<Topic, Mark>,
        message: &Message,
        empty: impl Fn(u64, u64) -> bool,
    ) -> Option<u64> {
        let offset = message.offset()?;
        let topic = message.topic();
        if !marks.contains_key(topic) {
            marks.insert(topic.clone(), Mark::default());
        }
        let mark = marks.get_mut(topic)?;
        if offset <= mark.committed {
            return None;
        }
        mark.above.insert(offset);
        let before = mark.committed;
        loop {
            if mark.above.remove(&(mark.committed + 1)) {
                mark.committed += 1;
                continue;
            }
            // Offsets below the lowest settled one that no message has: past them.
            let Some(&lowest) = mark.above.first() else { break };
            let from = mark.committed + 1;
            if mark.held.is_some_and(|(at, to)| at == from && to <= lowest) {
                break;
            }
            if !empty(from, lowest) {
                mark.held = Some((from, lowest));
                break;
            }
            mark.committed = lowest - 1;
        }
        (mark.committed > before).then_some(mark.committed)
    }
}

/// Every group's committed offsets, remembered by the broker (and restored from its log).
#[derive(Debug, Default)]
pub(crate) struct CommitStore {
    groups: Mutex<HashMap<GroupKey, HashMap<Topic, u64>>>,
}

impl CommitStore {
    /// Sets a commit. The latest wins: a group's commits are recorded in order, and a rewind
    /// (`Broker::rewind`) moves them back.
    pub(crate) fn set(&self, key: &GroupKey, topic: Topic, offset: u64) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        match groups.get_mut(key) {
            Some(topics) => {
                topics.insert(topic, offset);
            }
            None => {
                groups.insert(key.clone(), HashMap::from([(topic, offset)]));
            }
        }
    }

    /// Every commit: group, topic, offset.
    pub(crate) fn all(&self) -> Vec<(GroupKey, Topic, u64)> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .iter()
            .flat_map(|(key, topics)| topics.iter().map(|(t, o)| (key.clone(), t.clone(), *o)))
            .collect()
    }

    /// The commits of group `key`, if it ever committed.
    pub(crate) fn get(&self, key: &GroupKey) -> Option<HashMap<Topic, u64>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use whispeer_proto::{ContentType, Envelope, Flags, MessageId};

    use super::*;

    fn message(offset: u64) -> Message {
        let topic = Topic::parse("t").unwrap();
        let flags = Flags::with_content(ContentType::Raw);
        let envelope = Envelope::new(MessageId(u128::from(offset)), topic, 0, flags, Bytes::new());
        Message::retained(envelope, false, None, None, offset)
    }

    #[test]
    fn the_commit_advances_only_over_a_contiguous_run() {
        let key: GroupKey = ("t".into(), "g".into());
        let commits = Commits::new(key, HashMap::from([(Topic::parse("t").unwrap(), 4)]));
        let full = |_, _| false;
        assert_eq!(commits.settled(&message(6), full), None, "5 is still open");
        assert_eq!(commits.settled(&message(3), full), None, "committed already");
        let advanced = commits.settled(&message(5), full).map(|(_, offset)| offset);
        assert_eq!(advanced, Some(6), "5 closes the gap up to 6");
        assert_eq!(commits.settled(&message(7), full).map(|(_, offset)| offset), Some(7));
    }

    #[test]
    fn a_batch_records_each_topic_once_at_its_last_advance() {
        let key: GroupKey = ("t".into(), "g".into());
        let commits = Commits::new(key, HashMap::from([(Topic::parse("t").unwrap(), 4)]));
        let batch = [message(6), message(5), message(9), message(7)];
        let mut recorded = Vec::new();
        let full = |_: &Topic, _, _| false;
        commits.settled_then(&batch, full, |topic, offset| recorded.push((topic.clone(), offset)));
        assert_eq!(recorded, vec![(Topic::parse("t").unwrap(), 7)], "one record; 8 is still out");
        recorded.clear();
        commits.settled_then(&[message(3)], full, |t, o| recorded.push((t.clone(), o)));
        assert!(recorded.is_empty(), "nothing advanced: nothing recorded");
        commits.settled_then(&[message(8)], full, |t, o| recorded.push((t.clone(), o)));
        assert_eq!(recorded, vec![(Topic::parse("t").unwrap(), 9)]);
    }

    #[test]
    fn a_gap_found_to_hold_a_message_is_not_asked_about_again_while_it_stands() {
        let key: GroupKey = ("t".into(), "g".into());
        let commits = Commits::new(key, HashMap::from([(Topic::parse("t").unwrap(), 4)]));
        let asked = std::cell::RefCell::new(Vec::new());
        let full = |from, to| {
            asked.borrow_mut().push((from, to));
            false
        };
        for offset in [10, 11, 12] {
            assert_eq!(commits.settled(&message(offset), full), None);
        }
        assert_eq!(*asked.borrow(), vec![(5, 10)], "5..10 holds a message; so does 5..10 and on");
        // A lower offset settled: 5..7 may be empty though 5..10 is not; asked.
        assert_eq!(commits.settled(&message(7), full), None);
        assert_eq!(*asked.borrow(), vec![(5, 10), (5, 7)]);
        // Once the commit moves, the gap is another one.
        let advanced = commits.settled(&message(5), full).map(|(_, offset)| offset);
        assert_eq!(advanced, Some(5));
        assert_eq!(asked.borrow().last(), Some(&(6, 7)));
    }

    #[test]
    fn offsets_no_message_has_do_not_hold_the_commit_back() {
        let key: GroupKey = ("t".into(), "g".into());
        let commits = Commits::new(key, HashMap::from([(Topic::parse("t").unwrap(), 10)]));
        // After a crash the log went on at 51: 11 to 50 hold nothing; 52 is still out.
        let hole = |from: u64, to: u64| from >= 11 && to <= 51;
        assert_eq!(commits.settled(&message(51), hole).map(|(_, o)| o), Some(51));
        assert_eq!(commits.settled(&message(53), hole), None, "52 exists and is not settled");
        assert_eq!(commits.settled(&message(52), hole).map(|(_, o)| o), Some(53));
    }
}
