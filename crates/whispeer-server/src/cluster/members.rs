//! Which nodes make up the cluster. Each node sends an entry about itself through the engine
//! to every node every [`ANNOUNCE_EVERY`], and every node keeps the entries it heard for
//! [`EXPIRES_AFTER`]: a node that dies (or loses the engine) drops out of every list by
//! itself, and one that stops cleanly says so and drops out at once. Nothing is stored in the
//! engine (plain subjects, no JetStream needed): a node that starts knows the others after one
//! round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use whispeer_core::Broker;

use super::Engine;
use super::presence::{self, Chunk, Presence};
use crate::registry::Connections;

/// How often a node writes its entry and reads everyone's.
pub(crate) const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// How long the engine keeps an entry after its last write.
pub(crate) const EXPIRES_AFTER: Duration = Duration::from_secs(10);
/// Most nodes remembered (entries from further nodes are not listed, and counted).
const MAX_NODES: usize = 1024;
/// Largest entry accepted from the engine.
const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// One node as it announced itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct NodeInfo {
    /// The node's name (`[cluster] node`).
    pub node: String,
    /// Where its listeners accept clients.
    pub addrs: Vec<String>,
    /// The engine server it is connected to.
    pub engine_server: Option<String>,
    /// When it started, in milliseconds since the epoch.
    pub started_ms: u64,
    /// When it last wrote its entry.
    pub seen_ms: u64,
    /// Its whispeer version.
    pub version: String,
    /// Set in the last entry of a node that stops cleanly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// The cluster's nodes as this node last read them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Membership {
    /// Every node with a live entry, by name (this one included once it has announced).
    pub nodes: Vec<NodeInfo>,
    /// Why this node cannot hear the others now, if it cannot (the engine is unreachable).
    pub error: Option<String>,
}

/// The latest membership, shared by the announcing task and the status handle, and the
/// addresses this node advertises to clients.
#[derive(Debug, Default)]
pub(crate) struct Members {
    membership: Mutex<Membership>,
    advertised: Mutex<Vec<String>>,
    /// Every node's principals (see `presence`).
    pub(crate) presence: Presence,
    /// This node's connections, whose principals it announces.
    connections: Mutex<Option<Arc<Connections>>>,
}

impl Members {
    pub(crate) fn get(&self) -> Membership {
        self.membership.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, membership: Membership) {
        *self.membership.lock().unwrap_or_else(PoisonError::into_inner) = membership;
    }

    pub(crate) fn watch(&self, connections: Arc<Connections>) {
        *self.connections.lock().unwrap_or_else(PoisonError::into_inner) = Some(connections);
    }

    fn principals(&self) -> Option<std::collections::BTreeMap<String, u32>> {
        let connections = self.connections.lock().unwrap_or_else(PoisonError::into_inner);
        connections.as_ref().map(|connections| connections.principals())
    }

