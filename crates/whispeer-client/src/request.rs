//! Request/reply, as NATS has it: [`Client::request`] publishes at QoS 1 with a reply topic and a
//! correlation id (the `response-topic` and `correlation-data` headers, which are MQTT 5's
//! response topic and correlation data too) and waits for the one reply on the client's own
//! inbox; [`Client::respond`] answers the requests on a filter, responders sharing them as a
//! queue group. A request nothing subscribes to fails at once ([`ClientError::NoResponders`]),
//! one without an answer in time with [`ClientError::NoReply`]. Responders are a QoS 1 queue
//! group: when the last one leaves, the group lingers (the broker's `group_linger`) and keeps
//! the requests that come for a responder that returns; meanwhile a request waits for its
//! timeout rather than failing with `NoResponders`.
//!
//! The inbox is `_inbox/<16 hex digits>`, one exact topic per client (subscribed to on the first
//! request), and a reply finds its request by the correlation id, which a responder gives back:
//! no topic per request, so the server routes a reply as any exact topic, and its per-topic
//! traffic counts are not filled with one-off topics. On a server with ACLs, grant requesters
//! `subscribe = ["_inbox/#"]` and responders `publish = ["_inbox/#"]`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use whispeer_proto::header::{CORRELATION_DATA, RESPONSE_TOPIC};
use whispeer_proto::{ContentType, ErrorCode, Qos};

use super::connection::AckWaiter;
use super::{Client, ClientError, Delivery, PublishOptions, SubscribeOptions};

/// Requests a responder holds at once, answered one after another: enough that it does not wait
/// a round trip for the next (with 64 asked at once, one responder answered 67–72 k requests a
/// second holding eight, 136–143 k holding 32 and 127–131 k holding 64: `whispeer bench
/// --requests --responders 1`). The server gives a group's member at most its share of a burst,
/// so a responder holding this many still leaves the others theirs. Each is acked once
/// answered: one held by a responder that goes away is given to another.
const RESPONDER_WINDOW: u32 = 32;

/// Where a request's reply, or its refusal, goes.
type Waiter = oneshot::Sender<Result<Delivery, ClientError>>;

/// A client's inbox: its replies' topic and who waits for each.
#[derive(Debug)]
pub(crate) struct Inbox {
    /// The topic, as each request's `response-topic` header gives it.
    topic: Bytes,
    next: AtomicU64,
    /// Each request's waiter, told its reply, or the server's refusal of the request.
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
    /// Dropped with the inbox: its task ends.
    _stop: watch::Sender<()>,
}

/// Answers requests until dropped.
#[derive(Debug)]
pub struct Responder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn inbox(&self) -> Result<&Arc<Inbox>, ClientError> {
        self.shared
            .inbox
            .get_or_try_init(|| async {
                let mut id = [0u8; 8];
                let _ = getrandom::fill(&mut id);
                let prefix = format!("_inbox/{:016x}", u64::from_le_bytes(id));
                let mut replies = self.messages(prefix.as_str()).await?;
                let waiting: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
                let (stop, mut stopped) = watch::channel(());
                let routes = Arc::clone(&waiting);
                tokio::spawn(async move {
                    loop {
                        let reply = tokio::select! {
                            reply = replies.recv() => reply,
                            _ = stopped.changed() => None,
                        };
                        let Some(reply) = reply else { break };
                        let correlation = reply.headers().get(CORRELATION_DATA);
                        let n = correlation.and_then(|c| std::str::from_utf8(c).ok()?.parse().ok());
                        let waiter = n.and_then(|n: u64| {
                            routes.lock().unwrap_or_else(PoisonError::into_inner).remove(&n)
                        });
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(Ok(reply));
                        }
                    }
                });
                let topic = Bytes::from(prefix);
                Ok(Arc::new(Inbox { topic, next: AtomicU64::new(1), waiting, _stop: stop }))
            })
            .await
    }

    /// Publishes `payload` to `topic` as a request and waits up to `timeout` for its reply.
    ///
    /// # Errors
    /// [`ClientError::NoResponders`] when nothing subscribes to `topic`,
    /// [`ClientError::NoReply`] without a reply in time, or as [`Client::publish_acked`].
    pub async fn request(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Delivery, ClientError> {
        let inbox = self.inbox().await?;
        let n = inbox.next.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        let forget = || inbox.waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&n);
        inbox.waiting.lock().unwrap_or_else(PoisonError::into_inner).insert(n, answer);
        let options = PublishOptions::new()
            .header(RESPONSE_TOPIC, inbox.topic.clone())
            .header(CORRELATION_DATA, n.to_string());
        // The server's refusal (no responders, a denial, the connection lost) comes to the
        // waiter in place of the reply; its acknowledgement wakes nothing.
        let waiting = Arc::clone(&inbox.waiting);
        let refused = AckWaiter::Refusal(Box::new(move |err| {
            let waiter = waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&n);
            if let Some(waiter) = waiter {
                let _ = waiter.send(Err(err));
            }
        }));
        let envelope =
            self.envelope_with(topic, ContentType::Raw, payload.into(), options.headers)?;
        if let Err(err) = self.outbox.publish(Qos::AtLeastOnce, envelope, Some(refused)).await {
            forget();
            return Err(err);
        }
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(ClientError::Server { code, .. }))) if code == ErrorCode::NO_RESPONDERS => {
                Err(ClientError::NoResponders(topic.to_string()))
            }
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                forget();
                Err(ClientError::NoReply { topic: topic.to_string(), timeout })
            }
        }
    }

    /// Publishes `handler`'s answer to `request` to its reply topic, if it has one.
    async fn answer<F>(&self, request: &Delivery, handler: &mut F)
    where
        F: FnMut(&Delivery) -> Option<Bytes>,
    {
        let reply_to = request.headers().get(RESPONSE_TOPIC);
        let Some(reply_to) = reply_to.and_then(|t| std::str::from_utf8(t).ok()) else { return };
        let Some(body) = handler(request) else { return };
        let mut options = PublishOptions::new();
        if let Some(correlation) = request.headers().get(CORRELATION_DATA) {
            options = options.header(CORRELATION_DATA, correlation.clone());
        }
        if let Err(err) = self.publish_bytes_with(reply_to, body, &options).await {
            tracing::debug!(%err, "reply not sent");
        }
    }

    /// Answers the requests on `filter` with what `handler` returns (`None`: no answer),
    /// sharing them with the other responders of queue group `group`; until the [`Responder`]
    /// is dropped. A message without a reply topic is passed over. A responder holds 32
    /// requests at most, and at most its share of what the group has (so a burst is spread
    /// over the responders), and acknowledges each once answered, so a busy responder leaves
    /// the rest to the others, and a request whose responder goes away before answering goes
    /// to another; one not answered within the server's ack timeout (30 s unless configured)
    /// is delivered again too.
    ///
    /// # Errors
    /// As [`Client::messages`].
    pub async fn respond<F>(
        &self,
        filter: &str,
        group: &str,
        mut handler: F,
    ) -> Result<Responder, ClientError>
    where
        F: FnMut(&Delivery) -> Option<Bytes> + Send + 'static,
    {
        // QoS 1 with a window: the server spreads requests over the group's responders.
        let options = SubscribeOptions::new(filter)
            .group(group)
            .qos(Qos::AtLeastOnce)
            .prefetch(RESPONDER_WINDOW);
        let mut requests = self.messages(options).await?;
        let client = self.clone();
        let task = tokio::spawn(async move {
            while let Some(request) = requests.recv_unacked().await {
                client.answer(&request, &mut handler).await;
                request.ack();
            }
        });
        Ok(Responder { task })
    }
}
