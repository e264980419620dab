//! MQTT packets in and out, for both protocol levels: 3.1.1 (level 4) and 5. The bytes are
//! rumqttc's `mqttbytes` codecs (its v4 and v5 modules, which read and write every packet
//! type with a size limit checked before the packet is buffered); this module maps them to one
//! small vocabulary the session speaks, so the session logic is written once.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

mod v5_form;

use self::v5_form::{from_v5, to_v5};

/// The protocol level a client connected with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// MQTT 5 properties carried with a message (none in 3.1.1).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Props {
    pub(crate) user: Vec<(String, String)>,
    pub(crate) expiry_secs: Option<u32>,
    pub(crate) content_type: Option<String>,
    pub(crate) response_topic: Option<String>,
    pub(crate) correlation: Option<Bytes>,
    pub(crate) format: Option<u8>,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) subscription_ids: Vec<usize>,
}

/// A will: published when the connection ends without DISCONNECT.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) props: Props,
    /// MQTT 5: how long after the connection ends it is published, unless the session is
    /// resumed first (seconds).
    pub(crate) delay_secs: u32,
}

/// When a subscription gets the retained messages (MQTT 5's retain handling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetainHandling {
    /// Whenever it is subscribed (0, and 3.1.1).
    Always,
    /// Only when the subscription is new (1).
    IfNew,
    /// Never (2).
    Never,
}

/// One filter of a SUBSCRIBE, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SubFilter {
    pub(crate) path: String,
    pub(crate) qos: u8,
    /// MQTT 5 no local: not the messages this connection publishes.
    pub(crate) no_local: bool,
    /// MQTT 5 retain as published: live messages keep their publisher's retain flag.
    pub(crate) keep_retain: bool,
    pub(crate) retained: RetainHandling,
}

/// What a client sends.
#[derive(Debug, PartialEq)]
pub(crate) enum In {
    Connect {
        version: Version,
        client_id: String,
        clean: bool,
        keep_alive: u16,
        will: Option<Will>,
        username: Option<String>,
        password: Option<String>,
        receive_max: Option<u16>,
        max_packet: Option<u32>,
        /// MQTT 5's session expiry interval, in seconds.
        session_expiry: Option<u32>,
        /// MQTT 5's authentication method (enhanced authentication), if asked for.
        auth_method: Option<String>,
    },
    Publish {
        topic: String,
        qos: u8,
        retain: bool,
        dup: bool,
        pkid: u16,
        payload: Bytes,
        props: Props,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubFilter>,
        id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        with_will: bool,
        /// MQTT 5: the session's new expiry interval, in seconds.
        session_expiry: Option<u32>,
    },
    /// A packet a client may not send (CONNACK, SUBACK, …) or one not supported (AUTH).
    Unexpected(&'static str),
}

/// Why a CONNECT is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadCredentials,
    NotAuthorized,
    Unavailable,
    BadClientId,
    BadAuthMethod,
}

/// How a SUBSCRIBE's filter fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Granted {
    Qos(u8),
    NotAuthorized,
    Invalid,
    Quota,
    Failed,
}

/// How a publish fared, for PUBACK and PUBREC (3.1.1 has no reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    NotAuthorized,
    TopicInvalid,
    Quota,
    Failed,
}

/// Why the server ends the connection (MQTT 5 sends it in DISCONNECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Goodbye {
    Malformed,
    Protocol,
    TooLarge,
    KeepAlive,
    ShuttingDown,
    TakenOver,
    NotAuthorized,
    Unspecified,
}

/// What the server sends.
#[derive(Debug, PartialEq)]
pub(crate) enum Out {
    ConnAck {
        refused: Option<Refusal>,
        present: bool,
        session_expiry: u32,
        max_packet: u32,
        receive_max: u16,
    },
    Publish {
        topic: String,
        qos: u8,
        dup: bool,
        retain: bool,
        pkid: u16,
        payload: Bytes,
        props: Props,
    },
    PubAck {
        pkid: u16,
        outcome: Outcome,
    },
    PubRec {
        pkid: u16,
        outcome: Outcome,
    },
    PubComp(u16),
    SubAck {
        pkid: u16,
        granted: Vec<Granted>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Disconnect(Goodbye),
}

/// Why bytes are not a packet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("packet of {0} bytes over the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet must be CONNECT, of protocol level 4 (3.1.1) or 5")]
    NotConnect,
}

