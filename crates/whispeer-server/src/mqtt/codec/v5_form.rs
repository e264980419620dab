//! MQTT 5's packets mapped to and from the session's vocabulary.

use rumqttc::v5::mqttbytes::v5;

use super::{
    Goodbye, Granted, In, Out, Outcome, Props, Refusal, RetainHandling, SubFilter, Version, Will,
    qos5, text,
};

pub(super) fn from_v5(packet: v5::Packet) -> In {
    match packet {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties;
            In::Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                will: will.map(|w| Will {
                    topic: text(&w.topic),
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay_secs: w.properties.as_ref().and_then(|p| p.delay_interval).unwrap_or(0),
                    props: w.properties.map_or_else(Props::default, |p| Props {
                        user: p.user_properties,
                        expiry_secs: p.message_expiry_interval,
                        content_type: p.content_type,
                        response_topic: p.response_topic,
                        correlation: p.correlation_data,
                        format: p.payload_format_indicator,
                        ..Props::default()
                    }),
                }),
                username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                receive_max: props.as_ref().and_then(|p| p.receive_maximum),
                max_packet: props.as_ref().and_then(|p| p.max_packet_size),
                session_expiry: props.as_ref().and_then(|p| p.session_expiry_interval),
                auth_method: props.and_then(|p| p.authentication_method),
            }
        }
        v5::Packet::Publish(p) => In::Publish {
            topic: text(&p.topic),
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            payload: p.payload,
            props: p.properties.map_or_else(Props::default, |props| Props {
                user: props.user_properties,
                expiry_secs: props.message_expiry_interval,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation: props.correlation_data,
                format: props.payload_format_indicator,
                topic_alias: props.topic_alias,
                subscription_ids: Vec::new(),
            }),
        },
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(a.pkid),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    keep_retain: f.preserve_retain,
                    retained: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => RetainHandling::Always,
                        v5::RetainForwardRule::OnNewSubscribe => RetainHandling::IfNew,
                        v5::RetainForwardRule::Never => RetainHandling::Never,
                    },
                })
                .collect(),
            id: s.properties.and_then(|p| p.id),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe { pkid: u.pkid, filters: u.filters },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => In::Unexpected("AUTH (enhanced authentication is not supported)"),
        _ => In::Unexpected("a packet only a server sends"),
    }
}

fn props5(props: Props) -> Option<v5::PublishProperties> {
    let empty = props == Props::default();
    (!empty).then(|| v5::PublishProperties {
        payload_format_indicator: props.format,
        message_expiry_interval: props.expiry_secs,
        topic_alias: None,
        response_topic: props.response_topic,
        correlation_data: props.correlation,
        user_properties: props.user,
        subscription_identifiers: props.subscription_ids,
        content_type: props.content_type,
    })
}

fn outcome5(outcome: Outcome) -> v5::PubAckReason {
    match outcome {
        Outcome::Success => v5::PubAckReason::Success,
        Outcome::NotAuthorized => v5::PubAckReason::NotAuthorized,
        Outcome::TopicInvalid => v5::PubAckReason::TopicNameInvalid,
        Outcome::Quota => v5::PubAckReason::QuotaExceeded,
        Outcome::Failed => v5::PubAckReason::UnspecifiedError,
    }
}

fn rec5(outcome: Outcome) -> v5::PubRecReason {
    match outcome {
        Outcome::Success => v5::PubRecReason::Success,
        Outcome::NotAuthorized => v5::PubRecReason::NotAuthorized,
        Outcome::TopicInvalid => v5::PubRecReason::TopicNameInvalid,
        Outcome::Quota => v5::PubRecReason::QuotaExceeded,
        Outcome::Failed => v5::PubRecReason::UnspecifiedError,
    }
}

pub(super) fn to_v5(packet: Out) -> Option<v5::Packet> {
    Some(match packet {
        Out::ConnAck { refused, present, session_expiry, max_packet, receive_max } => {
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: present,
                code: match refused {
                    None => v5::ConnectReturnCode::Success,
                    Some(Refusal::BadCredentials) => v5::ConnectReturnCode::BadUserNamePassword,
                    Some(Refusal::NotAuthorized) => v5::ConnectReturnCode::NotAuthorized,
                    Some(Refusal::Unavailable) => v5::ConnectReturnCode::ServerUnavailable,
                    Some(Refusal::BadClientId) => v5::ConnectReturnCode::ClientIdentifierNotValid,
                    Some(Refusal::BadAuthMethod) => v5::ConnectReturnCode::BadAuthenticationMethod,
                },
                properties: refused.is_none().then(|| v5::ConnAckProperties {
                    session_expiry_interval: Some(session_expiry),
                    receive_max: Some(receive_max),
                    max_qos: None,
                    retain_available: Some(1),
                    max_packet_size: Some(max_packet),
                    assigned_client_identifier: None,
                    topic_alias_max: Some(super::super::session::TOPIC_ALIASES),
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(1),
                    shared_subscription_available: Some(1),
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            })
        }
        Out::Publish { topic, qos: level, dup, retain, pkid, payload, props } => {
            let mut publish = v5::Publish::new(topic, qos5(level), payload, props5(props));
            publish.dup = dup;
            publish.retain = retain;
            publish.pkid = pkid;
            v5::Packet::Publish(publish)
        }
        Out::PubAck { pkid, outcome } => {
            v5::Packet::PubAck(v5::PubAck { pkid, reason: outcome5(outcome), properties: None })
        }
        Out::PubRec { pkid, outcome } => {
            v5::Packet::PubRec(v5::PubRec { pkid, reason: rec5(outcome), properties: None })
        }
        Out::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp {
            pkid,
            reason: v5::PubCompReason::Success,
            properties: None,
        }),
        Out::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Granted::Qos(level) => v5::SubscribeReasonCode::Success(qos5(*level)),
                    Granted::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    Granted::Invalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Granted::Quota => v5::SubscribeReasonCode::QuotaExceeded,
                    Granted::Failed => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Disconnect(goodbye) => {
            use v5::DisconnectReasonCode as Code;
            let (reason_code, why) = match goodbye {
                Goodbye::Malformed => (Code::MalformedPacket, "a malformed packet"),
                Goodbye::Protocol => (Code::ProtocolError, "a packet out of place"),
                Goodbye::TooLarge => (Code::PacketTooLarge, "a packet over the size limit"),
                Goodbye::KeepAlive => (Code::KeepAliveTimeout, "nothing within the keep-alive"),
                Goodbye::ShuttingDown => (Code::ServerShuttingDown, "the server is shutting down"),
                Goodbye::TakenOver => {
                    (Code::SessionTakenOver, "another connection took this client id")
                }
                Goodbye::NotAuthorized => (Code::NotAuthorized, "not authorized"),
                Goodbye::Unspecified => (Code::UnspecifiedError, "the connection failed"),
            };
            // A reason string too: the client learns why (and Paho 1.6 reads the code only
            // when the packet carries more than the code and an empty property length).
            let properties = Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_string()),
                user_properties: Vec::new(),
                server_reference: None,
            });
            v5::Packet::Disconnect(v5::Disconnect { reason_code, properties })
        }
    })
}
