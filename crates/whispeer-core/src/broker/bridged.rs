//! A broker as one node of a cluster: what other nodes published comes in through
//! [`Broker::publish_bridged`], and [`Broker::confirmed`] says when a publish is safe to
//! acknowledge (stored, and taken by the cluster).

use whispeer_proto::{Envelope, Filter, Topic};

use crate::Broker;
use crate::bridge::Interest;
use crate::error::PublishError;
use crate::publish::PublishReceipt;
use crate::shared::SEAL_OVERHEAD;

/// Why a publish cannot be acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unconfirmed {
    /// The store failed before the message was durable.
    #[error("the store failed: not stored")]
    Store,
    /// The cluster did not take the message (the reason says why); this node's subscribers
    /// may have it.
    #[error("not taken by the cluster: {0}")]
    Cluster(String),
}

impl Broker {
    /// Routes a message that another node of the cluster accepted, to the subscribers here
    /// that `interest` stands for: the ordinary subscriptions matching its topic
    /// ([`Interest::Topics`]), or the one queue group ([`Interest::Group`]). Plugins ran on the
    /// node it came from; it is not forwarded again. Idempotency keys and time to live apply
    /// as to a local publish, and a retained topic keeps it in its history.
    ///
    /// # Errors
    /// An invalid or over-size envelope; full subscriber queues, as for a local publish.
    pub fn publish_bridged(
        &self,
        envelope: Envelope,
        interest: &Interest,
    ) -> Result<PublishReceipt, PublishError> {
        self.check_bridged(&envelope)?;
        self.inner.accept_from(envelope, crate::shared::Origin::Bridged(interest))
    }

    /// Routes a message that a peer of a mesh published (`whispeer-sync`): to every
    /// subscriber here, queue groups included (each node's groups get each message once).
    /// Plugins ran where it was published; it is not handed to the bridge again. Idempotency
    /// keys and time to live apply as to a local publish, and a retained topic keeps it.
    ///
    /// # Errors
    /// An invalid or over-size envelope; full subscriber queues, as for a local publish.
    pub fn publish_from_peer(&self, envelope: Envelope) -> Result<PublishReceipt, PublishError> {
        self.check_bridged(&envelope)?;
        self.inner.accept_from(envelope, crate::shared::Origin::Peer)
    }

    /// Routes a message of a durable topic that the cluster keeps, at the offset the cluster
    /// gave it (the same on every node), accepted by the cluster at `accepted_ms` (milliseconds
    /// since the epoch): to the ordinary subscriptions here (queue groups get theirs through
    /// [`Broker::publish_bridged`]), and into the topic's history. The bridge hands every such
    /// message to every node, its own included, in offset order; an offset already passed is
    /// dropped as a repeat. On a node where the topic is not durable it is routed like
    /// [`Broker::publish_bridged`] with the topic as interest.
    ///
    /// # Errors
    /// An invalid or over-size envelope; full subscriber queues.
    pub fn publish_sequenced(
        &self,
        envelope: Envelope,
        offset: u64,
        accepted_ms: u64,
    ) -> Result<PublishReceipt, PublishError> {
        self.check_bridged(&envelope)?;
        self.inner.accept_sequenced(envelope, offset, accepted_ms)
    }

    /// What another node sent is checked like a local publish: a valid topic, a payload
    /// within the limit (plus what sealing adds).
    fn check_bridged(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let limits = &self.inner.options.limits;
        Topic::validate(envelope.topic.as_str(), limits)?;
        let max = limits.max_message_bytes + SEAL_OVERHEAD;
        if envelope.payload.len() > max {
            return Err(PublishError::TooLarge { len: envelope.payload.len(), max });
        }
        Ok(())
    }

    /// Offers a durable topic's message that the cluster keeps, at its offset, to the local
    /// queue group `filter` / `name` (the cluster picked this node for it: a durable group's
    /// position lives in the cluster). `Ok(None)`: no such group here (the cluster should give
    /// it to another node); `Ok(Some(true))`: a QoS 1 group took it, and
    /// [`Bridge::group_settled`](crate::Bridge::group_settled) hears when it is settled;
    /// `Ok(Some(false))`: delivered, nothing to wait for.
    ///
    /// # Errors
    /// An invalid or over-size envelope; the group's queue is full.
    pub fn publish_sequenced_to_group(
        &self,
        envelope: Envelope,
        offset: u64,
        accepted_ms: u64,
        filter: &Filter,
        name: &str,
    ) -> Result<Option<bool>, PublishError> {
        self.check_bridged(&envelope)?;
        self.inner.to_group_sequenced(filter, name, envelope, offset, accepted_ms)
    }

    /// Waits until the publish of `receipt` may be acknowledged: durable under the store's
    /// policy (for a durable topic), and taken by the cluster (for a node of one). When it is
    /// not, the publish's idempotency key is forgotten, so a retry with it goes through.
    ///
    /// # Errors
    /// [`Unconfirmed`]: the store failed, or the cluster did not take the message.
    pub async fn confirmed(&self, receipt: &PublishReceipt) -> Result<(), Unconfirmed> {
        self.confirmed_at(receipt).await.map(drop)
    }

    /// [`confirmed`](Self::confirmed), with the offset the cluster gave the message when it
    /// keeps the topic (a durable topic on a node of a cluster); `None` otherwise.
    ///
    /// # Errors
    /// [`Unconfirmed`]: the store failed, or the cluster did not take the message.
    pub async fn confirmed_at(&self, receipt: &PublishReceipt) -> Result<Option<u64>, Unconfirmed> {
        let confirmed = async {
            if !self.durable(receipt).await {
                return Err(Unconfirmed::Store);
            }
            match (receipt.bridged, &self.inner.bridge) {
                (Some(Err(why)), _) => Err(Unconfirmed::Cluster(why.into())),
                (Some(Ok(ticket)), Some(bridge)) => {
                    bridge.confirm_offset(ticket).await.map_err(Unconfirmed::Cluster)
                }
                _ => Ok(None),
            }
        }
        .await;
        // A message not confirmed may not have been kept: its idempotency key must let the
        // publisher's retry through.
        if receipt.keyed {
            self.inner.dedup.confirmed(receipt.id, confirmed.is_ok());
        }
        confirmed
    }
}
