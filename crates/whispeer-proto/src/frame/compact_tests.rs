//! Compact deliveries: what they leave out, how their topics are numbered, and what a client
//! refuses.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::tests::envelope;
use super::*;
use crate::{Flags, Topic};

/// Appends a whole DELIVER_COMPACT of `envelope` (no headers) to `dst`.
fn put_compact(dst: &mut BytesMut, sub: u32, envelope: &Envelope, topic: TopicRef) {
    let head = PlainHead::of(envelope);
    Frame::encode_compact_deliver_head(dst, sub, &head, topic, usize::MAX).unwrap();
    dst.extend_from_slice(&envelope.payload);
}

/// Reads every delivery in `stream` (compact, or DELIVERs with attempt 1 and offset 0) as a
/// client's connection task and subscriptions do: each head where it lies, every definition
/// learnt as it is read, each delivery taken from a run that holds the table as it was when the
/// delivery was read.
fn read_as_a_client(stream: BytesMut) -> Result<Vec<(u32, Envelope)>, DecodeError> {
    let (limits, mut stream) = (Limits::DEFAULT, stream);
    let (mut aliases, mut topics) = (TopicAliases::default(), TopicCache::default());
    let mut read = Vec::new();
    while let Some(head) = Frame::peek_deliver(&stream, &limits) {
        if head.defines {
            aliases.learn(&stream[..head.frame_len], &limits)?;
        }
        let mut run = stream.split_to(head.frame_len).freeze();
        let taken = RawDeliver::take_from(&mut run).expect("a whole delivery");
        assert_eq!((taken.sub, taken.id, taken.attempt, taken.offset), (head.sub, head.id, 1, 0));
        // What a buffer weighs it by: the frame less its head (and a DELIVER's own fields).
        let own = if head.compact { 0 } else { 16 };
        assert_eq!(taken.envelope_len(), head.frame_len - HEADER_LEN - own);
        read.push((taken.sub, taken.decode(&limits, &mut topics, &aliases.clone())?));
    }
    assert!(stream.is_empty(), "every frame was a delivery read in place");
    Ok(read)
}

#[test]
fn a_compact_delivery_leaves_out_what_it_implies_and_names_its_topic_once() {
    // An 18-byte topic and a 128-byte payload, as `whispeer bench` sends.
    let sent = envelope("bench/t1x128/abcde", &[7; 128], &[]);
    let mut deliver = BytesMut::new();
    let body = Body::Deliver { sub: 3, attempt: 1, offset: 0, envelope: sent.clone() };
    Frame::new(0, body).encode(&mut deliver, usize::MAX).unwrap();
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 3, &sent, TopicRef::Define(1));
    let defined = stream.len();
    put_compact(&mut stream, 3, &sent, TopicRef::Alias(1));
    put_compact(&mut stream, 4, &sent, TopicRef::Given);
    assert_eq!((deliver.len(), defined, stream.len()), (205, 185, 185 + 165 + 185));
    let read = read_as_a_client(stream).unwrap();
    assert_eq!(read, vec![(3, sent.clone()), (3, sent.clone()), (4, sent)]);
}

#[test]
fn a_compact_delivery_split_off_whole_is_the_same_delivery() {
    let sent = envelope("a/b", b"payload", &[]);
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 9, &sent, TopicRef::Given);
    let raw = Frame::split(&mut stream, &Limits::DEFAULT).unwrap().unwrap();
    let deliver = raw.deliver().unwrap();
    assert_eq!((deliver.sub, deliver.attempt, deliver.offset, deliver.id), (9, 1, 0, sent.id));
    let none = TopicAliases::default();
    let decoded = deliver.decode(&Limits::DEFAULT, &mut TopicCache::default(), &none).unwrap();
    assert_eq!(decoded, sent);
    // Too short for its fixed fields: neither read in place nor taken as a delivery.
    let mut short = BytesMut::from(&[0, 0, 0, 9, 0x33, 0, 0, 0, 1, 0, 0, 0, 0][..]);
    assert!(Frame::peek_deliver(&short, &Limits::DEFAULT).is_none());
    let raw = Frame::split(&mut short, &Limits::DEFAULT).unwrap().unwrap();
    assert!(raw.deliver().is_err());
}

#[test]
fn a_client_refuses_a_number_never_defined_or_defined_out_of_order() {
    let sent = envelope("a/b", b"x", &[]);
    let undefined = |topic| {
        let mut stream = BytesMut::new();
        put_compact(&mut stream, 1, &sent, TopicRef::Define(1));
        put_compact(&mut stream, 1, &sent, topic);
        read_as_a_client(stream).unwrap_err()
    };
    assert_eq!(undefined(TopicRef::Alias(2)), DecodeError::TopicAlias { alias: 2 });
    assert_eq!(undefined(TopicRef::Define(3)), DecodeError::TopicAlias { alias: 3 });
    // Defined again: the numbers only grow.
    assert_eq!(undefined(TopicRef::Define(1)), DecodeError::TopicAlias { alias: 1 });
    // Number 0 is not one.
    let mut stream = BytesMut::new();
    put_compact(&mut stream, 1, &sent, TopicRef::Define(0));
    assert_eq!(read_as_a_client(stream).unwrap_err(), DecodeError::TopicAlias { alias: 0 });
}

