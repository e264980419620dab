//! The exact-topic table: a hash map whose entries hold each topic's first bytes in place.
//!
//! Among many topics, a look-up misses the cache on the table's entry and, comparing the
//! topic's text, once more on the topic's own allocation. An entry here also holds the first
//! [`HEAD`] bytes of its topic beside the text's length (which the topic's pointer carries), so
//! a topic that short is compared without leaving the entry, and a longer one reads its
//! allocation only for the rest, once its length and first bytes matched. Measured with
//! 100,000 exact subscriptions (`cargo bench --bench subscriptions`): the text's comparison had
//! been the largest single item of the publisher's profile.

use std::hash::{Hash, Hasher};

use hashbrown::{Equivalent, HashMap};
use whispeer_proto::Topic;

use super::{Routes, SubId, remove_route};

/// How many of a topic's first bytes an entry holds.
const HEAD: usize = 16;

/// The first [`HEAD`] bytes of `text`, zero-padded.
fn head(text: &str) -> [u8; HEAD] {
    let mut head = [0; HEAD];
    let n = text.len().min(HEAD);
    head[..n].copy_from_slice(&text.as_bytes()[..n]);
    head
}

/// An entry's key: the topic, and its first bytes in place.
#[derive(Debug)]
struct Key {
    head: [u8; HEAD],
    topic: Topic,
}

impl Hash for Key {
    /// As its text, like [`Probe`].
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.topic.as_str().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic
    }
}

impl Eq for Key {}

/// A topic's text to look up, with its first bytes laid out as an entry's.
struct Probe<'a> {
    text: &'a str,
    head: [u8; HEAD],
}

impl<'a> Probe<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, head: head(text) }
    }
}

impl Hash for Probe<'_> {
    /// As its text, like [`Key`].
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl Equivalent<Key> for Probe<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        // The length and the head are the entry's own; only a longer topic's rest is not.
        let stored = key.topic.as_str();
        stored.len() == self.text.len()
            && key.head == self.head
            && (self.text.len() <= HEAD
                || stored.as_bytes()[HEAD..] == self.text.as_bytes()[HEAD..])
    }
}

/// Exact filters (topics) and their routes.
#[derive(Debug, Default)]
pub(super) struct Exact(HashMap<Key, Routes, foldhash::fast::RandomState>);

impl Exact {
    /// The topic as the table holds it, and its routes.
    pub(super) fn get(&self, text: &str) -> Option<(&Topic, &Routes)> {
        self.0.get_key_value(&Probe::new(text)).map(|(key, routes)| (&key.topic, routes))
    }

    /// Adds a route to `topic`.
    pub(super) fn push(&mut self, topic: Topic, route: super::Route) {
        let head = head(topic.as_str());
        self.0.entry(Key { head, topic }).or_default().push(route);
    }

    /// Removes subscription `id` from `text`'s routes (and the entry once it has none);
    /// whether it was there.
    pub(super) fn remove(&mut self, text: &str, id: SubId) -> bool {
        let probe = Probe::new(text);
        let Some(routes) = self.0.get_mut(&probe) else { return false };
        let found = remove_route(routes, id);
        if routes.is_empty() {
            self.0.remove(&probe);
        }
        found
    }

    /// Every topic's routes.
    pub(super) fn routes(&self) -> impl Iterator<Item = &Routes> {
        self.0.values()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use whispeer_proto::Filter;

    use super::*;
    use crate::queue::Queue;
    use crate::{SlowConsumer, router::Route};

    fn route(id: u64) -> Route {
        let filter = Filter::parse("#").unwrap();
        Route {
            id: SubId(id),
            queue: Arc::new(Queue::new(filter, 1, 1024, SlowConsumer::DropOldest)),
        }
    }

    /// Topics alike in length and first bytes, shorter and longer than the head, find only
    /// their own routes.
    #[test]
    fn topics_alike_in_their_first_bytes_find_only_their_own_routes() {
        let texts = [
            "a",
            "a/b",
            "abcdefghijklmno",
            "abcdefghijklmnop",
            "abcdefghijklmnoq",
            "abcdefghijklmnop/x",
            "abcdefghijklmnop/y",
            "abcdefghijklmnop/yy",
        ];
        let mut exact = Exact::default();
        for (i, text) in texts.iter().enumerate() {
            exact.push(Topic::parse(text).unwrap(), route(i as u64));
        }
        for (i, text) in texts.iter().enumerate() {
            let (topic, routes) = exact.get(text).unwrap();
            assert_eq!(topic.as_str(), *text);
            assert_eq!(routes.iter().map(|r| r.id).collect::<Vec<_>>(), [SubId(i as u64)]);
        }
        for absent in ["", "b", "abcdefghijklmn", "abcdefghijklmnop/z", "abcdefghijklmnop/xx"] {
            assert!(exact.get(absent).is_none(), "{absent}");
        }
        assert!(exact.remove("abcdefghijklmnop/x", SubId(5)));
        assert!(!exact.remove("abcdefghijklmnop/x", SubId(5)));
        assert!(exact.get("abcdefghijklmnop/x").is_none());
        assert!(exact.get("abcdefghijklmnop/y").is_some());
    }
}
