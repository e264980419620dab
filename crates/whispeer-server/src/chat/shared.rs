//! Chat on a node of a cluster: what `chat.db` keeps on a single node — groups and their
//! members, device cursors and last-seen times, read positions, contacts, device keys — and who
//! is online on which node, kept by the cluster's engine instead. Each key is one entry, a
//! retained message under `$state/chat/` (the engine keeps the last of each, durably, and hands
//! every node each one, its own included); every node's hub applies them as they come, so every
//! node holds the same state, and a node that starts reads them all before it serves chat. Two
//! nodes writing one key at once end with the one the engine kept last, on every node (keys are
//! per member, per device, per reader: that takes two changes of one thing at once).

use serde_json::{Value, json};

use super::groups::Role;
use super::wire::ChatError;

/// One key of chat's state and its value (`None`: removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A group, and whether it is open.
    Group { group: String, open: Option<bool> },
    /// A member of a group and its role.
    Member { group: String, user: String, role: Option<Role> },
    /// A device's cursor in its user's inbox and when it was last seen.
    Device { user: String, device: String, cursor: u64, last_seen_ms: u64 },
    /// How far `user` read a conversation (its log's topic).
    Read { user: String, log: String, seq: u64 },
    /// Two users who talk to each other.
    Contact { a: String, b: String },
    /// A device's public identity.
    Key { user: String, device: String, identity: Option<String> },
    /// `user`'s devices connected to node `node` (none: gone from it).
    Online { user: String, node: String, devices: Vec<String> },
}

/// The log topics' common prefix, which read entries leave out.
#[cfg_attr(not(feature = "cluster"), allow(dead_code, reason = "only a cluster writes entries"))]
const LOGS: &str = "@chat/log/";

#[cfg_attr(not(feature = "cluster"), allow(dead_code, reason = "only a cluster writes entries"))]
fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

#[cfg_attr(not(feature = "cluster"), allow(dead_code, reason = "only a cluster writes entries"))]
fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg_attr(not(feature = "cluster"), allow(dead_code, reason = "only a cluster writes entries"))]
impl Entry {
    /// The entry's topic, under `prefix` (`$state/chat/`).
    pub(crate) fn topic(&self, prefix: &str) -> String {
        let key = match self {
            Self::Group { group, .. } => format!("g/{group}"),
            Self::Member { group, user, .. } => format!("m/{group}/{user}"),
            Self::Device { user, device, .. } => format!("d/{user}/{device}"),
            Self::Read { user, log, .. } => {
                format!("r/{user}/{}", log.strip_prefix(LOGS).unwrap_or(log))
            }
            Self::Contact { a, b } => format!("c/{a}/{b}"),
            Self::Key { user, device, .. } => format!("k/{user}/{device}"),
            // Node names are free text: the topic holds them in hex.
            Self::Online { user, node, .. } => format!("o/{user}/{}", hex(node)),
        };
        format!("{prefix}{key}")
    }

    /// The entry's value: JSON, or empty for a removal.
    pub(crate) fn payload(&self) -> Vec<u8> {
        let value = match self {
            Self::Group { open: Some(open), .. } => json!({ "open": open }),
            Self::Member { role: Some(role), .. } => json!({ "role": role.name() }),
            Self::Device { cursor, last_seen_ms, .. } => {
                json!({ "cursor": cursor, "last_seen_ms": last_seen_ms })
            }
            Self::Read { seq, .. } => json!({ "seq": seq }),
            Self::Contact { .. } => json!({}),
            Self::Key { identity: Some(identity), .. } => json!({ "identity": identity }),
            Self::Online { devices, .. } if !devices.is_empty() => json!({ "devices": devices }),
            Self::Group { open: None, .. }
            | Self::Member { role: None, .. }
            | Self::Key { identity: None, .. }
            | Self::Online { .. } => return Vec::new(),
        };
        value.to_string().into_bytes()
    }

