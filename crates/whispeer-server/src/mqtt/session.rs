//! One MQTT connection's translation to and from the native protocol, without I/O: each MQTT
//! packet becomes the frames it stands for (CONNECT → HELLO and AUTH, SUBSCRIBE → one
//! SUBSCRIBE per filter, PUBLISH → PUBLISH, PUBACK → ACK), and each frame the connection sends
//! back becomes MQTT packets (OK / ERROR / PUBACK by correlation id → CONNACK, SUBACK, PUBACK,
//! PUBREC; DELIVER → PUBLISH with a packet id). What MQTT answers that the native protocol does
//! not (PINGRESP, PUBCOMP, a SUBACK entry for an invalid filter) rides on a native PING, so
//! every answer leaves in the order its request came. The connection behind it — auth, ACLs,
//! limits, queues, QoS 1 credit and redelivery, metrics — is the native one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use whispeer_proto::{
    Body, ContentType, Envelope, ErrorCode, Filter, Flags, Frame, Limits, MessageId,
    PROTOCOL_VERSION, Qos, StartAt, Topic, header,
};

use super::codec::{Goodbye, Granted, In, Outcome, Props, Refusal, Version, Will};
use super::sessions::{MqttSessions, StoredSub};

/// Topic aliases a client may set (MQTT 5), each at most one topic.
pub(crate) const TOPIC_ALIASES: u16 = 64;

/// The queue group of a persistent session's subscriptions: `mqtt-session:<client id>`.
const SESSION_GROUP: &str = crate::retained::ONE_CLIENT_GROUP;
/// The longest group name the broker takes.
const MAX_GROUP_NAME: usize = 255;

/// Headers that carry MQTT 5 properties through the broker.
const CONTENT_TYPE: &str = "content-type";
const RESPONSE_TOPIC: &str = header::RESPONSE_TOPIC;
const CORRELATION: &str = header::CORRELATION_DATA;
const PAYLOAD_FORMAT: &str = "payload-format";

mod outbound;

/// What a correlation id's reply answers.
enum Pending {
    Auth,
    Subscribe {
        pkid: u16,
        index: usize,
        granted: u8,
        sub: u32,
    },
    SubscribeInvalid {
        pkid: u16,
        index: usize,
    },
    Unsubscribe {
        pkid: u16,
    },
    Publish {
        pkid: u16,
        exactly_once: bool,
    },
    PublishInvalid {
        pkid: u16,
        exactly_once: bool,
    },
    Release {
        pkid: u16,
    },
    PingReq,
    Ignore,
    /// A CONNECT refused once the connection said hello.
    Refuse(Refusal),
}

struct SubAckBuild {
    granted: Vec<Option<Granted>>,
}

struct SubInfo {
    qos: u8,
    id: Option<usize>,
    /// A QoS 0 subscription of a persistent session: the native subscription is QoS 1 (a
    /// lingering group), acknowledged here as each message goes out.
    acks_itself: bool,
}

/// The server's session registry, as this connection sees it.
pub(crate) struct Registry {
    pub(crate) sessions: Arc<MqttSessions>,
    pub(crate) connection: u64,
    pub(crate) stop: CancellationToken,
    /// Cancelled when another connection took the session over.
    pub(crate) taken: CancellationToken,
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    AwaitConnect,
    Connecting {
        auth_sent: bool,
    },
    Connected,
    /// Refused or told to go: nothing more is read.
    Closing,
}

