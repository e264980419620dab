//! QoS 1 publishes whose acknowledgement is awaited later, as a [`PendingAck`]: one task keeps
//! a window of publishes in flight (await the oldest, publish the next), where awaiting each
//! publish in turn would need a task per publish in flight, and a wake-up of each of them per
//! acknowledgement.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::oneshot;
use whispeer_proto::{ContentType, Envelope, MessageId, Qos};

use crate::connection::AckWaiter;
use crate::{Client, ClientError};

/// The server's answer to a QoS 1 publish, awaited when the caller chooses
/// ([`Client::publish_acked_deferred`]). It resolves to the message's id once the server has
/// acknowledged it (for a durable topic: once it is stored under the server's fsync policy),
/// or to the error that says why not. Dropping it does not withdraw the publish, which is
/// already on its way: only its answer goes unread.
#[derive(Debug)]
pub struct PendingAck {
    id: MessageId,
    acked: oneshot::Receiver<Result<(), ClientError>>,
}

impl PendingAck {
    /// The published message's id.
    #[must_use]
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl Future for PendingAck {
    type Output = Result<MessageId, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        Pin::new(&mut self.acked).poll(cx).map(|answer| match answer {
            Ok(Ok(())) => Ok(id),
            Ok(Err(err)) => Err(err),
            // The connection task is gone without answering: the client was closed.
            Err(_) => Err(ClientError::Closed),
        })
    }
}

impl Client {
    /// Publishes `value` with QoS 1 and returns once it is queued for the connection (waiting
    /// only while the outbox is full), with the acknowledgement to await later. Publishes go
    /// out, and are acknowledged, in the order they were queued. Run such a loop in a spawned
    /// task rather than in `main`'s own future: that one runs on a thread outside the runtime's
    /// workers, which every acknowledgement then has to wake.
    ///
    /// ```no_run
    /// # async fn run(client: whispeer_client::Client) -> Result<(), whispeer_client::ClientError> {
    /// // 64 publishes in flight from one task.
    /// let mut window = std::collections::VecDeque::new();
    /// for n in 0..10_000u32 {
    ///     if window.len() == 64 {
    ///         let oldest: whispeer_client::PendingAck = window.pop_front().unwrap();
    ///         oldest.await?;
    ///     }
    ///     window.push_back(client.publish_acked_deferred("orders", &n).await?);
    /// }
    /// for pending in window {
    ///     pending.await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::publish`] (an invalid topic, a value the codec refuses, a sealing failure, a
    /// message over the server's limit, a closed client); the server's refusal comes through
    /// the [`PendingAck`].
    pub async fn publish_acked_deferred<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<PendingAck, ClientError> {
        let codec = self.shared.codec;
        let envelope = self.envelope(topic, codec.content_type(), codec.encode(value)?)?;
        self.queue_acked(Qos::AtLeastOnce, envelope).await
    }

    /// [`Client::publish_acked_deferred`] with raw bytes.
    ///
    /// # Errors
    /// As [`Client::publish_acked_deferred`].
    pub async fn publish_acked_bytes_deferred(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PendingAck, ClientError> {
        let envelope = self.envelope(topic, ContentType::Raw, payload.into())?;
        self.queue_acked(Qos::AtLeastOnce, envelope).await
    }

    /// Queues a sealed envelope with a waiter for its acknowledgement.
    pub(crate) async fn queue_acked(
        &self,
        qos: Qos,
        envelope: Envelope,
    ) -> Result<PendingAck, ClientError> {
        let id = envelope.id;
        let (ack, acked) = oneshot::channel();
        self.outbox.publish(qos, envelope, Some(AckWaiter::Told(ack))).await?;
        Ok(PendingAck { id, acked })
    }
}
