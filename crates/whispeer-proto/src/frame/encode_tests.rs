//! The encoders of the hot paths (a server's DELIVER heads, a publisher's PUBLISH heads, with
//! their payloads after them) against the general encoder.

use proptest::prelude::*;

use super::tests::envelope;
use super::*;
use crate::{Flags, Topic};

#[test]
fn encode_deliver_matches_the_general_encoder() {
    let envelope = envelope("a/b", b"payload", &[("h", b"1")]);
    let mut fast = BytesMut::new();
    Frame::encode_deliver(&mut fast, 3, 2, 9, &envelope, usize::MAX).unwrap();
    let mut general = BytesMut::new();
    Frame::new(0, Body::Deliver { sub: 3, attempt: 2, offset: 9, envelope })
        .encode(&mut general, usize::MAX)
        .unwrap();
    assert_eq!(fast, general);
}

#[test]
fn a_publish_head_and_its_payload_make_the_whole_frame() {
    let envelope = envelope("a/b", &[7; 300], &[("k", b"v")]);
    let mut whole = BytesMut::new();
    let qos = Qos::AtLeastOnce;
    Frame::new(5, Body::Publish { qos, envelope: envelope.clone() })
        .encode(&mut whole, usize::MAX)
        .unwrap();
    let mut split = BytesMut::new();
    Frame::encode_publish_head(&mut split, 5, qos, &envelope, usize::MAX).unwrap();
    split.extend_from_slice(&envelope.payload);
    assert_eq!(split, whole);
    let mut over = BytesMut::from(&b"kept"[..]);
    let refused = Frame::encode_publish_head(&mut over, 5, qos, &envelope, 300);
    assert!(matches!(refused, Err(EncodeError::FrameTooLarge { .. })), "{refused:?}");
    assert_eq!(&over[..], b"kept", "the payload counts against the limit");
}

#[test]
fn a_plain_publish_from_its_parts_is_the_frame_of_its_envelope() {
    let envelope = envelope("a/b", &[7; 300], &[]);
    let mut whole = BytesMut::new();
    let qos = Qos::AtMostOnce;
    Frame::new(5, Body::Publish { qos, envelope: envelope.clone() })
        .encode(&mut whole, usize::MAX)
        .unwrap();
    let head = PlainHead::of(&envelope);
    let mut parts = BytesMut::new();
    Frame::encode_plain_publish_head(&mut parts, 5, &head, usize::MAX).unwrap();
    parts.extend_from_slice(&envelope.payload);
    assert_eq!(parts, whole);
    let mut over = BytesMut::from(&b"kept"[..]);
    let refused = Frame::encode_plain_publish_head(&mut over, 5, &head, 300);
    assert!(matches!(refused, Err(EncodeError::FrameTooLarge { .. })), "{refused:?}");
    assert_eq!(&over[..], b"kept", "the payload counts against the limit");
}

#[test]
fn a_deliver_head_and_its_payload_make_the_whole_frame() {
    let envelope = envelope("a/b", &[7; 300], &[("k", b"v")]);
    let mut whole = BytesMut::new();
    Frame::encode_deliver(&mut whole, 3, 2, 9, &envelope, usize::MAX).unwrap();
    let mut split = BytesMut::new();
    Frame::encode_deliver_head(&mut split, 3, 2, 9, &envelope, usize::MAX).unwrap();
    split.extend_from_slice(&envelope.payload);
    assert_eq!(split, whole);
    let mut over = BytesMut::from(&b"kept"[..]);
    let refused = Frame::encode_deliver_head(&mut over, 3, 2, 9, &envelope, 300);
    assert!(matches!(refused, Err(EncodeError::FrameTooLarge { .. })), "{refused:?}");
    assert_eq!(&over[..], b"kept", "the payload counts against the limit");
}

#[test]
fn encode_refuses_frames_over_the_peer_limit() {
    let frame = Frame::new(
        1,
        Body::Publish { qos: Qos::AtMostOnce, envelope: envelope("t", &[0; 100], &[]) },
    );
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(matches!(frame.encode(&mut buf, 64), Err(EncodeError::FrameTooLarge { max: 64, .. })));
    assert_eq!(&buf[..], b"keep");
}

proptest! {
    /// The heads a server writes for each delivery and a publisher for each publish (in one
    /// look when the envelope has no headers, field by field when it has) and the payload after
    /// them make the frame the general encoder makes, and both refuse a frame over the limit,
    /// leaving the buffer as it was.
    #[test]
    fn deliver_and_publish_heads_make_the_general_frames(
        topic in "[a-z]{1,5}(/[a-z]{1,30}){0,3}",
        payload in prop::collection::vec(any::<u8>(), 0..300),
        header in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        (id, timestamp, sub, attempt, offset, correlation) in (any::<u128>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
        (flags, qos) in (any::<u16>(), 0..2u8),
        max in 40..400usize,
    ) {
        let mut sent = Envelope::new(MessageId(id), Topic::parse(&topic).unwrap(), timestamp, Flags(flags), Bytes::from(payload));
        if let Some((name, value)) = header {
            sent.headers.insert(name, value);
        }
        let qos = Qos::try_from(qos).unwrap();
        let bodies = [
            Body::Deliver { sub, attempt, offset, envelope: sent.clone() },
            Body::Publish { qos, envelope: sent.clone() },
        ];
        for (n, body) in bodies.into_iter().enumerate() {
            let correlation = if n == 0 { 0 } else { correlation };
            let frame = Frame::new(correlation, body);
            let mut general = BytesMut::from(&b"kept"[..]);
            let whole = frame.encode(&mut general, max);
            let mut head = BytesMut::from(&b"kept"[..]);
            let parts = if n == 0 {
                Frame::encode_deliver_head(&mut head, sub, attempt, offset, &sent, max)
            } else {
                Frame::encode_publish_head(&mut head, correlation, qos, &sent, max)
            };
            prop_assert_eq!(parts.is_ok(), whole.is_ok());
            if parts.is_ok() {
                head.extend_from_slice(&sent.payload);
            }
            prop_assert_eq!(&head, &general);
        }
        if sent.headers.is_empty() && qos == Qos::AtMostOnce {
            let mut general = BytesMut::from(&b"kept"[..]);
            let whole = Frame::new(correlation, Body::Publish { qos, envelope: sent.clone() }).encode(&mut general, max);
            let mut head = BytesMut::from(&b"kept"[..]);
            let parts = Frame::encode_plain_publish_head(&mut head, correlation, &PlainHead::of(&sent), max);
            prop_assert_eq!(parts.is_ok(), whole.is_ok());
            if parts.is_ok() {
                head.extend_from_slice(&sent.payload);
            }
            prop_assert_eq!(&head, &general);
        }
    }
}
