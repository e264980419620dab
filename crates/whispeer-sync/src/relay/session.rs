//! One relay transport's WebSocket session: the driver task (connect, reconnect with backoff,
//! join the topics again, read what the relay sends) and the state it shares with the
//! transport's calls and the links' connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use whispeer_proto::relay::{RelayMessage, decode_data};

use crate::TopicHash;
use crate::key::PeerKey;
use crate::noise::{SecureConnection, Wire};
use crate::transport::{Connection, TransportConfig};

/// Messages queued to the relay.
const OUT_QUEUE: usize = 256;
/// Messages queued per link from the relay.
const LINK_QUEUE: usize = 64;
/// Connections of a topic not yet taken by the application.
const INCOMING_QUEUE: usize = 64;
/// How often the session pings the relay (its idle timeout is 60 s by default).
const PING_EVERY: Duration = Duration::from_secs(20);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the session's calls wait on: the current connection to the relay, or why there is none.
#[derive(Clone, Debug, Default)]
struct Link {
    out: Option<mpsc::Sender<Message>>,
    error: Option<String>,
}

#[derive(Default)]
struct Topic {
    connect: bool,
    incoming: Option<mpsc::Sender<Box<dyn Connection>>>,
}

#[derive(Default)]
struct State {
    topics: HashMap<TopicHash, Topic>,
    joins: HashMap<TopicHash, oneshot::Sender<Result<(), String>>>,
    lookups: HashMap<u32, oneshot::Sender<Vec<String>>>,
    next_request: u32,
    links: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    started: bool,
}

/// The session; see the module documentation.
pub(super) struct Session {
    config: TransportConfig,
    key: PeerKey,
    peer_id: String,
    url: String,
    token: Option<String>,
    /// For `wss://`.
    tls: Option<tokio_tungstenite::Connector>,
    state: Mutex<State>,
    link: watch::Sender<Link>,
    stop: tokio_util_stop::Stop,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer_id", &self.peer_id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A flag the driver watches to end.
mod tokio_util_stop {
    use tokio::sync::watch;

    #[derive(Debug)]
    pub(super) struct Stop(watch::Sender<bool>);

    impl Stop {
        pub(super) fn new() -> Self {
            Self(watch::channel(false).0)
        }
        pub(super) fn set(&self) {
            self.0.send_replace(true);
        }
        pub(super) fn is_set(&self) -> bool {
            *self.0.borrow()
        }
        pub(super) async fn wait(&self) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

impl Session {
    pub(super) fn new(
        config: TransportConfig,
        key: PeerKey,
        url: String,
        token: Option<String>,
        tls: Option<tokio_tungstenite::Connector>,
    ) -> Arc<Self> {
        let peer_id = key.id();
        Arc::new(Self {
            config,
            key,
            peer_id,
            url,
            token,
            tls,
            state: Mutex::default(),
            link: watch::channel(Link::default()).0,
            stop: tokio_util_stop::Stop::new(),
        })
    }

