//! The libp2p node behind a DHT transport: one task owns the swarm (Kademlia, identify,
//! AutoNAT, relay client and optionally relay server, DCUtR, streams) and serves the
//! transport's commands; everything else talks to it through a bounded command queue.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use libp2p::kad::{self, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, identify, noise, relay, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot, watch};

/// The protocol of connections between transports.
pub(super) const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispeer-sync/1.0.0");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/whispeer-sync/kad/1.0.0");
/// Provider records live an hour here and are republished every 20 minutes, well before.
const PROVIDER_TTL: Duration = Duration::from_secs(60 * 60);
const REPUBLISH: Duration = Duration::from_secs(20 * 60);
/// Commands queued for the swarm task.
const COMMANDS: usize = 256;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    kademlia: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    autonat: autonat::Behaviour,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// Providers found by a lookup, with the addresses known for each.
pub(super) type Providers = Vec<(PeerId, Vec<Multiaddr>)>;

/// What the swarm task hands back when it starts.
pub(super) struct Started {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) control: libp2p_stream::Control,
    pub(super) status: watch::Receiver<Status>,
    pub(super) stop: watch::Sender<bool>,
}

/// What the transport asks of the swarm task.
pub(super) enum Command {
    Announce {
        key: RecordKey,
        done: oneshot::Sender<anyhow::Result<()>>,
    },
    /// Providers of `key` (this node left out) with the addresses known for them; with `dial`,
    /// each is dialled while the query still knows its addresses.
    Lookup {
        key: RecordKey,
        dial: bool,
        done: oneshot::Sender<anyhow::Result<Providers>>,
    },
}

/// What the swarm task reports.
#[derive(Clone, Debug, Default)]
pub(super) struct Status {
    /// Addresses it listens on.
    pub(super) listening: Vec<Multiaddr>,
    /// Peers connected now.
    pub(super) peers: usize,
    /// Why bootstrap peers could not be reached, while none is connected.
    pub(super) bootstrap_error: Option<String>,
    /// Connections upgraded from relayed to direct by hole punching.
    pub(super) direct_upgrades: u64,
    /// Hole punches that failed.
    pub(super) punch_failures: u64,
    /// Provider records other peers stored here: a peer may just have joined a topic.
    pub(super) providers_added: u64,
    /// The last (up to 256) peers a hole punch gave a direct connection to, in order (the
    /// transport moves its connections to them off the relay).
    pub(super) upgraded: std::collections::VecDeque<PeerId>,
}

/// Settings of the node.
pub(super) struct Settings {
    pub(super) keypair: libp2p::identity::Keypair,
    pub(super) listen: Vec<Multiaddr>,
    pub(super) bootstrap: Vec<Multiaddr>,
    pub(super) relay_server: bool,
    pub(super) timeout: Duration,
}

