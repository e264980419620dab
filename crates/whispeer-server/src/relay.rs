//! The P2P relay (`/relay` on the WebSocket listener): pairs peers that join the same topic
//! and forwards the bytes of each pair's link, which it cannot read — the peers run Noise end to
//! end inside them (`whispeer-sync`'s relay transport). The wire is
//! [`whispeer_proto::relay`].
//!
//! The relay stores nothing and holds only live connections, so several can run side by side.
//! Its bounds, each with its policy: peers per topic and topics per connection (a `Join` past
//! them is `Refused`), links per connection (pairs past it are not made, and both sides are told
//! with `Refused`), bytes per second per connection (what a peer sends past the rate waits: the
//! relay stops reading that socket, so the sender's TCP window fills — back-pressure, never a
//! drop), a bounded queue of messages per connection (a full one also stops the reader that
//! forwards into it), and idle time (a connection that sends nothing, not even a ping, for
//! `idle_timeout` is closed).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_util::sync::CancellationToken;
use whispeer_proto::relay::{RelayMessage, RelayTopic, decode_data};

use crate::ServerConfig;

/// Where peers connect on the WebSocket listener.
pub(crate) const RELAY_PATH: &str = "/relay";

/// Messages queued for one relay connection's socket.
const QUEUE: usize = 64;

/// The relay's bounds; see the module documentation for what each does when reached.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Peers joined to one topic. Default: 64.
    pub max_peers_per_topic: usize,
    /// Topics one connection joins. Default: 32.
    pub max_topics_per_connection: usize,
    /// Links one connection has open. Default: 256.
    pub max_links_per_connection: usize,
    /// Bytes per second one connection forwards (bursts up to one second's worth).
    /// Default: 8 MiB.
    pub bytes_per_second: u64,
    /// A connection silent this long is closed. Default: 60 s.
    pub idle_timeout: Duration,
    /// Largest message a peer may send. Default: 80 KiB (a Noise message of 64 KiB and the
    /// link header fit).
    pub max_message_bytes: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_peers_per_topic: 64,
            max_topics_per_connection: 32,
            max_links_per_connection: 256,
            bytes_per_second: 8 << 20,
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: 80 << 10,
        }
    }
}

/// What the relay counts (Prometheus `whispeer_relay_*` on the admin port).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Connections now open.
    pub connections: AtomicU64,
    /// Links now open.
    pub links: AtomicU64,
    /// `Data` messages forwarded.
    pub messages: AtomicU64,
    /// Bytes of `Data` forwarded.
    pub bytes: AtomicU64,
    /// Joins refused (a bound reached, or a peer id taken on the topic).
    pub refused: AtomicU64,
    /// Times a connection was held back by its byte rate.
    pub throttled: AtomicU64,
    /// Connections closed for being idle.
    pub idle_closed: AtomicU64,
    /// Messages that were not relay messages, or named a link the sender is not on.
    pub bad_messages: AtomicU64,
}

/// Copies the counters into the metrics recorder (the admin port's scrape).
#[cfg(feature = "admin")]
pub(crate) fn record(stats: &RelayStats) {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    metrics::gauge!("whispeer_relay_connections").set(load(&stats.connections) as f64);
    metrics::gauge!("whispeer_relay_links").set(load(&stats.links) as f64);
    let counters = [
        ("whispeer_relay_messages_total", &stats.messages),
        ("whispeer_relay_bytes_total", &stats.bytes),
        ("whispeer_relay_refused_total", &stats.refused),
        ("whispeer_relay_throttled_total", &stats.throttled),
        ("whispeer_relay_idle_closed_total", &stats.idle_closed),
        ("whispeer_relay_bad_messages_total", &stats.bad_messages),
    ];
    for (name, counter) in counters {
        metrics::counter!(name).absolute(load(counter));
    }
}

/// A relay: its bounds, its live connections and links, its counters.
#[derive(Debug, Default)]
pub struct Relay {
    config: RelayConfig,
    hub: Mutex<Hub>,
    next: AtomicU64,
    /// What it counted.
    pub stats: RelayStats,
}

#[derive(Debug, Default)]
struct Hub {
    topics: HashMap<RelayTopic, Vec<Member>>,
    links: HashMap<u64, [u64; 2]>,
    conns: HashMap<u64, Conn>,
}

#[derive(Debug)]
struct Member {
    conn: u64,
    peer: String,
    connect: bool,
}

#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Message>,
    links: HashSet<u64>,
    topics: HashSet<RelayTopic>,
}

/// Messages to send once the hub's lock is released.
type Outbox = Vec<(mpsc::Sender<Message>, RelayMessage)>;

