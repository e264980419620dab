//! The exact-topic table: a hash map from each topic to its routes.
//!
//! Among many topics, a look-up misses the cache on the table's entry and, comparing the
//! topic's text, once more on the topic's own allocation, if it has one. A [`Topic`] of up to
//! 23 bytes holds its text in place, so the entry holds it: such a topic is compared, and the
//! copy a message takes of it made, without leaving the entry. A longer one is read from its
//! shared allocation. Measured with 100,000 exact subscriptions (`cargo bench --bench
//! subscriptions`): the text's comparison had been the largest single item of the
//! publisher's profile, and taking a reference to the shared text the next.

use whispeer_proto::Topic;

use super::{Routes, SubId, remove_route};
use crate::hash::FastMap;

/// Exact filters (topics) and their routes.
#[derive(Debug, Default)]
pub(super) struct Exact(FastMap<Topic, Routes>);

impl Exact {
    /// The topic as the table holds it, and its routes.
    pub(super) fn get(&self, text: &str) -> Option<(&Topic, &Routes)> {
        self.0.get_key_value(text)
    }

    /// Adds a route to `topic`.
    pub(super) fn push(&mut self, topic: Topic, route: super::Route) {
        self.0.entry(topic).or_default().push(route);
    }

    /// Removes subscription `id` from `text`'s routes (and the entry once it has none);
    /// whether it was there.
    pub(super) fn remove(&mut self, text: &str, id: SubId) -> bool {
        let Some(routes) = self.0.get_mut(text) else { return false };
        let found = remove_route(routes, id);
        if routes.is_empty() {
            self.0.remove(text);
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

    /// Topics alike in length and first bytes, held in place (up to 23 bytes) and shared
    /// (longer), find only their own routes.
    #[test]
    fn topics_alike_in_their_first_bytes_find_only_their_own_routes() {
        let texts = [
            "a",
            "a/b",
            "abcdefghijklmnopqrstuv",
            "abcdefghijklmnopqrstuvw",
            "abcdefghijklmnopqrstuvx",
            "abcdefghijklmnopqrstuvwx",
            "abcdefghijklmnopqrstuvwx/y",
            "abcdefghijklmnopqrstuvwx/z",
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
        for absent in ["", "b", "abcdefghijklmnopqrstu", "abcdefghijklmnopqrstuvwy", "a/bc"] {
            assert!(exact.get(absent).is_none(), "{absent}");
        }
        assert!(exact.remove("abcdefghijklmnopqrstuvwx/y", SubId(6)));
        assert!(!exact.remove("abcdefghijklmnopqrstuvwx/y", SubId(6)));
        assert!(exact.get("abcdefghijklmnopqrstuvwx/y").is_none());
        assert!(exact.get("abcdefghijklmnopqrstuvwx/z").is_some());
    }
}
