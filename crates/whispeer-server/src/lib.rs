//! The network server: accepts TCP connections and serves the binary protocol on a broker.
//!
//! ```text
//! serve ─ accept loop ─┬─ connection task (reader: decode frames, act on the broker)
//!                      │     └─ writer (owns the subscriptions; replies + deliveries, many
//!                      │                frames per write; its own task, or run by the reader
//!                      │                that woke it when that reader waits)
//!                      └─ … one per connection, tracked for shutdown
//! ```
//!
//! Every queue is bounded: a client that reads slowly holds its writer up, and its subscriptions'
//! broker queues meet their slow-consumer policy (counted). A client that stops reading
//! altogether is disconnected when a write stalls past the idle timeout.
//! The server never opens a payload; it holds no content key.
//!
//! The library takes its inputs: a bound listener, a broker, a config and a shutdown future.

mod acl;
mod adapter;
#[cfg(feature = "admin")]
mod admin;
mod auth;
#[cfg(feature = "chat")]
mod chat;
#[cfg(feature = "cluster")]
pub mod cluster;
mod connection;
pub(crate) mod embedded;
#[cfg(feature = "websocket")]
mod json;
mod jwt;
#[cfg(feature = "mqtt")]
mod mqtt;
mod rate;
mod registry;
#[cfg(feature = "relay")]
mod relay;
mod retained;
#[cfg(feature = "tls")]
mod tls;
mod traffic;
mod writer;
#[cfg(feature = "websocket")]
mod ws;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use acl::{AccessCounters, Permissions, Principal};
#[cfg(feature = "admin")]
pub use admin::{Admin, AdminServer, parse_start};
pub use auth::{ApiKeyError, ApiKeys, digest_of};
#[cfg(feature = "chat")]
pub use chat::{Chat, ChatConfig, ChatStatus};
#[cfg(feature = "cluster")]
pub use cluster::{Cluster, ClusterConfig, ClusterStatus};
pub use embedded::Tcp;
#[cfg(feature = "websocket")]
pub use embedded::{BrokerWs, WebSocket};
pub use jwt::{JwtError, JwtVerifier};
pub use registry::{ConnectionInfo, Connections};
#[cfg(feature = "relay")]
pub use relay::{Relay, RelayConfig, RelayStats};
pub use retained::Retained;
#[cfg(feature = "tls")]
pub use tls::{TlsError, server_tls};
pub use traffic::{FlowStats, MAX_CLASSES, Traffic, class_of};

use whispeer_core::{Broker, ByteBudget};

/// Counts one event.
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not for applications.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Parses one request of the WebSocket JSON form under `limits`: the frame it stands for,
    /// or why not.
    ///
    /// # Errors
    /// The parser's refusal, as text.
    pub fn json_request(
        text: &str,
        limits: &whispeer_proto::Limits,
    ) -> Result<whispeer_proto::Frame, String> {
        super::json::request_to_frame(text, limits, &super::json::JsonIds::new())
            .map_err(|err| err.to_string())
    }

    /// Parses one chat request (the chat listener's JSON): a description of the action, or
    /// the refusal's code.
    ///
    /// # Errors
    /// The refusal's code.
    pub fn chat_request(text: &str) -> Result<String, &'static str> {
        super::chat::fuzz_parse(text)
    }

    /// Decodes `data` as MQTT packets from a client (3.1.1, or 5 when `v5`) and translates
    /// each into native frames, until the first that does not decode or is refused.
    pub fn mqtt_packets(data: &[u8], v5: bool) {
        super::mqtt::fuzz_packets(data, v5);
    }
}

