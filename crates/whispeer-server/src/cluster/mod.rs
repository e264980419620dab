//! Several `whispeer serve` nodes as one broker, on an existing distributed engine (NATS).
//!
//! Add [`Cluster`] to a broker's builder: it makes the broker one node (through the core's
//! [`Bridge`](whispeer_core::Bridge)) and starts the link to the engine as a service. Each
//! node subscribes on the engine only to what its own subscribers need (interest-based), so
//! a message published on any node reaches every matching subscriber on every node once, and
//! each message of a queue group reaches one member in the whole cluster. Envelopes cross the
//! engine sealed. See `CLUSTER.md` for what is guaranteed, and what is not built yet.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use whispeer_core::{Broker, BrokerBuilder, Extension, Interest, Running, Service};

#[cfg(test)]
mod conformance;
mod engine;
mod links;
mod members;
mod nats;
mod presence;
mod redis;
mod relay;
mod retained;
mod subject;

pub use engine::{
    Appended, Engine, EngineError, EngineFuture, GROUP_ACK_WAIT, GroupDelivery, GroupHistory,
    History, Inbox, Sequenced, Settle,
};
use members::Members;
pub use members::{Membership, NodeInfo};
pub use presence::Whereabouts;
use relay::{Outgoing, Relay};
pub(crate) use retained::STATE_PREFIX;

/// Counter of reconnections to the engine.
pub const RECONNECTS: &str = "whispeer_cluster_reconnects_total";
/// Histogram of seconds per batch of messages published to the engine.
pub const PUBLISH_SECONDS: &str = "whispeer_cluster_publish_seconds";

/// The engines a cluster can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineKind {
    /// NATS (core subjects and queue groups; JetStream for durable topics).
    Nats,
    /// Redis (pub/sub; Streams for queue groups and durable topics).
    Redis,
}

/// How a node joins its cluster (`[cluster]` in `whispeer.toml`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The engine.
    pub engine: EngineKind,
    /// The engine's servers (`nats://127.0.0.1:4222`); the client moves between them.
    pub urls: Vec<String>,
    /// This node's name, unique in the cluster (logs, metrics, `whispeer inspect nodes`).
    pub node: String,
    /// The first subject token of every whispeer subject: clusters that share an engine keep
    /// apart by it.
    pub prefix: String,
    /// User name and password for the engine.
    pub user: Option<String>,
    /// See `user`.
    pub password: Option<String>,
    /// A token for the engine (when no user is set).
    pub token: Option<String>,
    /// Messages the engine keeps per durable topic (its history; offsets are the engine's).
    /// Default: 10 000, what a node keeps of a durable topic in memory.
    pub history_messages: u64,
    /// How long the engine keeps a durable topic's messages; `None`: no age limit.
    pub history_max_age: Option<Duration>,
    /// Copies of the history the engine keeps; `None`: three when the engine's cluster has
    /// three servers or more, else one.
    pub replicas: Option<usize>,
}

impl ClusterConfig {
    /// A NATS cluster at `urls`, with this node named `node`.
    pub fn nats(urls: Vec<String>, node: impl Into<String>) -> Self {
        Self {
            engine: EngineKind::Nats,
            urls,
            node: node.into(),
            prefix: "whispeer".into(),
            user: None,
            password: None,
            token: None,
            history_messages: 10_000,
            history_max_age: None,
            replicas: None,
        }
    }

    /// A Redis server at `url` (`redis://host:port`), with this node named `node`.
    pub fn redis(url: impl Into<String>, node: impl Into<String>) -> Self {
        Self { engine: EngineKind::Redis, ..Self::nats(vec![url.into()], node) }
    }
}

/// A configuration a cluster cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("cluster: {0}")]
pub struct ClusterError(String);

