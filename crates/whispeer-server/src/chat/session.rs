//! One chat connection: the upgrade (path, `?id=`, `?device=`, `?token=` or a bearer header),
//! who the user is, then one loop that reads requests and writes the user's inbox (from the
//! device's cursor), its live events and its broadcast topics.
//!
//! A user is the principal of the connection's API key or JWT; on a server without keys it is
//! `?id=` or the `from` of the first message. A `from` naming anyone else is refused and
//! nothing is sent.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use whispeer_core::{
    HistoryError, Message, SlowConsumer, StartAt, SubscribeError, SubscribeOptions, Subscription,
    Topic,
};

use super::hub::{Cursor, Hub, broadcast, inbox, live};
use super::messaging::{DIRECT, FROM, ID, ORIGIN};
use super::wire::{self, Action, ChatError, Request as ChatRequest, valid_name};
use crate::ServerConfig;

/// What the upgrade request said.
#[derive(Debug, Default)]
struct Hello {
    id: Option<String>,
    device: Option<String>,
    token: Option<String>,
}

/// `%xx` and `+` decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (byte, _, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Hello {
    fn read(request: &Request) -> Self {
        let mut hello = Self::default();
        for pair in request.uri().query().unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = Some(decode(value));
            match key {
                "id" | "user" => hello.id = value,
                "device" => hello.device = value,
                "token" => hello.token = value,
                _ => {}
            }
        }
        let bearer = request.headers().get("authorization").and_then(|v| v.to_str().ok());
        if let Some(token) = bearer.and_then(|v| v.strip_prefix("Bearer ")) {
            hello.token = Some(token.trim().to_string());
        }
        hello
    }
}

#[expect(clippy::result_large_err, reason = "tungstenite's handshake callback returns this type")]
fn refusal(status: StatusCode, reason: String) -> Result<Response, ErrorResponse> {
    let mut refusal = ErrorResponse::new(Some(reason));
    *refusal.status_mut() = status;
    Err(refusal)
}

/// Checks the upgrade: the path, then who connects. Gives the user when it is known already.
#[expect(clippy::result_large_err, reason = "tungstenite's handshake callback returns this type")]
fn admit(
    request: &Request,
    response: Response,
    hub: &Hub,
    config: &ServerConfig,
    found: &mut Option<(Option<String>, String)>,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != hub.config.path {
        let reason = format!("no chat endpoint at {}", request.uri().path());
        return refusal(StatusCode::NOT_FOUND, reason);
    }
    let hello = Hello::read(request);
    let device = hello.device.unwrap_or_else(|| "default".into());
    if !valid_name(&device) {
        let reason = "device must be 1 to 64 letters, digits or -_.@".to_string();
        return refusal(StatusCode::BAD_REQUEST, reason);
    }
    let user = if config.auth_required() {
        let Some(principal) = hello.token.and_then(|token| config.principal_of(token.as_bytes()))
        else {
            crate::bump(&config.access.auth_failures);
            let reason = "chat needs ?token=<API key or JWT> or an Authorization: Bearer header";
            return refusal(StatusCode::UNAUTHORIZED, reason.into());
        };
        if hello.id.as_ref().is_some_and(|id| *id != principal.name) {
            let reason = format!("?id= must be your own name, {}", principal.name);
            return refusal(StatusCode::FORBIDDEN, reason);
        }
        Some(principal.name.clone())
    } else {
        hello.id
    };
    if let Some(user) = user.as_ref().filter(|u| !valid_name(u)) {
        let reason = format!("{user:?} cannot be a chat user: 1 to 64 letters, digits or -_.@");
        return refusal(StatusCode::BAD_REQUEST, reason);
    }
    *found = Some((user, device));
    Ok(response)
}

/// Serves one connection, after TLS if configured.
pub(super) async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    let plain = config.tls.is_none();
    #[cfg(not(feature = "tls"))]
    let plain = true;
    if let Some(dir) = hub.config.page_dir.as_deref().filter(|_| plain) {
        let path = &hub.config.path;
        let peeked =
            super::page::serve_if_page(&mut stream, dir, path, config.idle_timeout()).await;
        if matches!(peeked, super::page::Peeked::Served) {
            return;
        }
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = crate::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        return upgrade(stream, peer, hub, config, stop).await;
    }
    upgrade(stream, peer, hub, config, stop).await;
}