fn qos(level: u8) -> m4::QoS {
    match level {
        0 => m4::QoS::AtMostOnce,
        1 => m4::QoS::AtLeastOnce,
        _ => m4::QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> m5::QoS {
    match level {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

/// The protocol level of the CONNECT at the start of `buf`: `None` until enough bytes came.
///
/// # Errors
/// [`CodecError::NotConnect`] for anything else.
pub(crate) fn connect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect);
    }
    // Remaining length: 1 to 4 bytes; then the protocol name (2 + 4 bytes) and the level.
    let mut at = 1;
    while at < buf.len().min(5) && buf[at] & 0x80 != 0 {
        at += 1;
    }
    if at >= 5 {
        return Err(CodecError::NotConnect);
    }
    let level_at = at + 1 + 6;
    let Some(&level) = buf.get(level_at) else { return Ok(None) };
    if buf.get(at + 1..at + 7) != Some(&[0, 4, b'M', b'Q', b'T', b'T'][..]) {
        return Err(CodecError::NotConnect);
    }
    match level {
        4 => Ok(Some(Version::V4)),
        5 => Ok(Some(Version::V5)),
        _ => Err(CodecError::NotConnect),
    }
}

fn malformed(err: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(err.to_string())
}

/// Takes the next packet off `buf`: `Ok(None)` until a whole one is there. Packets over
/// `max` bytes are refused before they are buffered in full.
///
/// # Errors
/// [`CodecError::TooLarge`], [`CodecError::Malformed`].
pub(crate) fn decode(
    version: Version,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<In>, CodecError> {
    match version {
        Version::V4 => match v4::Packet::read(buf, max) {
            Ok(packet) => Ok(Some(from_v4(packet))),
            Err(m4::Error::InsufficientBytes(_)) => Ok(None),
            Err(m4::Error::PayloadSizeLimitExceeded(size)) => Err(CodecError::TooLarge(size)),
            Err(err) => Err(malformed(err)),
        },
        Version::V5 => match v5::Packet::read(buf, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
            Ok(packet) => Ok(Some(from_v5(packet))),
            Err(m5::Error::InsufficientBytes(_)) => Ok(None),
            Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                Err(CodecError::TooLarge(pkt_size))
            }
            Err(err) => Err(malformed(err)),
        },
    }
}

fn from_v4(packet: v4::Packet) -> In {
    match packet {
        v4::Packet::Connect(c) => In::Connect {
            version: Version::V4,
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
                props: Props::default(),
                delay_secs: 0,
            }),
            username: c.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
            password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
            receive_max: None,
            max_packet: None,
            session_expiry: None,
            auth_method: None,
        },
        v4::Packet::Publish(p) => In::Publish {
            topic: p.topic,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            payload: p.payload,
            props: Props::default(),
        },
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    keep_retain: false,
                    retained: RetainHandling::Always,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe { pkid: u.pkid, filters: u.topics },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect { with_will: false, session_expiry: None },
        _ => In::Unexpected("a packet only a server sends"),
    }
}

fn text(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Appends `packet` to `buf` in `version`'s form; a publish over the client's `max` is
/// skipped (MQTT 5: the server must not send it), as is any packet that fails to encode.
pub(crate) fn encode(version: Version, packet: Out, buf: &mut BytesMut, max: usize) {
    let written = match version {
        Version::V4 => to_v4(packet).map(|p| p.write(buf, max).map(drop).map_err(malformed)),
        Version::V5 => {
            let max = Some(u32::try_from(max).unwrap_or(u32::MAX));
            to_v5(packet).map(|p| p.write(buf, max).map(drop).map_err(malformed))
        }
    };
    if let Some(Err(err)) = written {
        tracing::debug!(%err, "mqtt packet not sent");
    }
}

fn to_v4(packet: Out) -> Option<v4::Packet> {
    Some(match packet {
        Out::ConnAck { refused, present, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
            match refused {
                None => v4::ConnectReturnCode::Success,
                Some(Refusal::BadCredentials) => v4::ConnectReturnCode::BadUserNamePassword,
                Some(Refusal::NotAuthorized) => v4::ConnectReturnCode::NotAuthorized,
                Some(Refusal::Unavailable) => v4::ConnectReturnCode::ServiceUnavailable,
                Some(Refusal::BadClientId) => v4::ConnectReturnCode::BadClientId,
                // 3.1.1 has no enhanced authentication: not a client that would ask for it.
                Some(Refusal::BadAuthMethod) => v4::ConnectReturnCode::NotAuthorized,
            },
            present,
        )),
        Out::Publish { topic, qos: level, dup, retain, pkid, payload, .. } => {
            let mut publish = v4::Publish::from_bytes(topic, qos(level), payload);
            publish.dup = dup;
            publish.retain = retain;
            publish.pkid = pkid;
            v4::Packet::Publish(publish)
        }
        // 3.1.1 has no reason codes: the acknowledgement says only that it was handled.
        Out::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Out::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Out::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Out::SubAck { pkid, granted } => {
            let codes = granted
                .iter()
                .map(|g| match g {
                    Granted::Qos(level) => v4::SubscribeReasonCode::Success(qos(*level)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::Packet::SubAck(v4::SubAck::new(pkid, codes))
        }
        Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Out::PingResp => v4::Packet::PingResp,
        // 3.1.1: the server just closes the connection.
        Out::Disconnect(_) => return None,
    })
}
