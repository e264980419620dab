//! Frame encoding and decoding: round trips, partial input, limits, malformed input.

use bytes::{Buf, BufMut};
use proptest::prelude::*;

use super::*;
use crate::{ContentType, Flags, Topic};

fn limits() -> Limits {
    Limits::DEFAULT
}

pub(super) fn envelope(topic: &str, payload: &[u8], headers: &[(&str, &[u8])]) -> Envelope {
    let mut e = Envelope::new(
        MessageId(0x0102_0304),
        Topic::parse(topic).unwrap(),
        1_700_000_000_123,
        Flags::with_content(ContentType::Json),
        Bytes::copy_from_slice(payload),
    );
    for (name, value) in headers {
        e.headers.insert(*name, Bytes::copy_from_slice(value));
    }
    e
}

fn round_trip(frame: &Frame) -> Frame {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf, usize::MAX).unwrap();
    let decoded = Frame::decode(&mut buf, &limits()).unwrap().unwrap();
    assert!(buf.is_empty());
    decoded
}

fn all_bodies() -> Vec<Body> {
    vec![
        Body::Hello { version: 1, capabilities: 0, name: "cli".into() },
        Body::Welcome {
            version: 1,
            capabilities: 1,
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            heartbeat_ms: 5000,
            name: "whispeerd".into(),
        },
        Body::Auth { key: Bytes::from_static(b"secret") },
        Body::Ok,
        Body::Subscribe {
            sub: 7,
            qos: Qos::AtLeastOnce,
            filter: Filter::parse("a/+/#").unwrap(),
            prefetch: 32,
            group: Some("workers".into()),
            start: StartAt::Offset(17),
        },
        Body::Unsubscribe { sub: 7 },
        Body::Publish { qos: Qos::AtMostOnce, envelope: envelope("a/b", b"hi", &[("k", b"v")]) },
        Body::PubAck,
        Body::Deliver { sub: 9, attempt: 3, offset: 44, envelope: envelope("x", b"", &[]) },
        Body::Ack { sub: 1, id: MessageId(u128::MAX) },
        Body::Nack { sub: 1, id: MessageId(3), requeue: true },
        Body::Ping,
        Body::Pong,
        Body::Error { code: ErrorCode::FORBIDDEN, message: "no".into() },
    ]
}

#[test]
fn every_body_round_trips() {
    for (i, body) in all_bodies().into_iter().enumerate() {
        let frame = Frame::new(i as u32, body);
        assert_eq!(round_trip(&frame), frame);
    }
}

#[test]
fn partial_input_waits_for_more() {
    let mut full = BytesMut::new();
    Frame::new(1, Body::Ping).encode(&mut full, usize::MAX).unwrap();
    Frame::new(2, Body::Pong).encode(&mut full, usize::MAX).unwrap();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in full {
        buf.put_u8(byte);
        while let Some(frame) = Frame::decode(&mut buf, &limits()).unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, [Frame::new(1, Body::Ping), Frame::new(2, Body::Pong)]);
}

#[test]
fn oversize_prefix_is_refused_before_allocating() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    let err = Frame::decode(&mut buf, &limits()).unwrap_err();
    assert_eq!(err, DecodeError::FrameTooLarge { len: u32::MAX, max: limits().max_frame_bytes });
    assert_eq!(err.code(), ErrorCode::TOO_LARGE);
    assert!(buf.capacity() < 64, "nothing reserved for the claimed length");
}

#[test]
fn malformed_frames_are_typed_errors() {
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (vec![0, 0, 0, 1, 0x40], DecodeError::Truncated { frame_type: 0x40 }),
        (vec![0, 0, 0, 5, 0x66, 0, 0, 0, 0], DecodeError::UnknownType(0x66)),
        (
            vec![0, 0, 0, 6, 0x40, 0, 0, 0, 0, 9],
            DecodeError::TrailingBytes { frame_type: 0x40, extra: 1 },
        ),
        (vec![0, 0, 0, 7, 0x11, 0, 0, 0, 0, 0, 0], DecodeError::Truncated { frame_type: 0x11 }),
        (vec![0, 0, 0, 10, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 9], DecodeError::InvalidQos(9)),
    ];
    for (bytes, expected) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(Frame::decode(&mut buf, &limits()), Err(expected), "{bytes:?}");
    }
}

