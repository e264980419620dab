//! Routing, the last step of every publish: letting the topic through, offering the message
//! to every matching queue, and counting what came of it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use whispeer_proto::{Envelope, MessageId, Topic};

use super::{Shared, Tally};
use crate::error::PublishError;
use crate::message::Message;
use crate::publish::PublishReceipt;
use crate::queue::Queue;
use crate::router::{Matches, Routed, SubId};
use crate::staging;
use crate::stats::bump;

impl Shared {
    /// Lets a publish through routing: checks its topic against the broker's limits unless
    /// `check` says it was, or an exact subscription's filter is the same text (`subscribed`:
    /// that filter was checked against the same limits). It is one publish to count (with the
    /// fan-out's deliveries, in [`Shared::tallied`]).
    pub(super) fn admit(
        &self,
        topic: &str,
        check: Check,
        subscribed: bool,
    ) -> Result<u64, PublishError> {
        if check == Check::UnlessSubscribed && !subscribed {
            Topic::validate(topic, &self.options.limits)?;
        }
        Ok(1)
    }

    /// Offers the envelope to every queue whose filter matches `topic`, once `admit` lets it
    /// through (see [`Router::with_matches_admitted`]) and says how many publishes to count.
    /// `routed` is the topic's text, or the envelope itself, which `envelope` then takes.
    pub(crate) fn route<T: Routed>(
        &self,
        id: MessageId,
        routed: T,
        expires_at: Option<Instant>,
        scope: Scope,
        admit: impl FnOnce(&str, bool) -> Result<u64, PublishError>,
        envelope: impl FnOnce(T, &Topic) -> Envelope,
    ) -> Result<PublishReceipt, PublishError> {
        self.fan_out(id, routed, scope, admit, |routed, matches| {
            let engines = self.engines.clone();
            let envelope = envelope(routed, matches.topic);
            // One subscriber: a server connection's writer runs on its reader's thread
            // (`writer/inline.rs` in the server), so the message is mostly let go where it
            // was made, which spares serve without a lock. Several: let go by whichever
            // writer is last, often on another worker, which the allocator serves (see
            // `Message::from_spare`).
            if matches.len() == 1 {
                Message::from_spare(envelope, 1, engines, expires_at)
            } else {
                Message::new(envelope, matches.len(), engines, expires_at)
            }
        })
    }

    /// Offers the message `make` builds (only if the topic has subscribers) to every matching
    /// queue.
    pub(super) fn fan_out<T: Routed>(
        &self,
        id: MessageId,
        routed: T,
        scope: Scope,
        admit: impl FnOnce(&str, bool) -> Result<u64, PublishError>,
        make: impl FnOnce(T, &Matches<'_>) -> Message,
    ) -> Result<PublishReceipt, PublishError> {
        let mut tally = Tally::default();
        let mut disconnected: Vec<(SubId, Arc<Queue>)> = Vec::new();
        let mut published = 0;
        let admit = |topic: &str, subscribed| admit(topic, subscribed).map(|n| published = n);
        self.router.with_matches_admitted(routed, admit, |routed, matches| {
            let Some(matches) = matches else { return };
            let mut message = Some(make(routed, &matches));
            let mut routes = matches.iter().peekable();
            while let Some(route) = routes.next() {
                if scope == Scope::Solo && route.queue.group.is_some() {
                    continue;
                }
                // The last subscriber takes the publisher's reference instead of a clone.
                let next = if routes.peek().is_some() { message.clone() } else { message.take() };
                let Some(next) = next else { break };
                // Within a `PushBatch`, left with it for the queue (it always queues).
                let Err(next) = staging::hold(&route.queue, &self.counters, next) else {
                    tally.delivered += 1;
                    continue;
                };
                if tally.record_push(&route.queue, route.queue.push(next), &self.counters) {
                    disconnected.push((route.id, Arc::clone(&route.queue)));
                }
            }
        })?;
        tally.published = published;
        for (id, queue) in disconnected {
            tracing::warn!(filter = %queue.filter, "subscriber disconnected: queue full");
            self.unsubscribe(id, &queue);
        }
        self.tallied(id, &tally)
    }

    /// Counts a fan-out's outcomes; a publish that found full queues is refused.
    pub(super) fn tallied(
        &self,
        id: MessageId,
        tally: &Tally,
    ) -> Result<PublishReceipt, PublishError> {
        if tally.delivered == 0 && tally.full == 0 {
            bump(&self.counters.unrouted);
        }
        let delivered = tally.delivered as u64;
        // Within a `PushBatch`, counted once a batch.
        if !staging::count(&self.counters, tally.published, delivered) {
            if tally.published > 0 {
                self.counters.published.fetch_add(tally.published, Ordering::Relaxed);
            }
            self.counters.deliveries.fetch_add(delivered, Ordering::Relaxed);
        }
        if tally.full > 0 {
            return Err(PublishError::QueueFull { full: tally.full, delivered: tally.delivered });
        }
        let subscribers = tally.delivered;
        Ok(PublishReceipt {
            id,
            subscribers,
            duplicate: false,
            ticket: None,
            bridged: None,
            keyed: false,
        })
    }
}

/// Whether a publish's topic is still to be checked against the broker's limits when it
/// reaches routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Checked already (parsed under the broker's limits, or made by the broker itself).
    Done,
    /// To be checked, unless an exact subscription's filter is the same text.
    UnlessSubscribed,
}

/// An `admit` for [`Shared::route`] when the topic is known valid and the publish was
/// counted already: nothing to count.
pub(crate) fn known_valid(_topic: &str, _subscribed: bool) -> Result<u64, PublishError> {
    Ok(0)
}

/// Which of a topic's routes a fan-out offers a message to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every route.
    All,
    /// Ordinary subscriptions only: queue groups get the message through the cluster.
    Solo,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use whispeer_proto::{Envelope, Flags, MessageId, Topic};

    use crate::{Broker, BrokerOptions, SubscribeOptions};

    /// An envelope from elsewhere (a server connection's read) with one subscriber is made in
    /// a spare allocation; with several, by the system allocator.
    #[test]
    fn an_envelope_with_one_subscriber_is_made_from_spares_and_one_with_several_is_not() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _entered = runtime.enter();
        let broker = Broker::builder(BrokerOptions::default()).build();
        let options = |filter| SubscribeOptions::new(filter).capacity(16);
        let mut one = broker.messages(options("one")).unwrap();
        let mut several: Vec<_> =
            (0..2).map(|_| broker.messages(options("two")).unwrap()).collect();
        let envelope = |topic| {
            let topic = Topic::parse(topic).unwrap();
            Envelope::new(MessageId(1), topic, 0, Flags(0), Bytes::from_static(b"payload"))
        };
        broker.publish_envelope(envelope("one")).unwrap();
        broker.publish_envelope(envelope("two")).unwrap();
        let taken = one.try_recv_message().unwrap();
        assert!(taken.made_in_a_spare());
        assert_eq!(taken.payload()[..], b"payload"[..]);
        for sub in &mut several {
            let taken = sub.try_recv_message().unwrap();
            assert!(!taken.made_in_a_spare());
            assert_eq!(taken.payload()[..], b"payload"[..]);
        }
    }
}
