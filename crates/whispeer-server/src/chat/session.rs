//! One chat connection, once upgraded: who the user is, then one loop that reads requests and
//! writes the user's inbox (from the device's cursor), its live events, its broadcast topics and
//! the replies (in request order; a send's once the store has it).
//!
//! A `from` naming anyone but the connection's user is refused and nothing is sent.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use whispeer_core::{
    HistoryError, Message, SlowConsumer, StartAt, SubscribeError, SubscribeOptions, Subscription,
    Topic,
};

use super::hub::{Cursor, Hub, broadcast, inbox, live};
use super::messaging::{DIRECT, FROM, GROUP, ID, ORIGIN, Stored};
use super::position::{InboxPosition, with_position};
use super::wire::{self, Action, ChatError, Request as ChatRequest, valid_name};
use crate::ServerConfig;

/// Serves an upgraded connection of `device` (and `user`, when the upgrade named it);
/// `acking`: the client acknowledges what it receives (`?ack=1`).
pub(super) async fn serve<S>(
    ws: WebSocketStream<S>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    (user, device, acking): (Option<String>, String, bool),
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
        position: InboxPosition::new(acking),
        known: false,
        inbox: None,
        live: None,
        topics: HashMap::new(),
        heard: Instant::now(),
        pending: FuturesOrdered::new(),
    };
    // On a cluster, not before this node has read chat's state from the engine.
    if let Some(shared) = &session.hub.shared
        && !shared.ready(std::time::Duration::from_secs(10)).await
    {
        let message = "chat's state is still loading from the cluster: try again";
        let _ = session.refuse(&ChatError::new("unavailable", message), None).await;
        return session.close().await;
    }
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
    /// Where this connection is in the inbox: written, and acknowledged.
    position: InboxPosition,
    /// Whether the device was known before this connection (a new one has missed nothing).
    known: bool,
    inbox: Option<Subscription<Message>>,
    live: Option<Subscription<Message>>,
    topics: HashMap<String, Subscription<Message>>,
    /// When the client was last heard from.
    heard: Instant,
    /// Replies in the order of their requests; a send's waits until the store has it.
    pending: FuturesOrdered<PendingReply>,
}

/// A reply not written yet.
type PendingReply = Pin<Box<dyn Future<Output = String> + Send>>;

/// Requests whose replies may wait at once (sends waiting for the store); past it the
/// connection's requests are not read until replies go out.
const MAX_PENDING: usize = 256;

