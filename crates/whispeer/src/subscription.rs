//! Subscriptions: the pull [`Subscription`] and the callback [`Subscriber`], on one path.
//!
//! Both own a registration: a route in the router and a bounded queue. Dropping either ends the
//! registration synchronously — no spawning, no awaiting — so it works outside a runtime. A
//! callback subscriber's delivery task ends when it finds its queue closed.
//!
//! ```text
//! publish ──push──▶ Queue ──poll_pop──▶ Subscription::recv / Stream      (pull)
//!                        └──poll_pop──▶ delivery task ──▶ callback(T)     (sync or async)
//! ```

use std::any::{TypeId, type_name};
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use whispeer_proto::Filter;

use crate::broker::{Broker, Shared};
use crate::error::SubscribeError;
use crate::message::Message;
use crate::queue::{Queue, SlowConsumer};
use crate::router::SubId;
use crate::stats::{BrokerCounters, SubscriptionStats, bump};
use whispeer_engines::ReceiveError;

/// A delivery task yields to the runtime after this many messages in a row, so a busy
/// subscriber cannot starve the other tasks of its worker thread.
const DELIVERY_BUDGET: u32 = 128;

/// What to subscribe to and how. A plain `&str` or `String` converts into options with the
/// broker's defaults.
///
/// ```
/// use whispeer::{SlowConsumer, SubscribeOptions};
/// let options = SubscribeOptions::new("orders/#").capacity(64).slow_consumer(SlowConsumer::DropNewest);
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    filter: String,
    capacity: Option<usize>,
    max_bytes: Option<usize>,
    policy: Option<SlowConsumer>,
}

impl SubscribeOptions {
    /// Options for `filter` with the broker's default capacity and policy.
    pub fn new(filter: impl Into<String>) -> Self {
        Self { filter: filter.into(), capacity: None, max_bytes: None, policy: None }
    }

    /// Sets the queue capacity, in messages (1 to [`crate::MAX_QUEUE_CAPACITY`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets the queue's byte bound: payload bytes plus 256 per queued message.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    pub(crate) fn queue_max_bytes(&self) -> Option<usize> {
        self.max_bytes
    }

    /// Sets what happens when the queue is full.
    pub fn slow_consumer(mut self, policy: SlowConsumer) -> Self {
        self.policy = Some(policy);
        self
    }

    pub(crate) fn filter(&self) -> &str {
        &self.filter
    }

    pub(crate) fn queue_capacity(&self) -> Option<usize> {
        self.capacity
    }

    pub(crate) fn policy(&self) -> Option<SlowConsumer> {
        self.policy
    }
}

impl From<&str> for SubscribeOptions {
    fn from(filter: &str) -> Self {
        Self::new(filter)
    }
}

impl From<String> for SubscribeOptions {
    fn from(filter: String) -> Self {
        Self::new(filter)
    }
}

impl From<&String> for SubscribeOptions {
    fn from(filter: &String) -> Self {
        Self::new(filter.as_str())
    }
}

/// A route plus its queue; dropping it unsubscribes.
struct Registration {
    shared: Arc<Shared>,
    id: SubId,
    queue: Arc<Queue>,
}

impl Registration {
    fn new(
        broker: &Broker,
        options: &SubscribeOptions,
        typed: Option<(TypeId, &'static str)>,
    ) -> Result<Self, SubscribeError> {
        let (id, queue) = broker.inner.register(options, typed)?;
        Ok(Self { shared: Arc::clone(&broker.inner), id, queue })
    }

    fn stats(&self) -> SubscriptionStats {
        self.queue.counters.snapshot(self.queue.len())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unsubscribe(self.id, &self.queue);
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id.0)
            .field("filter", &self.queue.filter)
            .field("closed", &self.queue.is_closed())
            .finish()
    }
}

type Decode<T> = fn(&Message) -> Result<T, ReceiveError>;

fn typed_info<T: 'static>() -> Option<(TypeId, &'static str)> {
    Some((TypeId::of::<T>(), type_name::<T>()))
}

fn decode_typed<T>(message: &Message) -> Result<T, ReceiveError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    message.decode_shared()
}

/// Counts a message the subscriber could not open or decode.
fn decode_failed(
    queue: &Queue,
    counters: &BrokerCounters,
    message: &Message,
    error: &ReceiveError,
) {
    let (mine, total) = match error {
        ReceiveError::Open(_) => (&queue.counters.open_errors, &counters.open_errors),
        _ => (&queue.counters.decode_errors, &counters.decode_errors),
    };
    bump(mine);
    bump(total);
    tracing::debug!(topic = %message.topic(), id = %message.id(), %error, "message skipped");
}

/// A pull subscription: take messages with [`recv`](Self::recv) or as a [`Stream`].
/// Messages that do not decode as `T` are skipped and counted.
///
/// Dropping it unsubscribes; messages still queued are discarded.
#[derive(Debug)]
pub struct Subscription<T> {
    registration: Registration,
    decode: Decode<T>,
}

