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
//! dropped silently. Kept in memory by each server; with [`Retained::open`], those of durable
//! topics are also kept in the store's directory (`retained.log`, see `file.rs`) and survive a
//! restart. A cluster's nodes share them through the engine (`cluster/retained.rs`).

mod file;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};

use whispeer_proto::header::{RETAIN, RETAINED};
use whispeer_proto::{Body, Envelope, Filter, Frame, Limits};

use self::file::RetainedFile;

/// The retained messages of one server.
#[derive(Debug, Default)]
pub struct Retained {
    inner: Mutex<Inner>,
    forward: OnceLock<Forward>,
}

/// Where the retained messages kept here go as well: a cluster's other nodes.
struct Forward(Box<dyn Fn(&Envelope) + Send + Sync>);

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forward")
    }
}

#[derive(Debug, Default)]
struct Inner {
    topics: HashMap<String, Envelope>,
    bytes: usize,
    /// Where the retained messages of `durable` topics are kept across restarts.
    file: Option<RetainedFile>,
    durable: Vec<Filter>,
}

/// Queue groups whose name starts with this belong to one client (an MQTT persistent session's
/// subscriptions): they get retained messages as subscriptions of their own do.
pub(crate) const ONE_CLIENT_GROUP: &str = "mqtt-session:";

/// Why a retained publish is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full(pub(crate) String);

impl Retained {
    /// Retained messages whose topics match a `durable` filter are also kept in
    /// `dir/retained.log`, synced before each retained publish is acknowledged; those kept
    /// there before are loaded (`limits` bound what is read).
    ///
    /// # Errors
    /// The directory or the file cannot be read or written.
    pub fn open(dir: &Path, durable: Vec<Filter>, limits: Limits) -> io::Result<Self> {
        let (file, topics) = RetainedFile::open(dir, limits)?;
        let bytes = topics.values().map(|e| e.payload.len()).sum();
        let inner = Inner { topics, bytes, file: Some(file), durable };
        Ok(Self { inner: Mutex::new(inner), forward: OnceLock::new() })
    }

    /// Hands every retained message kept from now on (cleared ones too) to `forward` as well,
    /// once kept here: a cluster shares them with its other nodes. Set once.
    #[cfg(feature = "cluster")]
    pub(crate) fn forward_to(&self, forward: impl Fn(&Envelope) + Send + Sync + 'static) {
        let _ = self.forward.set(Forward(Box::new(forward)));
    }

    /// Keeps a retained message another node shared (or this one's, come back), here only,
    /// within the bounds; one kept already (this node's own, or read again after a
    /// reconnection) changes nothing and writes nothing.
    ///
    /// # Errors
    /// Past a bound, or the durable copy could not be written: nothing changed.
    #[cfg(feature = "cluster")]
    pub(crate) fn keep_shared(
        &self,
        envelope: &Envelope,
        max_topics: usize,
        max_bytes: usize,
    ) -> io::Result<()> {
        let kept = self.inner().topics.get(envelope.topic.as_str()).map(|e| e.id);
        let known = match kept {
            Some(id) => id == envelope.id,
            None => envelope.payload.is_empty(),
        };
        if known {
            return Ok(());
        }
        self.admit(envelope, max_topics, max_bytes).map_err(|Full(why)| io::Error::other(why))?;
        self.keep_here(envelope)
    }

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

    /// Keeps `envelope` as its topic's retained message, or clears the topic's when empty;
    /// on disk first for a durable topic; then hands it on (see [`Retained::forward_to`]).
    ///
    /// # Errors
    /// The durable copy could not be written: nothing changed.
    pub(crate) fn keep(&self, envelope: &Envelope) -> io::Result<()> {
        self.keep_here(envelope)?;
        if let Some(Forward(forward)) = self.forward.get() {
            forward(envelope);
        }
        Ok(())
    }