/// Settings of a server. Every field has a safe default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Name sent in `Welcome`, for clients' logs.
    pub name: String,
    /// Keys that may connect, each with its principal's permissions; empty means anyone may,
    /// with every ordinary topic (keep such a server on loopback).
    pub api_keys: ApiKeys,
    /// Keys that verify JWTs sent in AUTH (their claims name the principal and its
    /// permissions). Default: none.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// Refusals counted: wrong credentials, denied publishes and subscriptions. Clones of the
    /// config share them.
    pub access: Arc<AccessCounters>,
    /// The live connections (shared by clones of the config): list them, disconnect one.
    pub connections: Arc<Connections>,
    /// Messages and bytes in and out per topic and per topic class (shared by clones).
    pub traffic: Arc<Traffic>,
    /// An idle connection is pinged this often and closed after three silent periods; a write
    /// that stalls as long, or a frame left incomplete as long, also closes it. Default: 10 s.
    pub heartbeat: Duration,
    /// Connections beyond this are refused with `LIMIT_REACHED`. Default: 10 000.
    pub max_connections: usize,
    /// Subscriptions per connection. Default: 1 024.
    pub max_subscriptions: usize,
    /// Publishes per second per connection (bursts up to one second's worth); beyond it a
    /// publish is refused with `LIMIT_REACHED`. Default: unlimited.
    pub max_publish_rate: Option<u32>,
    /// Published payload bytes per second per connection, the same way. Default: unlimited.
    pub max_publish_bytes_rate: Option<u64>,
    /// Frames waiting to be written per connection. Default: 1 024.
    pub outbound_frames: usize,
    /// Bytes the broker holds queued for one connection, across its own subscriptions (payloads
    /// plus 256 per message); beyond it each subscription's slow-consumer policy applies.
    /// Default: 64 MiB.
    pub connection_max_bytes: usize,
    /// Bytes the broker holds queued for all connections of this server together (shared by
    /// clones of the config): each connection's budget draws on it, so many slow consumers
    /// cannot hold more than this between them; beyond it each subscription's slow-consumer
    /// policy applies. Default: 1 GiB.
    pub queued: ByteBudget,
    /// Wrong API keys tolerated before the connection is closed. Default: 3.
    pub max_auth_failures: u32,
    /// On a server that requires authentication, how long a new connection has to send HELLO
    /// and authenticate; past it the connection is closed with `UNAUTHENTICATED` and counted
    /// ([`AccessCounters::auth_timeouts`]), so connections that never log in cannot hold slots
    /// (answering pings does not keep them). Default: 5 s.
    pub auth_timeout: Duration,
    /// How long shutdown waits for connections to flush. Default: 5 s.
    pub shutdown_grace: Duration,
    /// The path WebSocket clients connect to. Default: `/ws`.
    pub websocket_path: String,
    /// TLS for every listener this config serves (see [`server_tls`]). Default: none.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Retained messages, shared by every listener of this server.
    pub retained: Arc<Retained>,
    /// Most topics with a retained message (a retained publish for another is refused).
    pub max_retained: usize,
    /// Most payload bytes of retained messages in all.
    pub max_retained_bytes: usize,
    /// MQTT sessions, shared by the MQTT and WebSocket listeners.
    #[cfg(feature = "mqtt")]
    pub(crate) mqtt_sessions: Arc<mqtt::MqttSessions>,
    /// The longest an MQTT persistent session outlives its connection (a longer session
    /// expiry is cut to it; a 3.1.1 session without clean session gets it). Default: 1 day.
    #[cfg(feature = "mqtt")]
    pub mqtt_max_session_expiry: Duration,
    /// The P2P relay at `/relay` on the WebSocket listener; none by default.
    #[cfg(feature = "relay")]
    pub relay: Option<Arc<Relay>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            name: format!("whispeerd {}", env!("CARGO_PKG_VERSION")),
            api_keys: ApiKeys::default(),
            jwt: None,
            access: Arc::default(),
            connections: Arc::default(),
            traffic: Arc::default(),
            heartbeat: Duration::from_secs(10),
            max_connections: 10_000,
            max_subscriptions: 1024,
            max_publish_rate: None,
            max_publish_bytes_rate: None,
            outbound_frames: 1024,
            connection_max_bytes: 64 * 1024 * 1024,
            queued: ByteBudget::new(1 << 30),
            max_auth_failures: 3,
            auth_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            websocket_path: "/ws".into(),
            #[cfg(feature = "tls")]
            tls: None,
            retained: Arc::default(),
            max_retained: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            #[cfg(feature = "mqtt")]
            mqtt_sessions: Arc::default(),
            #[cfg(feature = "mqtt")]
            mqtt_max_session_expiry: Duration::from_secs(86_400),
            #[cfg(feature = "relay")]
            relay: None,
        }
    }
}

