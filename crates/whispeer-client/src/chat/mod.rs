//! Chat for people from Rust: a client of the server's chat listener (`whispeer serve
//! --chat-listen`, `CHAT.md`), which speaks one JSON object per WebSocket text message.
//!
//! ```no_run
//! # async fn run() -> Result<(), whispeer_client::ChatError> {
//! use futures_util::StreamExt;
//! use whispeer_client::{Chat, ChatEvent, ChatOptions};
//! let (chat, mut events) = Chat::connect(ChatOptions::new("ws://127.0.0.1:3030/ws").user("alice")).await?;
//! chat.send_to("bob", "hi").await?;
//! while let Some(event) = events.next().await {
//!     if let ChatEvent::Message(message) = event {
//!         println!("{}: {}", message.from, message.msg);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! One task owns the socket: requests carry a `ref` and wait for the reply with that `ref`;
//! everything else (messages, group events, presence, typing, notices) comes out of
//! [`ChatEvents`] in order. The events queue holds 1 024; while it is full the task stops
//! reading the socket (the server keeps the rest), so read the events: a request's reply
//! behind them waits too. `connect` itself does not wait so: a device back to more in its
//! inbox than the queue holds gets its connection, and its key's publication is confirmed
//! beside (a refusal is logged).
//!
//! The connection acknowledges its inbox (`?ack=1`): what the application took from
//! [`ChatEvents`] is acknowledged to the server, and the device's cursor moves only so. A
//! message the program never took — the connection died, or the program did — comes again on
//! the device's next connection (with the same `id`). A program that ends after reading calls
//! [`ChatEvents::close`], which returns once the last acknowledgement reached the server.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod e2e;
mod events;

use e2e::{E2e, KeySource};
pub use events::{ChatEvent, ChatEvents, ChatMessage, Presence};
use events::{Ended, Taken, event_of};
pub use whispeer_engines::KeyChange;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    url: String,
    user: Option<String>,
    device: Option<String>,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    keys: KeySource,
}

impl ChatOptions {
    /// The chat listener's URL, e.g. `ws://127.0.0.1:3030/ws` (`wss://` for TLS).
    pub fn new(url: impl Into<String>) -> Self {
        let keys = KeySource::default();
        Self { url: url.into(), user: None, device: None, token: None, tls: None, keys }
    }

    /// The user to be, on a server without keys (with keys, the token's principal).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// This device's name (default `default`); each device has its own place in the inbox.
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    /// An API key or JWT, on a server that requires one.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// TLS settings for `wss://` (the platform's roots without them).
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    fn url_with_query(&self) -> String {
        let mut query = vec!["ack=1".to_string()];
        for (key, value) in [("id", &self.user), ("device", &self.device), ("token", &self.token)] {
            if let Some(value) = value {
                query.push(format!("{key}={}", encode(value)));
            }
        }
        let joiner = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{joiner}{}", self.url, query.join("&"))
    }
}

/// `%xx` for everything but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Why a chat call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The server refused the request: its code (`not_member`, `rate_limited`, …) and why.
    #[error("{code}: {message}")]
    Refused {
        /// The stable code.
        code: String,
        /// The server's sentence.
        message: String,
    },
    /// The connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection ended.
    #[error("the chat connection is closed")]
    Closed,
    /// End-to-end keys: a directory entry that does not verify, a user without keys, a box that
    /// does not open, an identity file that cannot be read.
    #[error("end-to-end keys: {0}")]
    Keys(String),
    /// A contact's key changed and the change is not trusted yet: nothing was sent. Compare the
    /// fingerprints with them, then [`Chat::trust`].
    #[error("{} changed key(s) of {}: compare fingerprints, then trust", .0.len(), .0.first().map_or("", |c| c.user.as_str()))]
    KeyChanged(Vec<KeyChange>),
}

/// Whom a conversation is with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conversation {
    /// A direct conversation with this user.
    User(String),
    /// A group's.
    Group(String),
}

impl Conversation {
    fn key(&self) -> (&'static str, &str) {
        match self {
            Self::User(user) => ("to", user),
            Self::Group(group) => ("group", group),
        }
    }
}

type Reply = oneshot::Sender<Result<Value, ChatError>>;

