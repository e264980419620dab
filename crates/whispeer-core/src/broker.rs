//! The broker handle, its builder and options, and the publish path.
//!
//! A [`Broker`] is a cheap handle on shared state. Publishing encodes the value once, runs the
//! plugins, routes the envelope and offers one shared [`Message`] to every matching queue;
//! it never blocks and never awaits.

use std::any::{TypeId, type_name};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use whispeer_engines::{Compression, Encryption, Engines, Sealing};
use whispeer_proto::{ContentType, Envelope, Flags, MessageId, Topic, header};

use crate::builder::{BrokerBuilder, BrokerOptions};

use crate::commit::{CommitStore, Commits};
use crate::dedup::{Dedup, Seen};
use crate::error::{BindError, PublishError, SubscribeError};
use crate::group::{GroupKey, Groups};
use crate::message::Message;
use crate::plugin::Plugin;
use crate::publish::{NO_OPTIONS, PublishOptions, PublishReceipt};
use crate::queue::{Pushed, Queue};
use crate::retention::{self, History};
use crate::router::{Matches, Router, SubId};
use crate::runtime::Spawner;
use crate::service::Services;
use crate::stats::{BrokerCounters, BrokerStats, bump};
use crate::store::Store;
use crate::subscription::{self, SubscribeOptions, Subscriber, Subscription};
use crate::typed::TypedTopic;

/// Room above `max_message_bytes` for what sealing adds to a payload (key id, nonce, tag).
pub(crate) const SEAL_OVERHEAD: usize = 64;

/// Largest queue a subscription may ask for; queues allocate their capacity up front.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// A topic's bound type; see [`Broker::topic`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binding {
    pub(crate) type_id: TypeId,
    pub(crate) type_name: &'static str,
}

/// Stands for "raw bytes" in type checks against bound topics.
struct RawBytes;

/// The state every handle shares.
pub(crate) struct Shared {
    pub(crate) options: BrokerOptions,
    /// Compression and encryption; `None` when neither is configured.
    pub(crate) engines: Option<Arc<Engines>>,
    pub(crate) router: Router,
    pub(crate) plugins: Box<[Arc<dyn Plugin>]>,
    bindings: RwLock<HashMap<Box<str>, Binding>>,
    has_bindings: AtomicBool,
    id_prefix: u64,
    next_id: AtomicU64,
    pub(crate) next_sub: AtomicU64,
    pub(crate) groups: Groups,
    pub(crate) history: History,
    /// Durable subscriptions' committed offsets.
    pub(crate) commits: CommitStore,
    /// The write-ahead log of durable topics.
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) dedup: Dedup,
    pub(crate) spawner: Spawner,
    pub(crate) counters: Arc<BrokerCounters>,
    /// Services started with the broker (network listeners, an admin port).
    pub(crate) services: Services,
}

impl Shared {
    pub(crate) fn new(
        options: BrokerOptions,
        plugins: Box<[Arc<dyn Plugin>]>,
        engines: Option<Arc<Engines>>,
        spawner: Spawner,
        store: Option<Arc<dyn Store>>,
    ) -> Self {
        let mut prefix = [0u8; 8];
        // Only uniqueness across brokers depends on this; a fixed prefix still gives unique ids
        // within this broker, so a failing entropy source is not worth refusing to start.
        if getrandom::fill(&mut prefix).is_err() {
            tracing::warn!(
                "no entropy for message id prefix; ids are unique only within this broker"
            );
        }
        let dedup = Dedup::new(options.dedup_window, options.dedup_max_keys);
        let durable = options.durability.as_ref().map(|d| d.topics.clone()).unwrap_or_default();
        let history = History::new(options.retention.clone(), durable);
        Self {
            options,
            engines,
            groups: Groups::default(),
            history,
            commits: CommitStore::default(),
            store,
            dedup,
            router: Router::default(),
            plugins,
            bindings: RwLock::default(),
            has_bindings: AtomicBool::new(false),
            id_prefix: u64::from_le_bytes(prefix),
            next_id: AtomicU64::new(1),
            next_sub: AtomicU64::new(1),
            spawner,
            counters: Arc::default(),
            services: Services::default(),
        }
    }