#[test]
fn a_client_numbers_at_most_the_limit_and_checks_every_topic_it_learns() {
    let mut aliases = TopicAliases::default();
    let mut frame = BytesMut::new();
    for n in 1..=MAX_TOPIC_ALIASES {
        frame.clear();
        put_compact(&mut frame, 1, &envelope(&format!("t/{n}"), b"", &[]), TopicRef::Define(n));
        aliases.learn(&frame, &Limits::DEFAULT).unwrap();
    }
    assert_eq!(aliases.len(), usize::from(MAX_TOPIC_ALIASES));
    assert_eq!(aliases.get(MAX_TOPIC_ALIASES).unwrap().as_str(), "t/1024");
    frame.clear();
    let over = MAX_TOPIC_ALIASES + 1;
    put_compact(&mut frame, 1, &envelope("t/x", b"", &[]), TopicRef::Define(over));
    let err = aliases.learn(&frame, &Limits::DEFAULT).unwrap_err();
    assert_eq!(err, DecodeError::TopicAlias { alias: over });
    // A topic that is not one, defined: refused as any invalid topic is.
    let mut bad = BytesMut::new();
    let head = PlainHead { topic: "a//b", ..PlainHead::of(&envelope("a", b"", &[])) };
    Frame::encode_compact_deliver_head(&mut bad, 1, &head, TopicRef::Define(1), usize::MAX)
        .unwrap();
    let err = TopicAliases::default().learn(&bad, &Limits::DEFAULT).unwrap_err();
    assert!(matches!(err, DecodeError::InvalidTopic(_)), "{err:?}");
    // A definition whose topic runs past its frame.
    let mut cut = bad.clone();
    cut[3] -= 2;
    cut.truncate(cut.len() - 2);
    let err = TopicAliases::default().learn(&cut, &Limits::DEFAULT).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { frame_type: 0x33 }), "{err:?}");
}

#[test]
fn a_compact_delivery_over_the_peer_limit_is_not_appended() {
    let sent = envelope("a/b", &[1; 100], &[]);
    let mut dst = BytesMut::from(&b"before"[..]);
    let head = PlainHead::of(&sent);
    let err = Frame::encode_compact_deliver_head(&mut dst, 1, &head, TopicRef::Given, 100);
    assert!(matches!(err, Err(EncodeError::FrameTooLarge { .. })), "{err:?}");
    assert_eq!(&dst[..], b"before");
}

proptest! {
    /// Deliveries to several subscriptions, numbered as a server numbers them (the first
    /// topics it sends, up to a bound, in order) and interleaved with plain DELIVERs, read as a
    /// client reads them: every one decodes to what was sent.
    #[test]
    fn compact_deliveries_decode_to_what_was_sent(
        sends in prop::collection::vec(
            (0u32..3, 0usize..6, any::<u128>(), any::<u64>(), any::<u16>(),
             prop::collection::vec(any::<u8>(), 0..40), any::<bool>()),
            1..60),
        numbered in 0usize..6,
    ) {
        let topics: Vec<Topic> =
            (0..6).map(|i| Topic::parse(&format!("p/{i}/x")).unwrap()).collect();
        let (mut stream, mut sent, mut numbers) = (BytesMut::new(), Vec::new(), Vec::new());
        for (sub, topic, id, timestamp_ms, flags, payload, plain) in sends {
            let envelope = Envelope::new(
                MessageId(id), topics[topic].clone(), timestamp_ms, Flags(flags),
                Bytes::from(payload),
            );
            if plain {
                let body = Body::Deliver { sub, attempt: 1, offset: 0, envelope: envelope.clone() };
                Frame::new(0, body).encode(&mut stream, usize::MAX).unwrap();
            } else {
                let known = numbers.iter().position(|&n| n == topic);
                let topic_ref = match known {
                    Some(at) => TopicRef::Alias(u16::try_from(at + 1).unwrap()),
                    None if numbers.len() < numbered => {
                        numbers.push(topic);
                        TopicRef::Define(u16::try_from(numbers.len()).unwrap())
                    }
                    None => TopicRef::Given,
                };
                put_compact(&mut stream, sub, &envelope, topic_ref);
            }
            sent.push((sub, envelope));
        }
        prop_assert_eq!(read_as_a_client(stream).unwrap(), sent);
    }
}