/// A chat connection; cheap to clone. It closes once every clone and its [`ChatEvents`] are
/// dropped.
#[derive(Clone, Debug)]
pub struct Chat {
    requests: mpsc::Sender<(Value, Option<Reply>)>,
    user: String,
    device: String,
    e2e: Option<Arc<E2e>>,
}

impl Chat {
    /// Connects and waits for the server's welcome.
    ///
    /// # Errors
    /// [`ChatError::Connect`] when the socket or the upgrade fails (a wrong token is refused
    /// there); [`ChatError::Refused`] when the server refuses the user.
    pub async fn connect(options: ChatOptions) -> Result<(Self, ChatEvents), ChatError> {
        let url = options.url_with_query();
        let mut ws = crate::transport::websocket_text(&url, options.tls.as_ref())
            .await
            .map_err(|e| ChatError::Connect(e.to_string()))?;
        let welcome = loop {
            let Some(message) = ws.next().await else { return Err(ChatError::Closed) };
            let message = message.map_err(|e| ChatError::Connect(e.to_string()))?;
            if let WsMessage::Text(text) = message {
                let value: Value =
                    serde_json::from_str(&text).map_err(|e| ChatError::Connect(e.to_string()))?;
                break value;
            }
        };
        if welcome["type"] == "error" {
            return Err(refusal(&welcome));
        }
        let user = welcome["user"].as_str().unwrap_or_default().to_string();
        let device = welcome["device"].as_str().unwrap_or_default().to_string();
        let e2e = match E2e::open(&options.keys, &user, &device) {
            Ok(e2e) => e2e.map(Arc::new),
            Err(err) => {
                let _ = ws.close(None).await;
                return Err(err);
            }
        };
        let (requests, commands) = mpsc::channel(256);
        let (events, receiver) = mpsc::channel(1024);
        let taken = Arc::new(Taken::default());
        tokio::spawn(run(ws, commands, (events, Arc::clone(&taken)), e2e.clone()));
        let chat = Self { requests, user, device, e2e };
        if chat.e2e.is_some() {
            chat.publish_identity_at_connect(&taken.full).await?;
        }
        Ok((chat, ChatEvents::new(receiver, taken)))
    }

