//! What a broker and a subscription are configured with: [`BrokerOptions`] and
//! [`SubscribeOptions`], each with safe defaults.

use std::time::Duration;

use whispeer_engines::Codec;
use whispeer_proto::{Filter, Limits, Qos, StartAt};

use crate::budget::ByteBudget;
use crate::delivery::Redelivery;
use crate::queue::SlowConsumer;
use crate::retention::Retention;
use crate::store::Durability;

/// The default byte bound of a subscription's queue.
const DEFAULT_QUEUE_BYTES: usize = 32 << 20;

/// Settings of a broker. Every field has a safe default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// How typed values are encoded. Default: [`Codec::Postcard`].
    pub codec: Codec,
    /// Bounds on topics and messages.
    pub limits: Limits,
    /// Default queue capacity of a subscription, in messages: a cap that does not bite before
    /// the byte bound (every message weighs at least 256 bytes). Default: 131 072.
    pub queue_capacity: usize,
    /// Default policy when a subscription's queue is full. Default: [`SlowConsumer::DropOldest`].
    pub slow_consumer: SlowConsumer,
    /// How long a publisher held back by a full queue (`SlowConsumer::BackPressure`) waits for
    /// its room ([`Room::wait`](crate::Room::wait)) before that subscription is closed as a
    /// slow consumer and the publisher goes on. Default: 10 s.
    pub back_pressure_timeout: Duration,
    /// Default byte bound of a subscription's queue: payloads plus 256 bytes per message. It
    /// holds a burst of 8 MiB of small messages in flight (65 536 messages of 128 bytes weigh
    /// 24 MiB). Default: 32 MiB.
    pub queue_max_bytes: usize,
    /// QoS 1: default ack timeout, backoff and attempts before dead-lettering.
    pub redelivery: Redelivery,
    /// QoS 1: default credit window, in unacknowledged messages per subscriber. Default: 1024.
    pub prefetch: usize,
    /// How long a publish's idempotency key is remembered. Default: 2 minutes.
    pub dedup_window: Duration,
    /// Most idempotency keys remembered; beyond it the oldest are forgotten early (counted in
    /// the logs). Default: 100 000.
    pub dedup_max_keys: usize,
    /// How long a QoS 1 queue group outlives its last member, still queueing, so a member that
    /// comes back gets what it missed. Zero removes groups with their last member. Default:
    /// 60 s.
    pub group_linger: Duration,
    /// Default time to live by topic: the first filter that matches applies to messages
    /// without a `ttl-ms` header. Default: none.
    pub topic_ttl: Vec<(Filter, Duration)>,
    /// Which topics keep a history to replay, and how much: the first filter that matches a
    /// topic applies. Default: none (no topic keeps history; publishing takes no lock).
    pub retention: Vec<(Filter, Retention)>,
    /// Durable topics and their write-ahead log; their history survives a restart. A durable
    /// topic without a retention rule keeps the last 10 000 messages (64 MiB) in memory.
    /// Default: none.
    pub durability: Option<Durability>,
    /// Bytes of history (payloads plus 256 a message) all topics keep in memory together:
    /// each topic within its own rule, and past this the broker's oldest messages go first,
    /// whatever their topic, counted in [`BrokerStats::history_evicted`](crate::BrokerStats).
    /// A durable topic's store still holds what memory let go. Default: 1 GiB.
    pub history_max_bytes: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            codec: Codec::default(),
            limits: Limits::default(),
            queue_capacity: DEFAULT_QUEUE_BYTES / 256,
            slow_consumer: SlowConsumer::default(),
            back_pressure_timeout: Duration::from_secs(10),
            queue_max_bytes: DEFAULT_QUEUE_BYTES,
            redelivery: Redelivery::default(),
            prefetch: 1024,
            dedup_window: Duration::from_secs(120),
            dedup_max_keys: 100_000,
            group_linger: Duration::from_secs(60),
            topic_ttl: Vec::new(),
            retention: Vec::new(),
            durability: None,
            history_max_bytes: 1 << 30,
        }
    }
}

