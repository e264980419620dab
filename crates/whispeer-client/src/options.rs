//! Options of a client ([`ClientOptions`]), of one subscription ([`SubscribeOptions`]) and of
//! one publish ([`PublishOptions`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_rustls::rustls;
use whispeer_engines::{Codec, Compression, Encryption, Engines, TopicRule};
use whispeer_proto::{Headers, Limits, Qos, StartAt};

#[cfg(doc)]
use crate::{ClientError, platform_tls_config, tls_config};

/// How to connect. Every field but the address has a default.
#[derive(Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// The server: `host:port` or `tcp://host:port` for TCP, `tls://host:port` for TLS,
    /// `ws://host:port/ws` for WebSocket, `wss://host:port/ws` for WebSocket over TLS.
    pub addr: String,
    /// Other nodes of the same cluster, tried in turn after `addr` when connecting and when
    /// the connection is lost (see [`ClientOptions::failover`]). Default: none.
    pub failover: Vec<String>,
    /// Whether the nodes share their subscriptions' offsets (the topics are durable topics kept
    /// by the cluster's engine), so a subscription resumes after its last offset also on
    /// another node. Default: no (offsets are per node).
    pub shared_offsets: bool,
    /// TLS settings for `tls://` and `wss://` (see [`tls_config`]); without them, the
    /// platform's root certificates are trusted ([`platform_tls_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// API key, if the server requires one.
    pub api_key: Option<String>,
    /// Name sent in `Hello`, for the server's logs.
    pub name: String,
    /// Codec for typed publishes. Default: postcard.
    pub codec: Codec,
    /// Compression and encryption applied here, before anything leaves the process.
    pub engines: Engines,
    /// Reconnect (and re-subscribe) after the connection drops. Default: yes.
    pub reconnect: bool,
    /// Limit for connecting and for the handshake. Default: 5 s.
    pub connect_timeout: Duration,
    /// First and longest wait between reconnection attempts. Default: 100 ms and 5 s.
    pub backoff: (Duration, Duration),
    /// Messages buffered per subscription; further ones are dropped and counted. Default:
    /// 131 072, a cap that does not bite before `subscription_max_bytes` (a message weighs its
    /// envelope as it came, payload, topic and headers, plus 224 bytes); the buffer grows as
    /// messages arrive. A QoS 1 subscription always holds its prefetch, beyond both bounds.
    pub subscription_capacity: usize,
    /// Bytes buffered per subscription (envelopes plus 224 a message) while the application has
    /// not taken them; further messages are dropped and counted (`SubscriptionStats::dropped`).
    /// Default: 32 MiB, which holds a burst of 8 MiB of 128-byte messages. A QoS 1
    /// subscription always has room for its prefetch (the server delivers no more
    /// unacknowledged), so none of those deliveries is dropped and left to come again after its
    /// ack timeout; the bounds apply beyond it (to redeliveries of messages still waiting).
    pub subscription_max_bytes: usize,
    /// Commands (subscribes, flushes) queued for the connection task. Default: 4 096.
    pub command_queue: usize,
    /// Bytes of encoded publishes waiting for the connection task to write them; a publish
    /// waits while more are waiting (and while the connection is being re-established); 0
    /// means one frame at a time. Default: 1 MiB.
    pub publish_buffer_bytes: usize,
    /// QoS 1: message ids each subscription remembers having acknowledged, so that a
    /// redelivery of one (its ack lost with a connection) is dropped. Default: 4 096.
    pub dedup_ids: usize,
    /// Bounds on what this client accepts from the server.
    pub limits: Limits,
}

impl ClientOptions {
    /// Options for the server at `addr` with every default.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            failover: Vec::new(),
            shared_offsets: false,
            tls: None,
            api_key: None,
            name: format!("whispeer-client {}", env!("CARGO_PKG_VERSION")),
            codec: Codec::default(),
            engines: Engines::new(),
            reconnect: true,
            connect_timeout: Duration::from_secs(5),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            subscription_capacity: 131_072,
            subscription_max_bytes: 32 << 20,
            command_queue: 4096,
            publish_buffer_bytes: 1 << 20,
            dedup_ids: 4096,
            limits: Limits::default(),
        }
    }

    /// Adds other nodes of the same cluster (same forms as `addr`). Connecting tries `addr`
    /// first and then each of these; a lost connection is retried on the same node once, then
    /// on the next one in turn, re-subscribing everything there.
    ///
    /// A subscription that moves to another node starts there with new messages, since
    /// offsets may differ between nodes; with [`ClientOptions::shared_offsets`] (durable topics
    /// of a cluster: the engine's offsets, the same everywhere) it resumes after its last
    /// offset, as it does on the same node.
    ///
    /// ```
    /// use whispeer_client::ClientOptions;
    /// let options = ClientOptions::new("127.0.0.1:7461").failover(["127.0.0.1:7462", "127.0.0.1:7463"]);
    /// assert_eq!(options.addresses().count(), 3);
    /// ```
    pub fn failover<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.failover.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Says the nodes share offsets (the subscriptions' topics are durable topics a cluster's
    /// engine keeps): after moving to another node, a subscription to an exact topic resumes
    /// after the last offset it received, so nothing is missed or repeated.
    pub fn shared_offsets(mut self, shared: bool) -> Self {
        self.shared_offsets = shared;
        self
    }

    /// Every address this client may connect to: `addr`, then the failover nodes.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.addr.as_str()).chain(self.failover.iter().map(String::as_str))
    }

    /// Uses this TLS configuration for `tls://` and `wss://` addresses.
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Sets the API key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Compresses payloads before sending.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.engines = std::mem::take(&mut self.engines).with_compression(compression);
        self
    }

    /// Encrypts payloads before sending and opens deliveries with these keys.
    pub fn encryption(mut self, encryption: Encryption) -> Self {
        self.engines = std::mem::take(&mut self.engines).with_encryption(encryption);
        self
    }

    /// Adds a per-topic rule for the engines.
    pub fn rule(mut self, rule: TopicRule) -> Self {
        self.engines = std::mem::take(&mut self.engines).with_rule(rule);
        self
    }

    /// Turns reconnection on or off.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }
}

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
    /// [`ClientSubscription::recv_delivery`](crate::ClientSubscription::recv_delivery)) or delivered again.
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

    /// The server keeps the message as its topic's retained message and gives it first to
    /// every new subscription that matches (an empty payload clears it).
    pub fn retain(self) -> Self {
        self.header(whispeer_proto::header::RETAIN, "1")
    }
}
