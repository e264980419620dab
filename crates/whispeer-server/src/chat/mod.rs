//! Chat for people, on the broker (feature `chat`): direct messages, groups, topic broadcast,
//! offline delivery per device, history and presence, over WebSocket with one JSON object per
//! text message (see `CHAT.md`).
//!
//! ```text
//! websocat ──► session (identity, limits) ──► Hub ──► broker topics
//!                 ▲                                    @chat/inbox/<user>   every message for a
//!                 │  replay from the device's cursor,  (durable, bounded)   user, in order
//!                 └─ then live ◄───────────────────── @chat/log/d/<a>/<b>  a conversation's
//!                                                      @chat/log/g/<group>  history (paging)
//!                                                      @chat/live/<user>    presence, typing
//!                                                                           (never stored)
//! ```
//!
//! A message is written once per recipient inbox (fan-out on write) and once to its
//! conversation's log; a device reads its user's inbox from its own cursor, so each device gets
//! everything once, in order, whether it was online or not. What the broker does not keep —
//! groups, members, device cursors, last-seen times — lives in `chat.db` (SQLite), owned by
//! [`store::ChatStore`]; on a node of a cluster the engine keeps it for every node
//! (`shared.rs`, `replica.rs`) and `chat.db` is this node's copy in memory. Clients seal
//! messages end to end by default; the server sees only what plain clients send.

mod groups;
mod hub;
mod messaging;
mod page;
mod position;
mod receipts;
mod replica;
mod session;
mod shared;
mod store;
mod upgrade;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use whispeer_core::{Broker, BrokerBuilder, Extension, Filter, Retention, Running, Service};

use super::ServerConfig;
use hub::Hub;

/// Settings of the chat listener; every field has a safe default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChatConfig {
    /// The path chat clients connect to. Default: `/ws` (the seed's URL).
    pub path: String,
    /// Where `chat.db` (groups, members, device cursors, last seen) is kept; in memory when
    /// unset. Set it with the broker's store so a restart keeps both. Default: unset.
    pub dir: Option<PathBuf>,
    /// Messages kept per user for devices that are away; older ones are dropped, and a device
    /// that missed some is told how many. Default: 10 000.
    pub inbox_max_messages: usize,
    /// Bytes of messages kept per user (payloads plus 256 a message), the same way.
    /// Default: 16 MiB.
    pub inbox_max_bytes: usize,
    /// How long a message waits for a device that is away. Default: 30 days.
    pub inbox_max_age: Duration,
    /// Messages kept per conversation (a pair of users, or a group) for `history`.
    /// Default: 10 000.
    pub history_max_messages: usize,
    /// Bytes kept per conversation for `history`. Default: 16 MiB.
    pub history_max_bytes: usize,
    /// Largest request, in bytes of JSON. Default: 16 KiB.
    pub max_message_bytes: usize,
    /// Messages per second one user may send, across its devices (bursts of one second's
    /// worth). Default: 20.
    pub max_messages_per_sec: u32,
    /// Groups one user may belong to. Default: 100.
    pub max_groups_per_user: usize,
    /// Members of one group. Default: 1 000.
    pub max_members_per_group: usize,
    /// Connections of one user at once (its devices). Default: 16.
    pub max_connections_per_user: usize,
    /// Serve the chat page at `/` of the listener, with the WASM client's web package
    /// (`wasm-bindgen --target web` output: `whispeer_wasm.js`, `whispeer_wasm_bg.wasm`) from
    /// this directory. Plain HTTP only (not with TLS). Default: off.
    pub page_dir: Option<PathBuf>,
    /// Authentication, TLS, heartbeat and the connection limit, shared with the other
    /// listeners.
    pub server: ServerConfig,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            path: "/ws".into(),
            dir: None,
            inbox_max_messages: 10_000,
            inbox_max_bytes: 16 << 20,
            inbox_max_age: Duration::from_secs(30 * 24 * 3600),
            history_max_messages: 10_000,
            history_max_bytes: 16 << 20,
            max_message_bytes: 16 * 1024,
            max_messages_per_sec: 20,
            max_groups_per_user: 100,
            max_members_per_group: 1000,
            max_connections_per_user: 16,
            page_dir: None,
            server: ServerConfig::default(),
        }
    }
}

