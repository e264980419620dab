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
use std::time::Duration;

use bytes::Bytes;
use whispeer_proto::clock::now_ms;
use whispeer_proto::{
    Body, ContentType, Envelope, ErrorCode, Flags, Frame, Limits, MessageId, PROTOCOL_VERSION, Qos,
    Topic, header,
};

use super::codec::{
    Goodbye, Granted, In, Outcome, Props, Refusal, RetainHandling, SubFilter, Version, Will,
};
use super::sessions::Foreign;
use crate::Principal;
use crate::retained::Retained;

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
mod registry;
mod subscribe;

pub(crate) use registry::Registry;

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
    /// A persistent session's subscription (a queue group of the session's own).
    session: bool,
    /// MQTT 5 no local: the messages this connection published are not sent.
    no_local: bool,
    /// MQTT 5 retain as published: live messages keep their publisher's retain flag.
    keep_retain: bool,
    /// The retained messages given at subscription are not sent (retain handling, or a
    /// subscription resumed rather than made).
    skip_retained: bool,
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
    /// Who the CONNECT's credentials say the client is (with a registry).
    principal: Option<Arc<Principal>>,
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
            principal: None,
        }
    }

    /// The filters of the session's own groups, for ending them when the session is over.
    pub(crate) fn session_filters(&self) -> Vec<String> {
        let session = |sub: &u32| self.sub_info.get(sub).is_some_and(|info| info.session);
        self.subs.iter().filter(|(_, sub)| session(sub)).map(|(text, _)| text.clone()).collect()
    }

    /// A session expiry within the server's bound.
    fn bounded(&self, secs: u32) -> u32 {
        let max = self.registry.as_ref().map_or(u32::MAX, |r| {
            u32::try_from(r.config.mqtt_max_session_expiry.as_secs()).unwrap_or(u32::MAX)
        });
        secs.min(max)
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
        // MQTT 5: after the will delay, or when the session ends if that is sooner.
        let delay = will.delay_secs.min(if self.persistent { self.expiry_secs } else { 0 });
        if delay > 0
            && let (Some(registry), Some(principal)) = (&self.registry, &self.principal)
        {
            let delay = Duration::from_secs(u64::from(delay));
            registry.publish_later(&self.client_id, envelope, delay, Arc::clone(principal));
            return None;
        }
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
            In::Disconnect { with_will, session_expiry } => {
                self.disconnected = !with_will;
                // A new expiry (MQTT 5); a session that had none cannot be given one here.
                if let Some(secs) = session_expiry
                    && (self.persistent || secs == 0)
                {
                    self.expiry_secs = self.bounded(secs);
                    self.persistent = self.expiry_secs > 0;
                    if let Some(r) = &self.registry {
                        let expiry = Duration::from_secs(u64::from(self.expiry_secs));
                        r.sessions.set_expiry(&self.client_id, r.connection, expiry);
                    }
                }
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
            auth_method,
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
        self.expiry_secs = self.bounded(match version {
            Version::V4 if !clean => u32::MAX,
            Version::V4 => 0,
            Version::V5 => session_expiry.unwrap_or(0),
        });
        self.persistent = self.expiry_secs > 0;
        let name = format!("mqtt:{}", self.client_id);
        let mut frames =
            vec![Frame::new(1, Body::Hello { version: PROTOCOL_VERSION, capabilities: 0, name })];
        if let Some(method) = auth_method {
            // Enhanced authentication (AUTH exchanges): no method is offered.
            tracing::debug!(client = %self.client_id, method, "mqtt authentication method refused");
            self.stage = Stage::Connecting { auth_sent: true };
            frames.push(self.ask(Pending::Refuse(Refusal::BadAuthMethod), Body::Ping));
            return Ok(frames);
        }
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
        let expiry =
            Duration::from_secs(if self.persistent { u64::from(self.expiry_secs) } else { 0 });
        // The credentials first: a client that cannot log in takes no session over (the
        // connection's AUTH refuses it), and a client id is bound to its principal.
        let principal = self.registry.as_ref().and_then(|r| r.principal(password.as_deref()));
        let mut resumed = None;
        if let (Some(r), Some(who)) = (&self.registry, &principal) {
            let tokens = (r.stop.clone(), r.taken.clone());
            match r.sessions.attach(&self.client_id, &who.name, r.connection, tokens, clean, expiry)
            {
                Ok(attached) => {
                    let ended = attached.discarded.into_iter().map(|s| s.filter).collect();
                    r.end_groups(&self.client_id, ended);
                    resumed = attached.resumed;
                }
                Err(Foreign) => {
                    tracing::debug!(client = %self.client_id, "mqtt client id of another principal");
                    self.stage = Stage::Connecting { auth_sent: true };
                    frames.push(self.ask(Pending::Refuse(Refusal::NotAuthorized), Body::Ping));
                    return Ok(frames);
                }
            }
        }
        self.principal = principal;
        let auth_sent = password.is_some();
        if let Some(key) = password {
            frames.push(self.ask(Pending::Auth, Body::Auth { key: Bytes::from(key) }));
        }
        self.stage = Stage::Connecting { auth_sent };
        self.present = resumed.is_some();
        for stored in resumed.unwrap_or_default() {
            let options = SubFilter {
                path: stored.filter,
                qos: stored.qos,
                no_local: stored.no_local,
                keep_retain: stored.keep_retain,
                // Resumed, not subscribed: MQTT gives retained messages on SUBSCRIBE only.
                retained: RetainHandling::Never,
            };
            frames.extend(self.session_subscribe(&options, stored.id, None));
        }
        Ok(frames)
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
}