impl<T> Subscription<T> {
    pub(crate) fn typed(broker: &Broker, options: SubscribeOptions) -> Result<Self, SubscribeError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let registration = Registration::new(broker, &options, typed_info::<T>())?;
        Ok(Self { registration, decode: decode_typed::<T> })
    }

    /// Waits for the next message. Returns `None` once the subscription is closed: unsubscribed,
    /// or disconnected by the `Disconnect` slow-consumer policy.
    ///
    /// # Cancel safety
    /// Cancel-safe: a message is only taken off the queue when it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_decoded(cx)).await
    }

    /// Takes the next message if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        let queue = &self.registration.queue;
        while let Some(message) = queue.try_pop() {
            if let Some(value) = self.decoded(&message) {
                return Some(value);
            }
        }
        None
    }

    /// Waits for the next message, undecoded.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`recv`](Self::recv).
    pub async fn recv_message(&mut self) -> Option<Message> {
        poll_fn(|cx| self.poll_recv_message(cx)).await
    }

    /// Polls for the next message, undecoded: `Ready(Some)` takes it, `Ready(None)` means the
    /// subscription is closed, `Pending` registers `cx`'s waker. For callers that wait on many
    /// subscriptions at once (the server's connection writer).
    pub fn poll_recv_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.registration.queue.poll_pop(cx)
    }

    /// Takes the next message, undecoded, if one is queued.
    pub fn try_recv_message(&mut self) -> Option<Message> {
        self.registration.queue.try_pop()
    }

    /// The subscription's filter.
    pub fn filter(&self) -> &Filter {
        &self.registration.queue.filter
    }

    /// A snapshot of this subscription's counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.registration.stats()
    }

    /// Whether the subscription has been closed.
    pub fn is_closed(&self) -> bool {
        self.registration.queue.is_closed()
    }

    /// Unsubscribes now; the same as dropping the subscription.
    pub fn unsubscribe(self) {}

    fn decoded(&self, message: &Message) -> Option<T> {
        match (self.decode)(message) {
            Ok(value) => Some(value),
            Err(error) => {
                let shared = &self.registration.shared;
                decode_failed(&self.registration.queue, &shared.counters, message, &error);
                None
            }
        }
    }

    fn poll_decoded(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        loop {
            match self.registration.queue.poll_pop(cx) {
                Poll::Ready(Some(message)) => {
                    if let Some(value) = self.decoded(&message) {
                        return Poll::Ready(Some(value));
                    }
                }
                other => return other.map(|_| None),
            }
        }
    }
}

impl Subscription<Message> {
    pub(crate) fn raw(broker: &Broker, options: SubscribeOptions) -> Result<Self, SubscribeError> {
        let registration = Registration::new(broker, &options, None)?;
        Ok(Self { registration, decode: |message| Ok(message.clone()) })
    }
}

impl<T> Stream for Subscription<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_decoded(cx)
    }
}

/// A running callback subscriber. Dropping it (or calling [`unsubscribe`](Self::unsubscribe))
/// unsubscribes, and its delivery task ends.
#[derive(Debug)]
#[must_use = "dropping a Subscriber unsubscribes it at once"]
pub struct Subscriber {
    registration: Registration,
}

impl Subscriber {
    /// The subscription's filter.
    pub fn filter(&self) -> &Filter {
        &self.registration.queue.filter
    }

    /// A snapshot of this subscriber's counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.registration.stats()
    }

    /// Whether the subscription has been closed (unsubscribed or disconnected by policy).
    pub fn is_closed(&self) -> bool {
        self.registration.queue.is_closed()
    }

    /// Unsubscribes now; the same as dropping the handle.
    pub fn unsubscribe(self) {}
}

/// Starts a subscriber whose delivery task runs `handle` for each decoded message, in order.
fn spawn_delivery<T, H, Fut>(
    broker: &Broker,
    options: SubscribeOptions,
    mut handle: H,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    H: FnMut(T) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let registration = Registration::new(broker, &options, typed_info::<T>())?;
    let queue = Arc::clone(&registration.queue);
    let counters = Arc::clone(&broker.inner.counters);
    let task = async move {
        let mut budget = DELIVERY_BUDGET;
        while let Some(message) = poll_fn(|cx| queue.poll_pop(cx)).await {
            match message.decode_shared::<T>() {
                Ok(value) => {
                    if !handle(value).await {
                        bump(&queue.counters.callback_panics);
                        bump(&counters.callback_panics);
                        tracing::error!(filter = %queue.filter, id = %message.id(), "subscriber callback panicked");
                    }
                }
                Err(error) => decode_failed(&queue, &counters, &message, &error),
            }
            budget -= 1;
            if budget == 0 {
                budget = DELIVERY_BUDGET;
                tokio::task::yield_now().await;
            }
        }
    };
    // Dropping the task's JoinHandle detaches it; it ends by itself once its queue closes.
    drop(broker.inner.spawner.spawn(task).map_err(SubscribeError::Runtime)?);
    Ok(Subscriber { registration })
}

pub(crate) fn spawn_sync<T>(
    broker: &Broker,
    options: SubscribeOptions,
    mut callback: impl FnMut(T) + Send + 'static,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    spawn_delivery(broker, options, move |value: T| {
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| callback(value))).is_ok();
        std::future::ready(ok)
    })
}

pub(crate) fn spawn_async<T, Fut>(
    broker: &Broker,
    options: SubscribeOptions,
    mut callback: impl FnMut(T) -> Fut + Send + 'static,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    spawn_delivery(broker, options, move |value: T| {
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| callback(value)));
        async move {
            match started {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await.is_ok(),
                Err(_) => false,
            }
        }
    })
}
