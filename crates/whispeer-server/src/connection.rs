//! One client connection: handshake, authentication, and the frames that follow.
//!
//! The reader decodes frames and acts on the broker; replies and deliveries go through one
//! bounded outbound queue to the writer, which batches them into as few writes as it can. A
//! fatal error (malformed frame, idle timeout, protocol violation) is reported with an `Error`
//! frame before the connection closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use whispeer_proto::{
    Body, CAP_COMPACT_DELIVER, ErrorCode, Filter, Frame, Limits, MessageId, PROTOCOL_VERSION, Qos,
    ReadPool, StartAt, Topic, TopicCache,
};

use super::ServerConfig;
use super::acl::Principal;
use super::adapter::AdapterError;
use super::rate::RateLimit;
use super::registry::{Connections, Registered};
#[cfg(feature = "mqtt")]
use super::retained::ONE_CLIENT_GROUP;
use super::traffic::FlowCache;
use super::writer::{Outbound, inline, write_loop};
use crate::bump;
#[cfg(feature = "mqtt")]
use whispeer_core::SlowConsumer;
use whispeer_core::{Acker, Broker, ByteBudget, Room, SubscribeOptions};

/// Capability bit in `Welcome`: the server requires `Auth`.
const CAP_AUTH_REQUIRED: u32 = 1;
/// Reads after which a reader that has not waited runs the writers it woke.
const FLUSH_EVERY: u32 = 4;

/// Why the connection ends, if not by the client's choice.
struct Close {
    code: ErrorCode,
    message: String,
}

impl Close {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Answers a connection beyond the limit with an error and closes it.
pub(super) async fn refuse(mut stream: TcpStream, peer: SocketAddr) {
    tracing::warn!(%peer, "connection refused: limit reached");
    let mut buf = BytesMut::new();
    let frame = error_frame(0, ErrorCode::LIMIT_REACHED, "too many connections");
    if frame.encode(&mut buf, usize::MAX).is_ok() {
        let _ = stream.write_all(&buf).await;
    }
    let _ = stream.shutdown().await;
}

fn error_frame(correlation: u32, code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::new(correlation, Body::Error { code, message: message.into() })
}

/// Serves one connection until the client leaves, a fatal error, or shutdown.
pub(super) async fn run_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = super::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        let (reader, writer) = tokio::io::split(stream);
        return run(reader, writer, peer, broker, config, stop).await;
    }
    let (reader, writer) = stream.into_split();
    run(reader, writer, peer, broker, config, stop).await;
}

/// Serves one connection over any byte stream (TCP, or WebSocket through its adapters).
pub(super) async fn run<R, W>(
    reader: R,
    writer: W,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(config.outbound_frames);
    let writer_gone = CancellationToken::new();
    let limits = broker.options().limits.clone();
    let registered = Connections::register(&config.connections, peer, &stop);
    // Driven by its task, and run by the readers whose publishes woke it (`inline.rs`).
    let write_task = inline::spawn(write_loop(
        writer,
        rx,
        Arc::clone(&config),
        limits.clone(),
        writer_gone.clone(),
        Arc::clone(&registered.entry),
    ));
    tracing::debug!(%peer, "connected");
    let kick = registered.entry.kick.clone();
    let mut connection = Connection {
        registered,
        flows: FlowCache::default(),
        published: 0,
        principal: (!config.auth_required()).then(Principal::anonymous),
        allowed: None,
        rate: RateLimit::new(&config),
        greeted: false,
        auth_failures: 0,
        subscriptions: HashMap::new(),
        budget: ByteBudget::within(config.connection_max_bytes, &config.queued),
        broker,
        config,
        tx,
        confirmations: Confirmations::default(),
        acks: Vec::new(),
        room: Room::default(),
    };
    if let Some(principal) = &connection.principal {
        connection.registered.entry.set_principal(&principal.name);
    }
    // The writers its publishes wake run on its thread when it waits (`inline.rs`).
    let reading = connection.read_loop(reader, &limits, &kick, &writer_gone);
    let outcome = inline::captured(reading).await;
    connection.settle();
    let close = match outcome {
        Err(close) => Some(close),
        Ok(()) if stop.is_cancelled() => {
            Some(Close::new(ErrorCode::SHUTTING_DOWN, "server shutting down"))
        }
        Ok(()) if kick.is_cancelled() => {
            Some(Close::new(ErrorCode::FORBIDDEN, "disconnected by an operator"))
        }
        Ok(()) => None,
    };
    if let Some(close) = close {
        tracing::debug!(%peer, code = %close.code, message = %close.message, "closing");
        let _ = connection.tx.try_send(Outbound::Frame(error_frame(0, close.code, close.message)));
    }
    // The writer drains what is queued, then sees the queue close and shuts the socket.
    drop(connection);
    let _ = write_task.await;
    tracing::debug!(%peer, "disconnected");
}