async fn upgrade<S>(
    stream: S,
    peer: SocketAddr,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut ws_config = WebSocketConfig::default();
    // Over-size requests get an error and the connection stays; far larger ones close it.
    let cap = (hub.config.max_message_bytes * 4).max(64 * 1024);
    ws_config.max_message_size = Some(cap);
    ws_config.max_frame_size = Some(cap);
    // Requests are small: a 4 KiB read buffer (not tungstenite's 128 KiB) keeps an idle
    // connection cheap; larger messages grow it while they last.
    ws_config.read_buffer_size = 4096;
    let mut found = None;
    #[expect(
        clippy::result_large_err,
        reason = "tungstenite's handshake callback returns this type"
    )]
    let callback =
        |request: &Request, response: Response| admit(request, response, &hub, &config, &mut found);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = match tokio::time::timeout(config.idle_timeout(), handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => return tracing::debug!(%peer, %err, "chat upgrade refused"),
        Err(_) => return tracing::debug!(%peer, "chat upgrade timed out"),
    };
    let Some((user, device)) = found else { return };
    let id = hub.session_id();
    let mut session = Session {
        origin: Bytes::from(id.to_string()),
        id,
        hub,
        config,
        ws,
        user: None,
        device,
        cursor: None,
        known: false,
        inbox: None,
        live: None,
        topics: HashMap::new(),
        heard: Instant::now(),
    };
    if let Some(user) = user
        && !session.identify(user, None).await
    {
        return session.close().await;
    }
    session.serve(stop).await;
    session.close().await;
}

struct Session<S> {
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    ws: WebSocketStream<S>,
    id: u64,
    /// `id` as the origin header's value.
    origin: Bytes,
    user: Option<String>,
    device: String,
    cursor: Option<Arc<Cursor>>,
    /// Whether the device was known before this connection (a new one has missed nothing).
    known: bool,
    inbox: Option<Subscription<Message>>,
    live: Option<Subscription<Message>>,
    topics: HashMap<String, Subscription<Message>>,
    /// When the client was last heard from.
    heard: Instant,
}

/// Waits for the next message of an optional subscription (forever without one); `None` when
/// it closed.
async fn next_of(subscription: &mut Option<Subscription<Message>>) -> Option<Message> {
    match subscription {
        Some(subscription) => subscription.recv_message().await,
        None => std::future::pending().await,
    }
}

