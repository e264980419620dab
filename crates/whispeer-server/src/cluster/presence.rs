//! Which principals are connected to which node, cluster-wide. Every round of the membership
//! (see `members`), each node sends the principals connected to it — in chunks, one round
//! number per snapshot — and every node keeps, per node, the last complete snapshot it heard.
//! A node's snapshot replaces the one before (so a principal that left is gone a round later)
//! and expires with the node's membership entry (so a dead node's principals are gone within
//! its expiry). Lookups are local: nothing is asked of other nodes when a client wants to know.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;

use super::members::EXPIRES_AFTER;

/// Principals per chunk of a snapshot.
const CHUNK: usize = 512;
/// Largest chunk accepted from the engine (512 principals of up to 256 bytes each, and room).
pub(crate) const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// Principals remembered per node; beyond it a snapshot is cut (and the node's entry says so).
const MAX_PER_NODE: usize = 100_000;

/// One chunk of a node's principals, as it crosses the engine.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Chunk {
    /// The node whose principals these are.
    pub(crate) presence_of: String,
    /// The snapshot's round: chunks of one round make one snapshot.
    pub(crate) round: u64,
    /// Whether this is the snapshot's last chunk.
    pub(crate) last: bool,
    /// Principals and how many connections each has on that node.
    pub(crate) principals: Vec<(String, u32)>,
}

/// `principals` of `node`, in round `round`, as encoded chunks (at least one, so an empty
/// snapshot also replaces the last one).
pub(crate) fn chunks(node: &str, round: u64, principals: &BTreeMap<String, u32>) -> Vec<Bytes> {
    let all: Vec<(String, u32)> = principals.iter().map(|(p, n)| (p.clone(), *n)).collect();
    let parts: Vec<&[(String, u32)]> =
        if all.is_empty() { vec![&[]] } else { all.chunks(CHUNK).collect() };
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            let chunk = Chunk {
                presence_of: node.to_string(),
                round,
                last: i + 1 == count,
                principals: part.to_vec(),
            };
            // Strings and numbers always serialize.
            Bytes::from(serde_json::to_vec(&chunk).unwrap_or_default())
        })
        .collect()
}

/// One node's principals.
#[derive(Debug)]
struct NodePresence {
    principals: BTreeMap<String, u32>,
    /// The snapshot being received: its round and what came so far.
    filling: Option<(u64, BTreeMap<String, u32>)>,
    heard: Instant,
    cut: bool,
}

/// Every node's principals, as last heard.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    nodes: Mutex<HashMap<String, NodePresence>>,
}

/// Where one principal is connected: each node and its connection count there.
pub type Whereabouts = Vec<(String, u32)>;

impl Presence {
    /// Takes in a chunk heard at `now`.
    pub(crate) fn take(&self, chunk: Chunk, now: Instant) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let node = nodes.entry(chunk.presence_of).or_insert_with(|| NodePresence {
            principals: BTreeMap::new(),
            filling: None,
            heard: now,
            cut: false,
        });
        if node.filling.as_ref().is_none_or(|(round, _)| *round != chunk.round) {
            node.filling = Some((chunk.round, BTreeMap::new()));
        }
        if let Some((_, filling)) = &mut node.filling {
            for (principal, count) in chunk.principals {
                if filling.len() < MAX_PER_NODE || filling.contains_key(&principal) {
                    filling.insert(principal, count);
                } else {
                    node.cut = true;
                }
            }
        }
        if chunk.last
            && let Some((_, complete)) = node.filling.take()
        {
            node.principals = complete;
            node.heard = now;
        }
    }

    /// Forgets what was not heard within the membership's expiry, and node `gone` (which said
    /// goodbye), if any.
    pub(crate) fn expire(&self, now: Instant, gone: Option<&str>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.retain(|name, node| {
            Some(name.as_str()) != gone && now.duration_since(node.heard) < EXPIRES_AFTER
        });
    }

    /// Every principal connected somewhere, with its nodes (by name).
    pub(crate) fn all(&self) -> BTreeMap<String, Whereabouts> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: BTreeMap<String, Whereabouts> = BTreeMap::new();
        for (name, node) in nodes.iter() {
            for (principal, count) in &node.principals {
                all.entry(principal.clone()).or_default().push((name.clone(), *count));
            }
        }
        for nodes in all.values_mut() {
            nodes.sort();
        }
        all
    }

    /// Where `principal` is connected.
    pub(crate) fn of(&self, principal: &str) -> Whereabouts {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found: Whereabouts = nodes
            .iter()
            .filter_map(|(name, node)| node.principals.get(principal).map(|n| (name.clone(), *n)))
            .collect();
        found.sort();
        found
    }

    /// Nodes whose snapshot was cut at the per-node bound.
    pub(crate) fn cut(&self) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.iter().filter(|(_, node)| node.cut).map(|(name, _)| name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn decode(bytes: &Bytes) -> Chunk {
        serde_json::from_slice(bytes).expect("a chunk")
    }

    #[test]
    fn snapshots_replace_each_other_arrive_in_chunks_and_expire_with_their_node() {
        let presence = Presence::default();
        let now = Instant::now();
        let many: BTreeMap<String, u32> = (0..1200).map(|i| (format!("user{i:04}"), 1)).collect();
        let parts = chunks("a", 1, &many);
        assert_eq!(parts.len(), 3, "512 principals a chunk");
        for (i, part) in parts.iter().enumerate() {
            presence.take(decode(part), now);
            let complete = i + 1 == parts.len();
            assert_eq!(
                presence.all().len(),
                if complete { 1200 } else { 0 },
                "only whole snapshots count"
            );
        }
        let b: BTreeMap<String, u32> = [("user0001".to_string(), 2)].into();
        presence.take(decode(&chunks("b", 7, &b)[0]), now);
        assert_eq!(presence.of("user0001"), [("a".to_string(), 1), ("b".to_string(), 2)]);
        // The next round of a: everyone but one left.
        let left: BTreeMap<String, u32> = [("user0002".to_string(), 1)].into();
        presence.take(decode(&chunks("a", 2, &left)[0]), now);
        assert_eq!(presence.of("user0001"), [("b".to_string(), 2)]);
        assert_eq!(presence.all().len(), 2);
        // An empty snapshot empties; a node not heard again expires; a goodbye removes at once.
        presence.take(decode(&chunks("a", 3, &BTreeMap::new())[0]), now);
        assert!(presence.of("user0002").is_empty());
        presence.expire(now + Duration::from_secs(1), Some("b"));
        assert!(presence.of("user0001").is_empty(), "b said goodbye");
        presence.take(decode(&chunks("c", 1, &left)[0]), now);
        presence.expire(now + EXPIRES_AFTER, None);
        assert!(presence.all().is_empty(), "c was not heard again");
    }
}