/// The cluster extension: `Broker::builder(options).with(Cluster::new(config)?)`.
pub struct Cluster {
    config: ClusterConfig,
    relay: Arc<Relay>,
    outbound: mpsc::Receiver<Outgoing>,
    members: Arc<Members>,
    engine: Arc<std::sync::OnceLock<Arc<dyn Engine>>>,
    retained: Option<retained::Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Cluster {
    /// A node of the cluster `config` describes.
    ///
    /// # Errors
    /// No engine URL, an empty node name, or a prefix that is not one subject token.
    pub fn new(config: ClusterConfig) -> Result<Self, ClusterError> {
        if config.urls.is_empty() {
            return Err(ClusterError("urls: at least one engine server is needed".into()));
        }
        if config.node.trim().is_empty() {
            return Err(ClusterError("node: the node needs a name".into()));
        }
        let token = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if config.prefix.is_empty() || !config.prefix.chars().all(token) {
            return Err(ClusterError(format!(
                "prefix {:?}: use letters, digits, '-' and '_' only",
                config.prefix
            )));
        }
        match config.engine {
            EngineKind::Nats => {
                nats::server_addrs(&config.urls)
                    .map_err(|err| ClusterError(format!("urls: {err}")))?;
            }
            EngineKind::Redis => {
                if config.urls.len() > 1 {
                    return Err(ClusterError("urls: Redis takes one server".into()));
                }
                for url in &config.urls {
                    ::redis::Client::open(url.as_str())
                        .map_err(|err| ClusterError(format!("urls: {url:?}: {err}")))?;
                }
            }
        }
        // Unique per process, so two nodes given one name by mistake still hear each other.
        let node = std::collections::hash_map::RandomState::new().hash_one(&config.node);
        let (relay, outbound) = Relay::new(node);
        let (members, engine) = (Arc::default(), Arc::default());
        Ok(Self { config, relay, outbound, members, engine, retained: None })
    }

    /// Shares the retained messages of `server` with the other nodes (through the engine),
    /// so each node's subscribers get every topic's, whichever node took it.
    #[must_use]
    pub fn share_retained(mut self, server: &crate::ServerConfig) -> Self {
        self.retained = Some(retained::Shared::of(server));
        self
    }

    /// A handle on the node's link, for readiness and metrics.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            relay: Arc::clone(&self.relay),
            node: self.config.node.clone().into(),
            engine_name: match self.config.engine {
                EngineKind::Nats => "nats",
                EngineKind::Redis => "redis",
            },
            members: Arc::clone(&self.members),
            engine: Arc::clone(&self.engine),
        }
    }
}

impl Extension for Cluster {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        builder.bridge(Arc::clone(&self.relay) as Arc<dyn whispeer_core::Bridge>).service(self)
    }
}

impl Service for Cluster {
    fn describe(&self) -> String {
        format!("cluster {:?} on {}", self.config.node, self.config.urls.join(","))
    }