#[test]
fn invalid_topic_and_text_are_refused() {
    let mut buf = BytesMut::new();
    let correlation = 77;
    let frame = Frame::new(
        correlation,
        Body::Subscribe {
            sub: 1,
            qos: Qos::AtMostOnce,
            filter: Filter::parse("a").unwrap(),
            prefetch: 0,
            group: None,
            start: StartAt::Latest,
        },
    );
    frame.encode(&mut buf, usize::MAX).unwrap();
    // The filter "a" is followed by the prefetch (4 bytes), an empty group (2 bytes) and the
    // start (9 bytes): swap it for other one-byte filters.
    let mut bad = buf.to_vec();
    let at = bad.len() - 16;
    bad[at] = b'#';
    let mut ok = BytesMut::from(&bad[..]);
    assert!(Frame::decode(&mut ok, &limits()).is_ok());
    bad[at] = 0xff;
    let mut utf = BytesMut::from(&bad[..]);
    assert_eq!(Frame::decode(&mut utf, &limits()), Err(DecodeError::InvalidUtf8));
    bad[at] = b'/';
    let mut topic = BytesMut::from(&bad[..]);
    let refused = Frame::decode(&mut topic, &limits()).unwrap_err();
    assert!(matches!(refused, DecodeError::RequestTopic { .. }), "{refused:?}");
    assert_eq!(refused.correlation(), Some(correlation), "the request can be answered alone");
    assert!(topic.is_empty(), "the whole frame was consumed");
}

#[test]
fn a_topic_cache_shares_a_repeated_topic_and_still_checks_new_ones() {
    let publish = |topic: &str| {
        let body = Body::Publish { qos: Qos::AtMostOnce, envelope: envelope(topic, b"x", &[]) };
        let mut buf = BytesMut::new();
        Frame::new(1, body).encode(&mut buf, usize::MAX).unwrap();
        buf
    };
    let topic_of = |frame: Frame| match frame.body {
        Body::Publish { envelope, .. } => envelope.topic,
        other => panic!("not a publish: {other:?}"),
    };
    let mut cache = TopicCache::default();
    let mut decode = |mut buf: BytesMut| Frame::decode_cached(&mut buf, &limits(), &mut cache);
    // Longer than the 23 bytes a topic holds in place, so a repeat shares the cached text.
    let (b, c) = ("sensors/0001/temperature/b", "sensors/0001/temperature/c");
    let first = topic_of(decode(publish(b)).unwrap().unwrap());
    let second = topic_of(decode(publish(b)).unwrap().unwrap());
    assert_eq!(first.as_str().as_ptr(), second.as_str().as_ptr(), "the text is shared");
    let other = topic_of(decode(publish(c)).unwrap().unwrap());
    assert_eq!(other.as_str(), c);
    // A topic the cache has not seen is parsed: `b` with its `/` made a control character.
    let mut bad = publish(b);
    let at = bad.iter().position(|&byte| byte == b'/').unwrap();
    bad[at] = 0x01;
    let refused = decode(bad).unwrap_err();
    assert!(matches!(refused, DecodeError::RequestTopic { .. }), "{refused:?}");
    let again = topic_of(decode(publish(c)).unwrap().unwrap());
    assert_eq!(again.as_str().as_ptr(), other.as_str().as_ptr(), "kept across a refusal");
    // A short topic is held in place: equal to the cached one, not shared.
    let short = topic_of(decode(publish("a/b")).unwrap().unwrap());
    assert_eq!(short, topic_of(decode(publish("a/b")).unwrap().unwrap()));
}

