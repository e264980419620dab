//! The `Engine` trait: what a cluster needs from the distributed system it runs on. One module
//! per engine implements it (NATS today); the rest of the cluster code knows only the trait.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use whispeer_core::Interest;
use whispeer_core::proto::Topic;

/// A future of an engine.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The messages one interest receives, as the engine carries them; dropping it ends the
/// engine's subscription.
pub type Inbox = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// A message appended to the history: resolves with its offset once the engine stored it.
pub type Appended = Pin<Box<dyn Future<Output = Result<u64, EngineError>> + Send>>;

/// One message of the history, as the engine hands it back.
#[derive(Clone, Debug)]
pub struct Sequenced {
    /// Its offset: the same on every node.
    pub offset: u64,
    /// When the engine stored it, in milliseconds since the epoch.
    pub stored_ms: u64,
    /// The message as it was appended.
    pub bytes: Bytes,
}

/// The history from some offset on, in offset order, as the engine hands it out.
pub type History = Pin<Box<dyn Stream<Item = Result<Sequenced, EngineError>> + Send>>;

/// Settles a group's message in the engine: `true` acknowledges it (the group's position moves
/// past it), `false` gives it back (delivered again at once, to any node).
pub type Settle = Box<dyn FnOnce(bool) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A durable topic's message for a queue group, and how to settle it in the engine.
pub struct GroupDelivery {
    /// The message and its offset.
    pub sequenced: Sequenced,
    /// Acknowledges it, or gives it back.
    pub settle: Settle,
}

impl std::fmt::Debug for GroupDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupDelivery")
            .field("offset", &self.sequenced.offset)
            .finish_non_exhaustive()
    }
}

/// A queue group's share of the durable topics' messages, as the engine hands them out.
pub type GroupHistory = Pin<Box<dyn Stream<Item = Result<GroupDelivery, EngineError>> + Send>>;

/// How long the engine waits for a group's message to be settled before it gives it to
/// another node (the node that had it died, or lost the engine).
pub const GROUP_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why an engine could not do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine's servers cannot be reached now (the client keeps reconnecting).
    #[error("the cluster engine is unreachable: {0}")]
    Unreachable(String),
    /// The engine refused or failed the operation.
    #[error("the cluster engine failed: {0}")]
    Failed(String),
}

/// A distributed engine that carries messages between the nodes of a cluster.
///
/// An engine connects when it is created and reconnects by itself, with backoff, re-creating
/// its subscriptions; [`Engine::connected`] says how it stands. Messages cross it as opaque
/// bytes: sealed envelopes, never opened.
pub trait Engine: Send + Sync + 'static {
    /// The engine's name, for logs and metrics (`nats`).
    fn name(&self) -> &'static str;

    /// Whether the engine is connected now.
    fn connected(&self) -> bool;

    /// Publishes `message` on `topic` to every node interested in it, and to one node of each
    /// queue group matching it. Messages from one node reach each other node in the order they
    /// were published.
    fn publish(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>>;

    /// Appends `message` to the history of durable topics under `topic`; `id` lets the engine
    /// drop a repeat within its de-duplication window. Resolves once it is on its way, with a
    /// future of its offset.
    fn append(
        &self,
        topic: &Topic,
        message: Bytes,
        id: String,
    ) -> EngineFuture<'_, Result<Appended, EngineError>>;

    /// Every message of the history from offset `from` on (1: from its beginning), in order,
    /// then each new one as it is appended. The history is created if there is none.
    fn history(&self, from: u64) -> EngineFuture<'_, Result<History, EngineError>>;

    /// The offset of the history's last message now (0 while it is empty).
    fn history_end(&self) -> EngineFuture<'_, Result<u64, EngineError>>;

    /// The durable topics' messages for queue group `name` on `filter` (perhaps more: the
    /// caller drops, and acknowledges, what its filter does not match), from the position the
    /// engine keeps for the group — new messages when the group is new — each to one of the
    /// nodes reading it. A message not settled within [`GROUP_ACK_WAIT`] (or given back) is
    /// handed out again, to any node.
    fn group_history(
        &self,
        filter: &whispeer_core::Filter,
        name: &str,
    ) -> EngineFuture<'_, Result<GroupHistory, EngineError>>;

    /// How many of the durable topics' messages for queue group `name` on `filter` the engine
    /// holds and has not handed to any reader yet. A group's reader that stays silent while
    /// this says more wait reads again (a consumer can stop delivering after the engine's
    /// leader changes). The default, 0, never reads again: for an engine whose reads cannot
    /// stall that way (Redis's readers poll).
    fn group_pending(
        &self,
        _filter: &whispeer_core::Filter,
        _name: &str,
    ) -> EngineFuture<'_, Result<u64, EngineError>> {
        Box::pin(async { Ok(0) })
    }

    /// Resolves once everything published before it reached the engine's server.
    fn flush(&self) -> EngineFuture<'_, Result<(), EngineError>>;

    /// Starts receiving what `interest` stands for: every message on its topics published by
    /// *other* nodes ([`Interest::Topics`]), or — for a queue group — a share of every
    /// node's messages (this one's included), each message going to one subscribed node.
    fn subscribe(&self, interest: &Interest) -> EngineFuture<'_, Result<Inbox, EngineError>>;

    /// The address of the engine server this node is connected to now.
    fn server(&self) -> Option<String>;

    /// Sends this node's membership entry to every node (this one included).
    fn announce(&self, entry: Bytes) -> EngineFuture<'_, Result<(), EngineError>>;

    /// Every node's membership entries, as they are announced.
    fn membership(&self) -> EngineFuture<'_, Result<Inbox, EngineError>>;

    /// Keeps `message` as the retained message of `topic` in the engine (the last one kept
    /// wins; the caller's empty envelope stands for a cleared topic) and hands it to every
    /// node's [`Engine::retained`]. Resolves once the engine stored it.
    fn retain(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>>;

    /// The retained message of every topic the engine keeps, then an empty message (the
    /// watch has caught up), then each one kept afterwards by any node (this one included), in
    /// the order the engine kept them; after a reconnection, every topic's again (and the
    /// empty marker after them). A message replaced before this node read it may be skipped (the
    /// engine keeps only the last of each topic): the node still ends with the newest, never an
    /// older one after it.
    fn retained(&self) -> EngineFuture<'_, Result<Inbox, EngineError>>;
}
