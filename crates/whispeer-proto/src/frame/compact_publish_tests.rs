//! Compact publishes: what they leave out, how a server reads the numbers a client chose, and
//! what it refuses.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::tests::envelope;
use super::*;
use crate::{Flags, Topic};

/// Appends a whole PUBLISH_COMPACT of `envelope` (no headers) to `dst`.
fn put_compact(
    dst: &mut BytesMut,
    correlation: u32,
    qos: Qos,
    envelope: &Envelope,
    topic: TopicRef,
) {
    let head = PlainHead::of(envelope);
    Frame::encode_compact_publish_head(dst, correlation, qos, &head, topic, usize::MAX).unwrap();
    dst.extend_from_slice(&envelope.payload);
}

/// A publish's correlation and what it decoded to.
type Read = (u32, Result<(Qos, Envelope), DecodeError>);

/// Reads every frame of `stream` as a server's reader does, with one [`TopicCache`] for the
/// connection: each publish's correlation and what it decoded to.
fn read_as_a_server(mut stream: BytesMut) -> Vec<Read> {
    let (limits, mut topics) = (Limits::DEFAULT, TopicCache::default());
    let mut read = Vec::new();
    while let Some(raw) = Frame::split(&mut stream, &limits).unwrap() {
        let correlation = raw.correlation();
        let publish = raw.publish(&limits, &mut topics).map(|p| p.expect("a publish"));
        read.push((correlation, publish));
    }
    read
}

fn publish(qos: Qos, envelope: &Envelope) -> BytesMut {
    let mut plain = BytesMut::new();
    let body = Body::Publish { qos, envelope: envelope.clone() };
    Frame::new(9, body).encode(&mut plain, usize::MAX).unwrap();
    plain
}

#[test]
fn a_compact_publish_leaves_out_what_it_implies_and_names_its_topic_once() {
    // An 18-byte topic and a 128-byte payload, as `whispeer bench` sends.
    let sent = envelope("bench/t1x128/abcde", &[7; 128], &[]);
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 1, Qos::AtMostOnce, &sent, TopicRef::Define(1));
    let defined = stream.len();
    put_compact(&mut stream, 2, Qos::AtLeastOnce, &sent, TopicRef::Alias(1));
    let named = stream.len() - defined;
    put_compact(&mut stream, 3, Qos::AtMostOnce, &sent, TopicRef::Given);
    assert_eq!((publish(Qos::AtMostOnce, &sent).len(), defined, named), (190, 186, 166));
    let read = read_as_a_server(stream);
    let expected = [(1, Qos::AtMostOnce), (2, Qos::AtLeastOnce), (3, Qos::AtMostOnce)]
        .map(|(correlation, qos)| (correlation, Ok((qos, sent.clone()))));
    assert_eq!(read, expected);
}

#[test]
fn the_whole_frame_decoder_does_not_read_a_compact_publish() {
    // Its topic may be a number only the connection knows: read with the connection's state.
    let mut stream = BytesMut::new();
    let sent = envelope("a/b", b"x", &[]);
    put_compact(&mut stream, 1, Qos::AtMostOnce, &sent, TopicRef::Given);
    assert_eq!(Frame::decode(&mut stream, &Limits::DEFAULT), Err(DecodeError::UnknownType(0x22)));
}

#[test]
fn a_client_numbers_its_topics_in_any_order_and_a_definition_replaces_the_last() {
    let [a, b, c] = ["a/b", "c", "d/e/f"].map(|topic| envelope(topic, b"p", &[]));
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 1, Qos::AtMostOnce, &a, TopicRef::Define(5));
    put_compact(&mut stream, 2, Qos::AtMostOnce, &b, TopicRef::Define(MAX_TOPIC_ALIASES));
    put_compact(&mut stream, 3, Qos::AtMostOnce, &a, TopicRef::Alias(5));
    put_compact(&mut stream, 4, Qos::AtMostOnce, &c, TopicRef::Define(5));
    put_compact(&mut stream, 5, Qos::AtMostOnce, &c, TopicRef::Alias(5));
    put_compact(&mut stream, 6, Qos::AtMostOnce, &b, TopicRef::Alias(MAX_TOPIC_ALIASES));
    // A plain PUBLISH between them changes no number.
    stream.extend_from_slice(&publish(Qos::AtMostOnce, &a));
    put_compact(&mut stream, 7, Qos::AtMostOnce, &c, TopicRef::Alias(5));
    let topics: Vec<_> = read_as_a_server(stream)
        .into_iter()
        .map(|(_, read)| read.unwrap().1.topic.as_str().to_string())
        .collect();
    assert_eq!(topics, ["a/b", "c", "a/b", "d/e/f", "d/e/f", "c", "a/b", "d/e/f"]);
}