/// A stream's topic cache after it decoded a publish to `topic`.
fn cache_of(topic: &str) -> TopicCache {
    let envelope = envelope(topic, b"x", &[]);
    let mut buf = BytesMut::new();
    Frame::new(1, Body::Publish { qos: Qos::AtMostOnce, envelope })
        .encode(&mut buf, usize::MAX)
        .unwrap();
    let mut cache = TopicCache::default();
    Frame::decode_cached(&mut buf, &limits(), &mut cache).unwrap().unwrap();
    cache
}

#[test]
fn envelopes_round_trip_on_their_own_and_refuse_extra_bytes() {
    let original = envelope("a/b", b"payload", &[("ttl-ms", b"100")]);
    let mut buf = BytesMut::new();
    original.encode(&mut buf).unwrap();
    let bytes = buf.freeze();
    assert_eq!(Envelope::decode(bytes.clone(), &limits()).unwrap(), original);
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert!(matches!(
        Envelope::decode(Bytes::from(longer), &limits()),
        Err(DecodeError::TrailingBytes { .. })
    ));
    let short = bytes.slice(..bytes.len() - 1);
    assert!(matches!(Envelope::decode(short, &limits()), Err(DecodeError::Truncated { .. })));
}

proptest! {
    /// A DELIVER's head read where it lies ([`Frame::peek_deliver`]) and the delivery taken
    /// from a run ([`RawDeliver::take_from`]) agree with cutting the frame off
    /// ([`Frame::split`], [`RawFrame::deliver`]) on every stream: deliveries and other frames,
    /// damaged anywhere, cut short, or over the limit.
    #[test]
    fn a_deliver_read_in_place_agrees_with_one_cut_off(
        frames in prop::collection::vec((0..4u8, 0..40usize), 1..6),
        damage in prop::option::of((any::<prop::sample::Index>(), 1..=255u8)),
        cut in any::<prop::sample::Index>(),
        max in prop::sample::select(vec![64usize, 1 << 20]),
    ) {
        let mut stream = BytesMut::new();
        for (kind, len) in frames {
            let body = match kind {
                0 => Body::Ping,
                // A DELIVER of 33 to 40 bytes after its length prefix: too short for its head
                // and an id below 37.
                3 => {
                    let len = 33 + len % 8;
                    stream.put_u32(len as u32);
                    stream.put_u8(0x30);
                    stream.put_bytes(1, len - 1);
                    continue;
                }
                sub => Body::Deliver {
                    sub: u32::from(sub),
                    attempt: 1,
                    offset: 5,
                    envelope: envelope("a/b", &vec![7; len], &[]),
                },
            };
            Frame::new(0, body).encode(&mut stream, usize::MAX).unwrap();
        }
        if let Some((at, xor)) = damage {
            let at = at.index(stream.len());
            stream[at] ^= xor;
        }
        stream.truncate(cut.index(stream.len() + 1));
        let limits = Limits { max_frame_bytes: max, ..limits() };
        let (mut split, mut run) = (stream.clone(), stream.freeze());
        loop {
            let head = Frame::peek_deliver(&split, &limits);
            // A run holds only what was read in place.
            let taken = head.and_then(|_| RawDeliver::take_from(&mut run));
            let cut_off = match Frame::split(&mut split, &limits) {
                Ok(Some(raw)) => Some(raw.deliver()),
                Ok(None) | Err(_) => None,
            };
            match (head, taken, cut_off) {
                (Some(head), Some(taken), Some(Ok(cut_off))) => {
                    prop_assert_eq!((head.sub, head.offset, head.id), (cut_off.sub, cut_off.offset, cut_off.id));
                    prop_assert_eq!(head.envelope_len(), cut_off.envelope_len());
                    prop_assert_eq!((taken.sub, taken.attempt, taken.offset), (cut_off.sub, cut_off.attempt, cut_off.offset));
                    let none = TopicAliases::default();
                    prop_assert_eq!(taken.decode(&limits, &mut TopicCache::default(), &none).ok(), cut_off.decode(&limits, &mut TopicCache::default(), &none).ok());
                    prop_assert_eq!(run.len(), split.len());
                }
                // Another frame, or a DELIVER too short for its head: neither reads it in
                // place; step over it.
                (None, None, Some(Err(_))) => run.advance(run.len() - split.len()),
                (None, None, None) => break,
                (head, taken, cut_off) => prop_assert!(false, "{:?} {:?} {:?}", head, taken, cut_off),
            }
        }
    }

    /// The SDK's path for deliveries (split off, then the envelope decoded on its own) and the
    /// whole-frame decoder agree on every DELIVER, a damaged one included.
    #[test]
    fn a_deliver_decodes_the_same_split_or_whole(
        topic in "[a-z]{1,5}(/[a-z]{1,5}){0,3}",
        payload in prop::collection::vec(any::<u8>(), 0..100),
        header in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        damage in prop::option::of((any::<prop::sample::Index>(), 1..=255u8)),
    ) {
        let mut sent = envelope(&topic, &payload, &[]);
        if let Some((name, value)) = header {
            sent.headers.insert(name, value);
        }
        let mut stream = BytesMut::new();
        let deliver = Body::Deliver { sub: 3, attempt: 1, offset: 9, envelope: sent };
        Frame::new(0, deliver).encode(&mut stream, usize::MAX).unwrap();
        if let Some((at, xor)) = damage {
            // Anything but the length prefix and the type.
            let at = 5 + at.index(stream.len() - 5);
            stream[at] ^= xor;
        }
        let mut whole = stream.clone();
        let raw = Frame::split(&mut stream, &limits()).unwrap().unwrap();
        let full = Frame::decode(&mut whole, &limits());
        let deliver = raw.deliver().unwrap();
        let (sub, attempt, offset) = (deliver.sub, deliver.attempt, deliver.offset);
        let envelope_len = deliver.envelope_len();
        // A stream's later deliveries meet their topic in the cache: the same result.
        let warm = deliver.clone().decode(&limits(), &mut cache_of(&topic), &TopicAliases::default());
        let cold = deliver.decode(&limits(), &mut TopicCache::default(), &TopicAliases::default());
        prop_assert_eq!(&warm, &cold);
        match (cold, full) {
            (Ok(envelope), Ok(Some(frame))) => {
                // Fixed fields, topic, headers and payload, each with its length.
                let fixed = 16 + 8 + 2 + 2 + envelope.topic.as_str().len() + 2 + 4;
                let headers: usize = envelope.headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
                prop_assert_eq!(envelope_len, fixed + headers + envelope.payload.len());
                prop_assert_eq!(frame.body, Body::Deliver { sub, attempt, offset, envelope });
            }
            (Err(_), Err(_)) => {}
            (split, full) => prop_assert!(false, "split {:?}, whole {:?}", split, full),
        }
    }

    /// The server's path for publishes (split off, then decoded straight to their envelope)
    /// and the whole-frame decoder agree on every PUBLISH, a damaged one included; any other
    /// frame is given back to be decoded whole.
    #[test]
    fn a_publish_decodes_the_same_raw_or_whole(
        topic in "[a-z]{1,5}(/[a-z]{1,5}){0,3}",
        payload in prop::collection::vec(any::<u8>(), 0..100),
        header in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        damage in prop::option::of((any::<prop::sample::Index>(), 1..=255u8)),
        correlation in any::<u32>(),
    ) {
        let mut sent = envelope(&topic, &payload, &[]);
        if let Some((name, value)) = header {
            sent.headers.insert(name, value);
        }
        let mut stream = BytesMut::new();
        let publish = Body::Publish { qos: Qos::AtLeastOnce, envelope: sent };
        Frame::new(correlation, publish).encode(&mut stream, usize::MAX).unwrap();
        Frame::new(correlation, Body::Ping).encode(&mut stream, usize::MAX).unwrap();
        if let Some((at, xor)) = damage {
            // Anything in the publish but its length prefix and its type.
            let at = 5 + at.index(stream.len() - 5 - HEADER_LEN);
            stream[at] ^= xor;
        }
        let mut whole = stream.clone();
        let full = Frame::decode(&mut whole, &limits());
        let raw = Frame::split(&mut stream, &limits()).unwrap().unwrap();
        let seen = raw.correlation();
        let warm = raw.clone().publish(&limits(), &mut cache_of(&topic)).map(|r| r.ok());
        let cold = raw.publish(&limits(), &mut TopicCache::default());
        prop_assert_eq!(&warm, &cold.as_ref().map(|r| r.as_ref().ok().cloned()).map_err(Clone::clone));
        match (cold, full) {
            (Ok(Ok((qos, envelope))), Ok(Some(frame))) => {
                prop_assert_eq!(frame, Frame::new(seen, Body::Publish { qos, envelope }));
            }
            (Err(raw), Err(full)) => prop_assert_eq!(raw, full),
            (raw, full) => prop_assert!(false, "raw {:?}, whole {:?}", raw, full),
        }
        // The PING after it is not a publish.
        let next = Frame::split(&mut stream, &limits()).unwrap().unwrap();
        let ping = next.publish(&limits(), &mut TopicCache::default()).unwrap().unwrap_err();
        let ping = ping.decode(&limits(), &mut TopicCache::default());
        prop_assert_eq!(ping, Ok(Frame::new(correlation, Body::Ping)));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Frame::decode(&mut buf, &limits()) {}
    }

    #[test]
    fn publish_round_trips(
        id in any::<u128>(),
        ts in any::<u64>(),
        flags in any::<u16>(),
        topic in "[a-z]{1,5}(/[a-z]{1,5}){0,3}",
        payload in prop::collection::vec(any::<u8>(), 0..300),
        header in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        correlation in any::<u32>(),
    ) {
        let mut envelope = Envelope::new(MessageId(id), Topic::parse(&topic).unwrap(), ts, Flags(flags), Bytes::from(payload));
        if let Some((name, value)) = header {
            envelope.headers.insert(name, value);
        }
        let frame = Frame::new(correlation, Body::Publish { qos: Qos::AtLeastOnce, envelope });
        prop_assert_eq!(round_trip(&frame), frame);
    }
}

