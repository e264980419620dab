//! What a chat connection receives: messages, events and presence, from the server's JSON.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};

/// A chat message as received, or as read from history.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    /// Its id: 32 hex digits that sort by time.
    pub id: String,
    /// Its sender.
    pub from: String,
    /// The user it was sent to (a direct message).
    pub to: Option<String>,
    /// The group it was sent to.
    pub group: Option<String>,
    /// The topic it was broadcast on.
    pub topic: Option<String>,
    /// What was sent.
    pub msg: Value,
    /// When the server took it, in milliseconds since the epoch.
    pub time: u64,
    /// Its number in its conversation (none for a topic broadcast).
    pub seq: Option<u64>,
    /// Whether it came sealed end to end: then `msg` is what it opened to (or, with
    /// `unreadable`, the sealed form).
    #[serde(default)]
    pub sealed: bool,
    /// Why a sealed message does not open on this device: sent before this device had the
    /// group's key, after this user left, altered, or moved to another conversation.
    #[serde(default)]
    pub unreadable: Option<String>,
}

/// What the server tells a connection without being asked.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ChatEvent {
    /// A message: direct, group or topic.
    Message(ChatMessage),
    /// A group changed: `event` is `created`, `joined`, `invited`, `left`, `removed` or `admin`.
    Group {
        /// The group.
        group: String,
        /// What happened.
        event: String,
        /// To whom.
        user: String,
        /// Who did it.
        by: String,
    },
    /// A contact or group member came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Whether it is online now.
        online: bool,
        /// When it was last seen, when offline.
        last_seen: Option<u64>,
    },
    /// Someone is typing to this user (or in `group`).
    Typing {
        /// Who.
        from: String,
        /// Where, for a group.
        group: Option<String>,
    },
    /// A receipt: `status` is `delivered` (to `by`'s `device`; `id` is the message's; for a
    /// group message, once to `members` members — every one but the sender — with `group` set
    /// and `by` empty) or `read` (`by` read the conversation up to `seq`; `with` or `group`
    /// names it for this user's own reads on another device).
    Receipt {
        /// `delivered` or `read`.
        status: String,
        /// Who received or read.
        by: String,
        /// The message delivered.
        id: Option<String>,
        /// The device it was delivered to.
        device: Option<String>,
        /// How far `by` read.
        seq: Option<u64>,
        /// The direct conversation, for this user's own reads.
        with: Option<String>,
        /// The group: of a group message delivered, or of this user's own reads.
        group: Option<String>,
        /// A group message delivered: to how many members (all but its sender).
        members: Option<u64>,
    },
    /// A group's key, sealed to this device by a member, learned: messages sealed with it open.
    GroupKey {
        /// The group.
        group: String,
        /// The key's epoch.
        epoch: u32,
        /// Who made it.
        from: String,
    },
    /// A message signed by a key other than the one seen before for its sender's device: not
    /// opened. Compare fingerprints with the sender, then `Chat::trust`.
    KeyChanged {
        /// The change.
        change: whispeer_engines::KeyChange,
        /// The message, still sealed.
        message: ChatMessage,
    },
    /// A contact's (or this user's) devices changed: a device published a new key or was
    /// revoked. The SDK fetches that user's keys again before sealing to it.
    KeysChanged {
        /// Whose.
        user: String,
    },
    /// Messages for this device that the inbox bound dropped while it was away.
    Missed(u64),
    /// Anything else the server said (an error without a request, say).
    Other(Value),
}