/// One connection's state.
pub(crate) struct Session {
    pub(crate) version: Version,
    pub(crate) stage: Stage,
    pub(crate) keep_alive: u16,
    limits: Limits,
    client_id: String,
    will: Option<Will>,
    /// Set by DISCONNECT: the connection ends cleanly, and the will is dropped (unless asked).
    pub(crate) disconnected: bool,
    client_max_packet: usize,
    receive_max: Option<u16>,
    next_correlation: u32,
    pending: HashMap<u32, Pending>,
    subacks: HashMap<u16, SubAckBuild>,
    unsubacks: HashMap<u16, (usize, usize)>,
    subs: HashMap<String, u32>,
    sub_info: HashMap<u32, SubInfo>,
    next_sub: u32,
    /// QoS 2 packet ids received and not yet released: a resend is not published again.
    exactly_once: HashSet<u16>,
    /// QoS 1 deliveries awaiting PUBACK: packet id → (subscription, message).
    outgoing: HashMap<u16, (u32, MessageId)>,
    next_pkid: u16,
    id_prefix: u64,
    next_id: u64,
    /// Frames for the connection's reader that no MQTT packet asked for (PONG to its PING).
    pub(crate) inject: VecDeque<Frame>,
    pub(crate) registry: Option<Registry>,
    /// The client's topic aliases (MQTT 5).
    aliases: HashMap<u16, String>,
    /// Whether the session outlives the connection.
    persistent: bool,
    /// Whether a stored session was resumed (CONNACK's session present).
    present: bool,
    expiry_secs: u32,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `$share/<group>/<filter>` → the group and the filter.
fn shared(filter: &str) -> (Option<String>, &str) {
    match filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')) {
        Some((group, filter)) if !group.is_empty() => (Some(group.to_string()), filter),
        _ => (None, filter),
    }
}

fn outcome_of(code: ErrorCode) -> Outcome {
    match code {
        ErrorCode::FORBIDDEN | ErrorCode::UNAUTHENTICATED => Outcome::NotAuthorized,
        ErrorCode::INVALID_TOPIC => Outcome::TopicInvalid,
        ErrorCode::QUEUE_FULL | ErrorCode::LIMIT_REACHED | ErrorCode::TOO_LARGE => Outcome::Quota,
        _ => Outcome::Failed,
    }
}

fn goodbye_of(code: ErrorCode) -> Goodbye {
    match code {
        ErrorCode::MALFORMED => Goodbye::Malformed,
        ErrorCode::TOO_LARGE => Goodbye::TooLarge,
        ErrorCode::IDLE_TIMEOUT => Goodbye::KeepAlive,
        ErrorCode::SHUTTING_DOWN => Goodbye::ShuttingDown,
        ErrorCode::FORBIDDEN | ErrorCode::UNAUTHENTICATED => Goodbye::NotAuthorized,
        ErrorCode::PROTOCOL_VIOLATION => Goodbye::Protocol,
        _ => Goodbye::Unspecified,
    }
}

impl Session {
    pub(crate) fn new(limits: Limits) -> Self {
        let mut prefix = [0u8; 8];
        let _ = getrandom::fill(&mut prefix);
        Self {
            version: Version::V4,
            stage: Stage::AwaitConnect,
            keep_alive: 0,
            client_max_packet: limits.max_frame_bytes,
            limits,
            client_id: String::new(),
            will: None,
            disconnected: false,
            receive_max: None,
            next_correlation: 2,
            pending: HashMap::new(),
            subacks: HashMap::new(),
            unsubacks: HashMap::new(),
            subs: HashMap::new(),
            sub_info: HashMap::new(),
            next_sub: 1,
            exactly_once: HashSet::new(),
            outgoing: HashMap::new(),
            next_pkid: 1,
            id_prefix: u64::from_le_bytes(prefix),
            next_id: 1,
            inject: VecDeque::new(),
            registry: None,
            aliases: HashMap::new(),
            persistent: false,
            present: false,
            expiry_secs: 0,
        }
    }

    /// A PUBLISH's topic through MQTT 5 topic aliases (1 to `TOPIC_ALIASES`, as CONNACK
    /// says): a topic with an alias sets it, an empty topic uses it.
    fn resolve_alias(&mut self, topic: String, alias: Option<u16>) -> Result<String, Goodbye> {
        let Some(alias) = alias else { return Ok(topic) };
        if alias == 0 || alias > TOPIC_ALIASES {
            return Err(Goodbye::Protocol);
        }
        if topic.is_empty() {
            return self.aliases.get(&alias).cloned().ok_or(Goodbye::Protocol);
        }
        self.aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    /// The client id, once CONNECT came.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The largest packet a client may send.
    pub(crate) fn max_packet(&self) -> usize {
        self.limits.max_frame_bytes
    }

    /// The largest packet the client accepts.
    pub(crate) fn client_max_packet(&self) -> usize {
        self.client_max_packet
    }

    fn ask(&mut self, pending: Pending, body: Body) -> Frame {
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1).max(2);
        self.pending.insert(correlation, pending);
        Frame::new(correlation, body)
    }