/// Reads `stream` as a connection does: room reserved before each read, a read filling it,
/// frames decoded and kept (as subscribers keep payloads, so the buffer stays shared). Returns
/// the frames and how many times bytes already buffered moved to another allocation.
fn read_as_a_connection(stream: &[u8]) -> (Vec<Frame>, usize) {
    let (mut buf, mut frames, mut moved, mut at) = (BytesMut::new(), Vec::new(), 0, 0);
    let mut count_move = |buf: &BytesMut, before: Option<*const u8>| {
        moved += usize::from(before.is_some_and(|p| p != buf.as_ptr()));
    };
    while at < stream.len() {
        let before = (!buf.is_empty()).then(|| buf.as_ptr());
        reserve_for_read(&mut buf);
        count_move(&buf, before);
        let take = (buf.capacity() - buf.len()).min(stream.len() - at);
        buf.extend_from_slice(&stream[at..at + take]);
        at += take;
        loop {
            let before = (!buf.is_empty()).then(|| buf.as_ptr());
            match Frame::decode(&mut buf, &limits()).unwrap() {
                Some(frame) => frames.push(frame),
                None => {
                    count_move(&buf, before);
                    break;
                }
            }
        }
    }
    (frames, moved)
}

/// `count` publishes of `len`-byte payloads, and the stream they make.
fn publishes(count: u32, len: usize) -> (Vec<Frame>, BytesMut) {
    let frames: Vec<Frame> = (0..count)
        .map(|n| {
            let envelope = envelope("t", &vec![n as u8; len], &[]);
            Frame::new(n, Body::Publish { qos: Qos::AtMostOnce, envelope })
        })
        .collect();
    let mut stream = BytesMut::new();
    for frame in &frames {
        frame.encode(&mut stream, usize::MAX).unwrap();
    }
    (frames, stream)
}

