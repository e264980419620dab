//! The chat's JSON: requests as clients write them (the seed's
//! `{"from":"client-a","to":"client-b","msg":"Hello from A!"}` among them) parsed into
//! [`Action`]s, and what the server writes back. `CHAT.md` is the reference.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A refusal: a stable code for programs and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChatError {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ChatError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    User(String),
    Group(String),
    Topic(String),
}

/// A position in a conversation's history: its number there, or a message id.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum Position {
    Seq(u64),
    Id(String),
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Action {
    /// Names the connection's user (its first message may do only that).
    Hello,
    Send {
        target: Target,
        msg: Value,
    },
    Create {
        group: String,
        open: bool,
    },
    Join {
        group: String,
    },
    Invite {
        group: String,
        user: String,
    },
    Leave {
        group: String,
    },
    Remove {
        group: String,
        user: String,
    },
    Admin {
        group: String,
        user: String,
    },
    Members {
        group: String,
    },
    Groups,
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    History {
        with: Target,
        before: Option<Position>,
        after: Option<Position>,
        limit: usize,
    },
    Typing {
        target: Target,
    },
    Who,
    /// Read up to a message of a conversation.
    Read {
        with: Target,
        upto: Position,
    },
    Unread,
    /// Publishes this device's public identity (the engines' `PublicIdentity` text).
    PublishKey {
        identity: String,
    },
    /// A user's devices' public identities.
    Keys {
        user: String,
    },
    /// Removes one of this user's devices from the directory (a lost or retired device).
    RevokeKey {
        device: String,
    },
    /// The client has everything of its inbox through position `at` (the `at` of what it
    /// received): on a connection opened with `?ack=1` the device's cursor moves only so.
    Ack {
        at: u64,
    },
}

/// A parsed request: its action, the `from` it claims, and the `ref` to echo.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Request {
    pub(crate) action: Action,
    pub(crate) from: Option<String>,
    pub(crate) reference: Option<Value>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group: Option<String>,
    topic: Option<String>,
    with: Option<String>,
    user: Option<String>,
    msg: Option<Value>,
    open: Option<bool>,
    before: Option<Position>,
    after: Option<Position>,
    limit: Option<usize>,
    seq: Option<u64>,
    id: Option<String>,
    publish: Option<String>,
    revoke: Option<String>,
    at: Option<u64>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
}

/// Most messages one `history` page holds.
pub(crate) const MAX_PAGE: usize = 200;

/// Whether `name` may name a user, a device, a group or a topic: 1 to 64 letters, digits and
/// `-_.@`.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

fn name(field: &str, value: Option<String>) -> Result<String, ChatError> {
    let value =
        value.ok_or_else(|| ChatError::new("malformed", format!("{field:?} is missing")))?;
    if !valid_name(&value) {
        let message = format!("{field:?} must be 1 to 64 letters, digits or -_.@, not {value:?}");
        return Err(ChatError::new("invalid_name", message));
    }
    Ok(value)
}

fn target(raw: &mut Raw, to_field: &str) -> Result<Target, ChatError> {
    let named = [raw.to.is_some(), raw.group.is_some(), raw.topic.is_some()];
    if named.iter().filter(|n| **n).count() != 1 {
        let message = format!("name exactly one of {to_field:?}, \"group\" or \"topic\"");
        return Err(ChatError::new("malformed", message));
    }
    if raw.to.is_some() {
        return Ok(Target::User(name(to_field, raw.to.take())?));
    }
    if raw.group.is_some() {
        return Ok(Target::Group(name("group", raw.group.take())?));
    }
    Ok(Target::Topic(name("topic", raw.topic.take())?))
}

/// Parses one text message. Errors carry the `ref` when it could be read.
pub(crate) fn parse(text: &str) -> Result<Request, (ChatError, Option<Value>)> {
    let mut raw: Raw = serde_json::from_str(text).map_err(|err| {
        let message = format!("not a chat request (a JSON object): {err}");
        (ChatError::new("malformed", message), None)
    })?;
    let reference = raw.reference.take();
    let from = raw.from.take();
    match action(&mut raw, from.is_some()) {
        Ok(action) => Ok(Request { action, from, reference }),
        Err(err) => Err((err, reference)),
    }
}

