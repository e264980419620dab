//! The NATS engine: core NATS subjects for fan-out and queue groups.
//!
//! Two connections per node. The first publishes, and subscribes to ordinary interests with
//! `no_echo`, so a node never hears its own messages back (its local subscribers got them
//! directly). The second holds the queue-group subscriptions: there a node's own messages must
//! come back, because the cluster picks one group member among every node, this one included.
//! async-nats reconnects both with backoff and re-subscribes; its per-subscription buffer is
//! bounded (messages beyond it are dropped and reported as a slow consumer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use whispeer_core::Interest;
use whispeer_core::proto::Topic;

use super::engine::{
    Appended, Engine, EngineError, EngineFuture, GROUP_ACK_WAIT, GroupDelivery, GroupHistory,
    History, Inbox, Sequenced, Settle,
};
use super::subject::{filter_subjects, push_token, topic_subject};
use super::{ClusterConfig, RECONNECTS};

/// How long a durable group's engine consumer outlives its last reader.
const GROUP_FORGOTTEN_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Messages one engine subscription may buffer before the node reads them.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// NATS as a cluster engine.
pub(crate) struct Nats {
    prefix: String,
    publisher: Client,
    groups: Client,
    connected: Arc<AtomicBool>,
    /// JetStream on the publishing connection: the history of durable topics.
    js: jetstream::Context,
    history_messages: u64,
    history_max_age: Option<std::time::Duration>,
    replicas: Option<usize>,
    /// Whether the history stream is known to exist (appends create it first otherwise).
    stream_ready: AtomicBool,
    /// Whether the retained messages' stream is known to exist.
    retained_ready: AtomicBool,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Nats {
    /// Connects to `config.urls` (in the background: a server that is down now is retried);
    /// `connected` follows the publishing connection's state.
    pub(crate) async fn connect(
        config: &ClusterConfig,
        connected: Arc<AtomicBool>,
    ) -> Result<Self, EngineError> {
        let publisher = Self::client(config, "", true, Some(Arc::clone(&connected))).await?;
        let groups = Self::client(config, " groups", false, None).await?;
        let js = jetstream::new(publisher.clone());
        Ok(Self {
            prefix: config.prefix.clone(),
            publisher,
            groups,
            connected,
            js,
            history_messages: config.history_messages,
            history_max_age: config.history_max_age,
            replicas: config.replicas,
            stream_ready: AtomicBool::new(false),
            retained_ready: AtomicBool::new(false),
        })
    }

    /// The subject of membership entries: outside every topic subject (those start with the
    /// prefix).
    fn membership_subject(&self) -> String {
        format!("_WHISPEER.{}.nodes", self.prefix)
    }

    /// The subjects' prefix of durable topics' history.
    fn log_prefix(&self) -> String {
        format!("_WHISPEER.{}.log", self.prefix)
    }

    /// The durable consumer that keeps queue group `name`'s position on `filter`.
    fn group_consumer(&self, filter: &whispeer_core::Filter, name: &str) -> String {
        format!("{}_{}", self.prefix, super::group_id(filter.as_str(), name))
    }

    /// The subjects' prefix of retained messages.
    fn retained_prefix(&self) -> String {
        format!("_WHISPEER.{}.retained", self.prefix)
    }

    fn replicas(&self) -> usize {
        let servers = self.publisher.server_info().connect_urls.len();
        self.replicas.unwrap_or(if servers >= 3 { 3 } else { 1 })
    }

    /// The stream holding each topic's retained message (the last per subject), on disk and
    /// replicated as the history is.
    async fn retained_stream(&self) -> Result<stream::Stream, EngineError> {
        let config = stream::Config {
            name: format!("{}_retained", self.prefix),
            description: Some("whispeer: retained messages, the last of each topic".into()),
            subjects: vec![format!("{}.>", self.retained_prefix())],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: self.replicas(),
            ..Default::default()
        };
        let stream = self.js.get_or_create_stream(config).await.map_err(|err| {
            EngineError::Failed(format!("retained stream (is JetStream enabled?): {err}"))
        })?;
        self.retained_ready.store(true, Ordering::Release);
        Ok(stream)
    }

    /// The stream holding durable topics' history, created with this node's limits if there
    /// is none (an existing one keeps its own).
    async fn history_stream(&self) -> Result<stream::Stream, EngineError> {
        let replicas = self.replicas();
        let config = stream::Config {
            name: format!("{}_history", self.prefix),
            description: Some("whispeer: durable topics' history".into()),
            subjects: vec![format!("{}.>", self.log_prefix())],
            max_messages_per_subject: i64::try_from(self.history_messages).unwrap_or(i64::MAX),
            max_age: self.history_max_age.unwrap_or_default(),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let stream = self.js.get_or_create_stream(config).await.map_err(|err| {
            EngineError::Failed(format!("history stream (is JetStream enabled?): {err}"))
        })?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(stream)
    }

    async fn client(
        config: &ClusterConfig,
        role: &str,
        no_echo: bool,
        connected: Option<Arc<AtomicBool>>,
    ) -> Result<Client, EngineError> {
        let mut options = ConnectOptions::new()
            .name(format!("whispeer {}{role}", config.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .ping_interval(ENGINE_PING)
            .subscription_capacity(SUBSCRIPTION_CAPACITY);
        if no_echo {
            options = options.no_echo();
        }
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        } else if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        let reconnects = Arc::new(AtomicU64::new(0));
        let node = config.node.clone();
        options = options.event_callback(move |event| {
            let (connected, reconnects, node) =
                (connected.clone(), Arc::clone(&reconnects), node.clone());
            async move {
                match event {
                    Event::Connected => {
                        if reconnects.fetch_add(1, Ordering::Relaxed) > 0 {
                            metrics::counter!(RECONNECTS).increment(1);
                        }
                        tracing::info!(%node, "cluster engine connected");
                        if let Some(flag) = &connected {
                            flag.store(true, Ordering::Release);
                        }
                    }
                    Event::Disconnected => {
                        tracing::warn!(%node, "cluster engine disconnected; reconnecting");
                        if let Some(flag) = &connected {
                            flag.store(false, Ordering::Release);
                        }
                    }
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "cluster engine: a subscription fell behind; messages from other nodes dropped");
                    }
                    other => tracing::debug!(event = %other, "cluster engine event"),
                }
            }
        });
        let servers = server_addrs(&config.urls).map_err(EngineError::Failed)?;
        options.connect(servers).await.map_err(|err| EngineError::Failed(err.to_string()))
    }
}

/// A NATS message's payload (one function, so every inbox has one type).
fn payload(message: async_nats::Message) -> Bytes {
    message.payload
}

/// The engine's servers, parsed; the error names the URL that is not one.
pub(crate) fn server_addrs(urls: &[String]) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.iter()
        .map(|url| url.parse().map_err(|err| format!("{url:?} is not a NATS server URL: {err}")))
        .collect()
}