#[test]
fn a_refused_definition_refuses_its_number_and_a_number_never_defined_ends_the_stream() {
    let good = envelope("ok", b"p", &[]);
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 1, Qos::AtMostOnce, &good, TopicRef::Define(1));
    // A topic deeper and longer than the limits allow: refused, and answerable.
    let mut long = BytesMut::new();
    let head = PlainHead { topic: &"x/".repeat(600), ..PlainHead::of(&good) };
    Frame::encode_compact_publish_head(
        &mut long,
        2,
        Qos::AtMostOnce,
        &head,
        TopicRef::Define(1),
        usize::MAX,
    )
    .unwrap();
    long.extend_from_slice(&good.payload);
    stream.extend_from_slice(&long);
    put_compact(&mut stream, 3, Qos::AtMostOnce, &good, TopicRef::Alias(1));
    put_compact(&mut stream, 4, Qos::AtMostOnce, &good, TopicRef::Alias(2));
    put_compact(&mut stream, 5, Qos::AtMostOnce, &good, TopicRef::Define(0));
    put_compact(&mut stream, 6, Qos::AtMostOnce, &good, TopicRef::Alias(MAX_TOPIC_ALIASES + 1));
    let read = read_as_a_server(stream);
    assert!(matches!(read[0], (1, Ok(_))));
    for (correlation, refused) in &read[1..3] {
        // The definition, and the number it left refused: each answered for itself.
        assert!(
            matches!(refused, Err(DecodeError::RequestTopic { correlation: c, .. }) if c == correlation),
            "{correlation}: {refused:?}"
        );
        assert_eq!(refused.as_ref().unwrap_err().code(), ErrorCode::INVALID_TOPIC);
    }
    let unknown = read[3..].iter().map(|(_, read)| read.clone().unwrap_err()).collect::<Vec<_>>();
    let alias = |alias| DecodeError::TopicAlias { alias };
    assert_eq!(unknown, [alias(2), alias(0), alias(MAX_TOPIC_ALIASES + 1)]);
}

#[test]
fn a_compact_publish_too_short_for_its_fields_is_truncated() {
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 1, Qos::AtMostOnce, &envelope("a", b"", &[]), TopicRef::Given);
    // Cut inside the topic: the frame's length says so, the body ends early.
    let mut cut = BytesMut::new();
    let len = u32::try_from(stream.len() - 4 - 2).unwrap();
    cut.extend_from_slice(&len.to_be_bytes());
    cut.extend_from_slice(&stream[4..stream.len() - 2]);
    let read = read_as_a_server(cut);
    assert!(
        matches!(read[..], [(1, Err(DecodeError::Truncated { frame_type: 0x22 }))]),
        "{read:?}"
    );
}

proptest! {
    /// Publishes numbered as a client with a few slots numbers them (a slot reused for a new
    /// topic redefines its number), interleaved with plain PUBLISHes and topics given in full:
    /// the server reads every one as what was sent.
    #[test]
    fn compact_publishes_decode_to_what_was_sent(
        sends in prop::collection::vec(
            (0usize..6, any::<u128>(), any::<u64>(), any::<u16>(), any::<bool>(),
             prop::collection::vec(any::<u8>(), 0..40), 0u8..3),
            1..60),
        slots in 1usize..4,
    ) {
        let topics: Vec<Topic> =
            (0..6).map(|i| Topic::parse(&format!("p/{i}/x")).unwrap()).collect();
        let (mut stream, mut sent) = (BytesMut::new(), Vec::new());
        let (mut numbered, mut next): (Vec<Option<usize>>, usize) = (vec![None; slots], 0);
        for (n, (topic, id, timestamp_ms, flags, acked, payload, how)) in sends.into_iter().enumerate() {
            let qos = if acked { Qos::AtLeastOnce } else { Qos::AtMostOnce };
            let envelope = Envelope::new(
                MessageId(id), topics[topic].clone(), timestamp_ms, Flags(flags),
                Bytes::from(payload),
            );
            let correlation = u32::try_from(n).unwrap();
            match how {
                0 => {
                    let body = Body::Publish { qos, envelope: envelope.clone() };
                    Frame::new(correlation, body).encode(&mut stream, usize::MAX).unwrap();
                }
                1 => put_compact(&mut stream, correlation, qos, &envelope, TopicRef::Given),
                _ => {
                    let slot = numbered.iter().position(|&held| held == Some(topic));
                    let topic_ref = match slot {
                        Some(at) => TopicRef::Alias(u16::try_from(at + 1).unwrap()),
                        None => {
                            numbered[next] = Some(topic);
                            let define = TopicRef::Define(u16::try_from(next + 1).unwrap());
                            next = (next + 1) % slots;
                            define
                        }
                    };
                    put_compact(&mut stream, correlation, qos, &envelope, topic_ref);
                }
            }
            sent.push((correlation, Ok((qos, envelope))));
        }
        prop_assert_eq!(read_as_a_server(stream), sent);
    }
}
