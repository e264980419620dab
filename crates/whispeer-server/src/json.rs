//! The JSON form of the protocol, for WebSocket clients without a frame encoder (a browser's
//! `WebSocket`, `websocat`, a Python script).
//!
//! Each text message is one JSON object with an `op`; it is translated into the binary frame it
//! stands for, and every frame the server sends back is translated into one JSON object. The
//! connection code behind it is the same as for binary clients. `PROTOCOL.md` lists every form.
//!
//! Payloads: `"payload": <any JSON value>` publishes that value as JSON content; `"data":
//! "<base64>"` publishes raw bytes. Deliveries carry `"payload"` when the message is unsealed
//! JSON content, and otherwise `"data"` (base64) with the envelope's `"flags"` — a sealed
//! message stays opaque to a client without its keys.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use whispeer_proto::{
    Body, ContentType, Envelope, Filter, Flags, Frame, Limits, MessageId, PROTOCOL_VERSION, Qos,
    StartAt, Topic, header,
};

/// A client's request, as JSON.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Hello {
        #[serde(default)]
        name: String,
    },
    Auth {
        key: String,
        #[serde(default, rename = "ref")]
        reference: u32,
    },
    Subscribe {
        id: u32,
        filter: String,
        #[serde(default)]
        qos: u8,
        #[serde(default)]
        group: Option<String>,
        #[serde(default)]
        prefetch: u32,
        #[serde(default)]
        start: Option<String>,
        #[serde(default, rename = "ref")]
        reference: u32,
    },
    Unsubscribe {
        id: u32,
        #[serde(default, rename = "ref")]
        reference: u32,
    },
    Publish {
        topic: String,
        #[serde(default)]
        payload: Option<Value>,
        #[serde(default)]
        data: Option<String>,
        #[serde(default)]
        qos: u8,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        idempotency_key: Option<String>,
        #[serde(default)]
        retain: bool,
        #[serde(default, rename = "ref")]
        reference: u32,
    },
    Ack {
        id: u32,
        message_id: String,
    },
    Nack {
        id: u32,
        message_id: String,
        #[serde(default)]
        requeue: bool,
    },
    Ping {
        #[serde(default, rename = "ref")]
        reference: u32,
    },
    Pong {
        #[serde(default, rename = "ref")]
        reference: u32,
    },
}

/// Why a JSON request could not become a frame: `Topic` is answered with `INVALID_TOPIC` and
/// the connection goes on; anything else with `MALFORMED` and a close, as for a bad binary
/// frame.
#[derive(Debug, thiserror::Error)]
pub(super) enum JsonError {
    #[error("invalid JSON request: {0}")]
    Syntax(#[from] serde_json::Error),
    /// Refused alone with `INVALID_TOPIC` for the request's `ref` (the first field); the
    /// connection goes on, as for a binary frame naming an invalid topic.
    #[error("invalid topic or filter: {1}")]
    Topic(u32, whispeer_proto::TopicError),
    #[error("publish needs exactly one of \"payload\" (JSON) and \"data\" (base64)")]
    Payload,
    #[error("\"data\" is not valid base64")]
    Base64,
    #[error("qos must be 0 or 1")]
    Qos,
    #[error("message_id must be 32 hex digits")]
    MessageId,
    #[error("start must be latest, earliest, offset:<n> or time:<ms>")]
    Start,
}

/// Ids for messages JSON clients publish: they do not choose their own.
#[derive(Debug)]
pub(super) struct JsonIds {
    prefix: u64,
    next: AtomicU64,
}

impl JsonIds {
    pub(super) fn new() -> Self {
        let mut prefix = [0u8; 8];
        let _ = getrandom::fill(&mut prefix);
        Self { prefix: u64::from_le_bytes(prefix), next: AtomicU64::new(1) }
    }