struct Connection {
    /// This connection's entry in the server's registry.
    registered: Registered,
    /// The last topic this connection's publishes were counted on.
    flows: FlowCache,
    /// Publishes counted here and not yet in the registry entry's count: added with the
    /// traffic counts (`settle`), at the end of each read and at each QoS 1 publish, so a
    /// connection's publishes cost its entry one atomic operation a read, not one each.
    published: u64,
    broker: Broker,
    config: Arc<ServerConfig>,
    tx: mpsc::Sender<Outbound>,
    /// Publishes waiting to be durable (or taken by the cluster) before their PUBACK.
    confirmations: Confirmations,
    greeted: bool,
    /// Who is connected, once authenticated (at once on a server without keys).
    principal: Option<Arc<Principal>>,
    /// The last topic the principal was allowed to publish to (publishers repeat topics).
    allowed: Option<Topic>,
    /// The publish budget, when the server limits publishing.
    rate: Option<RateLimit>,
    auth_failures: u32,
    /// Ids in use, with the QoS 1 ones' ackers; the writer owns the subscriptions themselves.
    subscriptions: HashMap<u32, Option<Acker>>,
    /// ACKs read and not settled yet (see `publish_read`).
    acks: Vec<(u32, MessageId)>,
    /// What the broker may hold queued for this connection.
    budget: ByteBudget,
    /// Queues under back-pressure its publishes filled, waited for before it reads on.
    room: Room,
}

