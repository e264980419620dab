//! The session's side facing the client: the frames the connection writes, as MQTT packets —
//! answers matched to their requests by correlation id, CONNACK, deliveries with packet ids.

use whispeer_proto::{Body, Envelope, Frame, header};

use super::super::codec::{Goodbye, Granted, Out, Outcome, Props, Refusal};
use super::{
    CONTENT_TYPE, CORRELATION, PAYLOAD_FORMAT, Pending, RESPONSE_TOPIC, Retained, Session, Stage,
    goodbye_of, outcome_of,
};

impl Session {
    fn resolve_subscribe(&mut self, pkid: u16, index: usize, granted: Granted) -> Vec<Out> {
        let Some(build) = self.subacks.get_mut(&pkid) else { return Vec::new() };
        if let Some(slot) = build.granted.get_mut(index) {
            *slot = Some(granted);
        }
        if build.granted.iter().any(Option::is_none) {
            return Vec::new();
        }
        let Some(build) = self.subacks.remove(&pkid) else { return Vec::new() };
        let granted = build.granted.into_iter().map(|g| g.unwrap_or(Granted::Failed)).collect();
        vec![Out::SubAck { pkid, granted }]
    }

    fn resolve_unsubscribe(&mut self, pkid: u16) -> Vec<Out> {
        let Some((count, done)) = self.unsubacks.get_mut(&pkid) else { return Vec::new() };
        *done += 1;
        if done < count {
            return Vec::new();
        }
        let count = *count;
        self.unsubacks.remove(&pkid);
        vec![Out::UnsubAck { pkid, count }]
    }

    fn publish_answer(&mut self, pkid: u16, exactly_once: bool, outcome: Outcome) -> Vec<Out> {
        if exactly_once {
            if outcome != Outcome::Success {
                self.exactly_once.remove(&pkid);
            }
            vec![Out::PubRec { pkid, outcome }]
        } else {
            vec![Out::PubAck { pkid, outcome }]
        }
    }

    /// The MQTT packets a frame from the connection stands for.
    pub(crate) fn outbound(&mut self, frame: Frame) -> Vec<Out> {
        let correlation = frame.correlation;
        match frame.body {
            Body::Welcome { capabilities, .. } => match self.stage {
                Stage::Connecting { auth_sent: false } if capabilities & 1 != 0 => {
                    self.refuse(Refusal::NotAuthorized)
                }
                Stage::Connecting { auth_sent: false } => self.accept(),
                _ => Vec::new(),
            },
            Body::Ok | Body::PubAck | Body::Pong => {
                let Some(pending) = self.pending.remove(&correlation) else { return Vec::new() };
                match pending {
                    Pending::Auth => self.accept(),
                    Pending::Subscribe { pkid, index, granted, .. } => {
                        self.resolve_subscribe(pkid, index, Granted::Qos(granted))
                    }
                    Pending::SubscribeInvalid { pkid, index } => {
                        self.resolve_subscribe(pkid, index, Granted::Invalid)
                    }
                    Pending::Unsubscribe { pkid } => self.resolve_unsubscribe(pkid),
                    Pending::Publish { pkid, exactly_once } => {
                        self.publish_answer(pkid, exactly_once, Outcome::Success)
                    }
                    Pending::PublishInvalid { pkid, exactly_once } => {
                        self.publish_answer(pkid, exactly_once, Outcome::TopicInvalid)
                    }
                    Pending::Release { pkid } => vec![Out::PubComp(pkid)],
                    Pending::PingReq => vec![Out::PingResp],
                    Pending::Ignore => Vec::new(),
                    Pending::Refuse(why) => self.refuse(why),
                }
            }
            Body::Error { code, message } => {
                let Some(pending) = self.pending.remove(&correlation) else {
                    tracing::debug!(client = %self.client_id, %code, message, "mqtt connection ends");
                    return self.goodbye(goodbye_of(code));
                };
                match pending {
                    Pending::Auth => self.refuse(Refusal::BadCredentials),
                    Pending::Subscribe { pkid, index, sub, .. } => {
                        // The subscription was not made: forget its id.
                        self.sub_info.remove(&sub);
                        self.subs.retain(|_, s| *s != sub);
                        let granted = match outcome_of(code) {
                            Outcome::NotAuthorized => Granted::NotAuthorized,
                            Outcome::TopicInvalid => Granted::Invalid,
                            Outcome::Quota => Granted::Quota,
                            _ => Granted::Failed,
                        };
                        self.resolve_subscribe(pkid, index, granted)
                    }
                    Pending::SubscribeInvalid { pkid, index } => {
                        self.resolve_subscribe(pkid, index, Granted::Invalid)
                    }
                    Pending::Unsubscribe { pkid } => self.resolve_unsubscribe(pkid),
                    Pending::Publish { pkid, exactly_once }
                    | Pending::PublishInvalid { pkid, exactly_once } => {
                        tracing::debug!(client = %self.client_id, %code, message, "mqtt publish refused");
                        self.publish_answer(pkid, exactly_once, outcome_of(code))
                    }
                    Pending::Release { pkid } => vec![Out::PubComp(pkid)],
                    Pending::PingReq => vec![Out::PingResp],
                    Pending::Ignore => Vec::new(),
                    Pending::Refuse(why) => self.refuse(why),
                }
            }
            Body::Ping => {
                // The server's probe of an idle connection: answered here, MQTT has no such thing.
                self.inject.push_back(Frame::new(correlation, Body::Pong));
                Vec::new()
            }
            Body::Deliver { sub, attempt, envelope, .. } => self.deliver(sub, attempt, envelope),
            _ => Vec::new(),
        }
    }

