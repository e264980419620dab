//! The seam through which a broker becomes one node of a cluster.
//!
//! A [`Bridge`] (the server's cluster engine implements one) hears of two things: every message a
//! local publisher got accepted ([`Bridge::forward`]), and every change in what this broker's
//! subscribers need from other nodes ([`Bridge::interest`]). What other nodes published comes
//! back through [`Broker::publish_bridged`](crate::Broker::publish_bridged), which routes it
//! here without forwarding it again.
//!
//! Queue groups span the cluster: while the bridge carries messages, a local publish skips this
//! broker's groups, and the bridge hands each message to one node's group
//! ([`Interest::Group`]). When it cannot carry a message (its engine is unreachable, its queue is
//! full) the broker serves its own groups, and a QoS 1 publisher is refused by
//! [`Broker::confirmed`](crate::Broker::confirmed).
//!
//! Durable topics can live in the cluster instead ([`Bridge::sequence`]): a local publish to one
//! is neither routed nor stored here; the cluster gives it an offset (the same on every node)
//! and hands it back, to this node as to every other, through
//! [`Broker::publish_sequenced`](crate::Broker::publish_sequenced), in offset order. Each node's
//! history of such a topic is then what the cluster keeps, at the same offsets everywhere.

use std::future::Future;
use std::pin::Pin;

use whispeer_proto::{Envelope, Filter};

/// What this broker's subscribers need from the rest of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Interest {
    /// Every message on topics matching the filter (ordinary subscriptions).
    Topics(Filter),
    /// Each message matching the filter once per cluster: the queue group `name`.
    Group {
        /// The group's filter.
        filter: Filter,
        /// The group's name.
        name: Box<str>,
    },
}

impl Interest {
    /// The filter.
    pub fn filter(&self) -> &Filter {
        match self {
            Self::Topics(filter) | Self::Group { filter, .. } => filter,
        }
    }
}

/// What a bridge did with a local message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// On its way to the other nodes; the ticket is for [`Bridge::confirm`]. Queue groups get
    /// the message through the bridge.
    Queued(u64),
    /// Not carried, for the reason given: only this broker's subscribers (its groups
    /// included) get the message.
    Refused(&'static str),
    /// Carried as a copy (or not wanted elsewhere), with nothing to confirm: this broker's
    /// subscribers, its groups included, get the message as without a bridge (a mesh of
    /// independent brokers, where each node's groups get each message).
    Alongside,
}

/// A future of a bridge.
pub type BridgeFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Connects a broker to the other nodes of a cluster; see the module documentation.
///
/// The broker calls `forward` and `interest` on the publisher's or subscriber's thread, so they
/// must be quick and must not block: a bridge queues the work for its own task.
pub trait Bridge: Send + Sync + 'static {
    /// A message a local publisher got accepted (after plugins and de-duplication), before it
    /// is routed here.
    fn forward(&self, envelope: &Envelope) -> Forwarded;

    /// This broker now needs (`present`) or no longer needs `interest`. Called once per
    /// subscription route or group, so the bridge counts.
    fn interest(&self, interest: &Interest, present: bool);

    /// Resolves once the message with `ticket` was taken by the cluster (as far as its engine
    /// says), or with why it may not have been.
    fn confirm(&self, ticket: u64) -> BridgeFuture<'_, Result<(), String>>;

    /// [`confirm`](Self::confirm), with the offset the cluster gave the message when it keeps
    /// the topic ([`Bridge::sequence`]); `None` when it does not, or no longer knows it. The
    /// default knows none.
    fn confirm_offset(&self, ticket: u64) -> BridgeFuture<'_, Result<Option<u64>, String>> {
        Box::pin(async move { self.confirm(ticket).await.map(|()| None) })
    }

    /// A message a local publisher got accepted on a durable topic. A bridge that keeps such
    /// topics answers [`Forwarded::Queued`] (its ticket confirms once the cluster stored it),
    /// and later hands the message back through `Broker::publish_sequenced`; the broker does
    /// not route it itself. The default keeps none: the broker stores the topic itself, and
    /// the message goes through [`Bridge::forward`] like any other.
    fn sequence(&self, envelope: &Envelope) -> Option<Forwarded> {
        let _ = envelope;
        None
    }

    /// A message the bridge handed to the QoS 1 queue group (`filter`, `name`) through
    /// `Broker::publish_sequenced_to_group` at `offset` was settled here (acknowledged, or
    /// given up to the dead-letter topic): the cluster may forget it. The group's position is
    /// the cluster's to keep.
    fn group_settled(&self, filter: &str, name: &str, offset: u64) {
        let _ = (filter, name, offset);
    }
}

/// Where a message being accepted comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Origin<'a> {
    /// A local publisher: plugins run, and the bridge hears of it.
    Local,
    /// Another node of a cluster, for the subscribers `interest` stands for.
    Bridged(&'a Interest),
    /// A peer of a mesh: every subscriber here, queue groups included; not forwarded again.
    Peer,
}
