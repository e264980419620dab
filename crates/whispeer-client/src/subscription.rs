//! Subscriptions on a client connection, and the messages they deliver.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use whispeer_engines::{Codec, Engines, OpenError};
use whispeer_proto::{Envelope, Headers, MessageId, Topic};

use crate::ReceiveError;
use crate::connection::Command;

/// A message delivered to this client: the envelope as the server forwarded it, and the keys
/// to open it.
#[derive(Clone)]
pub struct Delivery {
    envelope: Envelope,
    engines: Arc<Engines>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.envelope.id)
            .field("topic", &self.envelope.topic)
            .field("payload_len", &self.envelope.payload.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
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
        self.engines.open(&self.envelope)
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
    /// Messages that did not decode into the subscription's type.
    pub decode_errors: u64,
}

/// A subscription on a client: `recv().await`, or use it as a [`Stream`]. Dropping it
/// unsubscribes. Messages beyond its buffer (see `ClientOptions::subscription_capacity`) are
/// dropped by the connection task and logged.
pub struct ClientSubscription<T> {
    sub: u32,
    deliveries: mpsc::Receiver<Envelope>,
    commands: mpsc::Sender<Command>,
    engines: Arc<Engines>,
    decode: fn(&Delivery) -> Result<T, ReceiveError>,
    stats: SubscriptionStats,
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
    pub(crate) fn new(
        sub: u32,
        deliveries: mpsc::Receiver<Envelope>,
        commands: mpsc::Sender<Command>,
        engines: Arc<Engines>,
        decode: fn(&Delivery) -> Result<T, ReceiveError>,
    ) -> Self {
        Self { sub, deliveries, commands, engines, decode, stats: SubscriptionStats::default() }
    }

    /// Waits for the next message; `None` once the client is closed (or, without reconnection,
    /// the connection is lost).
    ///
    /// # Cancel safety
    /// Cancel-safe: a message is only taken when it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_decoded(cx)).await
    }

    /// This subscription's counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.stats
    }

    fn poll_decoded(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        loop {
            let Some(envelope) = std::task::ready!(self.deliveries.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let delivery = Delivery { envelope, engines: Arc::clone(&self.engines) };
            match (self.decode)(&delivery) {
                Ok(value) => return Poll::Ready(Some(value)),
                Err(err) => {
                    match err {
                        ReceiveError::Open(_) => self.stats.open_errors += 1,
                        _ => self.stats.decode_errors += 1,
                    }
                    tracing::debug!(topic = %delivery.topic(), id = %delivery.id(), %err, "message skipped");
                }
            }
        }
    }
}

impl<T> Stream for ClientSubscription<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_decoded(cx)
    }
}

impl<T> Unpin for ClientSubscription<T> {}

impl<T> Drop for ClientSubscription<T> {
    fn drop(&mut self) {
        // If the queue is full, the connection task still notices: its next delivery to this
        // subscription finds the receiver gone and unsubscribes then.
        let _ = self.commands.try_send(Command::Unsubscribe { sub: self.sub });
    }
}
