//! PUBLISH, the frame a connection sees most: the publishes of one read go to the broker
//! together, and each gets its reply (PUBACK, or why not), handed to the writer as it goes.

use bytes::BytesMut;
use whispeer_core::{PublishError, PublishReceipt, PushBatch};
use whispeer_proto::header::RESPONSE_TOPIC;
use whispeer_proto::{Body, DecodeError, Envelope, ErrorCode, Frame, Limits, Qos, TopicCache};

use super::codes::publish_code;
use super::{Connection, error_frame};
use crate::bump;
use crate::rate::RateLimit;
use crate::retained::{Full, Retained};
use crate::writer::Outbound;

/// ACKs gathered before they are settled together (a read holds fewer: this bounds the list).
const MAX_ACKS: usize = 4096;

/// What stopped [`Connection::publish_read`]: something to await.
pub(super) enum Next {
    /// A publish's reply to send, which the writer's queue had no room for.
    Reply(Frame),
    /// A frame other than a publish, to handle.
    Frame(Frame),
    /// A durable publish's confirmation queue is full: wait for room
    /// ([`Confirmations::make_room`](super::confirm::Confirmations::make_room)) before reading on.
    Room,
}

impl Connection {
    /// Publishes the frames of `buf` that are publishes, the common case, without a trip
    /// through `handle`, until one's answer finds the writer's queue full or a frame is another
    /// frame (returned, to be awaited), or `buf` holds no whole frame (`None`). Their messages
    /// reach their queues together when it returns ([`PushBatch`]), before anything awaits,
    /// and the consumers of those pushed at once (QoS 1 queues) are woken then, after the
    /// writer got the answers.
    ///
    /// ACKs of known subscriptions are gathered on the way and settled together, before the
    /// next publish or before it returns (before the frame it stops at is handled), so frames
    /// still take effect in the order they came. A subscriber acks every delivery: one take of
    /// its tracker's lock for a read's ACKs, rather than one each, spares the writer delivering
    /// on another thread from meeting that lock held.
    pub(super) fn publish_read(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        topics: &mut TopicCache,
        progressed: &mut bool,
    ) -> Result<Option<Next>, DecodeError> {
        let _batch = PushBatch::begin();
        let next = loop {
            let logged_in = self.greeted && self.principal.is_some();
            let raw = match Frame::split(buf, limits) {
                Ok(Some(raw)) => raw,
                Ok(None) => break Ok(None),
                Err(err) => break Err(err),
            };
            let correlation = raw.correlation();
            // A publish is decoded straight to its envelope, not wrapped in a `Frame`: built
            // without LTO, moving that about cost a third of its decoding. Any other frame is
            // decoded whole.
            let frame = match raw.publish(limits, topics) {
                Ok(Ok((qos, envelope))) if logged_in => {
                    *progressed = true;
                    // Frames take effect in order: the ACKs before this publish first.
                    self.settle_acks();
                    // The reply (a PUBACK, mostly) goes to the writer now and the read goes on;
                    // awaited only when the writer's queue has no room.
                    if let Some(reply) = self.publish(correlation, qos, envelope)
                        && let Err(refused) = self.tx.try_send(Outbound::Frame(reply))
                        && let Outbound::Frame(reply) = refused.into_inner()
                    {
                        break Ok(Some(Next::Reply(reply)));
                    }
                    if self.confirmations.holds() {
                        break Ok(Some(Next::Room));
                    }
                    continue;
                }
                // Refused in `handle`.
                Ok(Ok((qos, envelope))) => Frame::new(correlation, Body::Publish { qos, envelope }),
                Ok(Err(raw)) => match raw.decode(limits, topics) {
                    Ok(frame) => frame,
                    Err(err) => break Err(err),
                },
                Err(err) => break Err(err),
            };
            match frame {
                // An ACK of an unknown subscription is answered with an error, in `handle`.
                Frame { body: Body::Ack { sub, id }, .. }
                    if logged_in && self.subscriptions.contains_key(&sub) =>
                {
                    *progressed = true;
                    self.acks.push((sub, id));
                    if self.acks.len() >= MAX_ACKS {
                        self.settle_acks();
                    }
                }
                frame => break Ok(Some(Next::Frame(frame))),
            }
        };
        self.settle_acks();
        next
    }

