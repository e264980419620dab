//! Retained messages: the last message published with the `retain` header on each topic, kept
//! by the server and delivered first (marked with the `retained` header) to each new
//! subscription whose filter matches — not to queue groups, as MQTT does not give them to
//! shared subscriptions. A retained message with an empty payload clears its topic's. Every
//! client of the server has them: the native protocol and the SDK (`PublishOptions::retain`),
//! the JSON form (`"retain": true`), the CLI (`whispeer pub --retain`) and MQTT (the retain
//! flag).
//!
//! Bounded by `max_retained` topics and `max_retained_bytes` of payload: a retained publish for
//! a new topic past either bound is refused (`LIMIT_REACHED`, MQTT 5: quota exceeded), never
//! dropped silently. Kept in memory by each server: a restart forgets them, and the nodes of a
//! cluster keep their own.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use whispeer_proto::header::{RETAIN, RETAINED};
use whispeer_proto::{Body, Envelope, Filter, Frame};

/// The retained messages of one server.
#[derive(Debug, Default)]
pub struct Retained {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    topics: HashMap<String, Envelope>,
    bytes: usize,
}

/// Queue groups whose name starts with this belong to one client (an MQTT persistent session's
/// subscriptions): they get retained messages as subscriptions of their own do.
pub(crate) const ONE_CLIENT_GROUP: &str = "mqtt-session:";

/// Why a retained publish is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full(pub(crate) String);

impl Retained {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `envelope` asks to be retained.
    pub(crate) fn wanted(envelope: &Envelope) -> bool {
        envelope.headers.get(RETAIN).is_some_and(|v| &v[..] == b"1" || &v[..] == b"true")
    }

    /// Whether `envelope` fits within the bounds (replacing its topic's, if any).
    pub(crate) fn admit(
        &self,
        envelope: &Envelope,
        max_topics: usize,
        max_bytes: usize,
    ) -> Result<(), Full> {
        let inner = self.inner();
        let topic = envelope.topic.as_str();
        let replaced = inner.topics.get(topic).map_or(0, |e| e.payload.len());
        if envelope.payload.is_empty() {
            return Ok(());
        }
        if replaced == 0 && !inner.topics.contains_key(topic) && inner.topics.len() >= max_topics {
            return Err(Full(format!("{max_topics} topics have retained messages (max_retained)")));
        }
        if inner.bytes - replaced + envelope.payload.len() > max_bytes {
            return Err(Full(format!(
                "retained messages would pass {max_bytes} bytes (max_retained_bytes)"
            )));
        }
        Ok(())
    }

    /// Keeps `envelope` as its topic's retained message, or clears the topic's when empty.
    pub(crate) fn keep(&self, envelope: &Envelope) {
        let mut inner = self.inner();
        let topic = envelope.topic.as_str().to_string();
        let old = if envelope.payload.is_empty() {
            inner.topics.remove(&topic)
        } else {
            inner.bytes += envelope.payload.len();
            inner.topics.insert(topic, envelope.clone())
        };
        if let Some(old) = old {
            inner.bytes -= old.payload.len();
        }
    }

    /// The retained messages `filter` matches, oldest first, each marked `retained`.
    pub(crate) fn matching(&self, filter: &Filter) -> Vec<Envelope> {
        let inner = self.inner();
        let mut found: Vec<Envelope> = if filter.is_exact() {
            inner.topics.get(filter.as_str()).cloned().into_iter().collect()
        } else {
            inner.topics.values().filter(|e| filter.matches(&e.topic)).cloned().collect()
        };
        drop(inner);
        found.sort_by_key(|e| e.timestamp_ms);
        for envelope in &mut found {
            envelope.headers.insert(RETAINED, "1");
        }
        found
    }

    /// The deliveries of the retained messages a new subscription `sub` of `filter` gets first:
    /// none for a shared queue group's member (a group of [`ONE_CLIENT_GROUP`] gets them).
    pub(crate) fn deliveries(&self, sub: u32, filter: &Filter, group: Option<&str>) -> Vec<Frame> {
        if group.is_some_and(|name| !name.starts_with(ONE_CLIENT_GROUP)) {
            return Vec::new();
        }
        self.matching(filter)
            .into_iter()
            .map(|envelope| Frame::new(0, Body::Deliver { sub, attempt: 1, offset: 0, envelope }))
            .collect()
    }

    /// How many topics have a retained message, and their payload bytes.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.topics.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use whispeer_proto::{ContentType, Flags, MessageId, Topic};

    use super::*;

    fn message(topic: &str, payload: &'static str, time: u64) -> Envelope {
        let topic = Topic::parse(topic).unwrap();
        let flags = Flags::with_content(ContentType::Raw);
        Envelope::new(MessageId(u128::from(time)), topic, time, flags, Bytes::from(payload))
    }

    #[test]
    fn the_last_message_of_each_topic_is_kept_an_empty_one_clears_it_and_bounds_hold() {
        let retained = Retained::default();
        retained.keep(&message("home/a", "on", 1));
        retained.keep(&message("home/b", "off", 2));
        retained.keep(&message("home/a", "dim", 3));
        let all = retained.matching(&Filter::parse("home/#").unwrap());
        let payloads: Vec<&[u8]> = all.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(payloads, [&b"off"[..], b"dim"]);
        assert!(all.iter().all(|e| e.headers.get(RETAINED).is_some()));
        assert_eq!(retained.size(), (2, 6));
        retained.keep(&message("home/a", "", 4));
        assert_eq!(retained.size(), (1, 3));
        assert!(retained.matching(&Filter::parse("home/a").unwrap()).is_empty());
        // Bounds: a new topic past the count, or bytes past the budget, is refused; replacing
        // a topic's message, or clearing it, is not.
        assert!(retained.admit(&message("home/c", "x", 5), 1, 100).is_err());
        assert!(retained.admit(&message("home/b", "xyz", 5), 1, 100).is_ok());
        assert!(retained.admit(&message("home/b", "", 5), 1, 0).is_ok());
        assert!(retained.admit(&message("home/b", "0123456789", 5), 10, 5).is_err());
    }
}