    fn next(&self) -> MessageId {
        MessageId(
            u128::from(self.prefix) << 64 | u128::from(self.next.fetch_add(1, Ordering::Relaxed)),
        )
    }
}

/// Translates one JSON request into a frame.
pub(super) fn request_to_frame(
    text: &str,
    limits: &Limits,
    ids: &JsonIds,
) -> Result<Frame, JsonError> {
    let request: Request = serde_json::from_str(text)?;
    Ok(match request {
        Request::Hello { name } => {
            Frame::new(1, Body::Hello { version: PROTOCOL_VERSION, capabilities: 0, name })
        }
        Request::Auth { key, reference } => {
            Frame::new(reference, Body::Auth { key: Bytes::from(key.into_bytes()) })
        }
        Request::Subscribe { id, filter, qos, group, prefetch, start, reference } => Frame::new(
            reference,
            Body::Subscribe {
                sub: id,
                qos: qos_from(qos)?,
                filter: Filter::parse_with(&filter, limits)
                    .map_err(|e| JsonError::Topic(reference, e))?,
                prefetch,
                // Empty is none, as in the binary form (found by the `json_request` fuzz target:
                // `"group":""` made a group the binary protocol cannot name).
                group: group.filter(|group| !group.is_empty()),
                start: start.as_deref().map_or(Ok(StartAt::Latest), start_from)?,
            },
        ),
        Request::Unsubscribe { id, reference } => {
            Frame::new(reference, Body::Unsubscribe { sub: id })
        }
        Request::Publish {
            topic,
            payload,
            data,
            qos,
            ttl_ms,
            idempotency_key,
            retain,
            reference,
        } => {
            let (content, bytes) = match (payload, data) {
                (Some(value), None) => {
                    (ContentType::Json, Bytes::from(serde_json::to_vec(&value)?))
                }
                (None, Some(data)) => (
                    ContentType::Raw,
                    Bytes::from(BASE64.decode(data).map_err(|_| JsonError::Base64)?),
                ),
                _ => return Err(JsonError::Payload),
            };
            let qos = qos_from(qos)?;
            let timestamp_ms = whispeer_proto::clock::now_ms();
            let topic =
                Topic::parse_with(&topic, limits).map_err(|e| JsonError::Topic(reference, e))?;
            let mut envelope =
                Envelope::new(ids.next(), topic, timestamp_ms, Flags::with_content(content), bytes);
            if let Some(ttl) = ttl_ms {
                envelope.headers.insert(header::TTL_MS, ttl.to_string());
            }
            if let Some(key) = idempotency_key {
                envelope.headers.insert(header::IDEMPOTENCY_KEY, key);
            }
            if retain {
                envelope.headers.insert(header::RETAIN, "1");
            }
            Frame::new(reference, Body::Publish { qos, envelope })
        }
        Request::Ack { id, message_id } => {
            Frame::new(0, Body::Ack { sub: id, id: message_id_from(&message_id)? })
        }
        Request::Nack { id, message_id, requeue } => {
            Frame::new(0, Body::Nack { sub: id, id: message_id_from(&message_id)?, requeue })
        }
        Request::Ping { reference } => Frame::new(reference, Body::Ping),
        Request::Pong { reference } => Frame::new(reference, Body::Pong),
    })
}

/// `latest`, `earliest`, `offset:<n>` or `time:<ms since the epoch>`.
pub(crate) fn start_from(text: &str) -> Result<StartAt, JsonError> {
    let number = |n: &str| n.parse::<u64>().map_err(|_| JsonError::Start);
    match text.split_once(':') {
        None if text == "latest" => Ok(StartAt::Latest),
        None if text == "earliest" => Ok(StartAt::Earliest),
        Some(("offset", n)) => Ok(StartAt::Offset(number(n)?)),
        Some(("time", n)) => Ok(StartAt::Time(number(n)?)),
        _ => Err(JsonError::Start),
    }
}

fn qos_from(qos: u8) -> Result<Qos, JsonError> {
    Qos::try_from(qos).map_err(|_| JsonError::Qos)
}

fn message_id_from(text: &str) -> Result<MessageId, JsonError> {
    u128::from_str_radix(text, 16).map(MessageId).map_err(|_| JsonError::MessageId)
}

/// Translates one frame the server sends into JSON.
pub(super) fn frame_to_json(frame: &Frame) -> Value {
    let reference = frame.correlation;
    match &frame.body {
        Body::Welcome {
            version,
            capabilities,
            max_frame_bytes,
            max_message_bytes,
            heartbeat_ms,
            name,
        } => json!({
            "op": "welcome",
            "version": version,
            "auth_required": capabilities & 1 != 0,
            "max_frame_bytes": max_frame_bytes,
            "max_message_bytes": max_message_bytes,
            "heartbeat_ms": heartbeat_ms,
            "name": name,
        }),
        Body::Ok => json!({ "op": "ok", "ref": reference }),
        Body::PubAck => json!({ "op": "puback", "ref": reference }),
        Body::Ping => json!({ "op": "ping", "ref": reference }),
        Body::Pong => json!({ "op": "pong", "ref": reference }),
        Body::Error { code, message } => json!({
            "op": "error",
            "ref": reference,
            "code": code.0,
            "message": message,
        }),
        Body::Deliver { sub, attempt, offset, envelope } => {
            let mut message = delivery_to_json(*sub, *attempt, envelope);
            if *offset > 0 {
                message["offset"] = json!(offset);
            }
            message
        }
        // The server sends nothing else; a frame it might add later still reaches the client.
        other => json!({ "op": "unknown", "ref": reference, "frame": format!("{other:?}") }),
    }
}

fn delivery_to_json(sub: u32, attempt: u32, envelope: &Envelope) -> Value {
    let flags = envelope.flags;
    let plain = flags.is_plain();
    let headers: serde_json::Map<String, Value> = envelope
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), Value::String(BASE64.encode(value))))
        .collect();
    let mut message = json!({
        "op": "message",
        "id": sub,
        "topic": envelope.topic.as_str(),
        "message_id": envelope.id.to_string(),
        "timestamp_ms": envelope.timestamp_ms,
        "flags": flags.0,
        "attempt": attempt,
    });
    if !headers.is_empty() {
        message["headers"] = Value::Object(headers);
    }
    if envelope.headers.get(header::RETAINED).is_some() {
        message["retained"] = Value::Bool(true);
    }
    let json_payload = (plain && flags.content() == Some(ContentType::Json))
        .then(|| serde_json::from_slice::<Value>(&envelope.payload).ok())
        .flatten();
    match json_payload {
        Some(value) => message["payload"] = value,
        None => message["data"] = Value::String(BASE64.encode(&envelope.payload)),
    }
    message
}