/// What a request comes to.
enum Outcome {
    /// A reply now, or none.
    Now(Option<Value>),
    /// A reply once the store has the message.
    Stored(Stored, Value),
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
                    // Replies the store is about to settle still go out.
                    let grace = self.config.shutdown_grace;
                    let _ = tokio::time::timeout(grace, async {
                        while let Some(reply) = self.pending.next().await {
                            if !self.send_text(reply).await {
                                break;
                            }
                        }
                    })
                    .await;
                    let _ = self.send_json(json!({"type": "error", "code": "shutting_down",
                        "error": "the server is shutting down"})).await;
                    return;
                }
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    if !self.send_text(reply).await {
                        return;
                    }
                }
                incoming = self.ws.next(), if self.pending.len() < MAX_PENDING => {
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
                    // A request may wait for the cluster's engine (a direct message's seq, up
                    // to the engine's timeout): the client was not silent meanwhile, this
                    // session was not reading.
                    self.heard = Instant::now();
                }
                message = next_of(&mut self.inbox), if self.position.has_room() => {
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

    /// Writes an inbox message (and those queued behind it) unless this session sent it, each
    /// with its position (`"at"`), then moves the device's cursor (or, for a client that
    /// acks, waits for its acknowledgement). A closed inbox (it fell behind its queue) is
    /// opened again after what was written.
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
        let (mut direct, mut grouped, mut written) = (Vec::new(), Vec::new(), Vec::new());
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
            } else if let (Some(group), Some(from), Some(id)) =
                (headers.get(GROUP), headers.get(FROM), headers.get(ID))
                && Some(from.as_ref()) != mine
            {
                let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
                grouped.push((text(group), text(from), text(id)));
            }
            let text = match message.offset() {
                Some(at) => match with_position(message.payload(), at) {
                    Some(text) => {
                        written.push(at);
                        Utf8Bytes::from(text)
                    }
                    None => continue,
                },
                None => match Utf8Bytes::try_from(message.payload().clone()) {
                    Ok(text) => text,
                    Err(_) => continue,
                },
            };
            if self.ws.feed(WsMessage::Text(text)).await.is_err() {
                return false;
            }
        }
        if self.ws.flush().await.is_err() {
            return false;
        }
        if let Some(cursor) = &self.cursor {
            self.position.written(written, last, cursor);
        }
        if let Some(user) = &self.user {
            if !direct.is_empty() {
                self.hub.delivered(user, &self.device, &direct);
            }
            if !grouped.is_empty() {
                self.hub.delivered_group(user, &grouped);
            }
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
        let read = self.position.resume_after(cursor);
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
            self.later(wire::error(&ChatError::new("too_large", message), None));
            return true;
        }
        let request = match wire::parse(text) {
            Ok(request) => request,
            Err((err, reference)) => {
                self.later(wire::error(&err, reference.as_ref()));
                return true;
            }
        };
        let reference = request.reference.clone();
        let user = match (&self.user, &request.from) {
            (Some(user), Some(from)) if from != user => {
                let err = ChatError::new(
                    "spoofed_sender",
                    format!("this connection is {user}: it cannot send as {from}"),
                );
                self.later(wire::error(&err, reference.as_ref()));
                return true;
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
                self.later(wire::error(&err, reference.as_ref()));
                return true;
            }
        };
        match self.act(&user, request).await {
            Ok(Outcome::Now(Some(mut reply))) => {
                wire::with_ref(&mut reply, reference.as_ref());
                self.later(reply.to_string());
            }
            Ok(Outcome::Now(None)) => {}
            Ok(Outcome::Stored(stored, mut reply)) => {
                wire::with_ref(&mut reply, reference.as_ref());
                self.pending.push_back(Box::pin(async move {
                    match stored.settled().await {
                        Ok(()) => reply.to_string(),
                        Err(err) => wire::error(&err, reference.as_ref()),
                    }
                }));
            }
            Err(err) => self.later(wire::error(&err, reference.as_ref())),
        }
        true
    }

    /// A reply to write after those before it.
    fn later(&mut self, text: String) {
        self.pending.push_back(Box::pin(std::future::ready(text)));
    }

    /// Carries out a request of `user`: the reply to write, if any, now or once stored.
    async fn act(&mut self, user: &str, request: ChatRequest) -> Result<Outcome, ChatError> {
        let hub = Arc::clone(&self.hub);
        Ok(Outcome::Now(Some(match request.action {
            Action::Hello => return Ok(Outcome::Now(None)),
            Action::Send { target, msg } => {
                hub.admit(user)?;
                let (id, time, seq, stored) = hub.send(user, self.id, &target, &msg).await?;
                let sent = json!({ "type": "sent", "id": id, "time": time, "seq": seq });
                return Ok(Outcome::Stored(stored, sent));
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
                return Ok(Outcome::Now(None));
            }
            Action::Read { with, upto } => {
                let seq = hub.read(user, self.id, &with, &upto).await?;
                json!({ "type": "ok", "seq": seq })
            }
            Action::Unread => hub.unread(user),
            Action::PublishKey { identity } => {
                hub.publish_key(user, &self.device, &identity).await?;
                json!({ "type": "ok" })
            }
            Action::Keys { user: whose } => hub.keys(&whose).await?,
            Action::RevokeKey { device } => {
                hub.revoke_key(user, &device).await?;
                json!({ "type": "ok" })
            }
            Action::Ack { at } => {
                if let Some(cursor) = &self.cursor {
                    self.position.acked(at, cursor);
                }
                return Ok(Outcome::Now(None));
            }
            Action::Who => {
                let users: Vec<Value> = hub.watched(user).iter().map(|u| hub.presence(u)).collect();
                json!({ "type": "presence", "users": users })
            }
        })))
    }

    async fn close(mut self) {
        if let (Some(user), Some(cursor)) = (&self.user, &self.cursor) {
            self.hub.leave(user, &self.device, cursor);
        }
        let _ = self.ws.close(None).await;
    }
}
