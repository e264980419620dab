//! The frame decoder on arbitrary bytes: never panics, never reserves past the limit, and every
//! frame it accepts encodes back to bytes that decode to the same frame. The SDK's path for
//! deliveries (a frame split off undecoded, then its envelope decoded on its own) accepts and
//! refuses the same DELIVERs as the whole-frame decoder, with the same result, and so does its
//! reading of DELIVERs where they lie (`Frame::peek_deliver`, `RawDeliver::take_from`); so
//! does the server's path for publishes (a frame split off, then decoded straight to its
//! envelope). A DELIVER_COMPACT or a PUBLISH_COMPACT, which the whole-frame decoder does not
//! read (its topic may be a number the connection defined before), decodes with the numbers
//! the stream defined, and encodes back to the bytes it came as.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use whispeer_proto::{
    Body, Frame, Limits, PlainHead, RawDeliver, TopicAliases, TopicCache, TopicRef,
};

fuzz_target!(|data: &[u8]| {
    let mut limits = Limits::default();
    limits.max_frame_bytes = 4096;
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = Frame::decode(&mut buf, &limits) {
        assert!(buf.capacity() <= data.len() + 4096 + 4);
        let mut again = BytesMut::new();
        frame.encode(&mut again, usize::MAX).expect("a decoded frame encodes");
        let decoded = Frame::decode(&mut again, &limits).expect("re-decodes").expect("whole frame");
        assert_eq!(decoded, frame);
    }
    let (mut whole, mut split) = (BytesMut::from(data), BytesMut::from(data));
    // Each path keeps its stream's last topic, as a connection does: a repeated topic is
    // read in one look (the cache), and must decode as the whole-frame decoder does.
    let (mut topics, mut publish_topics) = (TopicCache::default(), TopicCache::default());
    let mut aliases = TopicAliases::default();
    loop {
        let head = Frame::peek_deliver(&split, &limits);
        if let Some(head) = head.filter(|head| head.compact) {
            if compact(&mut split, &head, &limits, &mut topics, &mut aliases).is_none() {
                break;
            }
            // The whole-frame decoder steps over it too (refusing it).
            assert!(Frame::decode(&mut whole, &limits).is_err());
            continue;
        }
        // What a run holding the rest of the buffer gives.
        let taken = head.and_then(|_| RawDeliver::take_from(&mut Bytes::copy_from_slice(&split)));
        let before = split.clone().freeze();
        let Ok(Some(raw)) = Frame::split(&mut split, &limits) else {
            assert!(head.is_none(), "read in place, not split off: {head:?}");
            break;
        };
        // The same frame, consumed whole whether its body decodes or not.
        let full = Frame::decode(&mut whole, &limits);
        let (correlation, frame_type) = (raw.correlation(), raw.frame_type());
        let publish = raw.publish(&limits, &mut publish_topics);
        if frame_type == 0x22 {
            assert!(head.is_none(), "a PUBLISH_COMPACT read in place as a DELIVER: {head:?}");
            assert!(full.is_err(), "the whole-frame decoder does not read a PUBLISH_COMPACT");
            if let Ok(Ok((qos, envelope))) = publish {
                let frame = &before[..before.len() - split.len()];
                compact_publish(frame, correlation, qos, &envelope);
            }
            continue;
        }
        if matches!(publish, Ok(Ok(_)) | Err(_)) {
            assert!(head.is_none(), "a PUBLISH read in place as a DELIVER: {head:?}");
        }
        let raw = match publish {
            Ok(Ok((qos, envelope))) => {
                let publish = Frame::new(correlation, Body::Publish { qos, envelope });
                assert_eq!(full, Ok(Some(publish)));
                continue;
            }
            Err(err) => {
                assert_eq!(full, Err(err));
                continue;
            }
            Ok(Err(other)) => other,
        };
        let Ok(deliver) = raw.deliver() else {
            assert!(head.is_none(), "a frame read in place as a DELIVER that is none: {head:?}");
            continue;
        };
        let (sub, attempt, offset, id) = (deliver.sub, deliver.attempt, deliver.offset, deliver.id);
        let len = deliver.envelope_len();
        let head = head.expect("every DELIVER split off is read in place too");
        assert_eq!((head.sub, head.offset, head.id, head.envelope_len()), (sub, offset, id, len));
        let taken = taken.expect("and taken from a run");
        assert_eq!((taken.sub, taken.attempt, taken.offset, taken.id), (sub, attempt, offset, id));
        assert_eq!(taken.envelope_len(), len);
        match (deliver.decode(&limits, &mut topics, &aliases), full) {
            (Ok(envelope), Ok(Some(frame))) => {
                assert_eq!(envelope.id, id);
                assert_eq!(frame.body, Body::Deliver { sub, attempt, offset, envelope });
            }
            (Err(_), Err(_)) => {}
            (split, full) => panic!("the two paths disagree: {split:?} against {full:?}"),
        }
    }
});

/// Reads the DELIVER_COMPACT at the front of `split` as a client does: learns the number it
/// defines, decodes it, and encodes it again. `None` where a client closes the connection (a
/// definition it refuses).
fn compact(
    split: &mut BytesMut,
    head: &whispeer_proto::DeliverHead,
    limits: &Limits,
    topics: &mut TopicCache,
    aliases: &mut TopicAliases,
) -> Option<()> {
    let frame = split.split_to(head.frame_len).freeze();
    if head.defines {
        aliases.learn(&frame, limits).ok()?;
    }
    let deliver = RawDeliver::take_from(&mut frame.clone()).expect("read in place");
    assert_eq!(
        (deliver.sub, deliver.attempt, deliver.offset, deliver.id),
        (head.sub, 1, 0, head.id)
    );
    let Ok(envelope) = deliver.decode(limits, topics, aliases) else { return Some(()) };
    let topic = topic_ref(frame[35], frame[36]);
    let mut again = BytesMut::new();
    let plain = PlainHead::of(&envelope);
    Frame::encode_compact_deliver_head(&mut again, head.sub, &plain, topic, usize::MAX)
        .expect("a decoded delivery encodes");
    again.extend_from_slice(&envelope.payload);
    assert_eq!(&again[..], &frame[..], "a compact delivery encodes back to its bytes");
    Some(())
}

/// Encodes the PUBLISH_COMPACT `frame` decoded to (`qos` and `envelope`, its topic read with
/// the numbers the stream defined) again, naming its topic as it did: the same bytes.
fn compact_publish(
    frame: &[u8],
    correlation: u32,
    qos: whispeer_proto::Qos,
    envelope: &whispeer_proto::Envelope,
) {
    let topic = topic_ref(frame[36], frame[37]);
    let mut again = BytesMut::new();
    let plain = PlainHead::of(envelope);
    Frame::encode_compact_publish_head(&mut again, correlation, qos, &plain, topic, usize::MAX)
        .expect("a decoded publish encodes");
    again.extend_from_slice(&envelope.payload);
    assert_eq!(&again[..], frame, "a compact publish encodes back to its bytes");
}

/// A compact frame's topic field, from its two bytes.
fn topic_ref(high: u8, low: u8) -> TopicRef {
    match u16::from_be_bytes([high, low]) {
        0 => TopicRef::Given,
        n if n & 0x8000 != 0 => TopicRef::Define(n & 0x7fff),
        n => TopicRef::Alias(n),
    }
}