    pub(crate) fn binding(&self, topic: &str) -> Option<Binding> {
        if !self.has_bindings.load(Ordering::Acquire) {
            return None;
        }
        self.bindings.read().unwrap_or_else(PoisonError::into_inner).get(topic).copied()
    }

    fn publish_payload(
        &self,
        topic: &str,
        type_id: TypeId,
        found: &'static str,
        options: &PublishOptions,
        payload: impl FnOnce() -> Result<(Flags, Bytes), PublishError>,
    ) -> Result<PublishReceipt, PublishError> {
        let limits = &self.options.limits;
        Topic::validate(topic, limits)?;
        if topic.starts_with('$') {
            return Err(PublishError::ReservedTopic(Topic::parse_with(topic, limits)?));
        }
        if let Some(bound) = self.binding(topic)
            && bound.type_id != type_id
        {
            let topic = Topic::parse_with(topic, limits)?;
            return Err(PublishError::WrongType { topic, expected: bound.type_name, found });
        }
        let (flags, payload) = payload()?;
        if payload.len() > limits.max_message_bytes {
            return Err(PublishError::TooLarge {
                len: payload.len(),
                max: limits.max_message_bytes,
            });
        }
        let id = self.next_message_id();
        let timestamp_ms = now_ms();
        let headers = options.headers();
        let (flags, payload) = match &self.engines {
            Some(engines) => {
                let meta = Sealing { topic, id, timestamp_ms, headers };
                engines.seal(&meta, flags, payload)?
            }
            None => (flags, payload),
        };
        let fast = self.plugins.is_empty() && headers.is_empty();
        if fast && self.options.topic_ttl.is_empty() && !self.history.is_active() {
            // The envelope shares the router's copy of the topic, and is only built if someone
            // subscribed.
            bump(&self.counters.published);
            return self.route(id, topic, None, |topic| {
                Envelope::new(id, topic.clone(), timestamp_ms, flags, payload)
            });
        }
        let topic = Topic::parse_with(topic, limits)?;
        let mut envelope = Envelope::new(id, topic, timestamp_ms, flags, payload);
        envelope.headers = headers.clone();
        self.accept(envelope)
    }

    pub(crate) fn next_message_id(&self) -> MessageId {
        MessageId(
            u128::from(self.id_prefix) << 64
                | u128::from(self.next_id.fetch_add(1, Ordering::Relaxed)),
        )
    }

    /// The rest of every publish but the fastest: plugins, idempotency, time to live, routing.
    fn accept(&self, mut envelope: Envelope) -> Result<PublishReceipt, PublishError> {
        for plugin in self.plugins.iter() {
            if let Err(rejection) = plugin.on_publish(&mut envelope) {
                bump(&self.counters.rejected_by_plugins);
                let plugin = plugin.name();
                return Err(PublishError::Rejected { plugin, reason: rejection.reason });
            }
        }
        let now = Instant::now();
        // A plugin may have moved the message to another (valid) topic.
        let topic = envelope.topic.clone();
        let key = envelope.headers.get(header::IDEMPOTENCY_KEY).cloned();
        if let Some(key) = &key {
            let (seen, evicted) = self.dedup.check(topic.as_str(), key, now);
            if evicted > 0 {
                tracing::warn!(evicted, "de-duplication window full: oldest keys forgotten early");
            }
            if seen == Seen::Repeat {
                bump(&self.counters.duplicates);
                return Ok(PublishReceipt {
                    id: envelope.id,
                    subscribers: 0,
                    duplicate: true,
                    ticket: None,
                });
            }
        }
        let ttl = envelope.headers.ttl_ms().map(Duration::from_millis).or_else(|| {
            let rules = &self.options.topic_ttl;
            rules.iter().find(|(filter, _)| filter.matches(&topic)).map(|(_, ttl)| *ttl)
        });
        let expires_at = ttl.map(|ttl| now + ttl);
        bump(&self.counters.published);
        let routed = match self.history.log(&topic) {
            None => self.route(envelope.id, topic.as_str(), expires_at, |_| envelope),
            Some(log) => {
                // Routed under the topic's lock: see `retention` for why replay needs it. A
                // durable message goes to the log first, so the log's order is the offsets'.
                let mut log = retention::lock(&log);
                let accepted_ms = now_ms();
                let ticket = match (&self.store, log.durable) {
                    (Some(store), true) => Some(
                        store
                            .append(log.next_offset(), accepted_ms, &envelope)
                            .map_err(|err| PublishError::Storage(err.to_string()))?,
                    ),
                    _ => None,
                };
                let (offset, seq) = (log.reserve(), self.history.next_seq());
                let engines = self.engines.clone();
                let message = Message::retained(envelope, true, engines, expires_at, offset);
                let routed = self.fan_out(message.id(), topic.as_str(), |_| message.clone());
                log.append(offset, seq, accepted_ms, message);
                routed.map(|receipt| PublishReceipt { ticket, ..receipt })
            }
        };
        if let (Err(_), Some(key)) = (&routed, &key) {
            self.dedup.forget(topic.as_str(), key);
        }
        routed
    }

