//! What a publish takes besides its value ([`PublishOptions`]) and what it returns
//! ([`PublishReceipt`]).

use std::time::Duration;

use bytes::Bytes;
use whispeer_proto::{Headers, MessageId, header};

/// What a successful publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishReceipt {
    /// The message's id.
    pub id: MessageId,
    /// How many subscriber queues took the message.
    pub subscribers: usize,
    /// The message repeated an idempotency key seen within the de-duplication window, and was
    /// dropped (the first publish with that key was routed).
    pub duplicate: bool,
    /// For a durable topic: the message's number in the write-ahead log, to wait for with
    /// [`Broker::durable`](crate::Broker::durable).
    pub(crate) ticket: Option<u64>,
    /// With a cluster [`Bridge`](crate::Bridge): its ticket for the message, or why it did not
    /// carry it.
    pub(crate) bridged: Option<Result<u64, &'static str>>,
    /// Its idempotency key waits for the confirmation (see `Dedup::pending`): only then does
    /// confirming it touch the de-duplication window.
    pub(crate) keyed: bool,
}

impl PublishReceipt {
    /// Whether the message went to a write-ahead log, so that it is durable only once
    /// [`Broker::durable`](crate::Broker::durable) says so.
    pub fn is_durable_pending(&self) -> bool {
        self.ticket.is_some() || self.bridged.is_some()
    }
}

/// How to publish one message: headers, time to live, idempotency key.
///
/// ```
/// # use std::time::Duration;
/// use whispeer_core::PublishOptions;
/// let options = PublishOptions::new()
///     .ttl(Duration::from_secs(30))
///     .idempotency_key("order-42")
///     .header("trace", "abc");
/// # let _ = options;
/// ```
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    headers: Headers,
}

impl PublishOptions {
    /// No headers, no time to live, no idempotency key.
    pub const fn new() -> Self {
        Self { headers: Headers::new() }
    }

    /// The message is never delivered once `ttl` has passed since the broker accepted it
    /// (whole milliseconds; travels as the `ttl-ms` header).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.headers.set_ttl(ttl);
        self
    }

    /// A second publish with the same key to the same topic within the broker's
    /// de-duplication window is acknowledged but not delivered.
    pub fn idempotency_key(self, key: impl Into<Bytes>) -> Self {
        self.header(header::IDEMPOTENCY_KEY, key)
    }

    /// Adds an application header (authenticated with the payload when sealed).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The headers so far.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
}

/// No options: the hot path's default.
pub(crate) static NO_OPTIONS: PublishOptions = PublishOptions::new();
