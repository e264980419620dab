//! whispeer-client — the Rust SDK for whispeer servers.
//!
//! Connect with [`Client::connect`] (or [`Client::connect_with`] for keys, engines and
//! reconnection settings), then publish typed values and subscribe with the same shapes as the
//! embedded broker. Payloads are sealed in this process and opened here: the server forwards
//! ciphertext and never holds a key.
//!
//! ```no_run
//! # async fn demo() -> Result<(), whispeer_client::ClientError> {
//! use whispeer_client::{Client, ClientOptions};
//! let client = Client::connect_with(ClientOptions::new("127.0.0.1:7450").api_key("secret")).await?;
//! let mut temps = client.subscribe::<f32>("sensor/+/temperature").await?;
//! client.publish("sensor/kitchen/temperature", &21.5f32).await?;
//! assert_eq!(temps.recv().await, Some(21.5));
//! # Ok(()) }
//! ```
//!
//! A connection task, spawned on the caller's tokio runtime, owns the socket: it batches
//! outgoing frames, hands deliveries to subscriptions, and on failure reconnects with
//! exponential backoff and re-subscribes. Requests in flight when a connection drops fail with
//! [`ClientError::Disconnected`]; messages published while disconnected wait in the outbox
//! (bounded by [`ClientOptions::publish_buffer_bytes`]) and go out on the next connection.
//! A publish from a task on that runtime reaches the connection task on the same worker
//! thread; one from the thread blocked in `block_on` (the body of `#[tokio::main]` itself)
//! wakes it on another thread, which costs latency (p50 about 120 µs against about 30 at 10 k
//! msgs/s on the machine of ARCHITECTURE.md): run latency-sensitive publishers as tasks.

mod chat;
mod connection;
mod keys;
mod options;
mod pending;
mod request;
mod subscription;
mod transport;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;
use whispeer_engines::{Codec, CodecError, Engines, SealError, Sealing};
use whispeer_proto::{
    ContentType, Envelope, ErrorCode, Filter, Flags, Headers, Limits, MessageId, PlainHead, Topic,
    TopicError, same_text,
};

pub use chat::{
    Chat, ChatError, ChatEvent, ChatEvents, ChatMessage, ChatOptions, Conversation, KeyChange,
    Presence,
};
pub use keys::{DIRECTORY as KEY_DIRECTORY, KeyPolicy, POLICY_HEADER, PolicyError, Renewal};
pub use options::{ClientOptions, PublishOptions, SubscribeOptions};
pub use pending::PendingAck;
pub use request::Responder;
pub use subscription::{ClientSubscription, Delivery, SubscriptionStats};
pub use whispeer_engines as engines;
pub use whispeer_engines::ReceiveError;
pub use whispeer_proto as proto;
pub use whispeer_proto::{Qos, StartAt};

use connection::Buffer;
use connection::{Command, SubSpec};
use subscription::{Decode, Parts};

