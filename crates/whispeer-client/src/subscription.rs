//! Subscriptions on a client connection, and the messages they deliver.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use whispeer_engines::{Codec, Engines, OpenError};
use whispeer_proto::{Envelope, Headers, Limits, MessageId, Topic, TopicCache};

use crate::ReceiveError;
use crate::connection::{Buffer, Command, Run, Settle};

/// Where a QoS 1 delivery sends its ack.
#[derive(Clone, Debug)]
struct AckTo {
    sub: u32,
    settles: mpsc::UnboundedSender<Settle>,
}

/// A message delivered to this client: the envelope as the server forwarded it, the keys to
/// open it, and, for a QoS 1 subscription, the way to acknowledge it.
#[derive(Clone)]
pub struct Delivery {
    envelope: Envelope,
    /// The client's engines where they can change a payload; `None` where they cannot (no
    /// compression, encryption or rule): a delivery then takes no reference on them.
    engines: Option<Arc<Engines>>,
    /// The largest payload opening may produce (the client's limit).
    max_message_bytes: u32,
    attempt: u32,
    offset: u64,
    ack_to: Option<AckTo>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.envelope.id)
            .field("topic", &self.envelope.topic)
            .field("attempt", &self.attempt)
            .field("payload_len", &self.envelope.payload.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// 1 for a first delivery; more for a redelivery of a QoS 1 message that was not
    /// acknowledged in time (or whose subscriber went away).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The message's offset in its topic's retained history, if the topic keeps one.
    pub fn offset(&self) -> Option<u64> {
        (self.offset > 0).then_some(self.offset)
    }

    /// Whether the message was delivered before.
    pub fn is_redelivery(&self) -> bool {
        self.attempt > 1
    }

    /// Acknowledges a QoS 1 message: the server will not deliver it again. Returns `false`
    /// under QoS 0 (nothing to acknowledge) or once the client is closed.
    pub fn ack(&self) -> bool {
        self.settle(None)
    }

    /// Refuses a QoS 1 message: with `requeue` the server delivers it again at once (to this
    /// subscription or another member of its group); without, it goes to the dead-letter topic.
    pub fn nack(&self, requeue: bool) -> bool {
        self.settle(Some(requeue))
    }

    fn settle(&self, requeue: Option<bool>) -> bool {
        let Some(to) = &self.ack_to else { return false };
        let settle = Settle { sub: to.sub, id: self.envelope.id, requeue };
        to.settles.send(settle).is_ok()
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &Topic {
        &self.envelope.topic
    }

    /// Its id.
    pub fn id(&self) -> MessageId {
        self.envelope.id
    }

    /// Publish time, milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.envelope.timestamp_ms
    }

    /// Application headers.
    pub fn headers(&self) -> &Headers {
        &self.envelope.headers
    }

    /// The payload as it travelled (sealed if the publisher sealed it).
    pub fn payload(&self) -> &Bytes {
        &self.envelope.payload
    }

    /// The payload as it travelled, taken out of the delivery: no reference is taken on its
    /// bytes, as [`Delivery::payload`] and a clone would. Acknowledge a QoS 1 delivery first.
    pub fn into_payload(self) -> Bytes {
        self.envelope.payload
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The payload opened with this client's keys and authenticated.
    ///
    /// # Errors
    /// [`OpenError`] for a wrong or unknown key, tampering or corruption.
    pub fn plaintext(&self) -> Result<Bytes, OpenError> {
        // `open` returns a plain payload as it is, without copying.
        match &self.engines {
            Some(engines) => engines.open(&self.envelope),
            // No keys: what a publisher compressed still opens, within the client's limit.
            None => Engines::new()
                .with_max_message_bytes(self.max_message_bytes as usize)
                .open(&self.envelope),
        }
    }

    /// Opens the payload and decodes it as a `T`.
    ///
    /// # Errors
    /// [`ReceiveError`].
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ReceiveError> {
        let plaintext = self.plaintext()?;
        Ok(Codec::for_content(self.envelope.flags.content())?.decode(&plaintext)?)
    }
}

/// Counters of one client subscription.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Messages that did not open (wrong key, tampering).
    pub open_errors: u64,
    /// Messages that did not decode into the subscription's type, or arrived malformed (given
    /// up: under QoS 1 refused without requeue, so they go to the dead-letter topic).
    pub decode_errors: u64,
    /// Redeliveries of messages already acknowledged here, dropped (and acknowledged again).
    pub duplicates: u64,
    /// Messages dropped because this subscription's buffer was full (the application did not
    /// keep up); see `ClientOptions::subscription_max_bytes`.
    pub dropped: u64,
}

