//! Options of one subscription ([`SubscribeOptions`]) and of one publish ([`PublishOptions`]).

use std::time::Duration;

use bytes::Bytes;
use whispeer_proto::{Headers, Qos, StartAt};

#[cfg(doc)]
use crate::{ClientError, ClientSubscription};

/// What to subscribe to and how; a filter string converts into options with QoS 0.
///
/// ```
/// use whispeer_client::{Qos, SubscribeOptions};
/// let jobs = SubscribeOptions::new("jobs/+").qos(Qos::AtLeastOnce).group("workers").prefetch(16);
/// # let _ = jobs;
/// ```
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    pub(crate) filter: String,
    pub(crate) qos: Qos,
    pub(crate) prefetch: u32,
    pub(crate) group: Option<String>,
    pub(crate) start: StartAt,
}

impl SubscribeOptions {
    /// QoS 0, the server's prefetch, no group.
    pub fn new(filter: impl Into<String>) -> Self {
        Self {
            filter: filter.into(),
            qos: Qos::AtMostOnce,
            prefetch: 0,
            group: None,
            start: StartAt::Latest,
        }
    }

    /// Starts in the server's retained history: the earliest retained message, an offset of an
    /// exact topic, or a time. An evicted offset is refused with `OFFSET_EVICTED`, whose message
    /// says where history begins. After a reconnect, an exact topic resumes after the last
    /// offset received.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// The delivery guarantee; under QoS 1 every message is acknowledged (see
    /// [`ClientSubscription::recv_delivery`]) or delivered again.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// QoS 1: at most this many delivered, unacknowledged messages at a time.
    pub fn prefetch(mut self, messages: u32) -> Self {
        self.prefetch = messages;
        self
    }

    /// Joins queue group `name`: its members share the filter's messages. Under QoS 1 the
    /// group outlives a member's disconnection for the server's linger, so a client that
    /// reconnects (or another member) gets what was left unacknowledged.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Some(name.into());
        self
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

/// How to publish one message: QoS, time to live, idempotency key, headers.
///
/// ```
/// # use std::time::Duration;
/// use whispeer_client::{PublishOptions, Qos};
/// let once = PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key("order-42").ttl(Duration::from_secs(60));
/// # let _ = once;
/// ```
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    pub(crate) qos: Qos,
    pub(crate) headers: Headers,
}

impl PublishOptions {
    /// QoS 0, no headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// QoS 1 waits for the server's acknowledgement.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// Never delivered once `ttl` has passed since the server accepted it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.headers.set_ttl(ttl);
        self
    }

    /// A retry with the same key to the same topic, within the server's de-duplication window,
    /// is acknowledged but not delivered again: publish with a key, retry on
    /// [`ClientError::Disconnected`], and the message arrives once.
    pub fn idempotency_key(self, key: impl Into<Bytes>) -> Self {
        self.header(whispeer_proto::header::IDEMPOTENCY_KEY, key)
    }

    /// Adds a header (authenticated with the payload when sealed).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }
}