/// The server's default QoS 1 prefetch (`[delivery] prefetch`), for a subscription asking for 0.
const DEFAULT_PREFETCH: usize = 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    /// The server refused a request or closed the connection with an error.
    #[error("server error {code}: {message}")]
    Server {
        /// The server's code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The server speaks something unexpected (not whispeer, or a broken peer).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection dropped before the request was answered; it may or may not have taken
    /// effect.
    #[error("connection lost before the server answered")]
    Disconnected,
    /// A request that nothing subscribes to.
    #[error("no responders: nothing subscribes to {0}")]
    NoResponders(String),
    /// A request that got no reply in time.
    #[error("no reply to the request on {topic} within {timeout:?}")]
    NoReply {
        /// The request's topic.
        topic: String,
        /// How long the request waited.
        timeout: Duration,
    },
    /// The client has been closed.
    #[error("client closed")]
    Closed,
    /// The topic or filter is invalid.
    #[error("invalid topic or filter: {0}")]
    InvalidTopic(#[from] TopicError),
    /// The value could not be encoded.
    #[error(transparent)]
    Encode(#[from] CodecError),
    /// The payload could not be sealed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(String),
    /// The message exceeds the server's limit.
    #[error("message of {len} bytes exceeds the server's limit of {max}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A TLS configuration that trusts the platform's root certificates (the system store, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), built with the ring provider: what `tls://` and
/// `wss://` use when [`ClientOptions::tls`] is not set. Loaded once per process.
///
/// # Errors
/// [`ClientError::Tls`] when the platform has no usable root certificate.
pub fn platform_tls_config() -> Result<Arc<rustls::ClientConfig>, ClientError> {
    static PLATFORM: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let built = PLATFORM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
            return Err(format!(
                "no root certificate found on this system{why}: install the CA certificates \
                 (ca-certificates), set SSL_CERT_FILE, or pass a CA file"
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    });
    built.clone().map_err(ClientError::Tls)
}

/// A TLS configuration that trusts the CA certificates in `ca_pem` and, if given, presents a
/// client certificate (`(cert_chain_pem, key_pem)`), built with the ring provider.
///
/// # Errors
/// [`ClientError::Tls`] for unreadable PEM or a key that does not fit.
pub fn tls_config(
    ca_pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error = |message: String| ClientError::Tls(message);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| tls_error(format!("CA PEM: {e}")))?)
            .map_err(|e| tls_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls_error("no certificate in the CA PEM".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_error(format!("client certificate PEM: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| tls_error(format!("client key PEM: {e}")))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| tls_error(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What every handle shares.
#[derive(Debug)]
struct Shared {
    codec: Codec,
    engines: Arc<Engines>,
    /// Whether `engines` can change a payload (compression, encryption, rules); if not, a raw
    /// publish is encoded from its parts (`Client::publish_plain`).
    sealing: bool,
    max_message_bytes: usize,
    id_prefix: u64,
    next_id: AtomicU64,
    subscription_capacity: usize,
    subscription_max_bytes: usize,
    /// The bounds deliveries are decoded under (by their subscriptions).
    limits: Limits,
    /// Where replies to this client's requests arrive (made on the first request).
    inbox: tokio::sync::OnceCell<Arc<request::Inbox>>,
}

thread_local! {
    /// The topic this thread published to last, through any client: publishers repeat
    /// topics, and a repeated one is shared rather than checked and allocated again. Kept per
    /// thread, it costs a publish no lock (a topic parses the same for every client).
    static LAST_TOPIC: RefCell<Option<Topic>> = const { RefCell::new(None) };
}

/// Checks that `text` is a topic: this thread's last one, or parsed (and kept).
fn check_topic(text: &str) -> Result<(), ClientError> {
    let known =
        LAST_TOPIC.with_borrow(|last| last.as_ref().is_some_and(|t| same_text(t.as_str(), text)));
    if known { Ok(()) } else { parse_topic(text).map(drop) }
}

/// `text` as a topic: this thread's last one when it is the same, else parsed (and kept).
fn parse_topic(text: &str) -> Result<Topic, ClientError> {
    LAST_TOPIC.with_borrow_mut(|last| {
        if let Some(topic) = last.as_ref().filter(|topic| same_text(topic.as_str(), text)) {
            return Ok(topic.clone());
        }
        let topic = Topic::parse(text)?;
        *last = Some(topic.clone());
        Ok(topic)
    })
}

/// A connection to a whispeer server. Cheap to clone; the connection closes when every clone
/// and every subscription is gone (or on [`Client::close`]).
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    outbox: Arc<connection::Outbox>,
    settles: mpsc::UnboundedSender<connection::Settle>,
    shared: Arc<Shared>,
    counters: Arc<connection::Counters>,
}

/// What a [`Client`]'s connection has counted since it was made ([`Client::stats`]).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections established again after one was lost. QoS 0 publishes the lost connection
    /// had taken but not yet written went with it (at most once); what was still waiting in
    /// the outbox went out on the next connection.
    pub reconnects: u64,
    /// QoS 0 publishes the server refused (not allowed, over a limit): nothing waits for their
    /// answer, so they are counted here and logged.
    pub refused_publishes: u64,
}

impl Client {
    /// Connects with default options.
    ///
    /// # Errors
    /// [`ClientError::Connect`], [`ClientError::Timeout`], or the server's refusal.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(ClientOptions::new(addr)).await
    }

    /// Connects, says hello, authenticates if a key is set, and starts the connection task.
    ///
    /// # Errors
    /// [`ClientError::Connect`], [`ClientError::Timeout`], or the server's refusal (for example
    /// `FORBIDDEN` for a wrong key).
    pub async fn connect_with(mut options: ClientOptions) -> Result<Self, ClientError> {
        whispeer_proto::clock::calibrate();
        let established = connection::connect_any(&options).await?;
        let max_message_bytes = established.max_message_bytes;
        let engines = std::mem::take(&mut options.engines)
            .with_max_message_bytes(options.limits.max_message_bytes);
        let mut prefix = [0u8; 8];
        // Only uniqueness across publishers depends on this; see the broker's identical choice.
        let _ = getrandom::fill(&mut prefix);
        let sealing = engines.is_active();
        let shared = Arc::new(Shared {
            codec: options.codec,
            engines: Arc::new(engines),
            sealing,
            max_message_bytes,
            id_prefix: u64::from_le_bytes(prefix),
            next_id: AtomicU64::new(1),
            subscription_capacity: options.subscription_capacity,
            subscription_max_bytes: options.subscription_max_bytes,
            limits: options.limits.clone(),
            inbox: tokio::sync::OnceCell::new(),
        });
        let (commands, rx) = mpsc::channel(options.command_queue);
        let (settles, settled) = mpsc::unbounded_channel();
        let outbox = Arc::new(connection::Outbox::new(
            options.publish_buffer_bytes,
            established.max_frame_bytes,
        ));
        // Publishes made as soon as this returns go as the server reads them best.
        established.prepare(&outbox);
        let counters = Arc::new(connection::Counters::default());
        let actor = connection::Actor::new(
            options,
            rx,
            settled,
            Arc::clone(&outbox),
            Arc::clone(&counters),
        );
        tokio::spawn(actor.run(established));
        Ok(Self { commands, outbox, settles, shared, counters })
    }

    /// What this client's connection has counted: reconnections, refused QoS 0 publishes.
    #[must_use]
    pub fn stats(&self) -> ClientStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClientStats {
            reconnects: get(&self.counters.reconnects),
            refused_publishes: get(&self.counters.refused_publishes),
        }
    }

    fn next_id(&self) -> MessageId {
        let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        MessageId(u128::from(self.shared.id_prefix) << 64 | u128::from(n))
    }

    fn envelope(
        &self,
        topic: &str,
        content: ContentType,
        plaintext: Bytes,
    ) -> Result<Envelope, ClientError> {
        self.envelope_with(topic, content, plaintext, Headers::new())
    }

    /// A payload of `len` bytes within the server's message limit, or why not.
    fn check_len(&self, len: usize) -> Result<(), ClientError> {
        let max = self.shared.max_message_bytes;
        if len > max { Err(ClientError::TooLarge { len, max }) } else { Ok(()) }
    }

    fn envelope_with(
        &self,
        topic: &str,
        content: ContentType,
        plaintext: Bytes,
        headers: Headers,
    ) -> Result<Envelope, ClientError> {
        let topic = parse_topic(topic)?;
        self.check_len(plaintext.len())?;
        let id = self.next_id();
        let timestamp_ms = whispeer_proto::clock::now_ms();
        let meta = Sealing { topic: topic.as_str(), id, timestamp_ms, headers: &headers };
        let (flags, payload) =
            self.shared.engines.seal(&meta, Flags::with_content(content), plaintext)?;
        let mut envelope = Envelope::new(id, topic, timestamp_ms, flags, payload);
        envelope.headers = headers;
        Ok(envelope)
    }

    async fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands.send(command).await.map_err(|_| ClientError::Closed)
    }

    /// Publishes `value` (QoS 0): encoded, sealed, and queued for sending; returns its id. Many
    /// publishes are written in one batch. Use [`Client::flush`] to wait until the server has
    /// them, or [`Client::publish_acked`] for an acknowledgement.
    ///
    /// # Errors
    /// An invalid topic, a value the codec refuses, a sealing failure, a message over the
    /// server's limit, or a closed client.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let codec = self.shared.codec;
        let payload = codec.encode(value)?;
        if !self.shared.sealing {
            return self.publish_plain(topic, codec.content_type(), payload).await;
        }
        self.publish_sealed(Qos::AtMostOnce, self.envelope(topic, codec.content_type(), payload)?)
            .await
    }

    /// Publishes raw bytes (QoS 0), for subscribers that read [`Delivery::plaintext`].
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub async fn publish_bytes(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, ClientError> {
        let payload = payload.into();
        if !self.shared.sealing {
            return self.publish_plain(topic, ContentType::Raw, payload).await;
        }
        self.publish_sealed(Qos::AtMostOnce, self.envelope(topic, ContentType::Raw, payload)?).await
    }

    /// A QoS 0 publish where nothing seals a payload: encoded from its parts while the outbox
    /// has room (the topic checked, not copied: by the outbox, which need not check again a
    /// topic it numbered), as an envelope when it is full.
    async fn publish_plain(
        &self,
        topic: &str,
        content: ContentType,
        payload: Bytes,
    ) -> Result<MessageId, ClientError> {
        self.check_len(payload.len())?;
        let (id, timestamp_ms) = (self.next_id(), whispeer_proto::clock::now_ms());
        let flags = Flags::with_content(content);
        let payload_len = payload.len();
        let head = PlainHead { id, timestamp_ms, flags, topic, payload_len };
        if !self.outbox.try_publish_plain(&head, &payload, check_topic)? {
            let envelope = Envelope::new(id, parse_topic(topic)?, timestamp_ms, flags, payload);
            self.outbox.publish(Qos::AtMostOnce, envelope, None).await?;
        }
        Ok(id)
    }

    /// Publishes `value` with QoS 1 and waits for the server's acknowledgement
    /// ([`Client::publish_acked_deferred`], awaited at once).
    ///
    /// # Errors
    /// As [`Client::publish`], plus the server's refusal or [`ClientError::Disconnected`].
    pub async fn publish_acked<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        self.publish_acked_deferred(topic, value).await?.await
    }

    /// Publishes raw bytes with QoS 1 and waits for the server's acknowledgement.
    ///
    /// # Errors
    /// As [`Client::publish_acked`].
    pub async fn publish_acked_bytes(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, ClientError> {
        self.publish_acked_bytes_deferred(topic, payload).await?.await
    }

    /// Publishes `value` with options: QoS (QoS 1 waits for the server's acknowledgement), time
    /// to live, idempotency key, headers.
    ///
    /// # Errors
    /// As [`Client::publish_acked`].
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        options: &PublishOptions,
    ) -> Result<MessageId, ClientError> {
        let codec = self.shared.codec;
        let plaintext = codec.encode(value)?;
        let headers = options.headers.clone();
        let envelope = self.envelope_with(topic, codec.content_type(), plaintext, headers)?;
        self.publish_sealed(options.qos, envelope).await
    }

    /// Publishes raw bytes with options; see [`Client::publish_with`].
    ///
    /// # Errors
    /// As [`Client::publish_acked`].
    pub async fn publish_bytes_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: &PublishOptions,
    ) -> Result<MessageId, ClientError> {
        let headers = options.headers.clone();
        let envelope = self.envelope_with(topic, ContentType::Raw, payload.into(), headers)?;
        self.publish_sealed(options.qos, envelope).await
    }

    /// Queues a sealed envelope; for QoS 1, waits for the acknowledgement.
    async fn publish_sealed(&self, qos: Qos, envelope: Envelope) -> Result<MessageId, ClientError> {
        let id = envelope.id;
        if qos == Qos::AtMostOnce {
            // Encoded at once while the outbox has room, as it mostly has.
            if !self.outbox.try_publish(&envelope)? {
                self.outbox.publish(qos, envelope, None).await?;
            }
            return Ok(id);
        }
        self.queue_acked(qos, envelope).await?.await
    }

    async fn open_subscription(&self, options: SubscribeOptions) -> Result<Parts, ClientError> {
        let SubscribeOptions { filter, qos, prefetch, group, start } = options;
        let spec = SubSpec { filter: Filter::parse(&filter)?, qos, prefetch, group, start };
        let (reply, replied) = oneshot::channel();
        let (max_bytes, max_count) =
            (self.shared.subscription_max_bytes, self.shared.subscription_capacity);
        let mut buffer = Buffer::new(max_bytes, max_count);
        if qos == Qos::AtLeastOnce {
            // The server's prefetch bounds what it delivers unacknowledged: every delivery within
            // it is held. A prefetch of 0 asks for the server's default (1 024 unless configured).
            buffer =
                buffer.holding(if prefetch == 0 { DEFAULT_PREFETCH } else { prefetch as usize });
        }
        let buffer = Arc::new(buffer);
        let shared_buffer = Arc::clone(&buffer);
        self.send(Command::Subscribe { spec, buffer: shared_buffer, reply }).await?;
        let sub = replied.await.map_err(|_| ClientError::Closed)??;
        Ok(Parts {
            sub,
            commands: self.commands.clone(),
            settles: (qos == Qos::AtLeastOnce).then(|| self.settles.clone()),
            engines: Arc::clone(&self.shared.engines),
            buffer,
            limits: self.shared.limits.clone(),
        })
    }

    /// Subscribes to a filter (or [`SubscribeOptions`]), decoding messages as `T`; messages that
    /// do not open or decode are skipped and counted. Returns once the server has accepted the
    /// subscription.
    ///
    /// # Errors
    /// An invalid filter, the server's refusal, or a lost connection.
    pub async fn subscribe<T: DeserializeOwned>(
        &self,
        options: impl Into<SubscribeOptions>,
    ) -> Result<ClientSubscription<T>, ClientError> {
        let parts = self.open_subscription(options.into()).await?;
        Ok(ClientSubscription::new(parts, Decode::Value(|d| d.decode())))
    }

    /// Subscribes to a filter (or [`SubscribeOptions`]), receiving [`Delivery`]s (topic, id,
    /// headers, payload).
    ///
    /// # Errors
    /// As [`Client::subscribe`].
    pub async fn messages(
        &self,
        options: impl Into<SubscribeOptions>,
    ) -> Result<ClientSubscription<Delivery>, ClientError> {
        let parts = self.open_subscription(options.into()).await?;
        let decode = Decode::Itself { poll: ClientSubscription::poll_itself, of: |d| d };
        Ok(ClientSubscription::new(parts, decode))
    }

    /// Waits until everything sent before this call has reached the server and been handled.
    ///
    /// # Errors
    /// [`ClientError::Disconnected`] if the connection drops meanwhile, or a closed client.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (reply, replied) = oneshot::channel();
        self.send(Command::Flush { reply }).await?;
        replied.await.map_err(|_| ClientError::Closed)?
    }

    /// Flushes, then closes the connection for every clone of this client.
    pub async fn close(self) {
        let _ = self.flush().await;
        let _ = self.commands.send(Command::Close).await;
    }
}