    /// Offers the envelope to every queue whose filter matches `topic`.
    pub(crate) fn route(
        &self,
        id: MessageId,
        topic: &str,
        expires_at: Option<Instant>,
        envelope: impl FnOnce(&Topic) -> Envelope,
    ) -> Result<PublishReceipt, PublishError> {
        self.fan_out(id, topic, |matches| {
            let engines = self.engines.clone();
            Message::new(envelope(matches.topic), matches.len(), engines, expires_at)
        })
    }

    /// Offers the message `make` builds (only if the topic has subscribers) to every matching
    /// queue.
    fn fan_out(
        &self,
        id: MessageId,
        topic: &str,
        make: impl FnOnce(&Matches<'_>) -> Message,
    ) -> Result<PublishReceipt, PublishError> {
        let mut tally = Tally::default();
        let mut disconnected: Vec<(SubId, Arc<Queue>)> = Vec::new();
        self.router.with_matches(topic, |matches| {
            let Some(matches) = matches else { return };
            let mut message = Some(make(&matches));
            let mut routes = matches.iter().peekable();
            while let Some(route) = routes.next() {
                // The last subscriber takes the publisher's reference instead of a clone.
                let next = if routes.peek().is_some() { message.clone() } else { message.take() };
                let Some(next) = next else { break };
                if tally.record(route.queue.push(next), &self.counters) {
                    disconnected.push((route.id, Arc::clone(&route.queue)));
                }
            }
        });
        for (id, queue) in disconnected {
            tracing::warn!(filter = %queue.filter, "subscriber disconnected: queue full");
            self.unsubscribe(id, &queue);
        }
        if tally.delivered == 0 && tally.full == 0 {
            bump(&self.counters.unrouted);
        }
        self.counters.deliveries.fetch_add(tally.delivered as u64, Ordering::Relaxed);
        if tally.full > 0 {
            return Err(PublishError::QueueFull { full: tally.full, delivered: tally.delivered });
        }
        Ok(PublishReceipt { id, subscribers: tally.delivered, duplicate: false, ticket: None })
    }

    /// Ends a subscription: closes its queue and removes its route. Idempotent; plugins hear
    /// of each subscription's end once.
    /// Records `message` as settled by the durable subscription `commits`; an advance of its
    /// committed offset is remembered, and written to the log for a durable topic.
    pub(crate) fn committed(&self, commits: &Commits, message: &Message) {
        let topic = message.topic();
        let durable = self.history.log(topic).is_some_and(|log| retention::lock(&log).durable);
        commits.settled_then(message, |topic, offset| {
            self.record_commit(&commits.key, topic, offset, durable);
        });
    }

    /// Remembers a commit, and writes it to the store for a durable topic.
    pub(crate) fn record_commit(&self, key: &GroupKey, topic: &Topic, offset: u64, durable: bool) {
        if let (true, Some(store)) = (durable, &self.store)
            && let Err(err) = store.commit(key, topic, offset)
        {
            tracing::warn!(%err, "commit not stored");
        }
        self.commits.set(key, topic.clone(), offset);
    }

    pub(crate) fn unsubscribe(&self, id: SubId, queue: &Queue) {
        queue.close();
        if self.router.remove(&queue.filter, id) {
            for plugin in self.plugins.iter() {
                plugin.on_unsubscribe(&queue.filter);
            }
        }
    }
}

/// Outcomes of one fan-out.
#[derive(Default)]
struct Tally {
    delivered: usize,
    full: usize,
}

impl Tally {
    /// Records one push; returns whether the subscriber must now be disconnected.
    fn record(&mut self, pushed: Pushed, counters: &BrokerCounters) -> bool {
        match pushed {
            Pushed::Queued => self.delivered += 1,
            Pushed::DroppedOldest => {
                self.delivered += 1;
                bump(&counters.dropped_oldest);
            }
            Pushed::DroppedNewest => bump(&counters.dropped_newest),
            Pushed::Full => {
                self.full += 1;
                bump(&counters.rejected_full);
            }
            Pushed::Disconnected => {
                bump(&counters.disconnected);
                return true;
            }
            Pushed::Closed => {}
        }
        false
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A handle to a running broker. Cloning is cheap; all clones share one broker.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), whispeer_core::Error> {
/// use whispeer_core::{Broker, BrokerOptions};
/// let broker = Broker::builder(BrokerOptions::default()).build();
/// let mut names = broker.subscription::<String>("greet/+")?;
/// broker.publish("greet/en", &"Ada".to_string())?;
/// assert_eq!(names.recv().await.as_deref(), Some("Ada"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Shared>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("options", &self.inner.options)
            .field("subscriptions", &self.inner.router.len())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A builder with the given options and no extensions.
    pub fn builder(options: BrokerOptions) -> BrokerBuilder {
        BrokerBuilder::new(options)
    }

    /// A builder with the recommended defaults: zstd compression for payloads of 256 bytes and
    /// more, and XChaCha20-Poly1305 encryption with a key generated for this broker (which
    /// therefore only this process can open). To share keys with other parties, configure them:
    /// `Broker::builder(options).with(Compression::new()).with(Encryption::from_env("WHISPEER_KEY")?)`.
    ///
    /// # Panics
    /// If the operating system cannot provide 32 random bytes for the key.
    pub fn build_default() -> BrokerBuilder {
        let encryption = Encryption::generated()
            .expect("the operating system's random number generator provides a key");
        Self::builder(BrokerOptions::default()).with(Compression::new()).with(encryption)
    }

    /// The keys this broker seals with, if it encrypts: share their text form
    /// ([`Keyring::to_text`](whispeer_engines::Keyring::to_text)) with the parties that must
    /// open its messages, e.g. as their `WHISPEER_KEY`, when [`Encryption::new`] generated them.
    pub fn encryption_keys(&self) -> Option<&whispeer_engines::Keyring> {
        let engines = self.inner.engines.as_deref()?;
        engines.encryption().map(Encryption::keyring)
    }

    /// Publishes `value` to `topic`, encoded once with the broker's codec and shared by every
    /// matching subscriber. Never blocks.
    ///
    /// # Errors
    /// See [`PublishError`]: an invalid or reserved topic, a topic bound to another type, a value
    /// the codec refuses, a message over the size limit, a plugin's refusal, or full queues of
    /// `FailPublish` subscribers.
    pub fn publish<T: Serialize + ?Sized + 'static>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<PublishReceipt, PublishError> {
        self.publish_with(topic, value, &NO_OPTIONS)
    }