    fn envelope(&mut self, topic: Topic, payload: Bytes, props: Props) -> Envelope {
        let id = MessageId(u128::from(self.id_prefix) << 64 | u128::from(self.next_id));
        self.next_id += 1;
        let mut envelope =
            Envelope::new(id, topic, now_ms(), Flags::with_content(ContentType::Raw), payload);
        let headers = &mut envelope.headers;
        for (name, value) in props.user {
            headers.insert(name, value);
        }
        if let Some(secs) = props.expiry_secs {
            headers.insert(header::TTL_MS, (u64::from(secs) * 1000).to_string());
        }
        if let Some(kind) = props.content_type {
            headers.insert(CONTENT_TYPE, kind);
        }
        if let Some(topic) = props.response_topic {
            headers.insert(RESPONSE_TOPIC, topic);
        }
        if let Some(data) = props.correlation {
            headers.insert(CORRELATION, data);
        }
        if let Some(format) = props.format {
            headers.insert(PAYLOAD_FORMAT, format.to_string());
        }
        envelope
    }

    /// The will as a publish, when the connection ends without DISCONNECT.
    pub(crate) fn will_frame(&mut self) -> Option<Frame> {
        if self.disconnected || self.stage != Stage::Connected {
            return None;
        }
        let will = self.will.take()?;
        let topic = Topic::parse_with(&will.topic, &self.limits).ok()?;
        let mut envelope = self.envelope(topic, will.payload, will.props);
        if will.retain {
            envelope.headers.insert(header::RETAIN, "1");
        }
        let qos = if will.qos == 0 { Qos::AtMostOnce } else { Qos::AtLeastOnce };
        Some(Frame::new(1, Body::Publish { qos, envelope }))
    }

    /// The frames an MQTT packet from the client stands for.
    ///
    /// # Errors
    /// Why the connection must end: a packet out of place or not allowed.
    pub(crate) fn inbound(&mut self, packet: In) -> Result<Vec<Frame>, Goodbye> {
        if let In::Connect { .. } = packet {
            return self.connect(packet);
        }
        if self.stage == Stage::AwaitConnect {
            return Err(Goodbye::Protocol);
        }
        Ok(match packet {
            In::Publish { topic, qos, retain, pkid, payload, props, .. } => {
                let topic = self.resolve_alias(topic, props.topic_alias)?;
                self.publish(&topic, qos, retain, pkid, payload, props)
            }
            In::PubAck(pkid) => match self.outgoing.remove(&pkid) {
                Some((sub, id)) => vec![Frame::new(0, Body::Ack { sub, id })],
                None => Vec::new(),
            },
            // Deliveries go out at QoS 0 or 1: nothing to complete for these.
            In::PubRec(_) | In::PubComp(_) => Vec::new(),
            In::PubRel(pkid) => {
                self.exactly_once.remove(&pkid);
                vec![self.ask(Pending::Release { pkid }, Body::Ping)]
            }
            In::Subscribe { pkid, filters, id } => self.subscribe(pkid, &filters, id),
            In::Unsubscribe { pkid, filters } => {
                self.unsubacks.insert(pkid, (filters.len(), 0));
                let mut frames = Vec::new();
                for filter in filters {
                    if let Some(r) = &self.registry {
                        r.sessions.unsubscribed(&self.client_id, r.connection, &filter);
                    }
                    let body = match self.subs.remove(&filter) {
                        Some(sub) => {
                            self.sub_info.remove(&sub);
                            Body::Unsubscribe { sub }
                        }
                        None => Body::Ping,
                    };
                    frames.push(self.ask(Pending::Unsubscribe { pkid }, body));
                }
                frames
            }
            In::PingReq => vec![self.ask(Pending::PingReq, Body::Ping)],
            In::Disconnect { with_will } => {
                self.disconnected = !with_will;
                Vec::new()
            }
            In::Connect { .. } | In::Unexpected(_) => return Err(Goodbye::Protocol),
        })
    }