/// The next message of any broadcast topic.
async fn next_topic(topics: &mut HashMap<String, Subscription<Message>>) -> Message {
    poll_fn(|cx| {
        for subscription in topics.values_mut() {
            if let Poll::Ready(Some(message)) = subscription.poll_recv_message(cx) {
                return Poll::Ready(message);
            }
        }
        Poll::Pending
    })
    .await
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve(&mut self, stop: CancellationToken) {
        let mut ping = tokio::time::interval(self.config.heartbeat);
        ping.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = self.send_json(json!({"type": "error", "code": "shutting_down",
                        "error": "the server is shutting down"})).await;
                    return;
                }
                incoming = self.ws.next() => {
                    self.heard = Instant::now();
                    let keep_on = match incoming {
                        Some(Ok(WsMessage::Text(text))) => self.request(text.as_str()).await,
                        Some(Ok(WsMessage::Binary(_))) => {
                            let err = ChatError::new("malformed", "chat speaks JSON text messages");
                            self.send_text(wire::error(&err, None)).await
                        }
                        Some(Ok(WsMessage::Close(_))) | None => false,
                        Some(Ok(_)) => true,
                        Some(Err(err)) => {
                            tracing::debug!(%err, "chat connection failed");
                            false
                        }
                    };
                    if !keep_on {
                        return;
                    }
                }
                message = next_of(&mut self.inbox) => {
                    if !self.deliver_inbox(message).await {
                        return;
                    }
                }
                message = next_of(&mut self.live) => {
                    let Some(message) = message else { return };
                    if !self.send_payload(message.payload().clone()).await {
                        return;
                    }
                }
                message = next_topic(&mut self.topics) => {
                    if !self.send_payload(message.payload().clone()).await {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if self.heard.elapsed() > self.config.idle_timeout() {
                        tracing::debug!(user = ?self.user, "chat client silent: closing");
                        return;
                    }
                    if self.ws.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Writes an inbox message (and those queued behind it) unless this session sent it, then
    /// moves the device's cursor. A closed inbox (it fell behind its queue) is opened again
    /// from the cursor.
    async fn deliver_inbox(&mut self, message: Option<Message>) -> bool {
        let Some(message) = message else {
            tracing::debug!(user = ?self.user, "inbox queue overflowed: reading from the cursor");
            return self.open_inbox().await;
        };
        let mut last = message.offset();
        let mut batch = vec![message];
        while batch.len() < 256 {
            let Some(next) = self.inbox.as_mut().and_then(Subscription::try_recv_message) else {
                break;
            };
            last = next.offset().or(last);
            batch.push(next);
        }
        let mut direct = Vec::new();
        for message in batch {
            let headers = message.headers();
            if headers.get(ORIGIN) == Some(&self.origin) {
                continue;
            }
            let mine = self.user.as_deref().map(str::as_bytes);
            if let (Some(to), Some(from), Some(id)) =
                (headers.get(DIRECT), headers.get(FROM), headers.get(ID))
                && Some(to.as_ref()) == mine
                && Some(from.as_ref()) != mine
            {
                let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
                direct.push((text(from), text(id)));
            }
            let Ok(text) = Utf8Bytes::try_from(message.payload().clone()) else { continue };
            if self.ws.feed(WsMessage::Text(text)).await.is_err() {
                return false;
            }
        }
        if self.ws.flush().await.is_err() {
            return false;
        }
        if let (Some(cursor), Some(last)) = (&self.cursor, last) {
            cursor.advance(last);
        }
        if let Some(user) = &self.user
            && !direct.is_empty()
        {
            self.hub.delivered(user, &self.device, &direct);
        }
        true
    }

    async fn send_payload(&mut self, payload: Bytes) -> bool {
        match Utf8Bytes::try_from(payload) {
            Ok(text) => self.ws.send(WsMessage::Text(text)).await.is_ok(),
            Err(_) => true,
        }
    }

    async fn send_text(&mut self, text: String) -> bool {
        self.ws.send(WsMessage::Text(text.into())).await.is_ok()
    }

    async fn send_json(&mut self, value: Value) -> bool {
        self.send_text(value.to_string()).await
    }

    async fn refuse(&mut self, err: &ChatError, reference: Option<&Value>) -> bool {
        self.send_text(wire::error(err, reference)).await
    }

    /// Makes `user` this connection's user: its presence, its inbox from the device's cursor,
    /// its live events. `false` when refused (too many connections).
    async fn identify(&mut self, user: String, reference: Option<&Value>) -> bool {
        if let Err(err) = self.hub.enter(&user, &self.device) {
            self.refuse(&err, reference).await;
            return false;
        }
        let (cursor, new) = self.hub.cursor(&user, &self.device);
        self.cursor = Some(cursor);
        self.known = !new;
        self.user = Some(user.clone());
        match self.hub.broker.messages(SubscribeOptions::new(live(&user))) {
            Ok(live) => self.live = Some(live),
            Err(err) => tracing::warn!(%err, "live events not subscribed"),
        }
        let mut welcome = json!({ "type": "welcome", "user": user, "device": self.device });
        wire::with_ref(&mut welcome, reference);
        self.send_json(welcome).await && self.open_inbox().await
    }

    /// Subscribes to the user's inbox from the device's cursor; says how many messages were
    /// dropped by the inbox bound while the device was away.
    async fn open_inbox(&mut self) -> bool {
        let (Some(user), Some(cursor)) = (&self.user, &self.cursor) else { return true };
        let topic = inbox(user);
        let Ok(parsed) = Topic::parse(&topic) else { return false };
        let read = cursor.offset.load(std::sync::atomic::Ordering::Acquire);
        let bounds = match self.hub.broker.history(&parsed, StartAt::Latest, 0) {
            Ok(page) => Some((page.first_offset, page.next_offset)),
            Err(HistoryError::NotRetained(_)) => None,
            Err(err) => {
                tracing::warn!(%err, "inbox unreadable");
                None
            }
        };
        let (mut start, mut missed) = match bounds {
            None => (StartAt::Earliest, 0),
            // Past the end: the inbox was lost (a store removed); start again from its start.
            Some((first, next)) if read + 1 > next => (StartAt::Offset(first), 0),
            Some((first, _)) if read + 1 < first && self.known => {
                (StartAt::Offset(first), first - read - 1)
            }
            Some((first, _)) => (StartAt::Offset((read + 1).max(first)), 0),
        };
        let subscription = loop {
            let options = SubscribeOptions::new(topic.as_str())
                .start(start)
                .slow_consumer(SlowConsumer::Disconnect);
            match self.hub.broker.messages(options) {
                Ok(subscription) => break subscription,
                Err(SubscribeError::OffsetEvicted { requested, first }) => {
                    missed += first.saturating_sub(requested);
                    start = StartAt::Offset(first);
                }
                Err(err) => {
                    tracing::warn!(%err, "inbox not subscribed");
                    let err =
                        ChatError::new("unavailable", format!("your inbox is unavailable: {err}"));
                    self.refuse(&err, None).await;
                    return false;
                }
            }
        };
        self.inbox = Some(subscription);
        if missed > 0 {
            let notice = json!({
                "type": "notice", "code": "missed", "missed": missed,
                "error": format!("{missed} messages for this device were dropped by the inbox \
                    bound (inbox_max_messages, inbox_max_age) before it came back"),
            });
            return self.send_json(notice).await;
        }
        true
    }

    /// Handles one request; `false` ends the connection.
    async fn request(&mut self, text: &str) -> bool {
        if text.len() > self.hub.config.max_message_bytes {
            let message = format!(
                "a request may have {} bytes (max_message_bytes); this one has {}",
                self.hub.config.max_message_bytes,
                text.len()
            );
            return self.refuse(&ChatError::new("too_large", message), None).await;
        }
        let request = match wire::parse(text) {
            Ok(request) => request,
            Err((err, reference)) => return self.refuse(&err, reference.as_ref()).await,
        };
        let reference = request.reference.clone();
        let user = match (&self.user, &request.from) {
            (Some(user), Some(from)) if from != user => {
                let err = ChatError::new(
                    "spoofed_sender",
                    format!("this connection is {user}: it cannot send as {from}"),
                );
                return self.refuse(&err, reference.as_ref()).await;
            }
            (Some(user), _) => user.clone(),
            (None, Some(from)) if !self.config.auth_required() && valid_name(from) => {
                if !self.identify(from.clone(), reference.as_ref()).await {
                    return false;
                }
                from.clone()
            }
            (None, _) => {
                let err = ChatError::new(
                    "unidentified",
                    "name yourself first: ?id=<name> on the URL, or \"from\" in your first message",
                );
                return self.refuse(&err, reference.as_ref()).await;
            }
        };
        match self.act(&user, request).await {
            Ok(Some(mut reply)) => {
                wire::with_ref(&mut reply, reference.as_ref());
                self.send_json(reply).await
            }
            Ok(None) => true,
            Err(err) => self.refuse(&err, reference.as_ref()).await,
        }
    }

    /// Carries out a request of `user`; the reply to write, if any.
    async fn act(&mut self, user: &str, request: ChatRequest) -> Result<Option<Value>, ChatError> {
        let hub = Arc::clone(&self.hub);
        Ok(Some(match request.action {
            Action::Hello => return Ok(None),
            Action::Send { target, msg } => {
                hub.admit(user)?;
                let (id, time, seq) = hub.send(user, self.id, &target, &msg).await?;
                json!({ "type": "sent", "id": id, "time": time, "seq": seq })
            }
            action @ (Action::Create { .. }
            | Action::Join { .. }
            | Action::Invite { .. }
            | Action::Leave { .. }
            | Action::Remove { .. }
            | Action::Admin { .. }) => {
                hub.change_group(user, &action).await?;
                json!({ "type": "ok" })
            }
            Action::Members { group } => hub.members(user, &group)?,
            Action::Groups => {
                let groups: Vec<Value> = hub
                    .groups()
                    .of(user)
                    .into_iter()
                    .map(|(group, role)| json!({ "group": group, "role": role.name() }))
                    .collect();
                json!({ "type": "groups", "groups": groups })
            }
            Action::Subscribe { topic } => {
                if self.topics.len() >= self.config.max_subscriptions {
                    let message = "too many topics on this connection (max_subscriptions)";
                    return Err(ChatError::new("too_many_topics", message));
                }
                if let std::collections::hash_map::Entry::Vacant(entry) = self.topics.entry(topic) {
                    let subscription = hub
                        .broker
                        .messages(SubscribeOptions::new(broadcast(entry.key())))
                        .map_err(|e| ChatError::new("unavailable", e.to_string()))?;
                    entry.insert(subscription);
                }
                json!({ "type": "ok" })
            }
            Action::Unsubscribe { topic } => {
                self.topics.remove(&topic);
                json!({ "type": "ok" })
            }
            Action::History { with, before, after, limit } => {
                hub.history(user, &with, before.as_ref(), after.as_ref(), limit)?
            }
            Action::Typing { target } => {
                hub.typing(user, &target)?;
                return Ok(None);
            }
            Action::Read { with, upto } => {
                let seq = hub.read(user, self.id, &with, &upto).await?;
                json!({ "type": "ok", "seq": seq })
            }
            Action::Unread => hub.unread(user),
            Action::Who => {
                let users: Vec<Value> = hub.watched(user).iter().map(|u| hub.presence(u)).collect();
                json!({ "type": "presence", "users": users })
            }
        }))
    }

    async fn close(mut self) {
        if let (Some(user), Some(cursor)) = (&self.user, &self.cursor) {
            self.hub.leave(user, &self.device, cursor);
        }
        let _ = self.ws.close(None).await;
    }
}
