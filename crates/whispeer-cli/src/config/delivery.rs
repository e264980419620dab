//! `[delivery]`: QoS 1 redelivery, credit, idempotency, queue groups, the connection and
//! server-wide queue budgets, and default times to live.

use serde::{Deserialize, Serialize};
use whispeer::BrokerOptions;
use whispeer::server::ServerConfig;

use super::millis;

/// `[delivery]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Delivery {
    /// How long the first delivery of a QoS 1 message waits for its ack.
    pub(crate) ack_timeout_ms: u64,
    /// Each further delivery waits this many times longer...
    pub(crate) backoff_factor: f64,
    /// ...up to this long.
    pub(crate) max_delay_ms: u64,
    /// Up to this fraction of each wait is taken off at random (0 to 1).
    pub(crate) jitter: f64,
    /// Deliveries before a message goes to `$dlq/<topic>`.
    pub(crate) max_attempts: u32,
    /// Default credit window: unacknowledged messages per QoS 1 subscriber.
    pub(crate) prefetch: usize,
    /// How long idempotency keys are remembered.
    pub(crate) dedup_window_ms: u64,
    /// Most idempotency keys remembered.
    pub(crate) dedup_max_keys: usize,
    /// How long a QoS 1 queue group outlives its last member.
    pub(crate) group_linger_ms: u64,
    /// Bytes queued per connection across its subscriptions.
    pub(crate) connection_max_bytes: usize,
    /// Bytes queued for all connections together.
    pub(crate) max_queued_bytes: usize,
    /// Default time to live by topic filter: `[[delivery.ttl]] filter = "quotes/#"`,
    /// `ttl_ms = 5000`; the first match applies.
    pub(crate) ttl: Vec<TopicTtl>,
}

/// `[[delivery.ttl]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicTtl {
    pub(crate) filter: String,
    pub(crate) ttl_ms: u64,
}

impl Default for Delivery {
    fn default() -> Self {
        let broker = BrokerOptions::default();
        let redelivery = broker.redelivery;
        Self {
            ack_timeout_ms: millis(redelivery.ack_timeout),
            backoff_factor: redelivery.backoff_factor,
            max_delay_ms: millis(redelivery.max_delay),
            jitter: redelivery.jitter,
            max_attempts: redelivery.max_attempts,
            prefetch: broker.prefetch,
            dedup_window_ms: millis(broker.dedup_window),
            dedup_max_keys: broker.dedup_max_keys,
            group_linger_ms: millis(broker.group_linger),
            connection_max_bytes: ServerConfig::default().connection_max_bytes,
            max_queued_bytes: ServerConfig::default().queued.max(),
            ttl: Vec::new(),
        }
    }
}