/// A subscription on a client: `recv().await`, or use it as a [`Stream`]. Dropping it
/// unsubscribes. Messages beyond its buffer (`ClientOptions::subscription_max_bytes`, then
/// `subscription_capacity`; under QoS 1 only past the prefetch) are dropped by the connection
/// task, counted and logged.
pub struct ClientSubscription<T> {
    sub: u32,
    /// Runs of deliveries taken from the buffer and not yet handed out.
    local: VecDeque<Run>,
    commands: mpsc::Sender<Command>,
    settles: Option<mpsc::UnboundedSender<Settle>>,
    /// The client's engines where they can change a payload, as deliveries carry them (decided
    /// once here, not per delivery).
    engines: Option<Arc<Engines>>,
    /// `limits.max_message_bytes`, as deliveries carry it.
    max_message_bytes: u32,
    decode: Decode<T>,
    stats: SubscriptionStats,
    buffer: Arc<Buffer>,
    /// Room of the messages taken from `local` and not yet given back to the buffer (bytes,
    /// messages): given back when `local` runs empty or every `RELEASE_EVERY` messages.
    unreleased: (usize, usize),
    /// What envelopes are decoded under, and the topic this subscription decoded last.
    limits: Limits,
    topics: TopicCache,
    /// Messages still to take on the unit of tokio's cooperative budget spent last.
    unspent: u8,
}

/// How many messages a subscription takes for one unit of tokio's cooperative budget: with
/// tokio's 128 units a task's turn, a subscriber that always finds a message waiting yields its
/// worker after 16,384 of them. The embedded broker's subscriptions spend a unit for 32; here a
/// unit for 8 or 32 cost the 1→8 receive of `whispeer bench` 5–20 % (a yield is a scheduler
/// round trip, often a parked worker woken and the task moved), for 128 about 4 %.
const MESSAGES_PER_UNIT: u8 = 128;

/// Most messages taken before their room is given back to the buffer.
const RELEASE_EVERY: usize = 256;

/// How a subscription makes its items from deliveries.
pub(crate) enum Decode<T> {
    /// Decoded (or opened) from the delivery, which stays for acknowledging.
    Value(fn(&Delivery) -> Result<T, ReceiveError>),
    /// The delivery itself (`T` is [`Delivery`]): `poll` is `ClientSubscription::<Delivery>::
    /// poll_itself`, which hands the delivery over where the caller wants it instead of
    /// through a call by pointer that takes and gives back its 160 bytes; `of` converts one.
    Itself {
        poll: fn(&mut ClientSubscription<T>, &mut Context<'_>) -> Poll<Option<T>>,
        of: fn(Delivery) -> T,
    },
}

/// What a client subscription is made of.
pub(crate) struct Parts {
    pub(crate) sub: u32,
    pub(crate) commands: mpsc::Sender<Command>,
    /// For QoS 1 subscriptions.
    pub(crate) settles: Option<mpsc::UnboundedSender<Settle>>,
    pub(crate) engines: Arc<Engines>,
    pub(crate) buffer: Arc<Buffer>,
    pub(crate) limits: Limits,
}

impl<T> fmt::Debug for ClientSubscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSubscription")
            .field("sub", &self.sub)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<T> ClientSubscription<T> {
    pub(crate) fn new(parts: Parts, decode: Decode<T>) -> Self {
        let Parts { sub, commands, settles, engines, buffer, limits } = parts;
        let (stats, local) = (SubscriptionStats::default(), VecDeque::new());
        let (unreleased, topics) = ((0, 0), TopicCache::default());
        let max_message_bytes = u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX);
        let engines = engines.is_active().then_some(engines);
        Self {
            sub,
            local,
            commands,
            settles,
            engines,
            max_message_bytes,
            decode,
            stats,
            buffer,
            unreleased,
            limits,
            topics,
            unspent: 0,
        }
    }