/// The NATS queue group of a whispeer group: its filter and name escaped, so groups of
/// different filters never share one.
fn queue_name(filter: &str, name: &str) -> String {
    let mut out = String::with_capacity(filter.len() + name.len() + 4);
    push_token(&mut out, filter);
    out.push_str("~00");
    push_token(&mut out, name);
    out
}

/// How often a node pings its NATS server: a connection with more than two pings unanswered is
/// given up and made again, so a dead route (a black hole, which no TCP error reports) is
/// noticed within about three seconds rather than the client's default two to three minutes.
const ENGINE_PING: Duration = Duration::from_secs(1);

impl Engine for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn publish(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        let subject = topic_subject(&self.prefix, topic);
        Box::pin(async move {
            self.publisher
                .publish(subject, message)
                .await
                .map_err(|err| EngineError::Unreachable(err.to_string()))
        })
    }

    fn flush(&self) -> EngineFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            self.publisher.flush().await.map_err(|err| EngineError::Unreachable(err.to_string()))
        })
    }

    fn subscribe(&self, interest: &Interest) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        let interest = interest.clone();
        Box::pin(async move {
            let subjects = filter_subjects(&self.prefix, interest.filter());
            let mut inboxes = Vec::with_capacity(subjects.len());
            for subject in subjects {
                let subscriber = match &interest {
                    Interest::Topics(_) => self.publisher.subscribe(subject).await,
                    Interest::Group { filter, name } => {
                        let queue = queue_name(filter.as_str(), name);
                        self.groups.queue_subscribe(subject, queue).await
                    }
                };
                let subscriber =
                    subscriber.map_err(|err| EngineError::Unreachable(err.to_string()))?;
                inboxes.push(subscriber.map(payload));
            }
            // The subjects of one filter never match the same message (see `subject`).
            let inbox: Inbox = Box::pin(futures_util::stream::select_all(inboxes));
            Ok(inbox)
        })
    }

    fn append(
        &self,
        topic: &Topic,
        message: Bytes,
        id: String,
    ) -> EngineFuture<'_, Result<Appended, EngineError>> {
        let subject = topic_subject(&self.log_prefix(), topic);
        Box::pin(async move {
            if !self.stream_ready.load(Ordering::Acquire) {
                self.history_stream().await?;
            }
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = self
                .js
                .publish_with_headers(subject, headers, message)
                .await
                .map_err(|err| EngineError::Unreachable(err.to_string()))?;
            let appended: Appended = Box::pin(async move {
                let ack = ack.await.map_err(|err| EngineError::Failed(err.to_string()))?;
                Ok(ack.sequence)
            });
            Ok(appended)
        })
    }

    fn history(&self, from: u64) -> EngineFuture<'_, Result<History, EngineError>> {
        Box::pin(async move {
            let stream = self.history_stream().await?;
            let deliver_policy = if from <= 1 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence { start_sequence: from }
            };
            let config = consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.log_prefix()),
                deliver_policy,
                ..Default::default()
            };
            let failed =
                |err: &dyn std::fmt::Display| EngineError::Failed(format!("history: {err}"));
            let ordered = stream.create_consumer(config).await.map_err(|e| failed(&e))?;
            let messages = ordered.messages().await.map_err(|e| failed(&e))?;
            let history: History = Box::pin(messages.map(move |message| {
                let message = message.map_err(|e| EngineError::Failed(format!("history: {e}")))?;
                let info =
                    message.info().map_err(|e| EngineError::Failed(format!("history: {e}")))?;
                let stored_ms =
                    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                let offset = info.stream_sequence;
                Ok(Sequenced { offset, stored_ms, bytes: message.payload.clone() })
            }));
            Ok(history)
        })
    }

    fn group_history(
        &self,
        filter: &whispeer_core::Filter,
        name: &str,
    ) -> EngineFuture<'_, Result<GroupHistory, EngineError>> {
        let durable = self.group_consumer(filter, name);
        let subjects = filter_subjects(&self.log_prefix(), filter);
        // One filter subject (NATS 2.9): a filter that needs two reads them all instead.
        let filter_subject = match subjects.as_slice() {
            [one] => one.clone(),
            _ => format!("{}.>", self.log_prefix()),
        };
        Box::pin(async move {
            let failed = |err: &dyn std::fmt::Display| EngineError::Failed(format!("group: {err}"));
            let stream = self.history_stream().await?;
            let config = consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: GROUP_ACK_WAIT,
                max_ack_pending: 65_536,
                deliver_policy: consumer::DeliverPolicy::New,
                // A group nobody reads for this long is forgotten (its position with it).
                inactive_threshold: GROUP_FORGOTTEN_AFTER,
                ..Default::default()
            };
            let consumer =
                stream.get_or_create_consumer(&durable, config).await.map_err(|e| failed(&e))?;
            // Short pull requests: one left by a node that stopped reading lapses within two
            // seconds (what the server sends it meanwhile comes back after the ack wait).
            let messages = consumer
                .stream()
                .max_messages_per_batch(256)
                .expires(Duration::from_secs(2))
                .heartbeat(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|e| failed(&e))?;
            let deliveries: GroupHistory = Box::pin(messages.map(move |message| {
                let message = message.map_err(|e| EngineError::Failed(format!("group: {e}")))?;
                let info =
                    message.info().map_err(|e| EngineError::Failed(format!("group: {e}")))?;
                let stored_ms =
                    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                let sequenced = Sequenced {
                    offset: info.stream_sequence,
                    stored_ms,
                    bytes: message.payload.clone(),
                };
                let settle: Settle = Box::new(move |done| {
                    Box::pin(async move {
                        let kind = if done {
                            jetstream::AckKind::Ack
                        } else {
                            jetstream::AckKind::Nak(None)
                        };
                        if let Err(err) = message.ack_with(kind).await {
                            tracing::debug!(%err, "cluster: a group message could not be settled");
                        }
                    })
                });
                Ok(GroupDelivery { sequenced, settle })
            }));
            Ok(deliveries)
        })
    }

    fn group_pending(
        &self,
        filter: &whispeer_core::Filter,
        name: &str,
    ) -> EngineFuture<'_, Result<u64, EngineError>> {
        let durable = self.group_consumer(filter, name);
        Box::pin(async move {
            let stream = self.history_stream().await?;
            let info = stream
                .consumer_info(&durable)
                .await
                .map_err(|err| EngineError::Failed(format!("group: {err}")))?;
            Ok(info.num_pending)
        })
    }

    fn history_end(&self) -> EngineFuture<'_, Result<u64, EngineError>> {
        Box::pin(async move {
            let mut stream = self.history_stream().await?;
            let info = stream
                .info()
                .await
                .map_err(|err| EngineError::Failed(format!("history: {err}")))?;
            Ok(info.state.last_sequence)
        })
    }

    fn server(&self) -> Option<String> {
        if !self.connected() {
            return None;
        }
        let info = self.publisher.server_info();
        Some(format!("{}:{}", info.host, info.port))
    }

    fn announce(&self, entry: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            // On the connection with echo, so this node hears its own entry too.
            let subject = self.membership_subject();
            self.groups
                .publish(subject, entry)
                .await
                .map_err(|err| EngineError::Unreachable(err.to_string()))
        })
    }

    fn retain(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        let subject = topic_subject(&self.retained_prefix(), topic);
        Box::pin(async move {
            if !self.retained_ready.load(Ordering::Acquire) {
                self.retained_stream().await?;
            }
            let ack = self
                .js
                .publish(subject, message)
                .await
                .map_err(|err| EngineError::Unreachable(err.to_string()))?;
            ack.await.map_err(|err| EngineError::Failed(format!("retain: {err}")))?;
            Ok(())
        })
    }

    fn retained(&self) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        Box::pin(async move {
            let stream = self.retained_stream().await?;
            // The last message of each subject, then each new one: JetStream's key-value watch.
            let config = consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.retained_prefix()),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            };
            let failed =
                |err: &dyn std::fmt::Display| EngineError::Failed(format!("retained: {err}"));
            let mut ordered = stream.create_consumer(config).await.map_err(|e| failed(&e))?;
            let mut caught_up = ordered.info().await.map_err(|e| failed(&e))?.num_pending == 0;
            let messages = ordered.messages().await.map_err(|e| failed(&e))?;
            // The empty marker once every subject's last message was handed.
            let marker = futures_util::stream::iter(caught_up.then(Bytes::new));
            let messages = messages.flat_map(move |message| {
                let mut out = Vec::with_capacity(2);
                match message {
                    Ok(message) => {
                        out.push(message.payload.clone());
                        let last = message.info().is_ok_and(|info| info.pending == 0);
                        if last && !caught_up {
                            caught_up = true;
                            out.push(Bytes::new());
                        }
                    }
                    Err(err) => tracing::warn!(%err, "cluster: reading retained messages"),
                }
                futures_util::stream::iter(out)
            });
            let inbox: Inbox = Box::pin(marker.chain(messages));
            Ok(inbox)
        })
    }

    fn membership(&self) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        Box::pin(async move {
            let subject = self.membership_subject();
            let subscriber = self
                .groups
                .subscribe(subject)
                .await
                .map_err(|err| EngineError::Unreachable(err.to_string()))?;
            let inbox: Inbox = Box::pin(subscriber.map(|message| message.payload));
            Ok(inbox)
        })
    }
}
