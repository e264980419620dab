//! Subscriptions: the pull [`Subscription`] and the callback [`Subscriber`], on one path.
//!
//! Both own a registration: a route in the router and a bounded queue, or membership of a
//! queue group. Dropping either ends the registration synchronously — no spawning, no
//! awaiting — so it works outside a runtime. An async callback subscriber's delivery task ends
//! when it finds its registration ended; a sync one leaves its dispatcher (`crate::dispatch`).
//!
//! ```text
//! publish ──push──▶ Queue ──Consumer──▶ Subscription::recv / Stream      (pull)
//!                        ├──Consumer──▶ delivery task ──▶ callback(T)     (async)
//!                        └──Consumer──▶ dispatcher ──▶ callback(T)        (sync, many a task)
//! ```

mod consumer;
mod cooperation;

pub use consumer::{Acker, Delivery};
pub(crate) use consumer::{Consumer, Taken};

use std::any::{TypeId, type_name};
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use whispeer_proto::Filter;

use crate::delivery::GiveUp;
use crate::dispatch::{self, Drained};
use crate::error::SubscribeError;
use crate::message::Message;
use crate::options::SubscribeOptions;
use crate::queue::Queue;
use crate::shared::Registration;
use crate::shared::Shared;
use crate::stats::{BrokerCounters, SubscriptionStats, bump};
use whispeer_engines::ReceiveError;

/// A delivery task yields to the runtime after this many messages in a row, so a busy
/// subscriber cannot starve the other tasks of its worker thread.
const DELIVERY_BUDGET: u32 = 128;

/// How a subscription makes a `T` of a message: from a borrowed message, for a [`Delivery`]
/// that keeps it beside the value, or from the message itself when it is not kept (`recv`),
/// which spares a raw subscription a second reference to it. `owned` gives the message back
/// when it fails.
struct Decode<T> {
    borrowed: fn(&Message) -> Result<T, ReceiveError>,
    owned: fn(Message) -> Result<T, (ReceiveError, Message)>,
}

impl<T> std::fmt::Debug for Decode<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decode")
    }
}

fn typed_info<T: 'static>() -> Option<(TypeId, &'static str)> {
    Some((TypeId::of::<T>(), type_name::<T>()))
}

fn decode_typed<T>(message: &Message) -> Result<T, ReceiveError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    message.decode_shared()
}

fn decode_typed_owned<T>(message: Message) -> Result<T, (ReceiveError, Message)>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    decode_typed(&message).map_err(|error| (error, message))
}

/// Counts a message the subscriber could not open or decode; under QoS 1 it is given up to the
/// dead-letter topic, since it would not decode the next time either.
fn decode_failed(
    queue: &Queue,
    acker: Option<&Acker>,
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
    if let Some(acker) = acker {
        acker.refuse(message.id(), false, GiveUp::Undecodable);
    }
}

/// A pull subscription: take messages with [`recv`](Self::recv) or as a [`Stream`].
/// Messages that do not decode as `T` are skipped and counted.
///
/// Under QoS 1, [`recv`](Self::recv) (and the `Stream`) acknowledge each message as they return
/// it; [`recv_delivery`](Self::recv_delivery) returns a [`Delivery`] to acknowledge after
/// processing instead.
///
/// Dropping it unsubscribes; messages still queued are discarded (a group keeps them for its
/// other members).
#[derive(Debug)]
pub struct Subscription<T> {
    registration: Registration,
    consumer: Consumer,
    acker: Option<Acker>,
    decode: Decode<T>,
}

impl<T> Subscription<T> {
    fn with(registration: Registration, decode: Decode<T>) -> Self {
        let consumer = Consumer::of(&registration);
        let acker = consumer.acker();
        Self { registration, consumer, acker, decode }
    }