impl Connection {
    async fn read_loop(
        &mut self,
        mut reader: impl AsyncRead + Unpin,
        limits: &Limits,
        stop: &CancellationToken,
        writer_gone: &CancellationToken,
    ) -> Result<(), Close> {
        let idle = self.config.idle_timeout();
        let auth_deadline = tokio::time::Instant::now() + self.config.auth_timeout;
        let (mut buf, mut pool) = (BytesMut::new(), ReadPool::default());
        let mut topics = TopicCache::default();
        let mut partial_since: Option<Instant> = None;
        let mut reads = 0u32;
        // The idle timeout as one timer, moved only when it fires: one made each turn makes
        // tokio wake the thread that waits for I/O, to learn when to wake, most round trips.
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        loop {
            let mut progressed = false;
            loop {
                // Notes left on this thread by publishers that never wait (cluster links, the
                // chat hub) are not this read's to wait for.
                let _ = self.broker.room();
                let read = self.publish_read(&mut buf, limits, &mut topics, &mut progressed);
                self.note_room();
                match read {
                    Ok(Some(Next::Reply(reply))) => self.send(reply).await,
                    Ok(Some(Next::Room)) => self.confirmations.make_room().await,
                    Ok(Some(Next::Frame(frame))) => {
                        progressed = true;
                        self.handle(frame).await?;
                    }
                    Ok(None) => {
                        // A reader that reads on without waiting lets the writers it woke
                        // write every few reads (they run at its next wait otherwise).
                        reads += 1;
                        if reads.is_multiple_of(FLUSH_EVERY) {
                            inline::flush();
                        }
                        break;
                    }
                    // A request naming an invalid topic is refused alone; the stream is in step.
                    Err(err) => match err.correlation() {
                        Some(correlation) => {
                            progressed = true;
                            self.reply_error(correlation, err.code(), err.to_string()).await;
                        }
                        // A TLS ClientHello read as a frame is absurdly long: say what it was.
                        None if matches!(buf[..], [0x16, 0x03, 0x00..=0x04, ..]) => {
                            let message = "this port speaks plain whispeer, not TLS: use tcp://";
                            return Err(Close::new(err.code(), message));
                        }
                        None => return Err(Close::new(err.code(), err.to_string())),
                    },
                }
            }
            // How long a frame has been incomplete without any frame completing meanwhile: a
            // busy publisher whose reads end mid-frame keeps making progress and is not cut off.
            partial_since = match (buf.is_empty(), progressed) {
                (true, _) => None,
                (false, true) => Some(Instant::now()),
                (false, false) => partial_since.or_else(|| Some(Instant::now())),
            };
            if partial_since.is_some_and(|since| since.elapsed() > idle) {
                return Err(Close::new(ErrorCode::IDLE_TIMEOUT, "frame left incomplete"));
            }
            self.settle();
            // Subscribers under back-pressure that this connection's publishes filled: it
            // reads on once they have room (or were closed for making none in time).
            if !self.room.is_empty() {
                let room = std::mem::take(&mut self.room);
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = writer_gone.cancelled() => return Ok(()),
                    _ = room.wait() => {}
                }
            }
            pool.reserve(&mut buf);
            // Without keys, a connection that says nothing meets the idle timeout, and any
            // frame but HELLO first closes it; with keys, answering pings is not enough.
            let logged_in =
                !self.config.auth_required() || (self.greeted && self.principal.is_some());
            let waiting_since = tokio::time::Instant::now();
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(auth_deadline), if !logged_in => {
                    bump(&self.config.access.auth_timeouts);
                    let within = self.config.auth_timeout.as_millis();
                    return Err(Close::new(
                        ErrorCode::UNAUTHENTICATED,
                        format!("not authenticated within {within} ms of connecting"),
                    ));
                }
                () = writer_gone.cancelled() => return Ok(()),
                () = &mut idle_timer => {
                    if waiting_since.elapsed() >= idle {
                        return Err(Close::new(ErrorCode::IDLE_TIMEOUT, "nothing received"));
                    }
                    idle_timer.as_mut().reset(waiting_since + idle);
                }
                read = reader.read_buf(&mut buf) => match read {
                    Err(err) => match err.get_ref().and_then(|e| e.downcast_ref::<AdapterError>()) {
                        Some(AdapterError::Refused { correlation, code, message }) => {
                            self.reply_error(*correlation, *code, message.clone()).await;
                        }
                        Some(AdapterError::Fatal { code, message }) => {
                            return Err(Close::new(*code, message.clone()));
                        }
                        // An adapter's refusal of its input (a bad JSON request) is reported
                        // like a malformed frame.
                        None if err.kind() == std::io::ErrorKind::InvalidData => {
                            return Err(Close::new(ErrorCode::MALFORMED, err.to_string()));
                        }
                        None => return Ok(()),
                    },
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                },
            }
        }
    }

    /// Takes the queues under back-pressure that the publishes just made filled, to wait for
    /// before reading on; not its own subscriptions' (their room may wait on this very
    /// connection's acks, which it would stop reading).
    fn note_room(&mut self) {
        let room = self.broker.room();
        if !room.is_empty() {
            self.room.merge(room.ignoring(&self.budget));
        }
    }

    /// Adds what this connection counted since the last settle to the shared counters.
    fn settle(&mut self) {
        self.flows.settle();
        let published = std::mem::take(&mut self.published);
        if published > 0 {
            self.registered.entry.published.fetch_add(published, Ordering::Relaxed);
        }
    }

    async fn send(&self, frame: Frame) {
        // A failed send means the writer has gone; the read loop notices on its next turn.
        let _ = self.tx.send(Outbound::Frame(frame)).await;
    }

    async fn reply_error(&self, correlation: u32, code: ErrorCode, message: impl Into<String>) {
        self.send(error_frame(correlation, code, message)).await;
    }

    /// Acts on one frame: each kind has its own function below.
    async fn handle(&mut self, frame: Frame) -> Result<(), Close> {
        let correlation = frame.correlation;
        if !self.greeted {
            return self.on_first(correlation, frame.body).await;
        }
        match frame.body {
            Body::Hello { .. } => {
                return Err(Close::new(ErrorCode::PROTOCOL_VIOLATION, "HELLO sent twice"));
            }
            Body::Ping => {
                // Everything before a ping is handled, and counted.
                self.settle();
                self.send(Frame::new(correlation, Body::Pong)).await;
            }
            Body::Pong => {}
            Body::Auth { key } => self.on_auth(correlation, &key).await?,
            Body::Error { code, message } => {
                tracing::debug!(%code, %message, "client reported an error");
            }
            Body::Subscribe { .. }
            | Body::Unsubscribe { .. }
            | Body::Publish { .. }
            | Body::Ack { .. }
            | Body::Nack { .. }
                if self.principal.is_none() =>
            {
                let message = "send AUTH with an API key first";
                self.reply_error(correlation, ErrorCode::UNAUTHENTICATED, message).await;
            }
            Body::Subscribe { sub, qos, filter, prefetch, group, start } => {
                self.on_subscribe(correlation, sub, qos, filter, prefetch, group, start).await;
            }
            Body::Unsubscribe { sub } => self.on_unsubscribe(correlation, sub).await,
            Body::Publish { qos, envelope } => {
                let reply = self.publish(correlation, qos, envelope);
                // Taken before anything awaits: the notes are this thread's.
                self.note_room();
                if let Some(reply) = reply {
                    self.send(reply).await;
                }
                self.confirmations.make_room().await;
            }
            // An ack for a message no longer in flight (acked twice, or after it timed out and
            // went to another member) settles nothing, and is not an error.
            Body::Ack { sub, id } => {
                if let Some(acker) = self.acker(correlation, sub).await {
                    acker.ack(id);
                }
            }
            Body::Nack { sub, id, requeue } => {
                if let Some(acker) = self.acker(correlation, sub).await {
                    acker.nack(id, requeue);
                }
            }
            other => {
                let message = format!("clients do not send {}", frame_name(&other));
                return Err(Close::new(ErrorCode::PROTOCOL_VIOLATION, message));
            }
        }
        Ok(())
    }

    /// The first frame: HELLO in this protocol version, or the connection ends.
    async fn on_first(&mut self, correlation: u32, body: Body) -> Result<(), Close> {
        let Body::Hello { version, capabilities, .. } = body else {
            return Err(Close::new(ErrorCode::PROTOCOL_VIOLATION, "the first frame must be HELLO"));
        };
        if version != PROTOCOL_VERSION {
            return Err(Close::new(
                ErrorCode::UNSUPPORTED_VERSION,
                format!("client speaks version {version}, server {PROTOCOL_VERSION}"),
            ));
        }
        self.greeted = true;
        let compact = capabilities & CAP_COMPACT_DELIVER != 0;
        if compact {
            let _ = self.tx.send(Outbound::Compact).await;
        }
        self.send(Frame::new(correlation, self.welcome(compact))).await;
        Ok(())
    }

    /// AUTH: the principal of a key or token; too many wrong ones end the connection.
    async fn on_auth(&mut self, correlation: u32, key: &[u8]) -> Result<(), Close> {
        let principal = if self.config.auth_required() {
            self.config.principal_of(key)
        } else {
            Some(Principal::anonymous())
        };
        if let Some(principal) = principal {
            tracing::debug!(principal = %principal.name, "authenticated");
            self.registered.entry.set_principal(&principal.name);
            self.principal = Some(principal);
            self.allowed = None;
            self.send(Frame::new(correlation, Body::Ok)).await;
            return Ok(());
        }
        bump(&self.config.access.auth_failures);
        self.auth_failures += 1;
        if self.auth_failures >= self.config.max_auth_failures {
            return Err(Close::new(ErrorCode::FORBIDDEN, "too many wrong API keys"));
        }
        self.reply_error(correlation, ErrorCode::FORBIDDEN, "wrong API key").await;
        Ok(())
    }

    /// SUBSCRIBE, once the principal may read `filter` (and join `group`).
    #[expect(clippy::too_many_arguments, reason = "the fields of one SUBSCRIBE frame")]
    async fn on_subscribe(
        &mut self,
        correlation: u32,
        sub: u32,
        qos: Qos,
        filter: Filter,
        prefetch: u32,
        group: Option<String>,
        start: StartAt,
    ) {
        if !self.may_subscribe(&filter) {
            bump(&self.config.access.denied_subscribe);
            let message = format!("not allowed to subscribe to {filter}");
            return self.reply_error(correlation, ErrorCode::FORBIDDEN, message).await;
        }
        if let Some(group) = &group
            && !self.may_join(group)
        {
            bump(&self.config.access.denied_subscribe);
            let message = format!("not allowed to join queue group {group}");
            return self.reply_error(correlation, ErrorCode::FORBIDDEN, message).await;
        }
        let retained = self.config.retained.deliveries(sub, &filter, group.as_deref());
        let mut options = SubscribeOptions::new(filter.as_str()).qos(qos).start(start);
        if prefetch > 0 {
            options = options.prefetch(prefetch as usize);
        }
        // An MQTT persistent session's group lingers for the session's expiry, within the queue's
        // bounds and the server's budget, dropping its oldest past them (as MQTT brokers do).
        #[cfg(feature = "mqtt")]
        if let Some(client) = group.as_deref().and_then(|g| g.strip_prefix(ONE_CLIENT_GROUP))
            && let Some(expiry) = self.config.mqtt_sessions.expiry(client)
        {
            options = options
                .linger(expiry)
                .slow_consumer(SlowConsumer::DropOldest)
                .budget(self.config.queued.clone());
        }
        options = match group {
            Some(group) => options.group(group),
            None => options.budget(self.budget.clone()),
        };
        self.subscribe(correlation, sub, options, retained).await;
    }

    /// UNSUBSCRIBE: the writer drops the subscription, then replies.
    async fn on_unsubscribe(&mut self, correlation: u32, sub: u32) {
        if self.subscriptions.remove(&sub).is_some() {
            self.registered.entry.unsubscribed(sub);
            let reply = Frame::new(correlation, Body::Ok);
            let _ = self.tx.send(Outbound::Unsubscribed { sub, reply }).await;
        } else {
            let message = format!("no subscription {sub}");
            self.reply_error(correlation, ErrorCode::UNKNOWN_SUBSCRIPTION, message).await;
        }
    }

    /// The acker of subscription `sub`; an unknown subscription is answered with an error, a
    /// QoS 0 one has nothing to settle.
    async fn acker(&self, correlation: u32, sub: u32) -> Option<&Acker> {
        match self.subscriptions.get(&sub) {
            Some(acker) => acker.as_ref(),
            None => {
                let message = format!("no subscription {sub}");
                self.reply_error(correlation, ErrorCode::UNKNOWN_SUBSCRIPTION, message).await;
                None
            }
        }
    }

    async fn subscribe(
        &mut self,
        correlation: u32,
        sub: u32,
        options: SubscribeOptions,
        retained: Vec<Frame>,
    ) {
        if self.subscriptions.contains_key(&sub) {
            let message = format!("subscription {sub} exists");
            return self.reply_error(correlation, ErrorCode::DUPLICATE_SUBSCRIPTION, message).await;
        }
        if self.subscriptions.len() >= self.config.max_subscriptions {
            let message = format!("at most {} subscriptions", self.config.max_subscriptions);
            return self.reply_error(correlation, ErrorCode::LIMIT_REACHED, message).await;
        }
        let subscription = match self.broker.messages(options) {
            Ok(subscription) => subscription,
            Err(err) => {
                return self.reply_error(correlation, subscribe_code(&err), err.to_string()).await;
            }
        };
        self.subscriptions.insert(sub, subscription.acker());
        self.registered.entry.subscribed(sub, subscription.filter().as_str());
        let reply = Frame::new(correlation, Body::Ok);
        let subscription = Box::new(subscription);
        let subscribed = Outbound::Subscribed { sub, subscription, reply, retained };
        let _ = self.tx.send(subscribed).await;
    }
}

mod access;
mod codes;
mod confirm;
mod publish;

use codes::{frame_name, subscribe_code};
use confirm::Confirmations;
use publish::Next;