    fn accept(&mut self) -> Vec<Out> {
        self.stage = Stage::Connected;
        vec![Out::ConnAck {
            refused: None,
            present: self.present,
            session_expiry: if self.persistent { self.expiry_secs } else { 0 },
            max_packet: u32::try_from(self.limits.max_frame_bytes).unwrap_or(u32::MAX),
            receive_max: u16::MAX,
        }]
    }

    fn refuse(&mut self, why: Refusal) -> Vec<Out> {
        self.stage = Stage::Closing;
        let (present, session_expiry, max_packet, receive_max) = (false, 0, 0, 0);
        vec![Out::ConnAck { refused: Some(why), present, session_expiry, max_packet, receive_max }]
    }

    fn goodbye(&mut self, why: Goodbye) -> Vec<Out> {
        // Closed because another connection took the client id: MQTT 5 says so (0x8E).
        let taken = self.registry.as_ref().is_some_and(|r| r.taken.is_cancelled());
        let why = if taken { Goodbye::TakenOver } else { why };
        let stage = std::mem::replace(&mut self.stage, Stage::Closing);
        match stage {
            Stage::Connected => vec![Out::Disconnect(why)],
            Stage::Connecting { .. } => {
                let refused = match why {
                    Goodbye::NotAuthorized => Refusal::NotAuthorized,
                    _ => Refusal::Unavailable,
                };
                self.refuse(refused)
            }
            _ => Vec::new(),
        }
    }

    fn next_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.outgoing.contains_key(&pkid) {
                return Some(pkid);
            }
        }
        None
    }

    fn deliver(&mut self, sub: u32, attempt: u32, envelope: Envelope) -> Vec<Out> {
        let Some(info) = self.sub_info.get(&sub) else { return Vec::new() };
        let (qos, subscription_id, acks_itself) = (info.qos, info.id, info.acks_itself);
        // Given at subscription (not tracked: nothing to acknowledge), or live.
        let given = envelope.headers.get(header::RETAINED).is_some();
        // MQTT 5 no local: this connection's own publishes carry its id prefix.
        let own = info.no_local && (envelope.id.0 >> 64) as u64 == self.id_prefix;
        let skip = own || (given && info.skip_retained);
        if acks_itself || (skip && qos == 1 && !given) {
            // Out at QoS 0, or not out at all: settled here.
            self.inject.push_back(Frame::new(0, Body::Ack { sub, id: envelope.id }));
        }
        if skip {
            return Vec::new();
        }
        let retain = given || (info.keep_retain && Retained::wanted(&envelope));
        let mut props = Props::default();
        for (name, value) in envelope.headers.iter() {
            let text = || String::from_utf8_lossy(value).into_owned();
            match name {
                header::TTL_MS => {
                    props.expiry_secs =
                        text().parse::<u64>().ok().map(|ms| ms.div_ceil(1000) as u32);
                }
                CONTENT_TYPE => props.content_type = Some(text()),
                RESPONSE_TOPIC => props.response_topic = Some(text()),
                CORRELATION => props.correlation = Some(value.clone()),
                PAYLOAD_FORMAT => props.format = text().parse().ok(),
                header::IDEMPOTENCY_KEY | header::RETAIN | header::RETAINED => {}
                _ => props.user.push((name.to_string(), text())),
            }
        }
        props.subscription_ids.extend(subscription_id);
        let topic = envelope.topic.as_str().to_string();
        let payload = envelope.payload;
        if qos == 0 {
            let (dup, pkid) = (false, 0);
            return vec![Out::Publish { topic, qos: 0, dup, retain, pkid, payload, props }];
        }
        let Some(pkid) = self.next_pkid() else {
            // 65,535 unacknowledged: the credit window keeps this from happening.
            return Vec::new();
        };
        self.outgoing.insert(pkid, (sub, envelope.id));
        vec![Out::Publish { topic, qos: 1, dup: attempt > 1, retain, pkid, payload, props }]
    }
}