fn action(raw: &mut Raw, has_from: bool) -> Result<Action, ChatError> {
    let group = |raw: &mut Raw| name("group", raw.group.take());
    let user = |raw: &mut Raw| name("user", raw.user.take());
    let kind = raw.kind.take();
    Ok(match kind.as_deref() {
        None | Some("msg" | "message") => match raw.msg.take() {
            Some(msg) => Action::Send { target: target(raw, "to")?, msg },
            None if kind.is_none() && !has_from => {
                return Err(ChatError::new("malformed", "a message needs \"msg\""));
            }
            None if kind.is_none() => Action::Hello,
            None => return Err(ChatError::new("malformed", "a message needs \"msg\"")),
        },
        Some("hello") => Action::Hello,
        Some("create") => Action::Create { group: group(raw)?, open: raw.open.unwrap_or(false) },
        Some("join") => Action::Join { group: group(raw)? },
        Some("invite") => Action::Invite { group: group(raw)?, user: user(raw)? },
        Some("leave") => Action::Leave { group: group(raw)? },
        Some("remove") => Action::Remove { group: group(raw)?, user: user(raw)? },
        Some("admin") => Action::Admin { group: group(raw)?, user: user(raw)? },
        Some("members") => Action::Members { group: group(raw)? },
        Some("groups") => Action::Groups,
        Some("subscribe") => Action::Subscribe { topic: name("topic", raw.topic.take())? },
        Some("unsubscribe") => Action::Unsubscribe { topic: name("topic", raw.topic.take())? },
        Some("history") => {
            raw.to = raw.to.take().or_else(|| raw.with.take());
            let with = target(raw, "with")?;
            if matches!(with, Target::Topic(_)) {
                return Err(ChatError::new("malformed", "history is of a user or a group"));
            }
            let limit = raw.limit.unwrap_or(50).clamp(1, MAX_PAGE);
            Action::History { with, before: raw.before.take(), after: raw.after.take(), limit }
        }
        Some("typing") => Action::Typing { target: target(raw, "to")? },
        Some("read") => {
            raw.to = raw.to.take().or_else(|| raw.with.take());
            let with = target(raw, "with")?;
            let upto = match (raw.seq.take(), raw.id.take()) {
                (Some(seq), _) => Position::Seq(seq),
                (None, Some(id)) => Position::Id(id),
                (None, None) => {
                    return Err(ChatError::new("malformed", "read needs \"seq\" or \"id\""));
                }
            };
            Action::Read { with, upto }
        }
        Some("unread") => Action::Unread,
        Some("keys") => match raw.publish.take() {
            Some(identity) if identity.len() <= 512 => Action::PublishKey { identity },
            Some(_) => {
                return Err(ChatError::new("malformed", "a public identity is at most 512 bytes"));
            }
            None if raw.revoke.is_some() => {
                Action::RevokeKey { device: name("revoke", raw.revoke.take())? }
            }
            None => Action::Keys { user: user(raw)? },
        },
        Some("who" | "presence") => Action::Who,
        Some("ack") => match raw.at.take() {
            Some(at) => Action::Ack { at },
            None => return Err(ChatError::new("malformed", "ack needs \"at\"")),
        },
        Some(other) => {
            return Err(ChatError::new("unknown_type", format!("no request type {other:?}")));
        }
    })
}

/// A message as every device receives it: the seed's fields first, then whispeer's.
#[derive(Clone, Copy, Serialize)]
pub(crate) struct Delivered<'a> {
    pub(crate) from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) topic: Option<&'a str>,
    pub(crate) msg: &'a Value,
    pub(crate) id: &'a str,
    pub(crate) time: u64,
    /// Its number in its conversation (none for a topic broadcast).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seq: Option<u64>,
}

/// An error for the client.
pub(crate) fn error(err: &ChatError, reference: Option<&Value>) -> String {
    let mut value = json!({ "type": "error", "code": err.code, "error": err.message });
    with_ref(&mut value, reference);
    value.to_string()
}

/// Adds `ref` to a reply object, when the request had one.
pub(crate) fn with_ref(value: &mut Value, reference: Option<&Value>) {
    if let (Some(reference), Some(object)) = (reference, value.as_object_mut()) {
        object.insert("ref".into(), reference.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_message_and_each_request_parse() {
        let seed = parse(r#"{"from":"client-a","to":"client-b","msg":"Hello from A!"}"#).unwrap();
        assert_eq!(seed.from.as_deref(), Some("client-a"));
        assert_eq!(
            seed.action,
            Action::Send { target: Target::User("client-b".into()), msg: json!("Hello from A!") }
        );
        assert_eq!(parse(r#"{"from":"b"}"#).unwrap().action, Action::Hello);
        let history = parse(r#"{"type":"history","with":"bob","before":12,"limit":1000}"#);
        assert_eq!(
            history.unwrap().action,
            Action::History {
                with: Target::User("bob".into()),
                before: Some(Position::Seq(12)),
                after: None,
                limit: MAX_PAGE
            }
        );
        let join = parse(r#"{"type":"join","group":"team","ref":7}"#).unwrap();
        assert_eq!(
            (join.action, join.reference),
            (Action::Join { group: "team".into() }, Some(json!(7)))
        );
    }

    #[test]
    fn bad_requests_are_refused_by_code() {
        let code = |text: &str| parse(text).unwrap_err().0.code;
        assert_eq!(code("not json"), "malformed");
        assert_eq!(code(r#"{"to":"b","group":"g","msg":"x"}"#), "malformed");
        assert_eq!(code(r#"{"to":"a/b","msg":"x"}"#), "invalid_name");
        assert_eq!(code(r#"{"type":"fly"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"history","topic":"news"}"#), "malformed");
        assert_eq!(parse(r#"{"type":"join","ref":"r1"}"#).unwrap_err().1, Some(json!("r1")));
        assert_eq!(code(r#"{"type":"ack"}"#), "malformed");
        assert_eq!(code(r#"{"type":"ack","at":-1}"#), "malformed");
        assert_eq!(parse(r#"{"type":"ack","at":9}"#).unwrap().action, Action::Ack { at: 9 });
    }
}
