//! The [`Transport`] trait, its [`Connection`]s, the configuration and the factory.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::TopicHash;

/// A connection to one peer: whole messages in both directions, in order.
#[async_trait]
pub trait Connection: Send {
    /// The peer's id (for the relay transport with encryption, its Noise static key in hex, as
    /// the handshake proved it).
    fn peer_id(&self) -> &str;

    /// Sends one message.
    ///
    /// # Errors
    /// The connection closed, or the message is larger than
    /// [`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES).
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()>;

    /// The next message; `Ok(None)` once the peer or the path to it is gone.
    ///
    /// # Errors
    /// What arrived could not be opened (a broken or forged message): the connection is not
    /// usable after it.
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>>;

    /// Closes the connection; the peer's `receive` gives `Ok(None)`. Dropping it does the same.
    ///
    /// # Errors
    /// None today; kept for transports whose close can fail.
    async fn close(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A peer found by [`Transport::lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id.
    pub peer_id: String,
    /// Where it can be reached, as the transport writes addresses (none for the relay, which
    /// reaches every peer itself).
    pub addresses: Vec<String>,
}

/// How peers find and reach each other.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Joins `topic` to be connected: every peer that joins it too (before or after) becomes a
    /// [`Connection`] on the returned receiver, until [`disconnect`](Self::disconnect). Also
    /// announces this peer on it.
    ///
    /// # Errors
    /// The transport could not reach its network (relay, bootstrap peers) within its timeout,
    /// or the topic was refused (full).
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>>;

    /// Makes this peer findable on `topic` by [`lookup`](Self::lookup).
    ///
    /// # Errors
    /// As for `connect`.
    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()>;

    /// The peers announced on `topic` (this one left out).
    ///
    /// # Errors
    /// As for `connect`.
    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>>;

    /// Leaves every topic and closes every connection.
    ///
    /// # Errors
    /// None for the transports here; kept for others.
    async fn disconnect(&mut self) -> anyhow::Result<()>;

    /// The transport's name (`relay`, `disabled`, …).
    fn name(&self) -> &str;

    /// Where other peers can reach this one (for the DHT mode, its listen addresses ending with
    /// `/p2p/<peer id>`, which others can take as bootstrap addresses). Default: none.
    ///
    /// # Errors
    /// The transport could not start.
    async fn local_addrs(&self) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Which transport [`create_transport`](crate::create_transport) makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportMode {
    /// Direct connections found through a Kademlia DHT (on libp2p; not the Hyperswarm wire
    /// protocol; see [`crate::dht`]). Needs the feature `dht` (on by default).
    #[default]
    Hyperswarm,
    /// Through a relay (`whispeer serve --relay`), over WebSocket, end to end encrypted.
    Relay,
    /// Local only: no network.
    Disabled,
}

/// What [`create_transport`](crate::create_transport) needs; [`PeerOptions`] holds the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// The transport. Default: [`TransportMode::Hyperswarm`].
    pub mode: TransportMode,
    /// The relay, for [`TransportMode::Relay`]: `ws://host:port`, or `wss://host:port` for a
    /// relay behind TLS (the path defaults to `/relay`). Default: none.
    pub relay_url: Option<String>,
    /// How long to wait for the network (relay connection, a lookup's answer, a peer's
    /// handshake) before an error. Default: 30 000.
    pub timeout_ms: u64,
    /// End-to-end encryption of connections (Noise XX). Default: on. Off, the relay can read
    /// everything and peer ids are taken as claimed: for debugging only.
    pub encryption: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            mode: TransportMode::Hyperswarm,
            relay_url: None,
            timeout_ms: 30_000,
            encryption: true,
        }
    }
}

impl TransportConfig {
    pub(crate) fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// Settings beyond [`TransportConfig`], for [`create_transport_with`](crate::create_transport_with).
#[derive(Clone, Debug, Default)]
pub struct PeerOptions {
    /// Where the peer's key is kept, so it keeps its id across restarts (made on first use).
    /// Default: none, a new key (and id) per transport.
    pub key_file: Option<PathBuf>,
    /// A token for a relay on a server that requires one (an API key or a JWT). Default: none.
    pub relay_token: Option<String>,
    /// For a `wss://` relay: a PEM file of CA certificates to trust besides the platform's
    /// (which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`). Default: none.
    pub relay_ca: Option<PathBuf>,
    /// DHT mode: peers to join the DHT through, as multiaddrs ending with `/p2p/<peer id>`
    /// (e.g. `/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW…`). Default: none (this node is alone
    /// until others bootstrap from it).
    pub bootstrap: Vec<String>,
    /// DHT mode: addresses to listen on. Default: `/ip4/0.0.0.0/tcp/0` and
    /// `/ip4/0.0.0.0/udp/0/quic-v1`.
    pub listen: Vec<String>,
    /// DHT mode: also relay other peers' connections (libp2p circuit relay v2), for peers
    /// behind NATs. Default: off.
    pub relay_server: bool,
}

/// Local only: announcing does nothing, lookups find no one, connecting yields no connection.
#[derive(Debug, Default)]
pub struct DisabledTransport {
    /// Senders of the receivers `connect` gave: kept until `disconnect`, so the receivers wait
    /// rather than end.
    open: Vec<mpsc::Sender<Box<dyn Connection>>>,
}

impl DisabledTransport {
    /// The local-only transport.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Transport for DisabledTransport {
    async fn connect(
        &mut self,
        _topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        let (tx, rx) = mpsc::channel(1);
        self.open.push(tx);
        Ok(rx)
    }

    async fn announce(&mut self, _topic: TopicHash) -> anyhow::Result<()> {
        Ok(())
    }

    async fn lookup(&self, _topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        Ok(Vec::new())
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.open.clear();
        Ok(())
    }

    fn name(&self) -> &str {
        "disabled"
    }
}