    /// The entry a topic under `prefix` and its payload stand for; `None` for anything else
    /// (an entry of a newer version, or damage).
    pub(crate) fn parse(topic: &str, prefix: &str, payload: &[u8]) -> Option<Self> {
        let key = topic.strip_prefix(prefix)?;
        let value: Value =
            if payload.is_empty() { Value::Null } else { serde_json::from_slice(payload).ok()? };
        let text = |field: &str| value.get(field).and_then(Value::as_str).map(str::to_string);
        let number = |field: &str| value.get(field).and_then(Value::as_u64);
        let levels: Vec<&str> = key.split('/').collect();
        let owned = |i: usize| levels.get(i).map(|level| (*level).to_string());
        Some(match levels.first().copied()? {
            "g" if levels.len() == 2 => {
                Self::Group { group: owned(1)?, open: value.get("open").and_then(Value::as_bool) }
            }
            "m" if levels.len() == 3 => Self::Member {
                group: owned(1)?,
                user: owned(2)?,
                role: text("role").map(|role| Role::parse(&role)),
            },
            "d" if levels.len() == 3 => Self::Device {
                user: owned(1)?,
                device: owned(2)?,
                cursor: number("cursor")?,
                last_seen_ms: number("last_seen_ms").unwrap_or(0),
            },
            "r" if levels.len() >= 4 => Self::Read {
                user: owned(1)?,
                log: format!("{LOGS}{}", levels[2..].join("/")),
                seq: number("seq")?,
            },
            "c" if levels.len() == 3 => Self::Contact { a: owned(1)?, b: owned(2)? },
            "k" if levels.len() == 3 => {
                Self::Key { user: owned(1)?, device: owned(2)?, identity: text("identity") }
            }
            "o" if levels.len() == 3 => {
                let devices = value.get("devices").and_then(Value::as_array);
                let devices = devices.map_or_else(Vec::new, |list| {
                    list.iter().filter_map(Value::as_str).map(str::to_string).collect()
                });
                Self::Online { user: owned(1)?, node: unhex(levels[2])?, devices }
            }
            _ => return None,
        })
    }
}

/// The refusal when the cluster engine cannot keep a change.
#[cfg_attr(not(feature = "cluster"), allow(dead_code, reason = "only a cluster writes entries"))]
pub(crate) fn unavailable(why: impl std::fmt::Display) -> ChatError {
    ChatError::new("unavailable", format!("the cluster engine did not keep the change: {why}"))
}

#[cfg(feature = "cluster")]
pub(crate) use clustered::Shared;

/// A chat without a cluster shares nothing: no `Shared` is ever made.
#[cfg(not(feature = "cluster"))]
#[derive(Debug)]
pub(crate) enum Shared {}

#[cfg(not(feature = "cluster"))]
impl Shared {
    pub(crate) async fn put(&self, _: &[Entry]) -> Result<(), ChatError> {
        match *self {}
    }

    pub(crate) fn node(&self) -> &str {
        match *self {}
    }

    pub(crate) fn alive(&self) -> Vec<String> {
        match *self {}
    }

    pub(crate) async fn ready(&self, _: std::time::Duration) -> bool {
        match *self {}
    }

    pub(crate) async fn follow(&self, _: whispeer_core::proto::Limits, _: impl Fn(Entry) -> bool) {
        match *self {}
    }
}

#[cfg(feature = "cluster")]
mod clustered {
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use futures_util::StreamExt;
    use tokio::sync::watch;
    use whispeer_core::proto::{ContentType, Envelope, Flags, Limits, MessageId, Topic};

    use super::{Entry, unavailable};
    use crate::chat::wire::ChatError;
    use crate::cluster::{ClusterStatus, STATE_PREFIX};

    /// The prefix of chat's entries.
    pub(crate) fn prefix() -> String {
        format!("{STATE_PREFIX}chat/")
    }

    /// Chat's state in the cluster: writing entries, and whether this node has read them all.
    #[derive(Debug)]
    pub(crate) struct Shared {
        status: ClusterStatus,
        ready: watch::Sender<bool>,
    }

    impl Shared {
        pub(crate) fn new(status: ClusterStatus) -> Self {
            Self { status, ready: watch::Sender::new(false) }
        }

        /// This node's name.
        pub(crate) fn node(&self) -> &str {
            self.status.node()
        }

        /// The nodes alive now (their membership entries).
        pub(crate) fn alive(&self) -> Vec<String> {
            self.status.membership().nodes.into_iter().map(|node| node.node).collect()
        }