/// Builds the swarm and starts its task.
pub(super) fn start(settings: Settings) -> anyhow::Result<Started> {
    let relay_server = settings.relay_server;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(settings.keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut config = kad::Config::new(KAD_PROTOCOL);
            config
                .set_provider_record_ttl(Some(PROVIDER_TTL))
                .set_provider_publication_interval(Some(REPUBLISH))
                .set_query_timeout(settings.timeout);
            let mut kademlia =
                kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), config);
            kademlia.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(identify::Config::new(
                "/whispeer-sync/id/1.0.0".into(),
                key.public(),
            ));
            let autonat = autonat::Behaviour::new(
                peer_id,
                autonat::Config { only_global_ips: false, ..autonat::Config::default() },
            );
            let relay = relay_server.then(|| {
                // Raised from 2 minutes and 128 KiB: a sync connection may stay relayed.
                let config = relay::Config {
                    max_circuit_duration: Duration::from_secs(60 * 60),
                    max_circuit_bytes: 1 << 30,
                    ..relay::Config::default()
                };
                relay::Behaviour::new(peer_id, config)
            });
            Behaviour {
                kademlia,
                identify,
                autonat,
                relay_client,
                relay: Toggle::from(relay),
                dcutr: dcutr::Behaviour::new(peer_id),
                stream: libp2p_stream::Behaviour::new(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    for address in &settings.listen {
        swarm.listen_on(address.clone())?;
    }
    let control = swarm.behaviour().stream.new_control();
    let (commands, rx) = mpsc::channel(COMMANDS);
    let (status, status_rx) = watch::channel(Status::default());
    let (stop, stopped) = watch::channel(false);
    let task = Task {
        swarm,
        commands: rx,
        status,
        bootstrap: settings.bootstrap,
        announces: HashMap::new(),
        lookups: HashMap::new(),
        bootstrap_errors: HashMap::new(),
        announced: HashSet::new(),
        reserved: HashSet::new(),
        remote: HashMap::new(),
        relayed: HashMap::new(),
    };
    tokio::spawn(task.run(stopped));
    Ok(Started { commands, control, status: status_rx, stop })
}

struct Lookup {
    dial: bool,
    found: HashSet<PeerId>,
    done: oneshot::Sender<anyhow::Result<Providers>>,
}

struct Task {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    bootstrap: Vec<Multiaddr>,
    announces: HashMap<kad::QueryId, oneshot::Sender<anyhow::Result<()>>>,
    lookups: HashMap<kad::QueryId, Lookup>,
    bootstrap_errors: HashMap<PeerId, String>,
    /// Topics announced, provided again when this node's addresses change.
    announced: HashSet<RecordKey>,
    /// Bootstrap peers that relay, on which this node holds a reservation.
    reserved: HashSet<PeerId>,
    /// The address each peer was dialled at.
    remote: HashMap<PeerId, Multiaddr>,
    /// Relayed connections per peer, closed once a hole punch gives a direct one.
    relayed: HashMap<PeerId, Vec<libp2p::swarm::ConnectionId>>,
}

/// The peer id at the end of `address` (`/p2p/<id>`).
pub(super) fn peer_of(address: &Multiaddr) -> Option<PeerId> {
    address.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

impl Task {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        self.dial_bootstrap();
        let mut redial = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = redial.tick() => {
                    if self.swarm.connected_peers().next().is_none() && !self.bootstrap.is_empty() {
                        self.dial_bootstrap();
                    }
                }
            }
        }
        self.close().await;
    }

    /// Closes every connection and waits (up to a second) until they are closed, so peers
    /// learn at once that this node left — a QUIC connection dropped without its close would
    /// only time out on their side.
    async fn close(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let drained = async {
            while self.swarm.connected_peers().next().is_some() {
                self.swarm.select_next_some().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
    }

    fn dial_bootstrap(&mut self) {
        for address in self.bootstrap.clone() {
            if let Some(peer) = peer_of(&address) {
                self.swarm.behaviour_mut().kademlia.add_address(&peer, address.clone());
            }
            if let Err(err) = self.swarm.dial(address.clone()) {
                self.bootstrap_failed(&address, err.to_string());
            }
        }
        if !self.bootstrap.is_empty() {
            let _ = self.swarm.behaviour_mut().kademlia.bootstrap();
        }
    }

    fn bootstrap_failed(&mut self, address: &Multiaddr, why: String) {
        if let Some(peer) = peer_of(address) {
            self.bootstrap_errors.insert(peer, format!("{address}: {why}"));
        }
        let errors: Vec<String> = self.bootstrap_errors.values().cloned().collect();
        self.status.send_modify(|s| s.bootstrap_error = Some(errors.join("; ")));
    }

    fn command(&mut self, command: Command) {
        let kad = &mut self.swarm.behaviour_mut().kademlia;
        match command {
            Command::Announce { key, done } => match kad.start_providing(key.clone()) {
                Ok(id) => {
                    self.announced.insert(key);
                    self.announces.insert(id, done);
                }
                Err(err) => drop(done.send(Err(anyhow::anyhow!("announce: {err}")))),
            },
            Command::Lookup { key, dial, done } => {
                let id = kad.get_providers(key);
                self.lookups.insert(id, Lookup { dial, found: HashSet::new(), done });
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                // Reachable as far as this node knows (a LAN, loopback): confirmed, so provider
                // records carry it. AutoNAT and relay reservations confirm others.
                self.swarm.add_external_address(address.clone());
                self.status.send_modify(|s| s.listening.push(address));
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. } => {
                let relayed = endpoint.is_relayed();
                if relayed {
                    self.relayed.entry(peer_id).or_default().push(connection_id);
                }
                tracing::info!(peer = %peer_id, relayed, address = %endpoint.get_remote_address(), "connected");
                if endpoint.is_dialer() && !relayed {
                    self.remote.insert(peer_id, endpoint.get_remote_address().clone());
                }
                self.bootstrap_errors.remove(&peer_id);
                let peers = self.swarm.connected_peers().count();
                self.status.send_modify(|s| {
                    s.peers = peers;
                    s.bootstrap_error = None;
                });
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, .. } => {
                if let Some(relayed) = self.relayed.get_mut(&peer_id) {
                    relayed.retain(|c| *c != connection_id);
                }
                let peers = self.swarm.connected_peers().count();
                self.status.send_modify(|s| s.peers = peers);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                let bootstrap = self.bootstrap.iter().find(|a| peer_of(a) == Some(peer)).cloned();
                if let Some(address) = bootstrap {
                    self.bootstrap_failed(&address, error.to_string());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for address in info.listen_addrs {
                        self.swarm.behaviour_mut().kademlia.add_address(&peer_id, address);
                    }
                }
                self.reserve(peer_id, &info.protocols);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "reachable at");
                // Provider records carry the addresses of when they were made: make them again.
                for key in self.announced.clone() {
                    let _ = self.swarm.behaviour_mut().kademlia.start_providing(key);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => tracing::info!(relay = %relay_peer_id, "reachable through the relay"),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => {
                let ok = event.result.is_ok();
                match &event.result {
                    Ok(_) => {
                        tracing::info!(peer = %event.remote_peer_id, "hole punched: direct connection");
                        // The relayed connection goes once its streams have: the transport ends
                        // them, and its next connection to the peer takes the direct one.
                        for id in self.relayed.remove(&event.remote_peer_id).unwrap_or_default() {
                            self.swarm.close_connection(id);
                        }
                    }
                    Err(err) => {
                        tracing::info!(peer = %event.remote_peer_id, %err, "hole punch failed: staying relayed")
                    }
                }
                let peer = event.remote_peer_id;
                self.status.send_modify(|s| {
                    if ok {
                        s.direct_upgrades += 1;
                        if s.upgraded.len() == 256 {
                            s.upgraded.pop_front();
                        }
                        s.upgraded.push_back(peer);
                    } else {
                        s.punch_failures += 1;
                    }
                });
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kademlia(kad::Event::InboundRequest {
                request: kad::InboundRequest::AddProvider { .. },
            })) => self.status.send_modify(|s| s.providers_added += 1),
            SwarmEvent::Behaviour(BehaviourEvent::Kademlia(
                kad::Event::OutboundQueryProgressed { id, result, step, .. },
            )) => self.progress(id, result, step.last),
            _ => {}
        }
    }

    fn progress(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::StartProviding(result)
            | kad::QueryResult::RepublishProvider(result) => {
                if let Some(done) = self.announces.remove(&id) {
                    // Stored here either way; with no peer to take it, it is found once one is.
                    let outcome = match result {
                        Err(err) if self.swarm.connected_peers().next().is_none() => {
                            match self.status.borrow().bootstrap_error.clone() {
                                Some(why) => {
                                    Err(anyhow::anyhow!("no bootstrap peer reachable: {why}"))
                                }
                                None => {
                                    tracing::debug!(%err, "announced with no peer yet");
                                    Ok(())
                                }
                            }
                        }
                        _ => Ok(()),
                    };
                    let _ = done.send(outcome);
                }
            }
            kad::QueryResult::GetProviders(result) => {
                let me = *self.swarm.local_peer_id();
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result
                    && let Some(lookup) = self.lookups.get_mut(&id)
                {
                    for peer in providers.into_iter().filter(|p| *p != me) {
                        if lookup.found.insert(peer)
                            && lookup.dial
                            && !self.swarm.is_connected(&peer)
                        {
                            // Dialled now: the query still knows the provider's addresses.
                            let _ = self.swarm.dial(peer);
                        }
                    }
                }
                if last && let Some(lookup) = self.lookups.remove(&id) {
                    let found = lookup
                        .found
                        .into_iter()
                        .map(|peer| {
                            let addresses = self.addresses_of(&peer);
                            (peer, addresses)
                        })
                        .collect();
                    let _ = lookup.done.send(Ok(found));
                }
            }
            _ => {}
        }
    }

    /// Holds a reservation on a bootstrap peer that relays, so peers behind NATs reach this
    /// one through it (and DCUtR can then try a direct connection).
    fn reserve(&mut self, peer: PeerId, protocols: &[StreamProtocol]) {
        let relays = protocols.contains(&relay::HOP_PROTOCOL_NAME);
        let bootstrap = self.bootstrap.iter().any(|a| peer_of(a) == Some(peer));
        if !relays || !bootstrap || self.reserved.contains(&peer) {
            return;
        }
        let Some(address) = self.remote.get(&peer).cloned() else { return };
        let address = match peer_of(&address) {
            Some(_) => address,
            None => address.with(Protocol::P2p(peer)),
        };
        match self.swarm.listen_on(address.with(Protocol::P2pCircuit)) {
            Ok(_) => drop(self.reserved.insert(peer)),
            Err(err) => tracing::warn!(relay = %peer, %err, "no reservation on the relay"),
        }
    }

    fn addresses_of(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addresses = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    addresses.extend(entry.node.value.iter().cloned());
                }
            }
        }
        addresses
    }
}
