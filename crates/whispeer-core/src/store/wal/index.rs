//! A sparse index of the write-ahead log: per topic, the record number of its first message and
//! of every `EVERY`-th after it, and the topic's latest offset (for the marks at the start of
//! each segment). A read of one topic from an offset starts scanning at the
//! segment holding the nearest sample at or before that offset, instead of at the first
//! segment; memory stays at one entry per `EVERY` messages (and one per topic).
//!
//! Built while recovery scans the log, and kept up as records are appended.

use std::sync::{Mutex, PoisonError};

use whispeer_proto::Topic;

use crate::hash::FastMap;

/// Messages of one topic between two samples.
const EVERY: u64 = 256;

#[derive(Debug, Default)]
struct Samples {
    /// (offset, record number), in offset order.
    entries: Vec<(u64, u64)>,
    /// Messages of the topic noted so far.
    seen: u64,
    /// The latest offset noted or marked.
    last: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct TopicIndex {
    topics: Mutex<FastMap<Topic, Samples>>,
}

impl TopicIndex {
    /// Notes that record `record` holds the message at `offset` of `topic`. Called in record
    /// order for each topic.
    pub(crate) fn note(&self, topic: &Topic, offset: u64, record: u64) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let samples = match topics.get_mut(topic) {
            Some(samples) => samples,
            None => topics.entry(topic.clone()).or_default(),
        };
        if samples.seen.is_multiple_of(EVERY) {
            samples.entries.push((offset, record));
        }
        samples.seen += 1;
        samples.last = samples.last.max(offset);
    }

    /// Notes that `topic`'s offsets reached `offset` (a mark read back), without a message.
    pub(crate) fn mark(&self, topic: &Topic, offset: u64) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let samples = topics.entry(topic.clone()).or_default();
        samples.last = samples.last.max(offset);
    }

    /// Every topic's latest offset.
    pub(crate) fn marks(&self) -> Vec<(Topic, u64)> {
        let topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        topics.iter().map(|(topic, samples)| (topic.clone(), samples.last)).collect()
    }

    /// The record number to start scanning from for `topic`'s messages from `from` on, or
    /// `None` if the log never held the topic.
    pub(crate) fn start(&self, topic: &Topic, from: u64) -> Option<u64> {
        let topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = &topics.get(topic)?.entries;
        let after = entries.partition_point(|(offset, _)| *offset <= from);
        let (_, record) = entries.get(after.saturating_sub(1))?;
        Some(*record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_starts_at_the_nearest_sample_at_or_before_the_offset() {
        let index = TopicIndex::default();
        let (a, b) = (Topic::parse("a").unwrap(), Topic::parse("b").unwrap());
        // Topic a's messages are records 10, 12, 14, …; b's are in between.
        for n in 0..1000u64 {
            index.note(&a, n + 1, 10 + 2 * n);
            index.note(&b, n + 1, 11 + 2 * n);
        }
        assert_eq!(index.start(&a, 1), Some(10));
        assert_eq!(index.start(&a, 0), Some(10), "before the first: the first");
        assert_eq!(index.start(&a, 256), Some(10));
        assert_eq!(index.start(&a, 257), Some(10 + 2 * 256), "the second sample");
        assert_eq!(index.start(&a, 5000), Some(10 + 2 * 768), "past the end: the last sample");
        assert_eq!(index.start(&b, 300), Some(11 + 2 * 256));
        assert_eq!(index.start(&Topic::parse("c").unwrap(), 1), None);
        let samples = index.topics.lock().unwrap().get(&a).unwrap().entries.len();
        assert_eq!(samples, 4, "one per 256 messages");
    }
}