impl ServerConfig {
    /// Whether clients must authenticate (API keys or JWTs are configured).
    pub fn auth_required(&self) -> bool {
        self.api_keys.required() || self.jwt.as_ref().is_some_and(|j| j.is_configured())
    }

    /// The principal of an API key, or of a JWT when verifiers are configured.
    pub(crate) fn principal_of(&self, key: &[u8]) -> Option<Arc<Principal>> {
        if let (Some(verifier), true) = (&self.jwt, jwt::looks_like_jwt(key)) {
            let token = std::str::from_utf8(key).ok()?;
            return match verifier.verify(token) {
                Ok(principal) => Some(Arc::new(principal)),
                Err(err) => {
                    tracing::debug!(%err, "token refused");
                    None
                }
            };
        }
        self.api_keys.principal(key)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// Serves `broker` on `listener` (TCP) until `shutdown` completes, then stops accepting, tells
/// every client (`SHUTTING_DOWN`), lets writers flush for up to `shutdown_grace`, and returns.
///
/// # Errors
/// Only for failures of the listener itself; a connection's errors close that connection.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    accept_loop(listener, broker, config, shutdown, connection::run_tcp).await
}

/// Like [`serve`], for WebSocket clients: the same frames in binary WebSocket messages, on
/// `config.websocket_path`. Run both on one broker to serve both kinds of client.
///
/// # Errors
/// Only for failures of the listener itself.
#[cfg(feature = "websocket")]
pub async fn serve_websocket(
    listener: TcpListener,
    broker: Broker,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    accept_loop(listener, broker, config, shutdown, ws::run).await
}

/// Like [`serve`], for MQTT 3.1.1 and 5 clients (`mqtt://`, or `mqtts://` with TLS): the
/// CONNECT password is an API key or a JWT, and the same ACLs, limits and queues apply.
///
/// # Errors
/// Only for failures of the listener itself.
#[cfg(feature = "mqtt")]
pub async fn serve_mqtt(
    listener: TcpListener,
    broker: Broker,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    accept_loop(listener, broker, config, shutdown, mqtt::run).await
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    broker: Broker,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
    handle: F,
) -> io::Result<()>
where
    F: Fn(TcpStream, SocketAddr, Broker, Arc<ServerConfig>, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let config = Arc::new(config);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let live = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = ConnectionCount::enter(&live);
        if guard.0 > config.max_connections {
            tasks.spawn(async move {
                let _guard = guard;
                connection::refuse(stream, peer).await;
            });
            continue;
        }
        let served = handle(stream, peer, broker.clone(), Arc::clone(&config), stop.child_token());
        tasks.spawn(async move {
            let _guard = guard;
            served.await;
        });
    }
    tracing::info!(connections = live.load(Ordering::Relaxed), "shutting down");
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(config.shutdown_grace, tasks.wait()).await.is_err() {
        tracing::warn!("some connections did not close within the grace period");
    }
    Ok(())
}

/// Counts live connections; the count drops when the guard does.
struct ConnectionCount(usize, Arc<AtomicUsize>);

impl ConnectionCount {
    fn enter(live: &Arc<AtomicUsize>) -> Self {
        Self(live.fetch_add(1, Ordering::Relaxed) + 1, Arc::clone(live))
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}