    /// Publishes `value` like [`Broker::publish`], with headers, a time to live or an
    /// idempotency key.
    ///
    /// # Errors
    /// As [`Broker::publish`].
    pub fn publish_with<T: Serialize + ?Sized + 'static>(
        &self,
        topic: &str,
        value: &T,
        options: &PublishOptions,
    ) -> Result<PublishReceipt, PublishError> {
        let codec = self.inner.options.codec;
        let payload = || Ok((Flags::with_content(codec.content_type()), codec.encode(value)?));
        self.inner.publish_payload(topic, TypeId::of::<T>(), type_name::<T>(), options, payload)
    }

    /// Publishes raw bytes, for subscribers that read [`Message::payload`]. A topic bound to a
    /// type refuses raw bytes.
    ///
    /// # Errors
    /// As [`Broker::publish`], except encoding.
    pub fn publish_bytes(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishReceipt, PublishError> {
        let payload = || Ok((Flags::with_content(ContentType::Raw), payload.into()));
        let raw = TypeId::of::<RawBytes>();
        self.inner.publish_payload(topic, raw, "raw bytes", &NO_OPTIONS, payload)
    }

    /// Publishes an envelope as it arrived from elsewhere, already encoded and sealed: the server
    /// forwards clients' messages this way, without opening them. The topic must not be reserved,
    /// the payload must fit `max_message_bytes` plus the seal's overhead, and plugins run as for
    /// any publish. Type bindings do not apply.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub fn publish_envelope(&self, envelope: Envelope) -> Result<PublishReceipt, PublishError> {
        let shared = &*self.inner;
        let limits = &shared.options.limits;
        Topic::validate(envelope.topic.as_str(), limits)?;
        if envelope.topic.is_reserved() {
            return Err(PublishError::ReservedTopic(envelope.topic));
        }
        let max = limits.max_message_bytes + SEAL_OVERHEAD;
        if envelope.payload.len() > max {
            return Err(PublishError::TooLarge { len: envelope.payload.len(), max });
        }
        shared.accept(envelope)
    }