    fn connect(&mut self, packet: In) -> Result<Vec<Frame>, Goodbye> {
        let In::Connect {
            version,
            client_id,
            clean,
            keep_alive,
            will,
            password,
            receive_max,
            max_packet,
            session_expiry,
            ..
        } = packet
        else {
            return Err(Goodbye::Protocol);
        };
        if self.stage != Stage::AwaitConnect {
            return Err(Goodbye::Protocol);
        }
        self.version = version;
        self.keep_alive = keep_alive;
        self.client_id = client_id;
        self.will = will;
        self.receive_max = receive_max;
        if let Some(max) = max_packet {
            self.client_max_packet = max as usize;
        }
        // 3.1.1: a session outlives its connection without clean session; 5: with an expiry.
        self.expiry_secs = match version {
            Version::V4 if !clean => u32::MAX,
            Version::V4 => 0,
            Version::V5 => session_expiry.unwrap_or(0),
        };
        self.persistent = self.expiry_secs > 0;
        let name = format!("mqtt:{}", self.client_id);
        let mut frames =
            vec![Frame::new(1, Body::Hello { version: PROTOCOL_VERSION, capabilities: 0, name })];
        if self.client_id.is_empty() {
            if self.persistent && version == Version::V4 {
                // 3.1.1: a persistent session needs a client id to find it again.
                self.stage = Stage::Connecting { auth_sent: true };
                frames.push(self.ask(Pending::Refuse(Refusal::BadClientId), Body::Ping));
                return Ok(frames);
            }
            self.client_id = format!("auto-{:016x}", self.id_prefix ^ self.next_id);
            self.persistent = false;
        }
        if SESSION_GROUP.len() + self.client_id.len() > MAX_GROUP_NAME {
            self.persistent = false;
        }
        let auth_sent = password.is_some();
        if let Some(key) = password {
            frames.push(self.ask(Pending::Auth, Body::Auth { key: Bytes::from(key) }));
        }
        self.stage = Stage::Connecting { auth_sent };
        let expiry =
            Duration::from_secs(if self.persistent { u64::from(self.expiry_secs) } else { 0 });
        let resumed = self.registry.as_ref().and_then(|r| {
            let tokens = (r.stop.clone(), r.taken.clone());
            r.sessions.attach(&self.client_id, r.connection, tokens, clean, expiry)
        });
        self.present = resumed.is_some();
        for stored in resumed.unwrap_or_default() {
            frames.extend(self.session_subscribe(&stored.filter, stored.qos, stored.id, None));
        }
        Ok(frames)
    }