#[cfg(test)]
mod tests {
    use whispeer_proto::CipherAlgorithm;

    use super::*;

    fn frame(text: &str) -> Frame {
        request_to_frame(text, &Limits::default(), &JsonIds::new()).unwrap()
    }

    #[test]
    fn requests_become_frames() {
        assert!(matches!(frame(r#"{"op":"hello"}"#).body, Body::Hello { version: 1, .. }));
        let sub = frame(r#"{"op":"subscribe","id":3,"filter":"chat/#","ref":9}"#);
        assert_eq!(sub.correlation, 9);
        assert!(
            matches!(sub.body, Body::Subscribe { sub: 3, ref filter, .. } if filter.as_str() == "chat/#")
        );
        let publish =
            frame(r#"{"op":"publish","topic":"chat/a","payload":{"text":"hi"},"qos":1,"ref":4}"#);
        let Body::Publish { qos: Qos::AtLeastOnce, envelope } = publish.body else { panic!() };
        assert_eq!(&envelope.payload[..], br#"{"text":"hi"}"#);
        assert_eq!(envelope.flags.content(), Some(ContentType::Json));
        let replay = frame(r#"{"op":"subscribe","id":5,"filter":"log","start":"offset:42"}"#);
        assert!(matches!(replay.body, Body::Subscribe { start: StartAt::Offset(42), .. }));
        let work = frame(
            r#"{"op":"subscribe","id":4,"filter":"jobs/+","qos":1,"group":"w","prefetch":8}"#,
        );
        assert!(matches!(
            work.body,
            Body::Subscribe { qos: Qos::AtLeastOnce, prefetch: 8, group: Some(ref g), .. } if g == "w"
        ));
        let ungrouped = frame(r#"{"op":"subscribe","id":6,"filter":"jobs/+","group":""}"#);
        assert!(matches!(ungrouped.body, Body::Subscribe { group: None, .. }), "empty is none");
        let once = frame(
            r#"{"op":"publish","topic":"t","payload":1,"qos":1,"ttl_ms":500,"idempotency_key":"k1"}"#,
        );
        let Body::Publish { envelope, .. } = once.body else { panic!() };
        assert_eq!(envelope.headers.ttl_ms(), Some(500));
        assert_eq!(envelope.headers.get(header::IDEMPOTENCY_KEY).map(|k| &k[..]), Some(&b"k1"[..]));
        let nack = frame(r#"{"op":"nack","id":4,"message_id":"ff","requeue":true}"#);
        assert_eq!(nack.body, Body::Nack { sub: 4, id: MessageId(255), requeue: true });
        let raw = frame(r#"{"op":"publish","topic":"t","data":"AAEC"}"#);
        let Body::Publish { envelope, .. } = raw.body else { panic!() };
        assert_eq!(
            (&envelope.payload[..], envelope.flags.content()),
            (&[0u8, 1, 2][..], Some(ContentType::Raw))
        );
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let bad =
            |text: &str| request_to_frame(text, &Limits::default(), &JsonIds::new()).unwrap_err();
        assert!(matches!(bad("not json"), JsonError::Syntax(_)));
        assert!(matches!(bad(r#"{"op":"launch"}"#), JsonError::Syntax(_)));
        assert!(matches!(
            bad(r#"{"op":"subscribe","id":1,"filter":"a/#/b","ref":7}"#),
            JsonError::Topic(7, _)
        ));
        assert!(matches!(bad(r#"{"op":"publish","topic":"t"}"#), JsonError::Payload));
        assert!(matches!(bad(r#"{"op":"publish","topic":"t","data":"%%"}"#), JsonError::Base64));
        assert!(matches!(
            bad(r#"{"op":"publish","topic":"t","payload":1,"qos":2}"#),
            JsonError::Qos
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}", op in "(hello|auth|subscribe|unsubscribe|publish|ack|nack|ping|pong)") {
            let _ = request_to_frame(&text, &Limits::default(), &JsonIds::new());
            let shaped = format!(r#"{{"op":"{op}","id":1,"topic":{text:?},"filter":{text:?},"key":{text:?},"data":{text:?},"message_id":{text:?}}}"#);
            let _ = request_to_frame(&shaped, &Limits::default(), &JsonIds::new());
        }
    }

    #[test]
    fn deliveries_show_json_payloads_and_hide_sealed_ones() {
        let mut envelope = Envelope::new(
            MessageId(1),
            Topic::parse("t").unwrap(),
            5,
            Flags::with_content(ContentType::Json),
            Bytes::from_static(br#"{"a":1}"#),
        );
        let shown = frame_to_json(&Frame::new(
            0,
            Body::Deliver { sub: 2, attempt: 1, offset: 0, envelope: envelope.clone() },
        ));
        assert_eq!(shown["payload"], json!({"a": 1}));
        assert_eq!(shown["id"], 2);
        envelope.flags = envelope.flags.with_cipher(CipherAlgorithm::XChaCha20Poly1305);
        let sealed = frame_to_json(&Frame::new(
            0,
            Body::Deliver { sub: 2, attempt: 1, offset: 0, envelope },
        ));
        assert!(sealed.get("payload").is_none());
        assert_eq!(sealed["data"], BASE64.encode(br#"{"a":1}"#));
    }
}
