//! The tracker's waits and a queue group's shares.

use std::sync::Arc;

use bytes::Bytes;
use whispeer_proto::{ContentType, Envelope, Filter, Flags, Topic};

use super::*;
use crate::SlowConsumer;

fn group_with(messages: u64) -> Queue {
    let queue = Queue::new(Filter::parse("t").unwrap(), 1024, usize::MAX, SlowConsumer::DropOldest)
        .for_group("g");
    for n in 0..messages {
        let flags = Flags::with_content(ContentType::Raw);
        let topic = Topic::parse("t").unwrap();
        let envelope = Envelope::new(MessageId(u128::from(n)), topic, 0, flags, Bytes::new());
        queue.push(Message::new(envelope, 1, None, None));
    }
    queue
}

/// Takes messages for `member` until the tracker gives none; their ids.
fn take_all(tracker: &Tracker, member: u64, queue: &Queue) -> Vec<MessageId> {
    std::iter::from_fn(|| tracker.next(member, queue, Instant::now(), None).next)
        .map(|(message, _)| message.id())
        .collect()
}

#[test]
fn a_burst_is_shared_by_the_group_and_a_member_alone_takes_what_its_credit_allows() {
    let (queue, tracker) = (group_with(20), Tracker::new(Redelivery::default()));
    let (a, b) = (tracker.join(32), tracker.join(32));
    // The first to poll takes its half, not the burst.
    let first = take_all(&tracker, a, &queue);
    assert_eq!(first.len(), 10);
    assert_eq!(take_all(&tracker, b, &queue).len(), 10);
    // Alone, a member takes up to its prefetch.
    let (queue, alone) = (group_with(40), Tracker::new(Redelivery::default()));
    let only = alone.join(32);
    assert_eq!(take_all(&alone, only, &queue).len(), 32);
    // A member with nothing in flight may always take one, even of a single message.
    let (queue, three) = (group_with(1), Tracker::new(Redelivery::default()));
    let members = [three.join(8), three.join(8), three.join(8)];
    assert_eq!(take_all(&three, members[2], &queue).len(), 1);
}

#[test]
fn a_member_held_to_its_share_takes_more_as_its_messages_settle_or_more_come() {
    let (queue, tracker) = (group_with(8), Tracker::new(Redelivery::default()));
    let (a, _absent) = (tracker.join(32), tracker.join(32));
    let mine = take_all(&tracker, a, &queue);
    assert_eq!(mine.len(), 4, "its share of eight");
    // The absent member never comes: each settled message lets it take about one more.
    tracker.ack(mine[0]);
    tracker.ack(mine[1]);
    assert_eq!(take_all(&tracker, a, &queue).len(), 1, "two settled: a share of 3 of 6");
    // Refused with a context, it is woken by the next push, which raises its share.
    let woken = Arc::new(Woken::default());
    let waker = Waker::from(Arc::clone(&woken));
    let mut cx = Context::from_waker(&waker);
    assert!(tracker.next(a, &queue, Instant::now(), Some(&mut cx)).next.is_none());
    assert_eq!(woken.0.load(std::sync::atomic::Ordering::Relaxed), 0);
    let flags = Flags::with_content(ContentType::Raw);
    let envelope = Envelope::new(MessageId(99), Topic::parse("t").unwrap(), 0, flags, Bytes::new());
    queue.push(Message::new(envelope, 1, None, None));
    assert_eq!(woken.0.load(std::sync::atomic::Ordering::Relaxed), 1, "woken by the push");
}

/// Counts its wake-ups.
#[derive(Default)]
struct Woken(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn waits_grow_by_the_factor_up_to_the_cap() {
    let policy =
        Redelivery::new(Duration::from_secs(1)).backoff(3.0, Duration::from_secs(20)).jitter(0.0);
    let waits: Vec<u64> = (1..=5).map(|n| policy.wait(n).as_secs()).collect();
    assert_eq!(waits, [1, 3, 9, 20, 20]);
    assert_eq!(policy.wait(u32::MAX), Duration::from_secs(20));
}

#[test]
fn jitter_only_shortens_the_wait_by_at_most_its_fraction() {
    let policy = Redelivery::new(Duration::from_secs(10)).jitter(0.25);
    let waits: Vec<Duration> = (0..1000).map(|n| policy.jittered_wait(1, n)).collect();
    assert!(waits.iter().all(|w| *w <= Duration::from_secs(10)));
    assert!(waits.iter().all(|w| *w >= Duration::from_millis(7500)));
    let (shortest, longest) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
    assert!(*longest - *shortest > Duration::from_secs(2), "spread over the jitter range");
}
