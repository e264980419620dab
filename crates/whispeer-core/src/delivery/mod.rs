//! Delivery: the QoS 1 tracker (in flight, redelivery with backoff, credit, dead letters given
//! up), queue groups, durable subscriptions' commits, and the idempotency window.

mod commit;
mod dedup;
mod flight;
mod group;
mod tracker;

pub(crate) use commit::*;
pub(crate) use dedup::*;
pub(crate) use group::*;
pub use tracker::Redelivery;
pub(crate) use tracker::*;