#[test]
fn large_frames_in_a_row_are_copied_once_every_few_frames_at_most() {
    let (frames, stream) = publishes(24, 64 * 1024);
    let (read, moved) = read_as_a_connection(&stream);
    assert_eq!(read, frames);
    // Room for the rest of a frame alone made the next read end inside the next frame, whose
    // start was then copied: once a frame.
    assert!(moved <= frames.len() / 3, "buffered bytes moved {moved} times for 24 frames");
}

#[test]
fn small_frames_are_read_without_moving_what_is_buffered_more_than_once_a_read_chunk() {
    let (frames, stream) = publishes(4096, 128);
    let (read, moved) = read_as_a_connection(&stream);
    assert_eq!(read, frames);
    assert!(moved <= stream.len() / (READ_CHUNK / 2) + 1, "moved {moved} times");
}

#[test]
fn a_run_is_not_held_to_the_frame_limit_again() {
    let sent = envelope("a/b", &[7; 200], &[]);
    let mut stream = BytesMut::new();
    let deliver = Body::Deliver { sub: 2, attempt: 1, offset: 0, envelope: sent.clone() };
    Frame::new(0, deliver).encode(&mut stream, usize::MAX).unwrap();
    let small = Limits { max_frame_bytes: 64, ..limits() };
    assert_eq!(Frame::peek_deliver(&stream, &small), None);
    let head = Frame::peek_deliver(&stream, &limits()).unwrap();
    let mut run = stream.freeze();
    let taken = RawDeliver::take_from(&mut run).unwrap();
    assert_eq!((taken.sub, taken.envelope_len()), (2, head.envelope_len()));
    assert_eq!(
        taken.decode(&limits(), &mut TopicCache::default(), &TopicAliases::default()).unwrap(),
        sent
    );
    assert!(run.is_empty() && RawDeliver::take_from(&mut run).is_none());
}

