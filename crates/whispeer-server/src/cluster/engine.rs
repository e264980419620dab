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

/// How a channel of [`Engine::publish`] reaches the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Every node with a matching interest, queue groups included.
    Everyone,
    /// Queue groups only (a durable topic's message: the other nodes' ordinary subscribers
    /// get it from the history).
    Groups,
}

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

    /// Publishes `message` on `topic` to every node interested in it (or to queue groups
    /// only). Messages from one node reach each other node in the order they were published.
    fn publish(
        &self,
        channel: Channel,
        topic: &Topic,
        message: Bytes,
    ) -> EngineFuture<'_, Result<(), EngineError>>;

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
}