    fn keep_here(&self, envelope: &Envelope) -> io::Result<()> {
        let mut inner = self.inner();
        let Inner { file, durable, .. } = &mut *inner;
        if let Some(file) = file
            && durable.iter().any(|filter| filter.matches(&envelope.topic))
        {
            file.append(envelope)?;
        }
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
        let Inner { file, topics, bytes, durable } = &mut *inner;
        if let Some(file) = file
            && file.bloated(*bytes)
        {
            let live = topics.values().filter(|e| durable.iter().any(|f| f.matches(&e.topic)));
            file.rewrite(live)?;
        }
        Ok(())
    }

    /// Clears `topic`'s retained message; whether it had one.
    ///
    /// # Errors
    /// The durable copy could not be written: nothing changed.
    pub fn clear(&self, topic: &whispeer_proto::Topic) -> io::Result<bool> {
        let Some(mut empty) = self.inner().topics.get(topic.as_str()).cloned() else {
            return Ok(false);
        };
        empty.payload = bytes::Bytes::new();
        self.keep(&empty)?;
        Ok(true)
    }

    /// Every retained message whose topic `filter` matches (all with `None`), oldest first,
    /// without the `retained` mark: for the admin API.
    pub fn list(&self, filter: Option<&Filter>) -> Vec<Envelope> {
        let inner = self.inner();
        let mut found: Vec<Envelope> = inner
            .topics
            .values()
            .filter(|e| filter.is_none_or(|f| f.matches(&e.topic)))
            .cloned()
            .collect();
        found.sort_by_key(|e| e.timestamp_ms);
        found
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
        retained.keep(&message("home/a", "on", 1)).unwrap();
        retained.keep(&message("home/b", "off", 2)).unwrap();
        retained.keep(&message("home/a", "dim", 3)).unwrap();
        let all = retained.matching(&Filter::parse("home/#").unwrap());
        let payloads: Vec<&[u8]> = all.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(payloads, [&b"off"[..], b"dim"]);
        assert!(all.iter().all(|e| e.headers.get(RETAINED).is_some()));
        assert_eq!(retained.size(), (2, 6));
        retained.keep(&message("home/a", "", 4)).unwrap();
        assert_eq!(retained.size(), (1, 3));
        assert!(retained.matching(&Filter::parse("home/a").unwrap()).is_empty());
        // Bounds: a new topic past the count, or bytes past the budget, is refused; replacing
        // a topic's message, or clearing it, is not.
        assert!(retained.admit(&message("home/c", "x", 5), 1, 100).is_err());
        assert!(retained.admit(&message("home/b", "xyz", 5), 1, 100).is_ok());
        assert!(retained.admit(&message("home/b", "", 5), 1, 0).is_ok());
        assert!(retained.admit(&message("home/b", "0123456789", 5), 10, 5).is_err());
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn only_durable_topics_are_written_and_a_message_kept_already_writes_nothing() {
        let dir =
            std::env::temp_dir().join(format!("whispeer-retained-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let durable = vec![Filter::parse("d/#").unwrap()];
        let retained = Retained::open(&dir, durable, whispeer_proto::Limits::DEFAULT).unwrap();
        let size = || std::fs::metadata(dir.join("retained.log")).unwrap().len();
        retained.keep(&message("d/a", "on", 1)).unwrap();
        let written = size();
        assert!(written > 0);
        retained.keep(&message("m/x", "memory only", 2)).unwrap();
        assert_eq!(size(), written, "not a durable topic");
        // This node's own, come back from the cluster, or read again: nothing written.
        retained.keep_shared(&message("d/a", "on", 1), 10, 1 << 20).unwrap();
        retained.keep_shared(&message("d/gone", "", 3), 10, 1 << 20).unwrap();
        assert_eq!(size(), written);
        // Another node's newer one is kept, on disk too.
        retained.keep_shared(&message("d/a", "off", 4), 10, 1 << 20).unwrap();
        assert!(size() > written);
        let payload = retained.matching(&Filter::parse("d/a").unwrap())[0].payload.clone();
        assert_eq!(&payload[..], b"off");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