impl Relay {
    /// A relay with these bounds.
    pub fn new(config: RelayConfig) -> Self {
        Self { config, ..Self::default() }
    }

    /// Its bounds.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(&self, conn: u64, topic: RelayTopic, connect: bool, peer: String) -> Outbox {
        let mut hub = self.hub();
        let hub = &mut *hub;
        let mut out = Outbox::new();
        let Some(me) = hub.conns.get(&conn) else { return out };
        let my_tx = me.tx.clone();
        let members = hub.topics.entry(topic).or_default();
        let refusal = if members.iter().any(|m| m.conn == conn) {
            Some("already joined".to_string())
        } else if members.iter().any(|m| m.peer == peer) {
            Some(format!("peer id {peer} is taken on this topic"))
        } else if members.len() >= self.config.max_peers_per_topic {
            Some(format!("topic full: {} peers", self.config.max_peers_per_topic))
        } else if me.topics.len() >= self.config.max_topics_per_connection {
            Some(format!("at most {} topics per connection", self.config.max_topics_per_connection))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            out.push((my_tx, RelayMessage::Refused { topic, reason }));
            return out;
        }
        let others: Vec<(u64, String)> = if connect {
            members.iter().filter(|m| m.connect).map(|m| (m.conn, m.peer.clone())).collect()
        } else {
            Vec::new()
        };
        members.push(Member { conn, peer: peer.clone(), connect });
        if let Some(me) = hub.conns.get_mut(&conn) {
            me.topics.insert(topic);
        }
        out.push((my_tx.clone(), RelayMessage::Joined { topic }));
        let max_links = self.config.max_links_per_connection;
        for (other, other_peer) in others {
            let full = |c: u64| hub.conns.get(&c).is_none_or(|c| c.links.len() >= max_links);
            if full(conn) || full(other) {
                let reason = format!("no link to {other_peer}: at most {max_links} links");
                out.push((my_tx.clone(), RelayMessage::Refused { topic, reason }));
                continue;
            }
            let link = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            hub.links.insert(link, [conn, other]);
            self.stats.links.fetch_add(1, Ordering::Relaxed);
            for (end, initiator, told) in [(conn, true, &other_peer), (other, false, &peer)] {
                if let Some(c) = hub.conns.get_mut(&end) {
                    c.links.insert(link);
                    let message = RelayMessage::Link { link, topic, initiator, peer: told.clone() };
                    out.push((c.tx.clone(), message));
                }
            }
        }
        out
    }

    fn leave(&self, conn: u64, topic: &RelayTopic) {
        let mut hub = self.hub();
        if let Some(members) = hub.topics.get_mut(topic) {
            members.retain(|m| m.conn != conn);
            if members.is_empty() {
                hub.topics.remove(topic);
            }
        }
        if let Some(me) = hub.conns.get_mut(&conn) {
            me.topics.remove(topic);
        }
    }

    fn lookup(&self, conn: u64, topic: &RelayTopic) -> Vec<String> {
        let hub = self.hub();
        let members = hub.topics.get(topic).map(Vec::as_slice).unwrap_or_default();
        members.iter().filter(|m| m.conn != conn).map(|m| m.peer.clone()).collect()
    }

    /// Closes `link` if `conn` is on it: tells the other end why.
    fn unlink(&self, conn: u64, link: u64, reason: &str) -> Outbox {
        let mut hub = self.hub();
        let Some(ends) = hub.links.get(&link).copied().filter(|ends| ends.contains(&conn)) else {
            return Outbox::new();
        };
        hub.links.remove(&link);
        self.stats.links.fetch_sub(1, Ordering::Relaxed);
        let mut out = Outbox::new();
        for end in ends {
            if let Some(c) = hub.conns.get_mut(&end) {
                c.links.remove(&link);
                if end != conn {
                    out.push((c.tx.clone(), RelayMessage::Unlink { link, reason: reason.into() }));
                }
            }
        }
        out
    }

    /// The queue of the other end of `link`, if `conn` is on it.
    fn other_end(&self, conn: u64, link: u64) -> Option<mpsc::Sender<Message>> {
        let hub = self.hub();
        let [a, b] = *hub.links.get(&link)?;
        let other = match conn {
            c if c == a => b,
            c if c == b => a,
            _ => return None,
        };
        hub.conns.get(&other).map(|c| c.tx.clone())
    }

    fn register(&self, tx: mpsc::Sender<Message>) -> u64 {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Conn { tx, links: HashSet::new(), topics: HashSet::new() };
        self.hub().conns.insert(conn, entry);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        conn
    }

    /// Forgets `conn`: its memberships and its links, whose other ends are told.
    fn remove(&self, conn: u64) -> Outbox {
        let links: Vec<u64> = {
            let hub = self.hub();
            let Some(me) = hub.conns.get(&conn) else { return Outbox::new() };
            let topics: Vec<RelayTopic> = me.topics.iter().copied().collect();
            let links = me.links.iter().copied().collect();
            drop(hub);
            for topic in &topics {
                self.leave(conn, topic);
            }
            links
        };
        let mut out = Outbox::new();
        for link in links {
            out.extend(self.unlink(conn, link, "the peer left the relay"));
        }
        self.hub().conns.remove(&conn);
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        out
    }
}