    pub(crate) fn typed(
        shared: &Arc<Shared>,
        options: SubscribeOptions,
    ) -> Result<Self, SubscribeError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let registration = Shared::register(shared, &options, typed_info::<T>())?;
        let decode = Decode { borrowed: decode_typed::<T>, owned: decode_typed_owned::<T> };
        Ok(Self::with(registration, decode))
    }

    /// Waits for the next message. Returns `None` once the subscription is closed: unsubscribed,
    /// or disconnected by the `Disconnect` slow-consumer policy. Under QoS 1 the message is
    /// acknowledged as it is returned.
    ///
    /// # Cancel safety
    /// Cancel-safe: a message is only taken off the queue when it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_acked(cx)).await
    }

    /// Takes the next message if one is queued, without waiting; acknowledged under QoS 1.
    pub fn try_recv(&mut self) -> Option<T> {
        loop {
            let taken = self.consumer.try_next()?;
            if let Some(value) = self.acked(taken) {
                return Some(value);
            }
        }
    }

    /// Waits for the next message with its delivery details and, under QoS 1, the handle to
    /// acknowledge it: call [`Delivery::ack`] once it is processed.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`recv`](Self::recv).
    pub async fn recv_delivery(&mut self) -> Option<Delivery<T>> {
        poll_fn(|cx| self.poll_recv_delivery(cx)).await
    }

    /// Polls for the next message with its delivery details; see
    /// [`recv_delivery`](Self::recv_delivery). For callers that wait on many subscriptions at
    /// once (the server's connection writer).
    pub fn poll_recv_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery<T>>> {
        loop {
            let Some(taken) = std::task::ready!(self.consumer.poll_next(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(value) = self.decoded(&taken.message) {
                return Poll::Ready(Some(Delivery::new(value, taken, self.acker.clone())));
            }
        }
    }

    /// Takes the next message with its delivery details, if one is ready.
    pub fn try_recv_delivery(&mut self) -> Option<Delivery<T>> {
        loop {
            let taken = self.consumer.try_next()?;
            if let Some(value) = self.decoded(&taken.message) {
                return Some(Delivery::new(value, taken, self.acker.clone()));
            }
        }
    }

    /// A handle to settle this subscription's QoS 1 messages by id; `None` under QoS 0.
    pub fn acker(&self) -> Option<Acker> {
        self.acker.clone()
    }

    /// The subscription's filter.
    pub fn filter(&self) -> &Filter {
        &self.registration.queue.filter
    }

    /// A snapshot of this subscription's counters (a group member sees the group's).
    pub fn stats(&self) -> SubscriptionStats {
        self.registration.stats()
    }

    /// Whether the subscription has been closed.
    pub fn is_closed(&self) -> bool {
        self.registration.is_closed()
    }

    /// Unsubscribes now; the same as dropping the subscription.
    pub fn unsubscribe(self) {}

    fn decoded(&self, message: &Message) -> Option<T> {
        match (self.decode.borrowed)(message) {
            Ok(value) => Some(value),
            Err(error) => {
                self.failed(message, &error);
                None
            }
        }
    }

    fn failed(&self, message: &Message, error: &ReceiveError) {
        let counters = &self.registration.shared.counters;
        decode_failed(&self.consumer.queue, self.acker.as_ref(), counters, message, error);
    }

    /// The value of a taken message, acknowledged under QoS 1; `None` if it does not decode.
    fn acked(&self, taken: Taken) -> Option<T> {
        let id = taken.message.id();
        match (self.decode.owned)(taken.message) {
            Ok(value) => {
                if let Some(acker) = &self.acker {
                    acker.ack(id);
                }
                Some(value)
            }
            Err((error, message)) => {
                self.failed(&message, &error);
                None
            }
        }
    }

    fn poll_acked(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        loop {
            let Some(taken) = std::task::ready!(self.consumer.poll_next(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(value) = self.acked(taken) {
                return Poll::Ready(Some(value));
            }
        }
    }
}

impl Subscription<Message> {
    pub(crate) fn raw(
        shared: &Arc<Shared>,
        options: SubscribeOptions,
    ) -> Result<Self, SubscribeError> {
        let registration = Shared::register(shared, &options, None)?;
        Ok(Self::with(registration, Decode { borrowed: |m| Ok(m.clone()), owned: Ok }))
    }

    /// Waits for the next message, undecoded; acknowledged under QoS 1.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`recv`](Self::recv).
    pub async fn recv_message(&mut self) -> Option<Message> {
        self.recv().await
    }

    /// Polls for the next message, undecoded (acknowledged under QoS 1): `Ready(Some)` takes it,
    /// `Ready(None)` means the subscription is closed, `Pending` registers `cx`'s waker.
    pub fn poll_recv_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.poll_acked(cx)
    }

    /// Takes the next message, undecoded, if one is queued; acknowledged under QoS 1.
    pub fn try_recv_message(&mut self) -> Option<Message> {
        self.try_recv()
    }

    /// Polls for the next message and its attempt number (1 for a first delivery), left
    /// unacknowledged under QoS 1 — settle it by id through [`acker`](Self::acker). What
    /// [`poll_recv_delivery`](Self::poll_recv_delivery) gives, for a caller that needs no
    /// more (the server, whose clients acknowledge by frame): the message is handed over
    /// without a second reference to it for the delivery's value.
    pub fn poll_recv_unsettled(&mut self, cx: &mut Context<'_>) -> Poll<Option<(Message, u32)>> {
        self.consumer.poll_next(cx).map(|taken| taken.map(|t| (t.message, t.attempt)))
    }

    /// Takes the next message and its attempt number if one is queued, left unacknowledged
    /// under QoS 1; see [`poll_recv_unsettled`](Self::poll_recv_unsettled).
    pub fn try_recv_unsettled(&mut self) -> Option<(Message, u32)> {
        self.consumer.try_next().map(|t| (t.message, t.attempt))
    }

    /// Takes the messages queued now, in order, as
    /// [`try_recv_unsettled`](Self::try_recv_unsettled) does, handing each to `each` until it
    /// returns `false` — for a caller that forwards many in a row (the server's connection
    /// writer). Under QoS 0 their room in the queue's bounds is given back once, when this
    /// returns, not message by message: publishers on other threads meet the queue's count
    /// once a batch. With `cx`, running out registers its waker, as
    /// [`poll_recv_unsettled`](Self::poll_recv_unsettled) does.
    pub fn drain_unsettled(
        &mut self,
        cx: Option<&mut Context<'_>>,
        mut each: impl FnMut(Message, u32) -> bool,
    ) -> Drained {
        self.consumer.drain(cx, |_, taken| each(taken.message, taken.attempt))
    }
}

impl<T> Stream for Subscription<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().poll_acked(cx)
    }
}