/// The chat listener as a broker extension: `.with(Chat::new("127.0.0.1:3030"))`. It keeps
/// its topics' history (and makes them durable when the broker has a store), then serves chat
/// clients on its own address.
///
/// ```no_run
/// use whispeer_core::{Broker, BrokerOptions};
/// use whispeer_server::Chat;
/// let chat = Chat::new("127.0.0.1:3030");
/// let status = chat.status();
/// let broker = Broker::builder(BrokerOptions::default()).with(chat).build();
/// println!("chat on ws://{}/ws", status.local_addr().unwrap());
/// ```
#[derive(Debug)]
pub struct Chat {
    addr: String,
    config: ChatConfig,
    status: ChatStatus,
    /// The cluster this node is in: chat's state is then the engine's (`shared.rs`).
    #[cfg(feature = "cluster")]
    cluster: Option<crate::cluster::ClusterStatus>,
}

impl Chat {
    /// Chat on `addr` (`host:port`; port 0 picks a free one).
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            config: ChatConfig::default(),
            status: ChatStatus::default(),
            #[cfg(feature = "cluster")]
            cluster: None,
        }
    }

    /// Runs chat on a node of `cluster` (the status of the node's `Cluster`): groups, members,
    /// device cursors, reads, contacts, device keys and presence are kept by the cluster's
    /// engine for every node, and the inboxes and conversation logs are durable topics the
    /// engine keeps (see `CHAT.md`). `ChatConfig::dir` is not used then.
    #[cfg(feature = "cluster")]
    pub fn on_cluster(mut self, cluster: crate::cluster::ClusterStatus) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Uses these settings.
    pub fn config(mut self, config: ChatConfig) -> Self {
        self.config = config;
        self
    }

    /// A handle that reports the listener's address once the broker is built.
    pub fn status(&self) -> ChatStatus {
        self.status.clone()
    }
}

/// What a running chat listener reports.
#[derive(Clone, Debug, Default)]
pub struct ChatStatus {
    addr: Arc<OnceLock<SocketAddr>>,
}

impl ChatStatus {
    /// The address it listens on, once started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr.get().copied()
    }
}

/// One request parsed, for the fuzz target: the action's description, or the refusal's code.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_parse(text: &str) -> Result<String, &'static str> {
    wire::parse(text).map(|request| format!("{:?}", request.action)).map_err(|(err, _)| err.code)
}

/// The topics of chat, and the retention each keeps.
pub(crate) const INBOXES: &str = "@chat/inbox/+";
pub(crate) const LOGS: &str = "@chat/log/#";

fn filter(text: &str) -> Filter {
    Filter::parse(text).expect("chat filters are valid")
}

impl Extension for Chat {
    fn extend(self, mut builder: BrokerBuilder) -> BrokerBuilder {
        let options = builder.options_mut();
        let inbox = Retention::messages(self.config.inbox_max_messages.max(1))
            .max_bytes(self.config.inbox_max_bytes.max(1))
            .max_age(self.config.inbox_max_age);
        let log = Retention::messages(self.config.history_max_messages.max(1))
            .max_bytes(self.config.history_max_bytes.max(1));
        // First, so that no broader rule of the operator's shadows them.
        options.retention.insert(0, (filter(INBOXES), inbox));
        options.retention.insert(1, (filter(LOGS), log));
        // On a cluster the engine keeps durable topics: inboxes and logs are, on every node.
        #[cfg(feature = "cluster")]
        if self.cluster.is_some() && options.durability.is_none() {
            let memory = whispeer_core::PersistenceType::Memory;
            options.durability = Some(whispeer_core::Durability::in_store(memory));
        }
        if let Some(durability) = &mut options.durability {
            durability.topics.push(filter(INBOXES));
            durability.topics.push(filter(LOGS));
        }
        builder.service(self)
    }
}

impl Service for Chat {
    fn describe(&self) -> String {
        format!("chat listener on {}", self.addr)
    }

    fn start(self: Box<Self>, broker: &Broker) -> io::Result<Running> {
        let listener = std::net::TcpListener::bind(&self.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let _ = self.status.addr.set(addr);
        #[cfg(feature = "cluster")]
        let shared = self.cluster.map(|status| Arc::new(shared::Shared::new(status)));
        #[cfg(not(feature = "cluster"))]
        let shared = None;
        let hub = Hub::start(broker.clone(), self.config, shared)?;
        let stop = CancellationToken::new();
        let (stopped, served) = (stop.clone(), broker.clone());
        broker.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return tracing::error!(%err, "chat listener could not start"),
            };
            let server = hub.config.server.clone();
            let serve = move |stream, peer, _broker, config, stop| {
                upgrade::run(stream, peer, Arc::clone(&hub), config, stop)
            };
            let shutdown = stopped.cancelled_owned();
            if let Err(err) = super::accept_loop(listener, served, server, shutdown, serve).await {
                tracing::error!(%err, "chat listener stopped");
            }
        })?;
        Ok(Running::new(vec![addr], move || stop.cancel()))
    }
}