    pub(super) fn peer_id(&self) -> &str {
        &self.peer_id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the session: the driver stops, every link closes.
    pub(super) fn shut(&self) {
        self.stop.set();
        let mut state = self.state();
        state.topics.clear();
        state.links.clear();
    }

    /// The relay connection, started on first use; waits up to the timeout for it.
    async fn out(self: &Arc<Self>) -> anyhow::Result<mpsc::Sender<Message>> {
        anyhow::ensure!(!self.stop.is_set(), "the transport was disconnected");
        let start = !std::mem::replace(&mut self.state().started, true);
        if start {
            tokio::spawn(Arc::clone(self).drive());
        }
        let mut rx = self.link.subscribe();
        let waited =
            tokio::time::timeout(self.config.timeout(), rx.wait_for(|l| l.out.is_some())).await;
        match waited {
            Ok(Ok(link)) => {
                link.out.clone().ok_or_else(|| anyhow::anyhow!("relay connection lost"))
            }
            _ => {
                let why = self.link.borrow().error.clone().unwrap_or_else(|| "no answer".into());
                anyhow::bail!(
                    "relay {} not reachable within {} ms: {why}",
                    self.url,
                    self.config.timeout_ms
                )
            }
        }
    }

    /// Joins `topic` (to be paired when `connect`); the receiver of its connections if so.
    pub(super) async fn join(
        self: &Arc<Self>,
        topic: TopicHash,
        connect: bool,
    ) -> anyhow::Result<Option<mpsc::Receiver<Box<dyn Connection>>>> {
        let out = self.out().await?;
        let (done, answer) = oneshot::channel();
        let (incoming, rx) = if connect {
            let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let rejoin = {
            let mut state = self.state();
            let rejoin = state.topics.get(&topic).is_some_and(|t| connect && !t.connect);
            if state.topics.get(&topic).is_some_and(|t| t.connect || !connect) {
                // Already joined as asked (a second `connect` gets a fresh receiver).
                if let (Some(tx), Some(t)) = (incoming, state.topics.get_mut(&topic)) {
                    t.incoming = Some(tx);
                }
                return Ok(rx);
            }
            state.topics.insert(topic, Topic { connect, incoming });
            state.joins.insert(topic, done);
            rejoin
        };
        if rejoin {
            send(&out, &RelayMessage::Leave { topic }).await?;
        }
        let peer = self.peer_id.clone();
        send(&out, &RelayMessage::Join { topic, connect, peer }).await?;
        match tokio::time::timeout(self.config.timeout(), answer).await {
            Ok(Ok(Ok(()))) => Ok(rx),
            Ok(Ok(Err(reason))) => {
                self.state().topics.remove(&topic);
                anyhow::bail!("the relay refused the topic: {reason}")
            }
            Ok(Err(_)) => anyhow::bail!("relay connection lost while joining"),
            Err(_) => {
                self.state().joins.remove(&topic);
                anyhow::bail!(
                    "the relay did not answer a join within {} ms",
                    self.config.timeout_ms
                )
            }
        }
    }

    /// The peers on `topic`, as the relay lists them.
    pub(super) async fn lookup(self: &Arc<Self>, topic: TopicHash) -> anyhow::Result<Vec<String>> {
        let out = self.out().await?;
        let (done, answer) = oneshot::channel();
        let request = {
            let mut state = self.state();
            state.next_request = state.next_request.wrapping_add(1);
            let request = state.next_request;
            state.lookups.insert(request, done);
            request
        };
        send(&out, &RelayMessage::Lookup { request, topic }).await?;
        match tokio::time::timeout(self.config.timeout(), answer).await {
            Ok(Ok(peers)) => Ok(peers),
            Ok(Err(_)) => anyhow::bail!("relay connection lost during a lookup"),
            Err(_) => {
                self.state().lookups.remove(&request);
                anyhow::bail!(
                    "the relay did not answer a lookup within {} ms",
                    self.config.timeout_ms
                )
            }
        }
    }

    /// Connects, serves, reconnects, until stopped.
    async fn drive(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        while !self.stop.is_set() {
            let connected = tokio::select! {
                () = self.stop.wait() => break,
                c = tokio::time::timeout(self.config.timeout(), self.dial()) => c,
            };
            let ws = match connected {
                Ok(Ok(ws)) => ws,
                Ok(Err(err)) => {
                    self.link.send_modify(|l| l.error = Some(err.to_string()));
                    tracing::debug!(url = %self.url, %err, "relay connection failed");
                    tokio::select! {
                        () = self.stop.wait() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err(_) => {
                    self.link.send_modify(|l| l.error = Some("connection timed out".into()));
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            self.serve(ws).await;
        }
        self.link.send_replace(Link { out: None, error: Some("disconnected".into()) });
    }

    async fn dial(&self) -> anyhow::Result<Ws> {
        let mut request = self.url.as_str().into_client_request()?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse()?;
            request.headers_mut().insert("authorization", value);
        }
        // Nagle off: a small message must not wait for the previous one's acknowledgement.
        let connector = self.tls.clone();
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
                .await?;
        Ok(ws)
    }

    /// One session: the writer task, joins again, the reader, until the socket ends.
    async fn serve(self: &Arc<Self>, ws: Ws) {
        let (mut sink, mut stream) = ws.split();
        let (out, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
        let writer = tokio::spawn(async move {
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            loop {
                let message = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => break },
                    _ = ping.tick() => Message::Ping(Default::default()),
                };
                // Written without a flush while more wait; flushed once the queue is empty.
                if sink.feed(message).await.is_err() {
                    break;
                }
                if rx.is_empty() && sink.flush().await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let rejoin: Vec<(TopicHash, bool)> =
            self.state().topics.iter().map(|(topic, t)| (*topic, t.connect)).collect();
        for (topic, connect) in rejoin {
            let _ = send(&out, &RelayMessage::Join { topic, connect, peer: self.peer_id.clone() })
                .await;
        }
        self.link.send_replace(Link { out: Some(out.clone()), error: None });
        loop {
            let message = tokio::select! {
                () = self.stop.wait() => break,
                m = stream.next() => m,
            };
            match message {
                Some(Ok(Message::Binary(bytes))) => self.dispatch(&bytes, &out).await,
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        self.link.send_replace(Link { out: None, error: Some("relay connection lost".into()) });
        {
            let mut state = self.state();
            state.links.clear();
            state.joins.clear();
            state.lookups.clear();
        }
        drop(out);
        writer.abort();
    }

    /// Handles one message from the relay.
    async fn dispatch(self: &Arc<Self>, bytes: &[u8], out: &mpsc::Sender<Message>) {
        if let Some((link, payload)) = decode_data(bytes) {
            let tx = self.state().links.get(&link).cloned();
            if let Some(tx) = tx
                && tx.send(payload.to_vec()).await.is_err()
            {
                self.state().links.remove(&link);
            }
            return;
        }
        let Ok(message) = RelayMessage::decode(bytes) else {
            tracing::debug!(url = %self.url, "a bad message from the relay, ignored");
            return;
        };
        match message {
            RelayMessage::Joined { topic } => {
                if let Some(done) = self.state().joins.remove(&topic) {
                    let _ = done.send(Ok(()));
                }
            }
            RelayMessage::Refused { topic, reason } => {
                let done = self.state().joins.remove(&topic);
                match done {
                    Some(done) => drop(done.send(Err(reason))),
                    None => {
                        tracing::warn!(topic = %hex::encode(topic), %reason, "relay refused a link")
                    }
                }
            }
            RelayMessage::Peers { request, peers } => {
                if let Some(done) = self.state().lookups.remove(&request) {
                    let _ = done.send(peers);
                }
            }
            RelayMessage::Unlink { link, .. } => {
                self.state().links.remove(&link);
            }
            RelayMessage::Link { link, topic, initiator, peer } => {
                self.linked(link, topic, initiator, peer, out)
            }
            _ => tracing::debug!(url = %self.url, "an unexpected message from the relay, ignored"),
        }
    }

    /// A new link: its handshake runs in its own task, then the connection goes to the topic's
    /// receiver.
    fn linked(
        self: &Arc<Self>,
        link: u64,
        topic: TopicHash,
        initiator: bool,
        peer: String,
        out: &mpsc::Sender<Message>,
    ) {
        let (tx, inbound) = mpsc::channel(LINK_QUEUE);
        let incoming = {
            let mut state = self.state();
            let incoming = state.topics.get(&topic).and_then(|t| t.incoming.clone());
            if incoming.is_some() {
                state.links.insert(link, tx);
            }
            incoming
        };
        let wire = LinkWire {
            link,
            out: out.clone(),
            inbound,
            session: Arc::downgrade(self),
            closed: false,
        };
        let Some(incoming) = incoming else {
            // Not (or no longer) connecting on that topic: the wire's drop unlinks.
            return;
        };
        let session = Arc::clone(self);
        tokio::spawn(async move {
            let mut prologue = b"whispeer-sync relay v1 ".to_vec();
            prologue.extend_from_slice(&topic);
            let timeout = session.config.timeout();
            let connection = if session.config.encryption {
                let private = session.key.noise_private();
                let handshake =
                    SecureConnection::handshake(wire, initiator, private, &prologue, Some(&peer));
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(err)) => {
                        return tracing::warn!(%peer, %err, "relay link handshake failed");
                    }
                    Err(_) => return tracing::warn!(%peer, "relay link handshake timed out"),
                }
            } else {
                SecureConnection::plain(wire, peer)
            };
            let _ = incoming.send(Box::new(connection)).await;
        });
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(out: &mpsc::Sender<Message>, message: &RelayMessage) -> anyhow::Result<()> {
    out.send(Message::Binary(message.encode().into()))
        .await
        .map_err(|_| anyhow::anyhow!("relay connection lost"))
}

/// One link's pipe: out through the session's writer, in from the session's reader.
struct LinkWire {
    link: u64,
    out: mpsc::Sender<Message>,
    inbound: mpsc::Receiver<Vec<u8>>,
    session: std::sync::Weak<Session>,
    closed: bool,
}

#[async_trait]
impl Wire for LinkWire {
    async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        anyhow::ensure!(!self.closed, "the connection is closed");
        let message = RelayMessage::Data { link: self.link, bytes };
        send(&self.out, &message).await
    }

    async fn recv(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.inbound.recv().await)
    }

    fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if let Some(session) = self.session.upgrade() {
            session.state().links.remove(&self.link);
        }
        let unlink = RelayMessage::Unlink { link: self.link, reason: "closed by the peer".into() };
        // Best effort: with the queue full, the relay learns it when the session ends.
        let _ = self.out.try_send(Message::Binary(unlink.encode().into()));
    }
}

impl Drop for LinkWire {
    fn drop(&mut self) {
        self.close();
    }
}

/// TLS for `wss://` relays: rustls with ring, the platform's roots, and `extra_ca` if given.
pub(super) fn tls_connector(
    extra_ca: Option<&std::path::Path>,
) -> anyhow::Result<tokio_tungstenite::Connector> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let cert: rustls::pki_types::CertificateDer<'static> =
                cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            roots.add(cert)?;
        }
    }
    anyhow::ensure!(!roots.is_empty(), "no CA certificates to trust a wss:// relay with");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
}
