//! The connection task's QoS 1 bookkeeping, without a socket.

use bytes::Bytes;
use whispeer_proto::{ContentType, Filter, Flags, MessageId, Topic};

use super::*;

fn actor_with_sub(qos: Qos) -> (Actor, mpsc::Receiver<Incoming>, Arc<AtomicU64>) {
    let (_commands, rx) = mpsc::channel(1);
    let (_settles, settled) = mpsc::unbounded_channel();
    let mut actor = Actor::new(ClientOptions::new("127.0.0.1:1"), rx, settled);
    let (deliver, deliveries) = mpsc::channel(8);
    let duplicates = Arc::new(AtomicU64::new(0));
    let filter = Filter::parse("t").unwrap();
    let spec = SubSpec { filter, qos, prefetch: 0, group: None, start: StartAt::Latest };
    let acked = RecentIds::default();
    let counter = Arc::clone(&duplicates);
    let sub = Sub { spec, deliver, acked, duplicates: counter, last_offset: None };
    actor.subscriptions.insert(1, sub);
    (actor, deliveries, duplicates)
}

fn deliver(id: u128) -> Frame {
    let topic = Topic::parse("t").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let envelope = Envelope::new(MessageId(id), topic, 0, flags, Bytes::from_static(b"x"));
    Frame::new(0, Body::Deliver { sub: 1, attempt: 2, offset: 0, envelope })
}

#[test]
fn a_redelivery_of_an_acked_message_is_acked_again_and_dropped() {
    let (mut actor, mut deliveries, duplicates) = actor_with_sub(Qos::AtLeastOnce);
    let mut out = BytesMut::new();
    // The ack is encoded (and remembered), then the connection is lost before it is sent.
    actor.settle(Settle { sub: 1, id: MessageId(7), requeue: None }, &mut out, usize::MAX).unwrap();
    out.clear();
    actor.dispatch(deliver(7), &mut out, usize::MAX).unwrap();
    actor.dispatch(deliver(8), &mut out, usize::MAX).unwrap();
    let frame = Frame::decode(&mut out, &Limits::default()).unwrap().unwrap();
    assert_eq!(frame.body, Body::Ack { sub: 1, id: MessageId(7) });
    assert!(out.is_empty(), "nothing else was sent");
    assert_eq!(deliveries.try_recv().unwrap().envelope.id, MessageId(8), "7 was dropped");
    assert!(deliveries.try_recv().is_err());
    assert_eq!(duplicates.load(Ordering::Relaxed), 1);
}

#[test]
fn a_resubscription_resumes_after_the_last_offset_of_an_exact_topic_only() {
    let spec = |filter: &str, start| SubSpec {
        filter: Filter::parse(filter).unwrap(),
        qos: Qos::AtMostOnce,
        prefetch: 0,
        group: None,
        start,
    };
    let mut exact = spec("log", StartAt::Earliest);
    exact.resume(Some(41));
    assert_eq!(exact.start, StartAt::Offset(42));
    let mut nothing_yet = spec("log", StartAt::Earliest);
    nothing_yet.resume(None);
    assert_eq!(nothing_yet.start, StartAt::Latest, "replaying again would repeat");
    let mut wildcard = spec("log/#", StartAt::Earliest);
    wildcard.resume(Some(7));
    assert_eq!(wildcard.start, StartAt::Latest);
}

#[test]
fn recent_ids_forget_the_oldest_beyond_their_capacity() {
    let mut recent = RecentIds::default();
    for id in 0..5 {
        recent.remember(MessageId(id), 3);
    }
    recent.remember(MessageId(4), 3);
    let kept: Vec<u128> = recent.order.iter().map(|id| id.0).collect();
    assert_eq!(kept, [2, 3, 4]);
    assert!(!recent.set.contains(&MessageId(1)) && recent.set.len() == 3);
}