impl<T> Unpin for Subscription<T> {}

/// A running callback subscriber. Dropping it (or calling [`unsubscribe`](Self::unsubscribe))
/// unsubscribes, and its delivery ends.
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
        self.registration.is_closed()
    }

    /// Unsubscribes now; the same as dropping the handle.
    pub fn unsubscribe(self) {}
}

/// After a callback returned (`ok`) or panicked: under QoS 1 the message is acknowledged, or
/// refused with requeue; a panic is counted and logged.
fn settle(
    queue: &Queue,
    acker: Option<&Acker>,
    counters: &BrokerCounters,
    message: &Message,
    ok: bool,
) {
    if let Some(acker) = acker {
        if ok {
            acker.ack(message.id());
        } else {
            acker.nack(message.id(), true);
        }
    }
    if !ok {
        bump(&queue.counters.callback_panics);
        bump(&counters.callback_panics);
        tracing::error!(filter = %queue.filter, id = %message.id(), "subscriber callback panicked");
    }
}

/// Starts a subscriber whose delivery task runs `handle` for each decoded message, in order.
/// Under QoS 1 a message is acknowledged when `handle` completes, and refused with requeue when
/// it panics.
fn spawn_delivery<T, H, Fut>(
    shared: &Arc<Shared>,
    options: SubscribeOptions,
    mut handle: H,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    H: FnMut(T) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let registration = Shared::register(shared, &options, typed_info::<T>())?;
    let mut consumer = Consumer::of(&registration);
    let acker = consumer.acker();
    let counters = Arc::clone(&shared.counters);
    let task = async move {
        let mut budget = DELIVERY_BUDGET;
        while let Some(taken) = poll_fn(|cx| consumer.poll_next(cx)).await {
            let message = &taken.message;
            // A panic in the value's `Deserialize` is caught as one in the callback is.
            match std::panic::catch_unwind(AssertUnwindSafe(|| message.decode_shared::<T>())) {
                Ok(Ok(value)) => {
                    let ok = handle(value).await;
                    settle(&consumer.queue, acker.as_ref(), &counters, message, ok);
                }
                Ok(Err(error)) => {
                    decode_failed(&consumer.queue, acker.as_ref(), &counters, message, &error);
                }
                Err(_) => settle(&consumer.queue, acker.as_ref(), &counters, message, false),
            }
            budget -= 1;
            if budget == 0 {
                budget = DELIVERY_BUDGET;
                tokio::task::yield_now().await;
            }
        }
    };
    // Dropping the task's JoinHandle detaches it; it ends by itself once its registration ends.
    drop(shared.spawner.spawn(task).map_err(SubscribeError::Runtime)?);
    Ok(Subscriber { registration })
}