    /// Calls `callback` with every message matching the filter, decoded as `T`, in order, on a
    /// delivery task. The callback should return quickly: a slow one fills its queue and meets
    /// the slow-consumer policy. Messages that do not decode as `T` are skipped and counted.
    /// A panic in the callback is caught, counted and logged; the subscriber goes on.
    ///
    /// `filter` is a filter string or a [`SubscribeOptions`]. Dropping the returned
    /// [`Subscriber`] unsubscribes.
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscribe<T>(
        &self,
        filter: impl Into<SubscribeOptions>,
        callback: impl FnMut(T) + Send + 'static,
    ) -> Result<Subscriber, SubscribeError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        subscription::spawn_sync(self, filter.into(), callback)
    }

    /// Like [`Broker::subscribe`], with an `async` callback. Each call's future completes before
    /// the next message is handed over, so messages stay in order.
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscribe_async<T, Fut>(
        &self,
        filter: impl Into<SubscribeOptions>,
        callback: impl FnMut(T) -> Fut + Send + 'static,
    ) -> Result<Subscriber, SubscribeError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        subscription::spawn_async(self, filter.into(), callback)
    }

    /// A pull subscription: `recv().await` or use it as a `Stream` of `T`.
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscription<T>(
        &self,
        filter: impl Into<SubscribeOptions>,
    ) -> Result<Subscription<T>, SubscribeError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        Subscription::typed(self, filter.into())
    }

    /// A pull subscription of undecoded [`Message`]s: topic, id, headers and payload bytes.
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn messages(
        &self,
        filter: impl Into<SubscribeOptions>,
    ) -> Result<Subscription<Message>, SubscribeError> {
        Subscription::raw(self, filter.into())
    }

    /// Binds `topic` to the type `T`: publishing another type there, or subscribing to it
    /// exactly with another type, is refused from now on. Binding the same type again is fine.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Clone, Serialize, Deserialize)] struct Order { id: u32 }
    /// use whispeer_core::{Broker, PublishError};
    /// let broker = Broker::build_default().build();
    /// let orders = broker.topic::<Order>("orders")?;
    /// orders.publish(&Order { id: 1 })?;
    /// assert!(matches!(broker.publish("orders", &"oops"), Err(PublishError::WrongType { .. })));
    /// # Ok::<(), whispeer_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`BindError`] for an invalid topic or one already bound to another type.
    pub fn topic<T>(&self, topic: &str) -> Result<TypedTopic<T>, BindError>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let topic = Topic::parse_with(topic, &self.inner.options.limits)?;
        let requested = Binding { type_id: TypeId::of::<T>(), type_name: type_name::<T>() };
        let mut bindings = self.inner.bindings.write().unwrap_or_else(PoisonError::into_inner);
        let bound = *bindings.entry(topic.as_str().into()).or_insert(requested);
        self.inner.has_bindings.store(true, Ordering::Release);
        if bound.type_id != requested.type_id {
            return Err(BindError::AlreadyBound {
                topic,
                bound: bound.type_name,
                requested: requested.type_name,
            });
        }
        Ok(TypedTopic::new(self.clone(), topic))
    }

    /// A snapshot of the broker's counters.
    pub fn stats(&self) -> BrokerStats {
        self.inner.counters.snapshot(self.inner.router.len())
    }

    /// The broker's options.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }
}