/// Who may use the relay: anyone on a server without keys; otherwise the holder of an API key
/// or JWT, as `?token=` or an `Authorization: Bearer` header.
#[expect(clippy::result_large_err, reason = "tungstenite's handshake callback returns this type")]
pub(crate) fn admit(request: &Request, config: &ServerConfig) -> Result<(), ErrorResponse> {
    if !config.auth_required() {
        return Ok(());
    }
    let query = request.uri().query().unwrap_or_default();
    let from_query = query.split('&').find_map(|pair| pair.strip_prefix("token="));
    let bearer = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = bearer.and_then(|v| v.strip_prefix("Bearer ")).or(from_query);
    if token.and_then(|t| config.principal_of(t.trim().as_bytes())).is_some() {
        return Ok(());
    }
    crate::bump(&config.access.auth_failures);
    let reason = "the relay needs ?token=<API key or JWT> or an Authorization: Bearer header";
    let mut refusal = ErrorResponse::new(Some(reason.into()));
    *refusal.status_mut() = StatusCode::UNAUTHORIZED;
    Err(refusal)
}

async fn send_all(out: Outbox) {
    for (tx, message) in out {
        let _ = tx.send(Message::Binary(message.encode().into())).await;
    }
}

/// A per-connection byte budget refilled at `rate` per second, up to one second's worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// How long to wait before `bytes` may pass (taking them now).
    fn take(&mut self, bytes: usize) -> Option<Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Serves one relay connection until it closes, idles out, or the server stops.
pub(crate) async fn serve<S>(
    ws: WebSocketStream<S>,
    peer: SocketAddr,
    relay: Arc<Relay>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let conn = relay.register(tx.clone());
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            let close = matches!(message, Message::Close(_));
            // Written without a flush while more wait; flushed once the queue is empty.
            if sink.feed(message).await.is_err() || close {
                break;
            }
            if rx.is_empty() && sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let rate = relay.config.bytes_per_second.max(1) as f64;
    let mut bucket = Bucket { rate, tokens: rate, at: Instant::now() };
    let idle = relay.config.idle_timeout;
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            next = tokio::time::timeout(idle, stream.next()) => next,
        };
        let message = match next {
            Err(_) => {
                relay.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "relay connection idle, closed");
                break;
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
            Ok(Some(Ok(_))) => continue,
        };
        if message.len() > relay.config.max_message_bytes {
            relay.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, len = message.len(), "relay message too large, closed");
            break;
        }
        if let Some((link, payload)) = decode_data(&message) {
            let Some(other) = relay.other_end(conn, link) else {
                // The link may just have closed: the sender learns it from `Unlink`.
                continue;
            };
            if let Some(wait) = bucket.take(message.len()) {
                relay.stats.throttled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
            relay.stats.messages.fetch_add(1, Ordering::Relaxed);
            relay.stats.bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
            // The link has the same number on both sides: the message goes on as it came.
            let _ = other.send(Message::Binary(message)).await;
            continue;
        }
        let out = match RelayMessage::decode(&message) {
            Ok(RelayMessage::Join { topic, connect, peer }) => {
                relay.join(conn, topic, connect, peer)
            }
            Ok(RelayMessage::Leave { topic }) => {
                relay.leave(conn, &topic);
                Outbox::new()
            }
            Ok(RelayMessage::Lookup { request, topic }) => {
                let peers = relay.lookup(conn, &topic);
                vec![(tx.clone(), RelayMessage::Peers { request, peers })]
            }
            Ok(RelayMessage::Unlink { link, reason }) => relay.unlink(conn, link, &reason),
            Ok(_) | Err(_) => {
                relay.stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "bad relay message, closed");
                break;
            }
        };
        send_all(out).await;
    }
    send_all(relay.remove(conn)).await;
    let _ = tx.send(Message::Close(None)).await;
    drop(tx);
    let _ = writer.await;
}
