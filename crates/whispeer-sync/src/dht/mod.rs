//! The DHT transport ([`TransportMode::Hyperswarm`](crate::TransportMode::Hyperswarm)): a
//! Kademlia DHT on libp2p — not the Hyperswarm wire protocol. Peers announce a topic as a
//! provider record keyed by its hash (republished every 20 minutes, kept an hour) and find each
//! other with provider lookups; connections run over TCP or QUIC, encrypted and authenticated
//! by Noise XX (a peer's id is its ed25519 key), multiplexed by yamux. Peers behind NATs are
//! reached through libp2p relays (circuit v2; any node started with
//! [`PeerOptions::relay_server`](crate::PeerOptions::relay_server) is one) and upgraded to a
//! direct connection by DCUtR hole punching where the NATs allow it; AutoNAT tells a node
//! whether it is reachable.
//!
//! Of two peers on a topic, the one with the smaller id opens the connection (one stream per
//! pair and topic); the other accepts it. Connecting looks providers up every 250 ms for the
//! first 2.5 seconds, then every second for half a minute, then every five — and at once when
//! another peer stores a provider record here.

mod node;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use futures_util::StreamExt;
use libp2p::kad::RecordKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::TopicHash;
use crate::key::PeerKey;
use crate::noise::SecureConnection;
use crate::transport::{Connection, PeerInfo, PeerOptions, Transport, TransportConfig};
use node::{Command, SYNC_PROTOCOL, Settings, Status};
use wire::StreamWire;

/// Connections of a topic not yet taken by the application.
const INCOMING_QUEUE: usize = 64;

/// The DHT transport; see the module documentation.
pub struct DhtTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DhtTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtTransport").field("peer_id", &self.inner.peer_id).finish_non_exhaustive()
    }
}

struct Running {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
}

struct Inner {
    config: TransportConfig,
    peer_id: PeerId,
    settings: Mutex<Option<Settings>>,
    running: tokio::sync::OnceCell<Running>,
    topics: Mutex<HashMap<TopicHash, mpsc::Sender<Box<dyn Connection>>>>,
    /// (topic, peer) pairs with a connection (or one being made).
    connected: Arc<Mutex<HashSet<(TopicHash, PeerId)>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Per peer, what ends its streams when a hole punch gives a direct connection.
    endings: Mutex<HashMap<PeerId, CancellationToken>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn parse_all(addresses: &[String], what: &str) -> anyhow::Result<Vec<Multiaddr>> {
    addresses
        .iter()
        .map(|a| a.parse::<Multiaddr>().map_err(|e| anyhow::anyhow!("{what} address {a:?}: {e}")))
        .collect()
}

impl DhtTransport {
    /// A DHT transport as `key`, with `options`' bootstrap peers, listen addresses and relay
    /// service. Starts on first use.
    ///
    /// # Errors
    /// An address that is not a multiaddr, or a bootstrap address without `/p2p/<peer id>`.
    pub fn new(
        config: TransportConfig,
        key: &PeerKey,
        options: &PeerOptions,
    ) -> anyhow::Result<Self> {
        let mut seed: [u8; 32] = Blake2b::<U32>::new()
            .chain_update(b"whispeer-sync libp2p ed25519 v1")
            .chain_update(key.seed())
            .finalize()
            .into();
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut seed)?;
        let peer_id = keypair.public().to_peer_id();
        let bootstrap = parse_all(&options.bootstrap, "bootstrap")?;
        if let Some(bad) = bootstrap.iter().find(|a| node::peer_of(a).is_none()) {
            anyhow::bail!("bootstrap address {bad}: it must end with /p2p/<peer id>");
        }
        let listen = if options.listen.is_empty() {
            parse_all(
                &["/ip4/0.0.0.0/tcp/0".into(), "/ip4/0.0.0.0/udp/0/quic-v1".into()],
                "listen",
            )?
        } else {
            parse_all(&options.listen, "listen")?
        };
        let settings = Settings {
            keypair,
            listen,
            bootstrap,
            relay_server: options.relay_server,
            timeout: config.timeout(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                peer_id,
                settings: Mutex::new(Some(settings)),
                running: tokio::sync::OnceCell::new(),
                topics: Mutex::default(),
                connected: Arc::default(),
                tasks: Mutex::default(),
                endings: Mutex::default(),
            }),
        })
    }

    /// This peer's id (its libp2p peer id).
    pub fn peer_id(&self) -> String {
        self.inner.peer_id.to_string()
    }

    /// Starts the node if needed and gives the addresses it listens on, each ending with
    /// `/p2p/<peer id>` (what other nodes take as a bootstrap address).
    ///
    /// # Errors
    /// The node could not start (an address it cannot listen on).
    pub async fn listen_addrs(&self) -> anyhow::Result<Vec<String>> {
        let running = self.inner.start().await?;
        let status = running.status.borrow().clone();
        Ok(status.listening.iter().map(|a| format!("{a}/p2p/{}", self.inner.peer_id)).collect())
    }

    /// Connections upgraded from relayed to direct by hole punching so far, and punches that
    /// failed.
    pub fn hole_punches(&self) -> (u64, u64) {
        self.inner.running.get().map_or((0, 0), |r| {
            let status = r.status.borrow();
            (status.direct_upgrades, status.punch_failures)
        })
    }
}