        /// Has the engine keep `entries`, in order; each is acknowledged by the engine before
        /// the next goes.
        pub(crate) async fn put(&self, entries: &[Entry]) -> Result<(), ChatError> {
            let engine = self.status.engine().ok_or_else(|| unavailable("not connected"))?;
            let prefix = prefix();
            for entry in entries {
                let topic = Topic::parse(&entry.topic(&prefix)).map_err(unavailable)?;
                let mut id = [0u8; 16];
                let _ = getrandom::fill(&mut id);
                let flags = Flags::with_content(ContentType::Json);
                let payload = Bytes::from(entry.payload());
                let time = crate::chat::hub::now_ms();
                let envelope = Envelope::new(
                    MessageId(u128::from_be_bytes(id)),
                    topic.clone(),
                    time,
                    flags,
                    payload,
                );
                let mut bytes = BytesMut::new();
                envelope.encode(&mut bytes).map_err(unavailable)?;
                engine.retain(&topic, bytes.freeze()).await.map_err(unavailable)?;
            }
            Ok(())
        }

        /// Waits until this node has read every entry the engine held when it started
        /// following them (at most `patience`): whether it has.
        pub(crate) async fn ready(&self, patience: Duration) -> bool {
            let mut ready = self.ready.subscribe();
            tokio::time::timeout(patience, ready.wait_for(|ready| *ready)).await.is_ok()
        }

        /// Reads the engine's entries for ever (again after every failure), handing each to
        /// `apply`, until `apply` says its hub is gone.
        pub(crate) async fn follow(&self, limits: Limits, apply: impl Fn(Entry) -> bool) {
            let prefix = prefix();
            loop {
                let Some(engine) = self.status.engine() else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                match engine.retained().await {
                    Ok(mut inbox) => {
                        while let Some(bytes) = inbox.next().await {
                            if bytes.is_empty() {
                                self.ready.send_replace(true);
                                continue;
                            }
                            let Ok(envelope) = Envelope::decode(bytes, &limits) else { continue };
                            let topic = envelope.topic.as_str();
                            let parsed = Entry::parse(topic, &prefix, envelope.payload.as_ref());
                            if let Some(entry) = parsed
                                && !apply(entry)
                            {
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "chat: the cluster's state unreadable; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_go_to_topics_and_back() {
        let prefix = "$state/chat/";
        let entries = [
            Entry::Group { group: "team".into(), open: Some(true) },
            Entry::Group { group: "team".into(), open: None },
            Entry::Member { group: "team".into(), user: "bob".into(), role: Some(Role::Admin) },
            Entry::Member { group: "team".into(), user: "bob".into(), role: None },
            Entry::Device {
                user: "bob".into(),
                device: "phone".into(),
                cursor: 7,
                last_seen_ms: 9,
            },
            Entry::Read { user: "bob".into(), log: "@chat/log/d/alice/bob".into(), seq: 4 },
            Entry::Read { user: "bob".into(), log: "@chat/log/g/team".into(), seq: 5 },
            Entry::Contact { a: "alice".into(), b: "bob".into() },
            Entry::Key {
                user: "bob".into(),
                device: "phone".into(),
                identity: Some("phone:x".into()),
            },
            Entry::Key { user: "bob".into(), device: "phone".into(), identity: None },
            Entry::Online {
                user: "bob".into(),
                node: "node a/1".into(),
                devices: vec!["phone".into()],
            },
            Entry::Online { user: "bob".into(), node: "b".into(), devices: Vec::new() },
        ];
        for entry in entries {
            let topic = entry.topic(prefix);
            assert!(whispeer_core::proto::Topic::parse(&topic).is_ok(), "{topic}");
            assert_eq!(Entry::parse(&topic, prefix, &entry.payload()), Some(entry), "{topic}");
        }
        assert_eq!(Entry::parse("$state/chat/x/1", prefix, b"{}"), None);
        assert_eq!(Entry::parse("$state/chat/d/bob/phone", prefix, b"not json"), None);
    }

    /// The state's topics are reserved: the broker refuses any client's publish there.
    #[cfg(feature = "cluster")]
    #[test]
    fn no_client_can_write_the_state() {
        let entry =
            Entry::Member { group: "team".into(), user: "eve".into(), role: Some(Role::Owner) };
        let topic = whispeer_core::proto::Topic::parse(&entry.topic(&clustered::prefix())).unwrap();
        assert!(topic.is_reserved(), "{topic}");
        let broker =
            whispeer_core::Broker::builder(whispeer_core::BrokerOptions::default()).build();
        assert!(broker.publish_bytes(topic.as_str(), "{\"role\":\"owner\"}").is_err());
    }
}
