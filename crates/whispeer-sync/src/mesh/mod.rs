//! Brokers that mesh: `Broker::builder(..).with(Sync::new(config).share("docs/#"))` makes
//! embedded brokers on different hosts exchange the messages of shared filters over a
//! [`Transport`](crate::Transport), with no server of their own.
//!
//! - **What travels**: the envelopes as they are (sealed ones stay sealed: peers need the keys
//!   to read them, the transport and relay never have them), with the publishing node's id and
//!   a sequence number of its own.
//! - **Once per node, no loops**: a node takes a message from a publisher only past its cursor
//!   for that publisher, and forwards only its own messages live.
//! - **Order per publisher**: one publisher's messages arrive in its order.
//! - **Catch-up**: on (re)connection each side says how far it got with every publisher; the
//!   other sends what it holds past that from its log (the recent shared messages, bounded by
//!   [`Sync::catch_up`]: 10,000 messages or 64 MiB by default; older ones are gone). With a
//!   key file ([`PeerOptions::key_file`]) the cursors are kept beside it, written at most once a
//!   second, so a restarted node asks only for what it missed (after a crash, up to a second's
//!   messages may come again; their ids are the same).
//! - **Groups**: each node's queue groups get each message once (groups do not span nodes).
//!   While a broker is in a mesh it cannot be in a cluster: both use its bridge.

mod log;
mod peer;
mod wire;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use whispeer_core::proto::{Envelope, Filter, Limits};
use whispeer_core::{
    Bridge, BridgeFuture, Broker, BrokerBuilder, Extension, Forwarded, Interest, Running, Service,
};

use crate::events::SyncBroadcaster;
use crate::key::PeerKey;
use crate::transport::{PeerOptions, TransportConfig};
use crate::{SyncEvent, derive_topic};
use log::MeshLog;
use wire::MeshMessage;

/// Parses `bytes` as a mesh message; one that parses encodes again (fuzzing).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(bytes: &[u8]) {
    if let Ok(message) = MeshMessage::decode(bytes, &Limits::default()) {
        let again = message.encode().unwrap_or_else(|_| unreachable!("a parsed message encodes"));
        assert!(MeshMessage::decode(&again, &Limits::default()).is_ok());
    }
}

/// The mesh extension; see the module documentation.
#[derive(Debug)]
pub struct Sync {
    config: TransportConfig,
    options: PeerOptions,
    topic: String,
    shares: Vec<String>,
    max_messages: usize,
    max_bytes: usize,
    events: SyncBroadcaster,
}

impl Sync {
    /// A mesh over the transport `config` names, on the mesh topic `whispeer-mesh`, sharing
    /// nothing until [`share`](Self::share).
    pub fn new(config: TransportConfig) -> Self {
        Self {
            config,
            options: PeerOptions::default(),
            topic: "whispeer-mesh".into(),
            shares: Vec::new(),
            max_messages: 10_000,
            max_bytes: 64 << 20,
            events: SyncBroadcaster::default(),
        }
    }

    /// Shares the messages of topics matching `filter` with the mesh (and takes the mesh's).
    /// A filter that does not parse makes `try_build` fail.
    #[must_use]
    pub fn share(mut self, filter: &str) -> Self {
        self.shares.push(filter.to_string());
        self
    }

    /// The name the nodes meet on (its [`derive_topic`] hash is what the transport sees).
    /// Default: `whispeer-mesh`.
    #[must_use]
    pub fn topic(mut self, name: &str) -> Self {
        self.topic = name.to_string();
        self
    }

    /// The key file and relay token ([`PeerOptions`]).
    #[must_use]
    pub fn options(mut self, options: PeerOptions) -> Self {
        self.options = options;
        self
    }

    /// How much of the recent shared traffic a node keeps for peers that catch up.
    #[must_use]
    pub fn catch_up(mut self, max_messages: usize, max_bytes: usize) -> Self {
        self.max_messages = max_messages;
        self.max_bytes = max_bytes;
        self
    }

    /// The mesh's events: peers connected and gone, errors.
    pub fn events(&self) -> SyncBroadcaster {
        self.events.clone()
    }
}

/// A running mesh node: its log, its shares, its stop flag.
#[derive(Debug)]
struct Mesh {
    node: Arc<str>,
    shares: Vec<Filter>,
    log: Mutex<MeshLog>,
    published: Notify,
    stop: watch::Sender<bool>,
    events: SyncBroadcaster,
    limits: Limits,
    timeout: Duration,
    cursor_file: Option<PathBuf>,
    broker: std::sync::OnceLock<Broker>,
    /// No message of this node's was numbered yet in this run.
    fresh: AtomicBool,
}

