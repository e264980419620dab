//! The broker handle, its builder and options, and the publish path.
//!
//! A [`Broker`] is a cheap handle on shared state. Publishing encodes the value once, runs the
//! plugins, routes the envelope and offers one shared [`Message`] to every matching queue;
//! it never awaits, and blocks only for a durable topic while its store's writer backlog is
//! full (back-pressure, see `store::backlog`).

mod bridged;
mod builder;
mod history;
mod inspect;
mod persistence;
mod service;
mod typed;

pub use bridged::Unconfirmed;
pub use builder::{BrokerBuilder, Extension};
pub use history::{HISTORY_PAGE_BYTES, HistoryError, HistoryPage};
pub use inspect::{DurableInfo, SubscriptionInfo, TopicInfo};
pub use persistence::Persistence;
pub use service::Service;
pub(crate) use service::start_all;
pub use typed::TypedTopic;

use std::any::{TypeId, type_name};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use whispeer_engines::{Compression, Encryption};
use whispeer_proto::{ContentType, Envelope, Flags, Topic};

use crate::options::BrokerOptions;

use crate::error::{BindError, PublishError, SubscribeError};
use crate::message::{Message, kept_payload};
use crate::options::SubscribeOptions;
use crate::publish::{NO_OPTIONS, PublishOptions, PublishReceipt};
use crate::room::Room;
use crate::shared::{Binding, Check, RawBytes, SEAL_OVERHEAD, Shared};
use crate::stats::BrokerStats;
use crate::subscription::{self, Subscriber, Subscription};

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
        let payload = || {
            Ok((Flags::with_content(codec.content_type()), codec.encode_with(value, kept_payload)?))
        };
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
        self.publish_bytes_with(topic, payload, &NO_OPTIONS)
    }

    /// Publishes raw bytes like [`Broker::publish_bytes`], with headers, a time to live or an
    /// idempotency key.
    ///
    /// # Errors
    /// As [`Broker::publish_bytes`].
    pub fn publish_bytes_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: &PublishOptions,
    ) -> Result<PublishReceipt, PublishError> {
        let payload = || Ok((Flags::with_content(ContentType::Raw), payload.into()));
        let raw = TypeId::of::<RawBytes>();
        self.inner.publish_payload(topic, raw, "raw bytes", options, payload)
    }

    /// Publishes an envelope as it arrived from elsewhere, already encoded and sealed: the server
    /// forwards clients' messages this way, without opening them. The topic must not be reserved,
    /// the payload must fit `max_message_bytes` plus the seal's overhead, and plugins run as for
    /// any publish. Type bindings do not apply.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub fn publish_envelope(&self, envelope: Envelope) -> Result<PublishReceipt, PublishError> {
        // The topic is checked against this broker's limits on the way (a `Topic` is well
        // formed, but may have been parsed under other limits).
        self.publish_envelope_as(envelope, Check::UnlessSubscribed)
    }

    /// [`Broker::publish_envelope`] for an envelope whose topic was parsed under this broker's
    /// own limits (`self.options().limits`), as a server's connection reads its clients'
    /// publishes: the topic is not checked against them again. (Otherwise a topic that no
    /// exact subscription holds, one that only wildcards match, is checked again for each
    /// publish.) A topic parsed under wider limits goes through unchecked: use
    /// [`Broker::publish_envelope`] for those.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub fn publish_envelope_checked(
        &self,
        envelope: Envelope,
    ) -> Result<PublishReceipt, PublishError> {
        self.publish_envelope_as(envelope, Check::Done)
    }

    fn publish_envelope_as(
        &self,
        envelope: Envelope,
        check: Check,
    ) -> Result<PublishReceipt, PublishError> {
        let shared = &*self.inner;
        let limits = &shared.options.limits;
        if envelope.topic.is_reserved() {
            return Err(PublishError::ReservedTopic(envelope.topic));
        }
        let max = limits.max_message_bytes + SEAL_OVERHEAD;
        if envelope.payload.len() > max {
            return Err(PublishError::TooLarge { len: envelope.payload.len(), max });
        }
        shared.accept(envelope, check)
    }

    /// Calls `callback` with every message matching the filter, decoded as `T`, in order, on
    /// one of the broker's dispatchers (a task per core, each running many subscriptions in
    /// turn). The callback should return quickly: a slow one fills its queue and meets the
    /// slow-consumer policy, and one that blocks delays the other subscriptions of its
    /// dispatcher — use [`Broker::subscribe_async`] or a stream for work that waits. Messages
    /// that do not decode as `T` are skipped and counted.
    /// A panic in the callback (or in `T`'s `Deserialize`) is caught, counted in
    /// `callback_panics` and logged; the subscriber goes on, and so do the others of its
    /// dispatcher.
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
        subscription::spawn_sync(&self.inner, filter.into(), callback)
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
        subscription::spawn_async(&self.inner, filter.into(), callback)
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
        Subscription::typed(&self.inner, filter.into())
    }

    /// A pull subscription of undecoded [`Message`]s: topic, id, headers and payload bytes.
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn messages(
        &self,
        filter: impl Into<SubscribeOptions>,
    ) -> Result<Subscription<Message>, SubscribeError> {
        Subscription::raw(&self.inner, filter.into())
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
        let memory = &self.inner.history.memory;
        BrokerStats {
            history_bytes: memory.held(),
            history_evicted: memory.evicted(),
            ..self.inner.counters.snapshot(self.inner.router.len())
        }
    }

    /// The queues under [`SlowConsumer::BackPressure`](crate::SlowConsumer::BackPressure)
    /// that this thread's publishes left past their bounds since it last asked: await
    /// [`Room::wait`] before publishing more, and the publisher keeps to its subscribers'
    /// pace with nothing dropped. Take it right after publishing, before anything awaits (the
    /// publishes noted are this thread's).
    pub fn room(&self) -> Room {
        Room::take(self.inner.options.back_pressure_timeout)
    }

    /// The broker's options.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }
}
