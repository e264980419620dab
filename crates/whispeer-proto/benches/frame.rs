//! The codec's cost per frame on the hot paths: a stream of 128-byte `Deliver` frames decoded
//! whole (`Frame::decode_cached` over one read buffer) and as the SDK reads them (each head read
//! in place by the connection task, the run cut off in one piece, each envelope decoded by the
//! subscription), `Publish` and `PUBLISH_COMPACT` frames decoded as a server connection reads
//! them, `Publish` frames encoded as the SDK's outbox writes them, `Deliver` heads as the
//! server writes them, and a stream of 64 KiB `Deliver` frames read as a connection reads them
//! (room reserved, each read filling it, the frames kept meanwhile). Run with `cargo bench -p
//! whispeer-proto --bench frame`.

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]
#![expect(missing_docs, reason = "criterion_group! generates an undocumented function")]

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use whispeer_proto::{
    Body, Envelope, Flags, Frame, Limits, MessageId, PlainHead, Qos, RawDeliver, Topic,
    TopicAliases, TopicCache, TopicRef, reserve_for_read,
};

/// Frames in one simulated read.
const BATCH: u64 = 256;

/// 64 KiB frames in one simulated stream.
const LARGE: u64 = 32;

fn envelope(n: u64) -> Envelope {
    sized(n, 128)
}

fn sized(n: u64, len: usize) -> Envelope {
    let topic = Topic::parse("bench.t1x128").unwrap();
    let payload = Bytes::from(vec![b'x'; len]);
    Envelope::new(MessageId(u128::from(n) << 64 | 7), topic, 1_764_000_000_000, Flags(0), payload)
}

fn codec(c: &mut Criterion) {
    let limits = Limits::default();
    let max = limits.max_frame_bytes;
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(BATCH));

    // One read's worth of deliveries, decoded as the SDK's connection task does.
    let mut stream = BytesMut::new();
    for n in 0..BATCH {
        Frame::encode_deliver(&mut stream, 1, 1, 0, &envelope(n), max).unwrap();
    }
    let stream = stream.freeze();
    group.bench_function("decode_deliver_128", |b| {
        let mut topics = TopicCache::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut frames = Vec::with_capacity(BATCH as usize);
            while let Some(frame) = Frame::decode_cached(&mut buf, &limits, &mut topics).unwrap() {
                frames.push(frame);
            }
            assert_eq!(frames.len() as u64, BATCH);
            frames
        });
    });

    // The same read as the SDK takes it: each DELIVER's head read where it lies by the
    // connection task and weighed for the subscription's buffer, the run cut off in one piece,
    // then each delivery taken from it and its envelope decoded by the subscription.
    group.bench_function("sdk_deliver_128", |b| {
        let (mut topics, aliases) = (TopicCache::default(), TopicAliases::default());
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let (mut at, mut weight) = (0, 0);
            while let Some(head) = Frame::peek_deliver(&buf[at..], &limits) {
                weight += head.envelope_len();
                at += head.frame_len;
            }
            let mut run = buf.split_to(at).freeze();
            let mut envelopes = Vec::with_capacity(BATCH as usize);
            while let Some(raw) = RawDeliver::take_from(&mut run) {
                envelopes.push(raw.decode(&limits, &mut topics, &aliases).unwrap());
            }
            assert_eq!(envelopes.len() as u64, BATCH);
            (weight, envelopes)
        });
    });

    // One read's worth of publishes, decoded as a server connection's reader does.
    let mut publishes = BytesMut::new();
    for n in 0..BATCH {
        let body = Body::Publish { qos: Qos::AtMostOnce, envelope: envelope(n) };
        Frame::new(1, body).encode(&mut publishes, max).unwrap();
    }
    let publishes = publishes.freeze();
    group.bench_function("raw_publish_128", |b| {
        let mut topics = TopicCache::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&publishes[..]);
            let mut envelopes = Vec::with_capacity(BATCH as usize);
            while let Some(raw) = Frame::split(&mut buf, &limits).unwrap() {
                let (_, envelope) = raw.publish(&limits, &mut topics).unwrap().unwrap();
                envelopes.push(envelope);
            }
            assert_eq!(envelopes.len() as u64, BATCH);
            envelopes
        });
    });
    // The same publishes as PUBLISH_COMPACTs (the first defining the topic's number, the rest
    // naming it), as the SDK sends them to a server that reads them.
    let mut compact = BytesMut::new();
    for n in 0..BATCH {
        let envelope = envelope(n);
        let head = PlainHead::of(&envelope);
        let topic = if n == 0 { TopicRef::Define(1) } else { TopicRef::Alias(1) };
        Frame::encode_compact_publish_head(&mut compact, 1, Qos::AtMostOnce, &head, topic, max)
            .unwrap();
        compact.extend_from_slice(&envelope.payload);
    }
    let compact = compact.freeze();
    group.bench_function("raw_compact_publish_128", |b| {
        let mut topics = TopicCache::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&compact[..]);
            let mut envelopes = Vec::with_capacity(BATCH as usize);
            while let Some(raw) = Frame::split(&mut buf, &limits).unwrap() {
                let (_, envelope) = raw.publish(&limits, &mut topics).unwrap().unwrap();
                envelopes.push(envelope);
            }
            assert_eq!(envelopes.len() as u64, BATCH);
            envelopes
        });
    });
    group.bench_function("decode_publish_128", |b| {
        let mut topics = TopicCache::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&publishes[..]);
            let mut envelopes = Vec::with_capacity(BATCH as usize);
            while let Some(frame) = Frame::decode_cached(&mut buf, &limits, &mut topics).unwrap() {
                if let Body::Publish { envelope, .. } = frame.body {
                    envelopes.push(envelope);
                }
            }
            assert_eq!(envelopes.len() as u64, BATCH);
            envelopes
        });
    });

    // Publishes encoded into one outbox buffer.
    let envelopes: Vec<Envelope> = (0..BATCH).map(envelope).collect();
    group.bench_function("encode_publish_128", |b| {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            buf.clear();
            for envelope in &envelopes {
                let frame = Frame::new(
                    1,
                    Body::Publish { qos: Qos::AtMostOnce, envelope: envelope.clone() },
                );
                frame.encode(&mut buf, max).unwrap();
            }
            buf.len()
        });
    });

    // Deliveries written by the server.
    group.bench_function("encode_deliver_128", |b| {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            buf.clear();
            for envelope in &envelopes {
                Frame::encode_deliver(&mut buf, 1, 1, 0, envelope, max).unwrap();
            }
            buf.len()
        });
    });

    // 64 KiB deliveries read from a socket: each read fills the room the buffer has.
    let mut large = BytesMut::new();
    for n in 0..LARGE {
        Frame::encode_deliver(&mut large, 1, 1, 0, &sized(n, 64 * 1024), max).unwrap();
    }
    let large = large.freeze();
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.bench_function("read_deliver_64k", |b| {
        let mut topics = TopicCache::default();
        b.iter(|| {
            let (mut buf, mut frames, mut at) = (BytesMut::new(), Vec::new(), 0);
            while at < large.len() {
                reserve_for_read(&mut buf);
                let take = (buf.capacity() - buf.len()).min(large.len() - at);
                buf.extend_from_slice(&large[at..at + take]);
                at += take;
                while let Some(frame) =
                    Frame::decode_cached(&mut buf, &limits, &mut topics).unwrap()
                {
                    frames.push(frame);
                }
            }
            assert_eq!(frames.len() as u64, LARGE);
            frames
        });
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