pub(super) fn event_of(value: Value) -> ChatEvent {
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
    match value.get("type").and_then(Value::as_str) {
        None if value.get("msg").is_some() => match serde_json::from_value(value.clone()) {
            Ok(message) => ChatEvent::Message(message),
            Err(_) => ChatEvent::Other(value),
        },
        Some("group") => ChatEvent::Group {
            group: text("group").unwrap_or_default(),
            event: text("event").unwrap_or_default(),
            user: text("user").unwrap_or_default(),
            by: text("by").unwrap_or_default(),
        },
        Some("presence") => ChatEvent::Presence {
            user: text("user").unwrap_or_default(),
            online: text("status").as_deref() == Some("online"),
            last_seen: value.get("last_seen").and_then(Value::as_u64),
        },
        Some("receipt") => ChatEvent::Receipt {
            status: text("status").unwrap_or_default(),
            by: text("by").unwrap_or_default(),
            id: text("id"),
            device: text("device"),
            seq: value.get("seq").and_then(Value::as_u64),
            with: text("with"),
            group: text("group"),
            members: value.get("members").and_then(Value::as_u64),
        },
        Some("typing") => {
            ChatEvent::Typing { from: text("from").unwrap_or_default(), group: text("group") }
        }
        Some("keys") if value.get("ref").is_none() => {
            ChatEvent::KeysChanged { user: text("user").unwrap_or_default() }
        }
        Some("notice") if text("code").as_deref() == Some("missed") => {
            ChatEvent::Missed(value.get("missed").and_then(Value::as_u64).unwrap_or(0))
        }
        _ => ChatEvent::Other(value),
    }
}

/// A user's presence, as `who` and `members` give it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Presence {
    /// Who.
    pub user: String,
    /// Whether a device of it is connected.
    pub online: bool,
    /// Its connected devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// When it was last seen, once it has been.
    pub last_seen: Option<u64>,
    /// Its role, in a group's member list.
    pub role: Option<String>,
}

/// The events of a chat connection, in order; ends when the connection does.
#[derive(Debug)]
pub struct ChatEvents {
    events: mpsc::Receiver<(ChatEvent, Option<u64>)>,
    taken: Arc<Taken>,
}

/// How far into its inbox the application took events: the connection task acknowledges it.
#[derive(Debug, Default)]
pub(super) struct Taken {
    pub(super) at: AtomicU64,
    pub(super) moved: Notify,
    /// The connection's task found the events queue full and waits for the application to
    /// take from it: no reply behind the events is read meanwhile.
    pub(super) full: Notify,
    /// The application asked to close ([`ChatEvents::close`]).
    pub(super) closing: Notify,
    /// The connection's task ended (set by [`Ended`]).
    ended: watch::Sender<bool>,
}

/// Held by the connection's task: says it ended when dropped, however it ends.
pub(super) struct Ended(pub(super) Arc<Taken>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.send_replace(true);
    }
}

impl ChatEvents {
    pub(super) fn new(events: mpsc::Receiver<(ChatEvent, Option<u64>)>, taken: Arc<Taken>) -> Self {
        Self { events, taken }
    }

    /// Acknowledges everything taken from the events, closes the connection, and returns once
    /// the server answered the close (after it read the acknowledgement) or the connection
    /// died. A program that ends after reading its events gets none of them again on the
    /// device's next connection; what it did not take comes again.
    ///
    /// Dropping the events and every [`Chat`](super::Chat) clone closes the connection too,
    /// in the background: a program that exits at once may end before the last
    /// acknowledgement (at most 50 ms old) is sent. Requests still awaited on a `Chat` clone
    /// fail with [`ChatError::Closed`](super::ChatError::Closed).
    pub async fn close(self) {
        let Self { events, taken } = self;
        // The task may wait to queue an event: dropped, that send fails at once.
        drop(events);
        let mut ended = taken.ended.subscribe();
        taken.closing.notify_one();
        let _ = ended.wait_for(|ended| *ended).await;
    }
}

impl Stream for ChatEvents {
    type Item = ChatEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChatEvent>> {
        let item = self.events.poll_recv(cx);
        if let Poll::Ready(Some((_, Some(at)))) = &item {
            self.taken.at.fetch_max(*at, Ordering::AcqRel);
            self.taken.moved.notify_one();
        }
        item.map(|item| item.map(|(event, _)| event))
    }
}