    /// The user this connection is.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// This connection's device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Sends a request and waits for its reply.
    ///
    /// # Errors
    /// The server's refusal, or [`ChatError::Closed`].
    pub async fn request(&self, request: Value) -> Result<Value, ChatError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((request, Some(reply))).await.map_err(|_| ChatError::Closed)?;
        answer.await.map_err(|_| ChatError::Closed)?
    }

    async fn fire(&self, request: Value) -> Result<(), ChatError> {
        self.requests.send((request, None)).await.map_err(|_| ChatError::Closed)
    }

    async fn send(&self, to: Conversation, msg: Value) -> Result<ChatMessage, ChatError> {
        let (key, name) = to.key();
        let sent = self.request(json!({ key: name, "msg": msg.clone() })).await?;
        let (to, group) = match to {
            Conversation::User(user) => (Some(user), None),
            Conversation::Group(group) => (None, Some(group)),
        };
        Ok(ChatMessage {
            id: sent["id"].as_str().unwrap_or_default().to_string(),
            from: self.user.clone(),
            to,
            group,
            topic: None,
            msg,
            time: sent["time"].as_u64().unwrap_or_default(),
            seq: sent["seq"].as_u64(),
            sealed: false,
            unreadable: None,
        })
    }

    /// Broadcasts `msg` on `topic` to the connections subscribed to it now.
    ///
    /// # Errors
    /// As [`send_to`](Self::send_to).
    pub async fn broadcast(&self, topic: &str, msg: impl Into<Value>) -> Result<(), ChatError> {
        self.request(json!({ "topic": topic, "msg": msg.into() })).await.map(drop)
    }

    /// A group request: `create` (with `open`), `join`, `invite`, `leave`, `remove`, `admin`.
    async fn group(
        &self,
        kind: &str,
        group: &str,
        user: Option<&str>,
        open: bool,
    ) -> Result<(), ChatError> {
        let mut request = json!({ "type": kind, "group": group });
        if let Some(user) = user {
            request["user"] = user.into();
        }
        if open {
            request["open"] = true.into();
        }
        self.request(request).await.map(drop)
    }

    /// Creates a group owned by this user; `open` lets anyone join, else members are invited.
    ///
    /// # Errors
    /// `group_exists`, `too_many_groups`, or [`ChatError::Closed`].
    pub async fn create_group(&self, group: &str, open: bool) -> Result<(), ChatError> {
        self.group("create", group, None, open).await
    }

    /// Joins an open group, or accepts an invitation.
    ///
    /// # Errors
    /// `invite_only`, `group_full`, `no_such_group`, …
    pub async fn join(&self, group: &str) -> Result<(), ChatError> {
        self.group("join", group, None, false).await
    }

    /// Invites `user` to `group`.
    ///
    /// # Errors
    /// `forbidden`, `not_member`, …
    pub async fn invite(&self, group: &str, user: &str) -> Result<(), ChatError> {
        self.group("invite", group, Some(user), false).await
    }

    /// Leaves `group`.
    ///
    /// # Errors
    /// `not_member`, …
    pub async fn leave(&self, group: &str) -> Result<(), ChatError> {
        self.group("leave", group, None, false).await?;
        self.group_changed(group);
        Ok(())
    }

    /// Removes `user` from `group` (owner and admins); the next sealed message to the group
    /// goes under a new key that `user`'s devices do not get.
    ///
    /// # Errors
    /// `forbidden`, `not_member`, …
    pub async fn remove(&self, group: &str, user: &str) -> Result<(), ChatError> {
        self.group("remove", group, Some(user), false).await?;
        self.group_changed(group);
        Ok(())
    }

    /// `group`'s members, their roles and presence.
    ///
    /// # Errors
    /// `not_member`, `no_such_group`, …
    pub async fn members(&self, group: &str) -> Result<Vec<Presence>, ChatError> {
        let reply = self.request(json!({ "type": "members", "group": group })).await?;
        Ok(serde_json::from_value(reply["members"].clone()).unwrap_or_default())
    }

    /// The presence of this user's contacts and group members.
    ///
    /// # Errors
    /// [`ChatError::Closed`].
    pub async fn who(&self) -> Result<Vec<Presence>, ChatError> {
        let reply = self.request(json!({ "type": "who" })).await?;
        Ok(serde_json::from_value(reply["users"].clone()).unwrap_or_default())
    }

    /// A page of history, oldest first: the latest `limit` (1–200) entries, or those before
    /// `before` (a `seq`); the messages among them (a group's log also holds its events and
    /// keys), sealed ones opened.
    ///
    /// # Errors
    /// `not_member`, or [`ChatError::Closed`].
    pub async fn history(
        &self,
        with: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        let (key, name) = with.key();
        let key = if key == "to" { "with" } else { key };
        let mut request = json!({ "type": "history", key: name, "limit": limit });
        if let Some(before) = before {
            request["before"] = before.into();
        }
        let reply = self.request(request).await?;
        let entries = reply["messages"].as_array().cloned().unwrap_or_default();
        // Group events share the log; this gives the messages.
        let messages = entries.into_iter().filter_map(|entry| serde_json::from_value(entry).ok());
        Ok(match &self.e2e {
            Some(e2e) => e2e.open_history(messages.collect()),
            None => messages.collect(),
        })
    }

    /// Marks `with` read up to `seq` (the other side of a direct conversation, and this user's
    /// other devices, get a `read` receipt).
    ///
    /// # Errors
    /// `not_member`, `no_such_message`, or [`ChatError::Closed`].
    pub async fn read(&self, with: &Conversation, seq: u64) -> Result<(), ChatError> {
        let (key, name) = with.key();
        self.request(json!({ "type": "read", key: name, "seq": seq })).await.map(drop)
    }

    /// Unread messages per conversation: `(conversation, unread, last seq)`.
    ///
    /// # Errors
    /// [`ChatError::Closed`].
    pub async fn unread(&self) -> Result<Vec<(Conversation, u64, u64)>, ChatError> {
        let reply = self.request(json!({ "type": "unread" })).await?;
        let list = reply["conversations"].as_array().cloned().unwrap_or_default();
        Ok(list
            .iter()
            .filter_map(|c| {
                let conversation = match (c["with"].as_str(), c["group"].as_str()) {
                    (Some(user), _) => Conversation::User(user.into()),
                    (None, Some(group)) => Conversation::Group(group.into()),
                    _ => return None,
                };
                Some((conversation, c["unread"].as_u64()?, c["last"].as_u64()?))
            })
            .collect())
    }

    /// Tells `to` this user is typing (not stored, not acknowledged).
    ///
    /// # Errors
    /// [`ChatError::Closed`].
    pub async fn typing(&self, to: &Conversation) -> Result<(), ChatError> {
        let (key, name) = to.key();
        self.fire(json!({ "type": "typing", key: name })).await
    }

    /// Receives the broadcasts of `topic` on this connection.
    ///
    /// # Errors
    /// `too_many_topics`, or [`ChatError::Closed`].
    pub async fn subscribe(&self, topic: &str) -> Result<(), ChatError> {
        self.request(json!({ "type": "subscribe", "topic": topic })).await.map(drop)
    }
}