    /// Settles the ACKs gathered by `publish_read`, each run of one subscription's together;
    /// those of a QoS 0 subscription settle nothing, as in `handle`.
    fn settle_acks(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let mut acks = std::mem::take(&mut self.acks);
        for run in acks.chunk_by(|a, b| a.0 == b.0) {
            if let Some(Some(acker)) = run.first().and_then(|(sub, _)| self.subscriptions.get(sub))
            {
                acker.ack_all(run.iter().map(|&(_, id)| id));
            }
        }
        acks.clear();
        self.acks = acks;
    }

    /// PUBLISH, once the principal may write the topic and the rate limit allows it; returns
    /// the reply to send now, if any. Not `async`: a publish is the frame a connection sees
    /// most, and an `async fn` this size costs a copy of its state.
    pub(super) fn publish(
        &mut self,
        correlation: u32,
        qos: Qos,
        envelope: Envelope,
    ) -> Option<Frame> {
        // A reserved topic is refused as such by the broker, whoever publishes.
        if !envelope.topic.is_reserved() && !self.may_publish(&envelope.topic) {
            bump(&self.config.access.denied_publish);
            let message = format!("not allowed to publish to {}", envelope.topic);
            return Some(error_frame(correlation, ErrorCode::FORBIDDEN, message));
        }
        if !self.admit(envelope.payload.len()) {
            bump(&self.config.access.rate_limited);
            let message = RateLimit::refusal(&self.config);
            return Some(error_frame(correlation, ErrorCode::LIMIT_REACHED, message));
        }
        let retain = Retained::wanted(&envelope).then(|| envelope.clone());
        if let Some(kept) = &retain {
            let (max, bytes) = (self.config.max_retained, self.config.max_retained_bytes);
            if let Err(Full(message)) = self.config.retained.admit(kept, max, bytes) {
                return Some(error_frame(correlation, ErrorCode::LIMIT_REACHED, message));
            }
        }
        let bytes = envelope.payload.len();
        let request = qos == Qos::AtLeastOnce && envelope.headers.get(RESPONSE_TOPIC).is_some();
        // A copy of the topic only where the traffic counter does not hold it already (it
        // mostly does: the connection's last topic), or a request may need it to refuse.
        let counted = self.flows.holds(&envelope.topic, true);
        let topic = (!counted || request).then(|| envelope.topic.clone());
        // Read under the broker's own limits (`connection::run`): checked already.
        let published = self.broker.publish_envelope_checked(envelope);
        // A request nothing took (known here only when no other node or store is involved).
        if let Ok(receipt) = &published
            && let Some(topic) = topic.as_ref().filter(|_| request)
            && receipt.subscribers == 0
            && !receipt.is_durable_pending()
        {
            let message = format!("nothing subscribes to {topic}");
            return Some(error_frame(correlation, ErrorCode::NO_RESPONDERS, message));
        }
        if published.is_ok() {
            match &topic {
                Some(topic) => self.config.traffic.inbound(&mut self.flows, topic, bytes),
                None => self.flows.add(bytes),
            }
            self.published += 1;
            if qos == Qos::AtLeastOnce {
                self.settle();
            }
            if let Some(kept) = retain
                && let Err(err) = self.config.retained.keep(&kept)
            {
                tracing::error!(%err, topic = %kept.topic, "retained message not stored");
                let message = format!("published, but its retained copy was not stored: {err}");
                return Some(error_frame(correlation, ErrorCode::INTERNAL, message));
            }
        }
        self.published(correlation, qos, published)
    }

    /// Replies to a publish: PUBACK for QoS 1 (once durable, for a durable topic), or why not.
    fn published(
        &mut self,
        correlation: u32,
        qos: Qos,
        published: Result<PublishReceipt, PublishError>,
    ) -> Option<Frame> {
        match published {
            Ok(receipt) if qos == Qos::AtLeastOnce && receipt.is_durable_pending() => {
                // PUBACK once the record is durable; meanwhile the connection goes on, so
                // concurrent publishes share one fsync (group commit).
                self.confirmations.push(&self.broker, &self.tx, correlation, receipt);
                None
            }
            Ok(_) if qos == Qos::AtLeastOnce => Some(Frame::new(correlation, Body::PubAck)),
            Ok(_) => None,
            Err(err) => Some(error_frame(correlation, publish_code(&err), err.to_string())),
        }
    }
}