/// A sync callback subscriber, run by one of the broker's dispatchers.
struct Callback<T, F> {
    consumer: Consumer,
    acker: Option<Acker>,
    counters: Arc<BrokerCounters>,
    callback: F,
    value: std::marker::PhantomData<fn() -> T>,
}

impl<T, F> dispatch::Drain for Callback<T, F>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    F: FnMut(T) + Send + 'static,
{
    fn drain(&mut self, cx: &mut Context<'_>, allowance: &mut usize) -> Drained {
        if *allowance == 0 {
            return Drained::More;
        }
        let Self { consumer, acker, counters, callback, .. } = self;
        consumer.drain(Some(cx), |queue, taken| {
            *allowance -= 1;
            let message = &taken.message;
            // A panic in the value's `Deserialize` as well as in the callback is caught: the
            // dispatcher runs other subscriptions too.
            let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                message.decode_shared::<T>().map(&mut *callback)
            }));
            match handled {
                Ok(Ok(())) => settle(queue, acker.as_ref(), counters, message, true),
                Ok(Err(error)) => decode_failed(queue, acker.as_ref(), counters, message, &error),
                Err(_) => settle(queue, acker.as_ref(), counters, message, false),
            }
            *allowance > 0
        })
    }
}

pub(crate) fn spawn_sync<T>(
    shared: &Arc<Shared>,
    options: SubscribeOptions,
    callback: impl FnMut(T) + Send + 'static,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    let registration = Shared::register(shared, &options, typed_info::<T>())?;
    let consumer = Consumer::of(&registration);
    let acker = consumer.acker();
    let counters = Arc::clone(&shared.counters);
    let value = std::marker::PhantomData;
    let drain = Box::new(Callback { consumer, acker, counters, callback, value });
    shared.dispatchers.add(&shared.spawner, drain).map_err(SubscribeError::Runtime)?;
    Ok(Subscriber { registration })
}

pub(crate) fn spawn_async<T, Fut>(
    shared: &Arc<Shared>,
    options: SubscribeOptions,
    mut callback: impl FnMut(T) -> Fut + Send + 'static,
) -> Result<Subscriber, SubscribeError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    spawn_delivery(shared, options, move |value: T| {
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| callback(value)));
        async move {
            match started {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await.is_ok(),
                Err(_) => false,
            }
        }
    })
}