/// What to subscribe to and how. A plain `&str` or `String` converts into options with the
/// broker's defaults.
///
/// ```
/// use whispeer_core::{Qos, SlowConsumer, SubscribeOptions};
/// let options = SubscribeOptions::new("orders/#").capacity(64).slow_consumer(SlowConsumer::DropNewest);
/// let workers = SubscribeOptions::new("jobs/+").qos(Qos::AtLeastOnce).group("workers").prefetch(8);
/// # let _ = (options, workers);
/// ```
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    filter: String,
    capacity: Option<usize>,
    max_bytes: Option<usize>,
    policy: Option<SlowConsumer>,
    pub(crate) qos: Qos,
    pub(crate) prefetch: Option<usize>,
    pub(crate) group: Option<String>,
    pub(crate) redelivery: Option<Redelivery>,
    pub(crate) budget: Option<ByteBudget>,
    pub(crate) start: StartAt,
    pub(crate) linger: Option<Duration>,
}

impl SubscribeOptions {
    /// Options for `filter` with the broker's defaults: QoS 0, no group.
    pub fn new(filter: impl Into<String>) -> Self {
        Self {
            filter: filter.into(),
            capacity: None,
            max_bytes: None,
            policy: None,
            qos: Qos::AtMostOnce,
            prefetch: None,
            group: None,
            redelivery: None,
            budget: None,
            start: StartAt::Latest,
            linger: None,
        }
    }

    /// Sets the queue capacity, in messages (1 to [`crate::MAX_QUEUE_CAPACITY`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets the queue's byte bound: payload bytes plus 256 per queued message.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    pub(crate) fn queue_max_bytes(&self) -> Option<usize> {
        self.max_bytes
    }

    /// Sets what happens when the queue is full.
    pub fn slow_consumer(mut self, policy: SlowConsumer) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sets the delivery guarantee. Under [`Qos::AtLeastOnce`] every message is tracked until
    /// acknowledged and delivered again after its ack timeout; see `DELIVERY.md`.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// QoS 1: at most this many delivered, unacknowledged messages at a time (the credit
    /// window). Default: the broker's `prefetch`.
    pub fn prefetch(mut self, messages: usize) -> Self {
        self.prefetch = Some(messages);
        self
    }

    /// Joins the queue group `name`: subscribers of the same filter and group share its
    /// messages, each going to one member. For QoS 1, what a member leaves unacknowledged goes
    /// to another, and the group outlives its last member for the broker's `group_linger`.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
    }

    /// QoS 1 group: how long the group outlives its last member, still queueing, instead of
    /// the broker's `group_linger` (zero: it goes with its last member). The member that
    /// creates the group sets it. An MQTT persistent session's groups linger for the session's
    /// expiry this way.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// QoS 1: this subscription's ack timeout, backoff and attempts, instead of the broker's.
    /// In a group, the member that creates the group sets them.
    pub fn redelivery(mut self, redelivery: Redelivery) -> Self {
        self.redelivery = Some(redelivery);
        self
    }

    /// Starts in the retained history of the matching topics (see `BrokerOptions::retention`)
    /// instead of with the next message: the retained messages come first, then live ones, with
    /// none missed or repeated in between. An offset needs an exact topic; an evicted offset is
    /// refused with [`SubscribeError::OffsetEvicted`](crate::SubscribeError::OffsetEvicted), which
    /// says where history begins.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Counts this subscription's queued bytes against `budget`, shared with other
    /// subscriptions (in a group, the member that creates the group sets it for the group's
    /// queue).
    pub fn budget(mut self, budget: ByteBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    pub(crate) fn filter(&self) -> &str {
        &self.filter
    }

    pub(crate) fn queue_capacity(&self) -> Option<usize> {
        self.capacity
    }

    pub(crate) fn policy(&self) -> Option<SlowConsumer> {
        self.policy
    }
}

impl From<&str> for SubscribeOptions {
    fn from(filter: &str) -> Self {
        Self::new(filter)
    }
}

impl From<String> for SubscribeOptions {
    fn from(filter: String) -> Self {
        Self::new(filter)
    }
}

impl From<&String> for SubscribeOptions {
    fn from(filter: &String) -> Self {
        Self::new(filter.as_str())
    }
}

/// Whether a subscription asks for QoS 1.
pub(crate) fn is_qos1(qos: Qos) -> bool {
    qos == Qos::AtLeastOnce
}