    /// Waits for the next message; `None` once the client is closed (or, without reconnection,
    /// the connection is lost). Under QoS 1 the message is acknowledged as it is returned; use
    /// [`recv_delivery`](Self::recv_delivery) to acknowledge after processing.
    ///
    /// # Cancel safety
    /// Cancel-safe: a message is only taken when it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_acked(cx)).await
    }

    /// Waits for the next message and its [`Delivery`] (attempt, id, and for QoS 1 the ack):
    /// call [`Delivery::ack`] once the message is processed. Unacknowledged, it is delivered
    /// again after the server's ack timeout.
    ///
    /// # Cancel safety
    /// Cancel-safe, as [`recv`](Self::recv).
    pub async fn recv_delivery(&mut self) -> Option<(T, Delivery)> {
        poll_fn(|cx| self.poll_decoded(cx)).await
    }

    /// This subscription's counters.
    pub fn stats(&self) -> SubscriptionStats {
        SubscriptionStats {
            duplicates: self.buffer.duplicates.load(Ordering::Relaxed),
            dropped: self.buffer.dropped(),
            ..self.stats
        }
    }

    fn poll_acked(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Decode::Itself { poll, .. } = self.decode {
            // The delivery is the item: acked and handed over, not copied.
            return poll(self, cx);
        }
        self.poll_decoded(cx).map(|next| {
            next.map(|(value, delivery)| {
                delivery.ack();
                value
            })
        })
    }

    /// The next delivery as it came, acknowledged first with `ack`. One whose envelope does not
    /// decode (the server sent it malformed) is skipped and counted, and under QoS 1 refused
    /// without requeue.
    ///
    /// Acknowledging here, before the delivery is made, lets it be made where the caller wants
    /// it: acknowledged by the caller through a reference, it was made here and then copied out
    /// whole (160 bytes) for each delivery.
    #[inline(always)]
    fn poll_delivery(&mut self, cx: &mut Context<'_>, ack: bool) -> Poll<Option<Delivery>> {
        loop {
            if self.local.is_empty()
                && !std::task::ready!(self.buffer.poll_take(&mut self.local, cx))
            {
                return Poll::Ready(None);
            }
            // Taking it spends the task's share of tokio's cooperative budget.
            if self.unspent == 0 {
                std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
                self.unspent = MESSAGES_PER_UNIT;
            }
            self.unspent -= 1;
            let Some(run) = self.local.front_mut() else { return Poll::Ready(None) };
            // Whole deliveries, as the connection task found them: every one comes out.
            let Some(incoming) = run.next() else {
                self.local.pop_front();
                continue;
            };
            let (id, attempt, offset) = (incoming.id, incoming.attempt, incoming.offset);
            let weight = Buffer::weight(incoming.envelope_len());
            let decoded = incoming.decode(&self.limits, &mut self.topics, &run.aliases);
            if run.is_empty() {
                self.local.pop_front();
            }
            self.unreleased.0 += weight;
            self.unreleased.1 += 1;
            if self.local.is_empty() || self.unreleased.1 >= RELEASE_EVERY {
                let (bytes, count) = std::mem::take(&mut self.unreleased);
                self.buffer.release(bytes, count);
            }
            let ack_to = self.settles.clone().map(|settles| AckTo { sub: self.sub, settles });
            match decoded {
                Ok(envelope) => {
                    if let Some(to) = ack_to.as_ref().filter(|_| ack) {
                        let _ = to.settles.send(Settle { sub: to.sub, id, requeue: None });
                    }
                    let engines = self.engines.clone();
                    return Poll::Ready(Some(Delivery {
                        envelope,
                        engines,
                        max_message_bytes: self.max_message_bytes,
                        attempt,
                        offset,
                        ack_to,
                    }));
                }
                Err(err) => {
                    self.stats.decode_errors += 1;
                    tracing::warn!(sub = self.sub, %id, %err, "malformed delivery skipped");
                    if let Some(to) = ack_to {
                        let _ = to.settles.send(Settle { sub: to.sub, id, requeue: Some(false) });
                    }
                }
            }
        }
    }

    fn poll_decoded(&mut self, cx: &mut Context<'_>) -> Poll<Option<(T, Delivery)>> {
        loop {
            let Some(delivery) = std::task::ready!(self.poll_delivery(cx, false)) else {
                return Poll::Ready(None);
            };
            let decoded = match self.decode {
                Decode::Value(decode) => decode(&delivery),
                Decode::Itself { of, .. } => Ok(of(delivery.clone())),
            };
            match decoded {
                Ok(value) => return Poll::Ready(Some((value, delivery))),
                Err(err) => {
                    match err {
                        ReceiveError::Open(_) => self.stats.open_errors += 1,
                        _ => self.stats.decode_errors += 1,
                    }
                    tracing::debug!(topic = %delivery.topic(), id = %delivery.id(), %err, "message skipped");
                    // It will not open or decode next time either: give it up.
                    delivery.nack(false);
                }
            }
        }
    }
}

impl ClientSubscription<Delivery> {
    /// The next delivery, acknowledged (see [`Decode::Itself`]).
    pub(crate) fn poll_itself(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.poll_delivery(cx, true)
    }

    /// The next delivery, not acknowledged: the caller acks it once it is done with it.
    pub(crate) async fn recv_unacked(&mut self) -> Option<Delivery> {
        poll_fn(|cx| self.poll_delivery(cx, false)).await
    }
}

impl<T> Stream for ClientSubscription<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_acked(cx)
    }
}

impl<T> Unpin for ClientSubscription<T> {}

impl<T> Drop for ClientSubscription<T> {
    fn drop(&mut self) {
        // If the queue is full, the connection task still notices: its next delivery to this
        // subscription finds the receiver gone and unsubscribes then.
        self.buffer.receiver_gone.store(true, Ordering::Release);
        let _ = self.commands.try_send(Command::Unsubscribe { sub: self.sub });
    }
}