#[test]
fn a_deliver_split_raw_gives_its_fixed_fields_and_then_its_envelope() {
    let sent = envelope("a/b", b"payload", &[("k", b"v")]);
    let mut stream = BytesMut::new();
    let deliver = Body::Deliver { sub: 7, attempt: 2, offset: 41, envelope: sent.clone() };
    Frame::new(0, deliver).encode(&mut stream, usize::MAX).unwrap();
    Frame::new(9, Body::Ping).encode(&mut stream, usize::MAX).unwrap();
    // A DELIVER too short for its fixed fields and an id.
    stream.extend_from_slice(&[0, 0, 0, 9, 0x30, 0, 0, 0, 0, 0, 0, 0, 1]);
    let raw = Frame::split(&mut stream, &limits()).unwrap().unwrap();
    let deliver = raw.deliver().unwrap();
    assert_eq!((deliver.sub, deliver.attempt, deliver.offset), (7, 2, 41));
    // Fixed fields, the topic "a/b", one header ("k": "v") and the payload, each with its length.
    let len = 16 + 8 + 2 + (2 + 3) + 2 + (2 + 1 + 4 + 1) + (4 + b"payload".len());
    assert_eq!((deliver.id, deliver.envelope_len()), (sent.id, len));
    assert_eq!(
        deliver.decode(&limits(), &mut TopicCache::default(), &TopicAliases::default()).unwrap(),
        sent
    );
    let ping = Frame::split(&mut stream, &limits()).unwrap().unwrap().deliver().unwrap_err();
    let ping = ping.decode(&limits(), &mut TopicCache::default()).unwrap();
    assert_eq!(ping, Frame::new(9, Body::Ping));
    let short = Frame::split(&mut stream, &limits()).unwrap().unwrap().deliver().unwrap_err();
    let err = short.decode(&limits(), &mut TopicCache::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { frame_type: 0x30 }), "{err:?}");
    assert!(Frame::split(&mut stream, &limits()).unwrap().is_none() && stream.is_empty());
}
