//! The relay transport: peers meet on a `whispeer serve --relay` over WebSocket (`/relay`),
//! which pairs peers of a topic and forwards each pair's bytes; the peers run Noise XX end to
//! end through it, so the relay sees only ciphertext and cannot pass one peer off as another
//! (a peer's id is its Noise static key).
//!
//! One WebSocket per transport carries every topic and link. When it drops (the relay
//! restarted), the transport reconnects with backoff (100 ms doubling to 5 s) and joins its
//! topics again; the connections of the lost session end (`receive` gives `Ok(None)`) and new
//! ones arrive on the same receivers once the peers are back.
//!
//! Queues, each bounded: 256 messages to the relay (a full one makes `send` wait), 64 messages
//! per link from it (a full one stops reading the relay for every link until the application
//! reads — back-pressure, never a drop), 64 connections per topic not yet taken from
//! `connect`'s receiver (a full one makes later handshakes wait).

mod session;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::TopicHash;
use crate::key::PeerKey;
use crate::transport::{Connection, PeerInfo, PeerOptions, Transport, TransportConfig};
use session::Session;

/// The relay transport; see the module documentation.
#[derive(Debug)]
pub struct RelayTransport {
    session: Arc<Session>,
}

impl RelayTransport {
    /// A transport through the relay at `config.relay_url`, as `key`. Connects on first use.
    ///
    /// # Errors
    /// No relay URL, or one that is not `ws://` or `wss://`.
    pub fn new(
        config: TransportConfig,
        key: PeerKey,
        options: PeerOptions,
    ) -> anyhow::Result<Self> {
        let Some(url) = config.relay_url.clone() else {
            anyhow::bail!("relay mode needs a relay_url (ws://host:port)");
        };
        let url = relay_url(&url)?;
        let tls = if url.starts_with("wss://") {
            Some(session::tls_connector(options.relay_ca.as_deref())?)
        } else {
            None
        };
        Ok(Self { session: Session::new(config, key, url, options.relay_token, tls) })
    }

    /// This peer's id (its Noise static key in hex).
    pub fn peer_id(&self) -> &str {
        self.session.peer_id()
    }
}

/// The URL with `/relay` as its path when it has none.
fn relay_url(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| anyhow::anyhow!("relay URL {url:?}: must start with ws:// or wss://"))?;
    Ok(match rest.find('/') {
        None => format!("{url}/relay"),
        Some(at) if rest[at..] == *"/" => format!("{}relay", url),
        Some(_) => url.to_string(),
    })
}

#[async_trait]
impl Transport for RelayTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.session.join(topic, true).await.map(|rx| rx.unwrap_or_else(|| mpsc::channel(1).1))
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.session.join(topic, false).await.map(drop)
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        let peers = self.session.lookup(topic).await?;
        Ok(peers.into_iter().map(|peer_id| PeerInfo { peer_id, addresses: Vec::new() }).collect())
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.session.shut();
        Ok(())
    }

    fn name(&self) -> &str {
        "relay"
    }
}

impl Drop for RelayTransport {
    fn drop(&mut self) {
        self.session.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::relay_url;

    #[test]
    fn the_path_defaults_to_relay() {
        assert_eq!(relay_url("ws://h:1").ok().as_deref(), Some("ws://h:1/relay"));
        assert_eq!(relay_url("ws://h:1/").ok().as_deref(), Some("ws://h:1/relay"));
        assert_eq!(relay_url("ws://h:1/p2p").ok().as_deref(), Some("ws://h:1/p2p"));
        assert!(relay_url("http://h:1").is_err());
    }
}