fn refusal(value: &Value) -> ChatError {
    ChatError::Refused {
        code: value["code"].as_str().unwrap_or("error").to_string(),
        message: value["error"].as_str().unwrap_or_default().to_string(),
    }
}

/// How long what the application took waits before it is acknowledged (with what it takes
/// meanwhile): one acknowledgement a batch, not one a message.
const ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Resolves when `sleep` is set and over; never without one.
async fn due(sleep: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match sleep {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// The connection task: writes requests with a `ref`, routes replies by it, everything else
/// to the events (with its inbox position), and acknowledges what the application took.
async fn run(
    mut ws: crate::transport::TextSocket,
    mut requests: mpsc::Receiver<(Value, Option<Reply>)>,
    (events, taken): (mpsc::Sender<(ChatEvent, Option<u64>)>, Arc<Taken>),
    e2e: Option<Arc<E2e>>,
) {
    let _ended = Ended(Arc::clone(&taken));
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_ref = 1u64;
    let mut acknowledged = 0u64;
    // One acknowledgement per `ACK_EVERY` at most, for everything taken by then.
    let mut ack_due: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // The connection lives while a `Chat` handle or the events stream does.
    let mut handles = true;
    loop {
        tokio::select! {
            request = requests.recv(), if handles => {
                let Some((mut request, reply)) = request else {
                    handles = false;
                    if events.is_closed() {
                        break;
                    }
                    continue;
                };
                if let Some(reply) = reply {
                    request["ref"] = next_ref.into();
                    pending.insert(next_ref, reply);
                    next_ref += 1;
                }
                if ws.send(WsMessage::Text(request.to_string().into())).await.is_err() {
                    break;
                }
            }
            () = events.closed(), if !handles => break,
            () = taken.closing.notified() => break,
            () = taken.moved.notified(), if ack_due.is_none() => {
                ack_due = Some(Box::pin(tokio::time::sleep(ACK_EVERY)));
            }
            () = due(&mut ack_due) => {
                ack_due = None;
                let at = taken.at.load(Ordering::Acquire);
                if at > acknowledged {
                    acknowledged = at;
                    let ack = json!({ "type": "ack", "at": at }).to_string();
                    if ws.send(WsMessage::Text(ack.into())).await.is_err() {
                        break;
                    }
                }
            }
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(WsMessage::Text(text))) => text,
                    Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                let Ok(value) = serde_json::from_str::<Value>(&text) else { continue };
                if let Some(reply) = value.get("ref").and_then(Value::as_u64).and_then(|r| pending.remove(&r)) {
                    let answer = if value["type"] == "error" { Err(refusal(&value)) } else { Ok(value) };
                    let _ = reply.send(answer);
                    continue;
                }
                // A full queue holds the socket up (back-pressure); a dropped stream discards.
                let at = value.get("at").and_then(Value::as_u64);
                let event = match &e2e {
                    Some(e2e) => e2e.process(event_of(value)),
                    None => event_of(value),
                };
                let sent = match events.try_send((event, at)) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        taken.full.notify_one();
                        events.send(event).await.map_err(drop)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                };
                if sent.is_err() && !handles {
                    break;
                }
            }
        }
    }
    for (_, reply) in pending {
        let _ = reply.send(Err(ChatError::Closed));
    }
    // What the application took last, before the connection goes.
    let at = taken.at.load(Ordering::Acquire);
    if at > acknowledged {
        let _ =
            ws.send(WsMessage::Text(json!({ "type": "ack", "at": at }).to_string().into())).await;
    }
    // The server answers the close once it read everything before it (the acknowledgement
    // included); the socket is let go only then.
    if ws.close(None).await.is_ok() {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(message)) = ws.next().await {
                if matches!(message, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// How long a closing connection waits for the server to answer its close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