    fn start(self: Box<Self>, broker: &Broker) -> std::io::Result<Running> {
        let stop = CancellationToken::new();
        let Self { config, relay, outbound, members, engine: slot, retained } = *self;
        let durable = broker.options().durability.as_ref().is_some_and(|d| !d.topics.is_empty());
        relay.history_loaded.store(!durable, Ordering::Release);
        let (broker, stopped) = (broker.clone(), stop.clone());
        broker.clone().spawn(async move {
            let engine: Arc<dyn Engine> = match config.engine {
                EngineKind::Nats => match nats::Nats::connect(&config, Arc::clone(&relay.up)).await
                {
                    Ok(engine) => Arc::new(engine),
                    Err(err) => return tracing::error!(%err, "cluster engine not started"),
                },
                EngineKind::Redis => loop {
                    // A server that is down now is retried, as NATS's client does.
                    match redis::Redis::connect(&config, Arc::clone(&relay.up)).await {
                        Ok(engine) => break Arc::new(engine),
                        Err(err) => tracing::warn!(%err, "cluster engine unreachable; retrying"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
            };
            tracing::info!(node = %config.node, engine = engine.name(), "cluster link started");
            let _ = slot.set(Arc::clone(&engine));
            let send = links::send(Arc::clone(&engine), Arc::clone(&relay), outbound);
            let follow =
                links::follow_interests(Arc::clone(&engine), Arc::clone(&relay), broker.clone());
            let node = config.node.clone();
            let durable =
                broker.options().durability.as_ref().is_some_and(|d| !d.topics.is_empty());
            let history = async {
                if durable {
                    links::follow_history(Arc::clone(&engine), Arc::clone(&relay), broker.clone())
                        .await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let announce = members::announce(Arc::clone(&engine), members, broker.clone(), node);
            let limits = broker.options().limits.clone();
            let retained = async {
                match retained {
                    Some(shared) => retained::share(Arc::clone(&engine), shared, limits).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = retained => {}
                () = history => {}
                () = stopped.cancelled() => {
                    // A clean stop leaves the membership at once (a dead node's entry expires).
                    members::leave(&*engine, &config.node).await;
                }
                () = send => {}
                () = follow => {}
                () = announce => {}
            }
        })?;
        Ok(Running::new(Vec::new(), move || stop.cancel()))
    }
}

/// A node's view of its cluster link: for `/readyz`, `/metrics` and `whispeer inspect nodes`.
#[derive(Clone)]
pub struct ClusterStatus {
    relay: Arc<Relay>,
    node: Arc<str>,
    engine_name: &'static str,
    members: Arc<Members>,
    engine: Arc<std::sync::OnceLock<Arc<dyn Engine>>>,
}

impl std::fmt::Debug for ClusterStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStatus").field("node", &self.node).finish_non_exhaustive()
    }
}

/// A snapshot of a node's cluster counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Whether the engine is connected.
    pub connected: bool,
    /// Local messages queued for the other nodes.
    pub forwarded: u64,
    /// Messages from other nodes routed here.
    pub received: u64,
    /// Local messages not carried to other nodes because the engine was unreachable.
    pub lost_unreachable: u64,
    /// Local messages not carried because the outbound queue was full.
    pub lost_full: u64,
    /// Messages from other nodes that this node's queues refused.
    pub refused_here: u64,
    /// Second copies (own echoes, overlapping subscriptions) dropped.
    pub duplicates: u64,
    /// Messages from the engine that did not decode.
    pub malformed: u64,
    /// Local messages waiting for the engine now.
    pub backlog: usize,
}

impl ClusterStatus {
    /// The engine, once the link started.
    pub(crate) fn engine(&self) -> Option<Arc<dyn Engine>> {
        self.engine.get().cloned()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the engine is connected now.
    pub fn connected(&self) -> bool {
        self.relay.up.load(Ordering::Acquire)
    }

    /// Whether this node has read the durable topics' history as far as it reached when the
    /// node started (always, without durable topics); until then replay here may miss the
    /// newest part, and `/readyz` says so.
    pub fn history_loaded(&self) -> bool {
        self.relay.history_loaded.load(Ordering::Acquire)
    }

    /// The cluster's nodes, as this node last read them from the engine (at most
    /// one announcement round, 2 s, old).
    pub fn membership(&self) -> Membership {
        self.members.get()
    }

    /// The addresses clients reach this node at (`127.0.0.1:7461`, `ws://…/ws`), listed in
    /// its membership entry; without them, the broker's own listeners are listed.
    pub fn advertise(&self, addrs: Vec<String>) {
        self.members.advertise(addrs);
    }

    /// Announces the principals of `connections` (this node's server) to the cluster, for
    /// [`ClusterStatus::presence`] on every node.
    pub fn watch_connections(&self, connections: Arc<crate::Connections>) {
        self.members.watch(connections);
    }

    /// Where `principal` is connected in the whole cluster: each node and its connection count
    /// there, as last announced (at most one round, 2 s, old).
    pub fn whereabouts(&self, principal: &str) -> Whereabouts {
        self.members.presence.of(principal)
    }

    /// Every principal connected anywhere in the cluster, with its nodes: `/api/presence`.
    pub fn presence(&self) -> serde_json::Value {
        let all = self.members.presence.all();
        let principals: Vec<serde_json::Value> = all
            .into_iter()
            .map(|(principal, nodes)| {
                let connections: u32 = nodes.iter().map(|(_, n)| n).sum();
                let nodes: Vec<_> = nodes.into_iter().map(|(node, _)| node).collect();
                serde_json::json!({"principal": principal, "nodes": nodes, "connections": connections})
            })
            .collect();
        serde_json::json!({"principals": principals, "cut": self.members.presence.cut()})
    }

    /// This node's view of the cluster, as `/api/cluster` and `whispeer inspect nodes` show
    /// it: the node, its engine and the server it is on, its counters, and the membership.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "node": &*self.node,
            "engine": self.engine_name,
            "engine_server": self.engine.get().and_then(|engine| engine.server()),
            "stats": self.stats(),
            "membership": self.membership(),
        })
    }

    /// The counters now.
    pub fn stats(&self) -> ClusterStats {
        let c = &self.relay.counters;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        ClusterStats {
            connected: self.connected(),
            forwarded: get(&c.forwarded),
            received: get(&c.received),
            lost_unreachable: get(&c.lost_unreachable),
            lost_full: get(&c.lost_full),
            refused_here: get(&c.refused_here),
            duplicates: get(&c.duplicates),
            malformed: get(&c.malformed),
            backlog: self.relay.backlog(),
        }
    }
}

/// What `interest` means for the engine's subscription bookkeeping.
fn topics_filter(interest: &Interest) -> Option<whispeer_core::Filter> {
    match interest {
        Interest::Topics(filter) => Some(filter.clone()),
        Interest::Group { .. } => None,
    }
}

/// How long a publish batch or a flush may take before the engine counts as unreachable.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(5);

/// A stable short name for queue group (`filter`, `name`) in the engine (consumer and group
/// names take few characters).
fn group_id(filter: &str, name: &str) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same on every node and every run.
    let mut hasher = std::hash::DefaultHasher::new();
    (filter, name).hash(&mut hasher);
    format!("g{:016x}", hasher.finish())
}

/// Seconds since `started`, for histograms.
fn seconds(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(config: ClusterConfig) -> String {
        Cluster::new(config).map(drop).expect_err("refused").to_string()
    }

    #[test]
    fn configurations_a_cluster_cannot_run_with_are_refused_with_the_key() {
        let ok = ClusterConfig::nats(vec!["nats://127.0.0.1:4222".into()], "n1");
        assert!(Cluster::new(ok.clone()).is_ok());
        assert!(refused(ClusterConfig::nats(Vec::new(), "n1")).contains("urls"));
        assert!(refused(ClusterConfig::nats(vec!["nats://h:port".into()], "n1")).contains("urls"));
        assert!(refused(ClusterConfig { node: " ".into(), ..ok.clone() }).contains("node"));
        assert!(refused(ClusterConfig { prefix: "a.b".into(), ..ok }).contains("prefix"));
    }
}
