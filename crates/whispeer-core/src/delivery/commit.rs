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
            .map(|(topic, committed)| (topic, Mark { committed, above: BTreeSet::new() }))
            .collect();
        Self { key, marks: Mutex::new(marks) }
    }

    /// Records `message` as settled; if the topic's committed offset advances, calls `record`
    /// with it while still holding the state, so the group's commits are recorded in order.
    /// `empty(from, to)` says whether the topic has no message at offsets `from..to` (asked
    /// only when a settled message waits above offsets that were never settled).
    pub(crate) fn settled_then(
        &self,
        message: &Message,
        empty: impl Fn(u64, u64) -> bool,
        record: impl FnOnce(&Topic, u64),
    ) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((topic, offset)) = Self::settle(&mut marks, message, empty) {
            record(&topic, offset);
        }
    }

    /// Records `message` as settled; returns the topic's new committed offset if it advanced.
    #[cfg(test)]
    fn settled(&self, message: &Message, empty: impl Fn(u64, u64) -> bool) -> Option<(Topic, u64)> {
        Self::settle(&mut self.marks.lock().unwrap_or_else(PoisonError::into_inner), message, empty)
    }

    fn settle(
        marks: &mut HashMap<Topic, Mark>,
        message: &Message,
        empty: impl Fn(u64, u64) -> bool,
    ) -> Option<(Topic, u64)> {
        let offset = message.offset()?;
        let mark = marks.entry(message.topic().clone()).or_default();
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
            match mark.above.first() {
                Some(&lowest) if empty(mark.committed + 1, lowest) => mark.committed = lowest - 1,
                _ => break,
            }
        }
        (mark.committed > before).then(|| (message.topic().clone(), mark.committed))
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
        groups.entry(key.clone()).or_default().insert(topic, offset);
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