impl Mesh {
    fn log(&self) -> MutexGuard<'_, MeshLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A peer's message: taken once, routed here.
    fn receive(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let MeshMessage::Message { origin, seq, envelope } =
            MeshMessage::decode(bytes, &self.limits)?
        else {
            anyhow::bail!("a second hello");
        };
        if !self.shares.iter().any(|f| f.matches(&envelope.topic)) {
            return Ok(());
        }
        let origin: Arc<str> = Arc::from(origin);
        if !self.log().take(&origin, seq, &envelope) {
            return Ok(());
        }
        if let Some(broker) = self.broker.get()
            && let Err(err) = broker.publish_from_peer(envelope)
        {
            tracing::warn!(%origin, %err, "a mesh message was not routed here");
        }
        Ok(())
    }

    /// Writes the cursors when they changed.
    fn save(&self) {
        let Some(path) = &self.cursor_file else { return };
        let Some(text) = self.log().take_dirty() else { return };
        let tmp = path.with_extension("cursors.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(err) = written {
            tracing::warn!(path = %path.display(), %err, "mesh cursors not saved");
        }
    }
}

impl Bridge for Mesh {
    fn forward(&self, envelope: &Envelope) -> Forwarded {
        if self.shares.iter().any(|f| f.matches(&envelope.topic)) {
            {
                let mut log = self.log();
                // Contiguous within a run of the process; the first jumps to the clock (in µs),
                // past any seq a previous run of this node may have used but not saved.
                let mut seq = log.cursor(&self.node) + 1;
                if self.fresh.swap(false, Ordering::Relaxed) {
                    let now =
                        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
                    seq = seq.max(u64::try_from(now).unwrap_or(u64::MAX));
                }
                log.take(&self.node, seq, envelope);
            }
            self.published.notify_waiters();
        }
        Forwarded::Alongside
    }

    fn interest(&self, _interest: &Interest, _present: bool) {}

    fn confirm(&self, _ticket: u64) -> BridgeFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Starts the node when the broker is built.
struct MeshService {
    sync: Sync,
    mesh: Arc<Mesh>,
    key: Option<PeerKey>,
    error: Option<String>,
}

impl Extension for Sync {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        let mut error = None;
        let shares: Vec<Filter> = self
            .shares
            .iter()
            .filter_map(|f| {
                Filter::parse(f).map_err(|e| error = Some(format!("share {f:?}: {e}"))).ok()
            })
            .collect();
        let key = match &self.options.key_file {
            Some(path) => {
                PeerKey::load_or_create(path).map_err(|e| error = Some(e.to_string())).ok()
            }
            None => Some(PeerKey::generate()),
        };
        let node: Arc<str> = Arc::from(key.as_ref().map(PeerKey::id).unwrap_or_default());
        let cursor_file = self.options.key_file.as_deref().map(log::cursor_file);
        let mut log = MeshLog::new(self.max_messages, self.max_bytes);
        if let Some(text) = cursor_file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            log.restore(&text);
        }
        let mesh = Arc::new(Mesh {
            node,
            shares,
            log: Mutex::new(log),
            published: Notify::new(),
            stop: watch::channel(false).0,
            events: self.events.clone(),
            limits: Limits::default(),
            timeout: self.config.timeout(),
            cursor_file,
            broker: std::sync::OnceLock::new(),
            fresh: AtomicBool::new(true),
        });
        let bridge: Arc<dyn Bridge> = Arc::clone(&mesh) as Arc<dyn Bridge>;
        builder.bridge(bridge).service(MeshService { sync: self, mesh, key, error })
    }
}

impl Service for MeshService {
    fn describe(&self) -> String {
        format!("sync mesh {:?}", self.sync.topic)
    }

    fn start(self: Box<Self>, broker: &Broker) -> io::Result<Running> {
        let Self { sync, mesh, key, error } = *self;
        if let Some(error) = error {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, error));
        }
        let key = key.ok_or_else(|| io::Error::other("no peer key"))?;
        let _ = mesh.broker.set(broker.clone());
        let mut transport =
            crate::factory::build(sync.config.clone(), key, sync.options.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let topic = derive_topic(&sync.topic);
        let node = Arc::clone(&mesh);
        broker.spawn(async move {
            let mut stop = node.stop.subscribe();
            let mut backoff = Duration::from_millis(100);
            let mut incoming = loop {
                match transport.connect(topic).await {
                    Ok(incoming) => break incoming,
                    Err(err) => {
                        tracing::warn!(%err, "mesh: cannot join; retrying");
                        let _ = node.events.publish(SyncEvent::Error { message: err.to_string() });
                    }
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            };
            if let Ok(addresses) = transport.local_addrs().await
                && !addresses.is_empty()
            {
                let _ = node.events.publish(SyncEvent::Listening { addresses });
            }
            let saver = Arc::clone(&node);
            tokio::spawn(async move {
                let mut stop = saver.stop.subscribe();
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => saver.save(),
                    }
                }
                saver.save();
            });
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    conn = incoming.recv() => match conn {
                        Some(conn) => drop(tokio::spawn(peer::serve(Arc::clone(&node), conn))),
                        None => break,
                    },
                }
            }
            let _ = transport.disconnect().await;
        })?;
        let stopping = Arc::clone(&mesh);
        Ok(Running::new(Vec::new(), move || {
            stopping.stop.send_replace(true);
        }))
    }
}