    pub(crate) fn advertise(&self, addrs: Vec<String>) {
        *self.advertised.lock().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// The advertised addresses, or else the broker's own listeners.
    fn addrs(&self, broker: &Broker) -> Vec<String> {
        let advertised = self.advertised.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if advertised.is_empty() {
            broker.local_addrs().iter().map(ToString::to_string).collect()
        } else {
            advertised
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The entries heard lately, by node name.
#[derive(Default)]
struct Heard {
    entries: HashMap<String, (NodeInfo, Instant)>,
}

impl Heard {
    /// Takes in what came from the engine: a node's entry here, a chunk of its principals into
    /// `presence`; `false` if it is neither.
    fn take(&mut self, bytes: &[u8], now: Instant, presence: &Presence) -> bool {
        if bytes.len() <= MAX_ENTRY_BYTES
            && let Ok(entry) = serde_json::from_slice::<NodeInfo>(bytes)
        {
            if entry.leaving {
                self.entries.remove(&entry.node);
                presence.expire(now, Some(&entry.node));
            } else if self.entries.len() < MAX_NODES || self.entries.contains_key(&entry.node) {
                self.entries.insert(entry.node.clone(), (entry, now));
            }
            return true;
        }
        if bytes.len() <= presence::MAX_CHUNK_BYTES
            && let Ok(chunk) = serde_json::from_slice::<Chunk>(bytes)
        {
            presence.take(chunk, now);
            return true;
        }
        false
    }

    /// The nodes heard within `EXPIRES_AFTER` of `now`, by name; older entries are forgotten.
    fn live(&mut self, now: Instant) -> Vec<NodeInfo> {
        self.entries.retain(|_, (_, heard)| now.duration_since(*heard) < EXPIRES_AFTER);
        let mut nodes: Vec<NodeInfo> = self.entries.values().map(|(e, _)| e.clone()).collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }
}

/// This node's entry now.
fn entry(
    engine: &dyn Engine,
    members: &Members,
    broker: &Broker,
    node: &str,
    started_ms: u64,
) -> NodeInfo {
    NodeInfo {
        node: node.to_string(),
        addrs: members.addrs(broker),
        engine_server: engine.server(),
        started_ms,
        seen_ms: now_ms(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        leaving: false,
    }
}

fn encode(entry: &NodeInfo) -> Bytes {
    // A struct of strings and numbers always serializes.
    Bytes::from(serde_json::to_vec(entry).unwrap_or_default())
}

/// Sends this node's entry every round and keeps the entries heard, until dropped; then (a
/// clean stop) [`leave`] says goodbye.
pub(super) async fn announce(
    engine: Arc<dyn Engine>,
    members: Arc<Members>,
    broker: Broker,
    node: String,
) {
    let started_ms = now_ms();
    let mut round = 0u64;
    let mut heard = Heard::default();
    let mut inbox = None;
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if inbox.is_none() {
            match engine.membership().await {
                Ok(subscribed) => inbox = Some(subscribed),
                Err(err) => {
                    tracing::debug!(%err, "cluster: membership subscription failed; retrying")
                }
            }
        }
        let heard_one = async {
            match inbox.as_mut() {
                Some(inbox) => inbox.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                let me = entry(&*engine, &members, &broker, &node, started_ms);
                let mut sent = engine.announce(encode(&me)).await;
                if let (Ok(()), Some(principals)) = (&sent, members.principals()) {
                    round += 1;
                    for chunk in presence::chunks(&node, round, &principals) {
                        sent = engine.announce(chunk).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                }
                let now = Instant::now();
                members.presence.expire(now, None);
                let mut nodes = heard.live(now);
                let error = match (sent, engine.connected()) {
                    (Ok(()), true) => None,
                    (Err(err), _) => Some(err.to_string()),
                    (Ok(()), false) => Some("the cluster engine is unreachable".to_string()),
                };
                if !nodes.iter().any(|n| n.node == me.node) {
                    nodes.push(me);
                    nodes.sort_by(|a, b| a.node.cmp(&b.node));
                }
                members.set(Membership { nodes, error });
            }
            received = heard_one => match received {
                Some(bytes) => {
                    if !heard.take(&bytes, Instant::now(), &members.presence) {
                        tracing::debug!("cluster: a membership entry did not decode");
                    }
                }
                None => inbox = None,
            },
        }
    }
}

/// Tells the other nodes that this one is stopping, so they drop it at once.
pub(super) async fn leave(engine: &dyn Engine, node: &str) {
    let goodbye = NodeInfo {
        node: node.to_string(),
        addrs: Vec::new(),
        engine_server: None,
        started_ms: 0,
        seen_ms: now_ms(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        leaving: true,
    };
    let said = async {
        engine.announce(encode(&goodbye)).await?;
        engine.flush().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), said).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node: &str) -> NodeInfo {
        NodeInfo {
            node: node.into(),
            addrs: vec!["127.0.0.1:7461".into()],
            engine_server: None,
            started_ms: 1,
            seen_ms: 2,
            version: "0".into(),
            leaving: false,
        }
    }

    #[test]
    fn entries_expire_a_goodbye_removes_at_once_and_garbage_is_refused() {
        let mut heard = Heard::default();
        let presence = Presence::default();
        let start = Instant::now();
        assert!(heard.take(&encode(&info("b")), start, &presence));
        assert!(heard.take(&encode(&info("a")), start + Duration::from_secs(5), &presence));
        let names = |nodes: Vec<NodeInfo>| nodes.into_iter().map(|n| n.node).collect::<Vec<_>>();
        assert_eq!(names(heard.live(start + Duration::from_secs(6))), ["a", "b"]);
        assert_eq!(names(heard.live(start + EXPIRES_AFTER)), ["a"], "b was not heard again");
        let goodbye = NodeInfo { leaving: true, ..info("a") };
        assert!(heard.take(&encode(&goodbye), start + EXPIRES_AFTER, &presence));
        assert!(heard.live(start + EXPIRES_AFTER).is_empty(), "a said goodbye");
        assert!(!heard.take(b"{not json", start, &presence));
        let huge = vec![b' '; presence::MAX_CHUNK_BYTES + 1];
        assert!(!heard.take(&huge, start, &presence));
    }
}
