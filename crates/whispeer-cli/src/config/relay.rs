//! `[relay]`: the P2P relay at `/relay` on the WebSocket listener (off unless `enabled`, or
//! `--relay` is given).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use whispeer::server::RelayConfig;

/// `[relay]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Relay {
    /// Serve the relay at `/relay` on the WebSocket listener (`ws_listen` must be set).
    pub(crate) enabled: bool,
    /// Peers joined to one topic; a join past it is refused.
    pub(crate) max_peers_per_topic: usize,
    /// Topics one connection joins.
    pub(crate) max_topics_per_connection: usize,
    /// Links one connection has open.
    pub(crate) max_links_per_connection: usize,
    /// Bytes per second one connection forwards; past it the relay reads it more slowly.
    pub(crate) bytes_per_second: u64,
    /// Milliseconds a connection may be silent before it is closed.
    pub(crate) idle_timeout_ms: u64,
    /// Largest message a peer may send.
    pub(crate) max_message_bytes: usize,
}

impl Default for Relay {
    fn default() -> Self {
        let relay = RelayConfig::default();
        Self {
            enabled: false,
            max_peers_per_topic: relay.max_peers_per_topic,
            max_topics_per_connection: relay.max_topics_per_connection,
            max_links_per_connection: relay.max_links_per_connection,
            bytes_per_second: relay.bytes_per_second,
            idle_timeout_ms: relay.idle_timeout.as_millis() as u64,
            max_message_bytes: relay.max_message_bytes,
        }
    }
}

impl Relay {
    /// The relay's bounds, or `None` when it is off.
    ///
    /// # Errors
    /// A bound too small for the relay to work, naming the key and its least value.
    pub(crate) fn settings(&self) -> anyhow::Result<Option<RelayConfig>> {
        if !self.enabled {
            return Ok(None);
        }
        let least: [(&str, u64, u64); 6] = [
            ("max_peers_per_topic", self.max_peers_per_topic as u64, 2),
            ("max_topics_per_connection", self.max_topics_per_connection as u64, 1),
            ("max_links_per_connection", self.max_links_per_connection as u64, 1),
            ("bytes_per_second", self.bytes_per_second, 1),
            ("idle_timeout_ms", self.idle_timeout_ms, 1_000),
            // A Noise message (64 KiB) and the link header must fit.
            ("max_message_bytes", self.max_message_bytes as u64, 65_535 + 9),
        ];
        if let Some((key, value, min)) = least.iter().find(|(_, value, min)| value < min) {
            anyhow::bail!("relay.{key} = {value}: it must be at least {min}");
        }
        Ok(Some(RelayConfig {
            max_peers_per_topic: self.max_peers_per_topic,
            max_topics_per_connection: self.max_topics_per_connection,
            max_links_per_connection: self.max_links_per_connection,
            bytes_per_second: self.bytes_per_second,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_message_bytes: self.max_message_bytes,
        }))
    }
}