impl Inner {
    /// Starts the node once; waits until it listens and, with bootstrap peers, until one is
    /// connected or all failed (up to the timeout).
    async fn start(self: &Arc<Self>) -> anyhow::Result<&Running> {
        let running = self
            .running
            .get_or_try_init(|| async {
                let settings = lock(&self.settings)
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("the transport was disconnected"))?;
                let bootstrapping = !settings.bootstrap.is_empty();
                let node::Started { commands, control, mut status, stop } = node::start(settings)?;
                let ready = status.wait_for(|s| {
                    !s.listening.is_empty()
                        && (!bootstrapping || s.peers > 0 || s.bootstrap_error.is_some())
                });
                let _ = tokio::time::timeout(self.config.timeout(), ready).await;
                let running = Running { commands, control, status, stop };
                let accept = tokio::spawn(Arc::clone(self).accept(running.control.clone()));
                let upgrades = tokio::spawn(Arc::clone(self).upgrades(running.status.clone()));
                lock(&self.tasks).extend([accept, upgrades]);
                anyhow::Ok(running)
            })
            .await?;
        Ok(running)
    }

    /// Fails with why the network is out of reach: bootstrap peers configured, none connected.
    fn reachable(running: &Running) -> anyhow::Result<()> {
        let status = running.status.borrow();
        match &status.bootstrap_error {
            Some(why) if status.peers == 0 => anyhow::bail!("no bootstrap peer reachable: {why}"),
            _ => Ok(()),
        }
    }

    async fn ask<T>(
        self: &Arc<Self>,
        command: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Command,
    ) -> anyhow::Result<T> {
        let running = self.start().await?;
        Self::reachable(running)?;
        let (done, answer) = oneshot::channel();
        running
            .commands
            .send(command(done))
            .await
            .map_err(|_| anyhow::anyhow!("the DHT node stopped"))?;
        match tokio::time::timeout(self.config.timeout(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => anyhow::bail!("the DHT node stopped"),
            Err(_) => anyhow::bail!("no answer from the DHT within {} ms", self.config.timeout_ms),
        }
    }

    async fn providers(
        self: &Arc<Self>,
        topic: TopicHash,
        dial: bool,
    ) -> anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>> {
        let key = RecordKey::new(&topic);
        self.ask(|done| Command::Lookup { key, dial, done }).await
    }

    /// What ends `peer`'s streams (see [`Inner::upgrades`]).
    fn ending(&self, peer: PeerId) -> CancellationToken {
        lock(&self.endings).entry(peer).or_default().clone()
    }

    /// Ends the streams to each peer a hole punch gave a direct connection to: they ran over the
    /// relay, and the next connection (the follow loop makes it) takes the direct one.
    async fn upgrades(self: Arc<Self>, mut status: watch::Receiver<Status>) {
        // Hole punches are counted by the status (`direct_upgrades`); the newest are listed.
        let mut done = 0;
        loop {
            let upgraded: Vec<PeerId> = {
                let status = status.borrow_and_update();
                let new = (status.direct_upgrades - done) as usize;
                done = status.direct_upgrades;
                status.upgraded.iter().rev().take(new).copied().collect()
            };
            for peer in upgraded {
                if let Some(ending) = lock(&self.endings).remove(&peer) {
                    ending.cancel();
                }
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    }

    /// Accepts other peers' connections, each on the topic its first message names.
    async fn accept(self: Arc<Self>, mut control: libp2p_stream::Control) {
        let Ok(mut incoming) = control.accept(SYNC_PROTOCOL) else { return };
        while let Some((peer, stream)) = incoming.next().await {
            let inner = Arc::clone(&self);
            tokio::spawn(async move {
                let connected = Arc::clone(&inner.connected);
                let topic_of = Arc::new(Mutex::new(None::<TopicHash>));
                let forget = Arc::clone(&topic_of);
                let mut wire = StreamWire::new(stream, inner.ending(peer), move || {
                    if let Some(topic) = *lock(&forget) {
                        lock(&connected).remove(&(topic, peer));
                    }
                });
                let first = tokio::time::timeout(
                    inner.config.timeout(),
                    crate::noise::Wire::recv(&mut wire),
                )
                .await;
                let Ok(Ok(Some(first))) = first else { return };
                let Ok(topic) = TopicHash::try_from(first.as_slice()) else { return };
                let Some(tx) = lock(&inner.topics).get(&topic).cloned() else { return };
                if !lock(&inner.connected).insert((topic, peer)) {
                    return;
                }
                *lock(&topic_of) = Some(topic);
                let _ = tx.send(Box::new(SecureConnection::plain(wire, peer.to_string()))).await;
            });
        }
    }

    /// Opens a connection to `peer` on `topic`.
    async fn dial(
        self: Arc<Self>,
        topic: TopicHash,
        peer: PeerId,
        tx: mpsc::Sender<Box<dyn Connection>>,
    ) {
        let Some(running) = self.running.get() else { return };
        let mut control = running.control.clone();
        let opened =
            tokio::time::timeout(self.config.timeout(), control.open_stream(peer, SYNC_PROTOCOL))
                .await;
        let connected = Arc::clone(&self.connected);
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(%peer, %err, "DHT peer not reachable");
                lock(&connected).remove(&(topic, peer));
                return;
            }
            Err(_) => {
                lock(&connected).remove(&(topic, peer));
                return;
            }
        };
        let mut wire = StreamWire::new(stream, self.ending(peer), move || {
            lock(&connected).remove(&(topic, peer));
        });
        if crate::noise::Wire::send(&mut wire, topic.to_vec()).await.is_err() {
            return;
        }
        let _ = tx.send(Box::new(SecureConnection::plain(wire, peer.to_string()))).await;
    }

    /// Finds the topic's providers and connects to those this side should dial, for ever.
    async fn follow(self: Arc<Self>, topic: TopicHash, tx: mpsc::Sender<Box<dyn Connection>>) {
        let me = self.peer_id.to_bytes();
        let Some(mut status) = self.running.get().map(|r| r.status.clone()) else { return };
        let mut seen = status.borrow_and_update().providers_added;
        for round in 0u32.. {
            match self.providers(topic, true).await {
                Ok(found) => {
                    for (peer, _) in found {
                        let mine = me < peer.to_bytes();
                        if mine && lock(&self.connected).insert((topic, peer)) {
                            tokio::spawn(Arc::clone(&self).dial(topic, peer, tx.clone()));
                        }
                    }
                }
                Err(err) => tracing::debug!(%err, "DHT lookup failed; retrying"),
            }
            if tx.is_closed() {
                break;
            }
            let pause = match round {
                0..10 => Duration::from_millis(250),
                10..40 => Duration::from_secs(1),
                _ => Duration::from_secs(5),
            };
            // Until the next round, or until a peer stores a provider record here.
            let added = status.wait_for(|s| s.providers_added != seen);
            if let Ok(Ok(now)) = tokio::time::timeout(pause, added).await {
                seen = now.providers_added;
            }
        }
    }

    fn shut(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        lock(&self.topics).clear();
        if let Some(running) = self.running.get() {
            running.stop.send_replace(true);
        }
    }
}

#[async_trait]
impl Transport for DhtTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        // Ready to accept the topic's connections before anyone can find this node on it:
        // peers that see the provider record dial at once, before `announce` returns here.
        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        lock(&self.inner.topics).insert(topic, tx.clone());
        if let Err(err) = self.announce(topic).await {
            lock(&self.inner.topics).remove(&topic);
            return Err(err);
        }
        let follow = tokio::spawn(Arc::clone(&self.inner).follow(topic, tx));
        lock(&self.inner.tasks).push(follow);
        Ok(rx)
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        let key = RecordKey::new(&topic);
        self.inner.ask(|done| Command::Announce { key, done }).await
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        let found = self.inner.providers(topic, false).await?;
        Ok(found
            .into_iter()
            .map(|(peer, addresses)| PeerInfo {
                peer_id: peer.to_string(),
                addresses: addresses.iter().map(ToString::to_string).collect(),
            })
            .collect())
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.inner.shut();
        Ok(())
    }

    fn name(&self) -> &str {
        "dht"
    }

    async fn local_addrs(&self) -> anyhow::Result<Vec<String>> {
        self.listen_addrs().await
    }
}

impl Drop for DhtTransport {
    fn drop(&mut self) {
        self.inner.shut();
    }
}