    /// A persistent session's subscription: a native QoS 1 queue group of the session's own,
    /// remembered by the registry. With `pkid`, the SUBACK entry it answers.
    fn session_subscribe(
        &mut self,
        text: &str,
        qos: u8,
        id: Option<usize>,
        answer: Option<(u16, usize)>,
    ) -> Vec<Frame> {
        let granted = qos.min(1);
        if let Some(&sub) = self.subs.get(text) {
            // Resumed already: kept (its queue holds what came while away), its QoS updated.
            if let Some(info) = self.sub_info.get_mut(&sub) {
                info.qos = granted;
                info.acks_itself = granted == 0;
            }
            self.remember(text, granted, id);
            return match answer {
                Some((pkid, index)) => {
                    vec![self.ask(Pending::Subscribe { pkid, index, granted, sub }, Body::Ping)]
                }
                None => Vec::new(),
            };
        }
        let Ok(filter) = Filter::parse_with(text, &self.limits) else {
            return match answer {
                Some((pkid, index)) => {
                    vec![self.ask(Pending::SubscribeInvalid { pkid, index }, Body::Ping)]
                }
                None => Vec::new(),
            };
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        self.subs.insert(text.to_string(), sub);
        self.sub_info.insert(sub, SubInfo { qos: granted, id, acks_itself: granted == 0 });
        self.remember(text, granted, id);
        let body = Body::Subscribe {
            sub,
            qos: Qos::AtLeastOnce,
            filter,
            prefetch: self.receive_max.map_or(0, u32::from),
            group: Some(format!("{SESSION_GROUP}{}", self.client_id)),
            start: StartAt::Latest,
        };
        let pending = match answer {
            Some((pkid, index)) => Pending::Subscribe { pkid, index, granted, sub },
            None => Pending::Ignore,
        };
        vec![self.ask(pending, body)]
    }

    fn remember(&self, filter: &str, qos: u8, id: Option<usize>) {
        if let Some(r) = &self.registry {
            let stored = StoredSub { filter: filter.to_string(), qos, id };
            r.sessions.subscribed(&self.client_id, r.connection, stored);
        }
    }

    fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload: Bytes,
        props: Props,
    ) -> Vec<Frame> {
        let exactly_once = qos == 2;
        if exactly_once && !self.exactly_once.insert(pkid) {
            // A resend before PUBREL: received already, answer again without publishing.
            return vec![self.ask(Pending::Publish { pkid, exactly_once: true }, Body::Ping)];
        }
        let Ok(topic) = Topic::parse_with(topic, &self.limits) else {
            if qos == 0 {
                tracing::debug!(client = %self.client_id, topic, "mqtt publish to an invalid topic dropped");
                return Vec::new();
            }
            if exactly_once {
                self.exactly_once.remove(&pkid);
            }
            return vec![self.ask(Pending::PublishInvalid { pkid, exactly_once }, Body::Ping)];
        };
        let mut envelope = self.envelope(topic, payload, props);
        if retain {
            envelope.headers.insert(header::RETAIN, "1");
        }
        if qos == 0 {
            return vec![Frame::new(0, Body::Publish { qos: Qos::AtMostOnce, envelope })];
        }
        let body = Body::Publish { qos: Qos::AtLeastOnce, envelope };
        vec![self.ask(Pending::Publish { pkid, exactly_once }, body)]
    }

    fn subscribe(&mut self, pkid: u16, filters: &[(String, u8)], id: Option<usize>) -> Vec<Frame> {
        self.subacks.insert(pkid, SubAckBuild { granted: vec![None; filters.len()] });
        let mut frames = Vec::new();
        for (index, (text, qos)) in filters.iter().enumerate() {
            let (group, filter) = shared(text);
            if self.persistent && group.is_none() {
                frames.extend(self.session_subscribe(text, *qos, id, Some((pkid, index))));
                continue;
            }
            let Ok(filter) = Filter::parse_with(filter, &self.limits) else {
                frames.push(self.ask(Pending::SubscribeInvalid { pkid, index }, Body::Ping));
                continue;
            };
            // A filter subscribed again replaces the subscription it had.
            if let Some(old) = self.subs.remove(text) {
                self.sub_info.remove(&old);
                frames.push(self.ask(Pending::Ignore, Body::Unsubscribe { sub: old }));
            }
            let sub = self.next_sub;
            self.next_sub += 1;
            let granted = (*qos).min(1);
            self.subs.insert(text.clone(), sub);
            self.sub_info.insert(sub, SubInfo { qos: granted, id, acks_itself: false });
            let body = Body::Subscribe {
                sub,
                qos: if granted == 0 { Qos::AtMostOnce } else { Qos::AtLeastOnce },
                filter,
                prefetch: self.receive_max.map_or(0, u32::from),
                group,
                start: StartAt::Latest,
            };
            frames.push(self.ask(Pending::Subscribe { pkid, index, granted, sub }, body));
        }
        frames
    }
}
