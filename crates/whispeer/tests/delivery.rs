//! Delivery guarantees of the embedded broker: QoS 1 acks, redelivery with backoff, dead
//! letters, TTL, idempotency keys, credit, queue groups. Timing tests run on tokio's paused
//! clock, so they measure the broker's own schedule exactly, not the machine's speed.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, timeout};
use whispeer::{
    Broker, BrokerOptions, ByteBudget, Delivery, Drained, Filter, Message, PublishOptions, Qos,
    Redelivery, SlowConsumer, SubscribeError, SubscribeOptions, Subscription,
};

/// Fails a test that would otherwise hang. On the paused clock this is virtual time.
async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(600), f).await.expect("timed out waiting")
}

fn broker_with(redelivery: Redelivery) -> Broker {
    let mut options = BrokerOptions::default();
    options.redelivery = redelivery;
    Broker::builder(options).build()
}

/// A policy without jitter, so redelivery times are exact.
fn exact(ack_timeout_ms: u64) -> Redelivery {
    Redelivery::new(Duration::from_millis(ack_timeout_ms))
        .backoff(2.0, Duration::from_secs(60))
        .jitter(0.0)
}

fn qos1(filter: &str) -> SubscribeOptions {
    SubscribeOptions::new(filter).qos(Qos::AtLeastOnce)
}

async fn next(sub: &mut Subscription<u32>) -> Delivery<u32> {
    soon(sub.recv_delivery()).await.expect("subscription open")
}

#[tokio::test(start_paused = true)]
async fn unacked_messages_come_back_with_exponential_backoff_then_go_to_the_dead_letter_topic() {
    let broker = broker_with(exact(1000).max_attempts(4));
    let mut sub = broker.subscription::<u32>(qos1("jobs/+")).unwrap();
    let mut dead = broker.messages("$dlq/#").unwrap();
    let start = Instant::now();
    broker.publish("jobs/a", &7u32).unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let delivery = next(&mut sub).await;
        assert_eq!(*delivery.value(), 7);
        seen.push((delivery.attempt(), start.elapsed().as_millis()));
        drop(delivery); // not acknowledged
    }
    // Waits of 1 s, 2 s and 4 s between the four deliveries.
    assert_eq!(seen, [(1, 0), (2, 1000), (3, 3000), (4, 7000)]);
    // Timeouts are acted on while the subscriber waits for messages.
    let letter = tokio::select! {
        delivery = sub.recv_delivery() => panic!("delivered again: {delivery:?}"),
        letter = soon(dead.recv_message()) => letter.unwrap(),
    };
    assert_eq!(start.elapsed().as_millis(), 15_000, "the fourth delivery waited 8 s too");
    assert_eq!(letter.topic().as_str(), "$dlq/jobs/a");
    let letter = letter.dead_letter().expect("a dead letter");
    assert_eq!((letter.reason.as_str(), letter.attempts), ("max-attempts", 4));
    assert_eq!(letter.message.topic().as_str(), "jobs/a");
    assert_eq!(letter.message.decode::<u32>().unwrap(), 7);
    let stats = broker.stats();
    assert_eq!((stats.redelivered, stats.dead_lettered, stats.acked), (3, 1, 0));
    assert!(sub.try_recv_delivery().is_none(), "given up for good");
    assert_eq!(sub.stats().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn an_ack_settles_the_message_and_a_late_ack_settles_nothing() {
    let broker = broker_with(exact(1000));
    let mut sub = broker.subscription::<u32>(qos1("t")).unwrap();
    broker.publish("t", &1u32).unwrap();
    broker.publish("t", &2u32).unwrap();
    let first = next(&mut sub).await;
    let acker = sub.acker().unwrap();
    let id = first.message().id();
    assert!(first.ack());
    assert!(!acker.ack(id), "a second ack settles nothing");
    let second = next(&mut sub).await;
    assert_eq!(*second.value(), 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Only the unacknowledged second message comes back.
    let again = next(&mut sub).await;
    assert_eq!((*again.value(), again.attempt(), again.is_redelivery()), (2, 2, true));
    assert!(again.ack());
    assert_eq!(sub.stats().unacked, 0);
    assert_eq!(broker.stats().acked, 2);
}

/// Acks settled together (a server's read of ACK frames) settle each message named once,
/// count only those, and leave the others to come again after their timeout.
#[tokio::test(start_paused = true)]
async fn acks_settled_together_count_only_what_was_unacknowledged() {
    let broker = broker_with(exact(1000));
    let mut sub = broker.messages(qos1("t")).unwrap();
    for n in 0..3u32 {
        broker.publish("t", &n).unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (message, _) = sub.try_recv_unsettled().expect("queued");
        ids.push(message.id());
    }
    let acker = sub.acker().unwrap();
    let never_delivered = whispeer::MessageId(7);
    assert_eq!(acker.ack_all([ids[0], ids[1], ids[0], never_delivered]), 2);
    assert_eq!((broker.stats().acked, sub.stats().unacked), (2, 1));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (again, attempt) =
        soon(std::future::poll_fn(|cx| sub.poll_recv_unsettled(cx))).await.unwrap();
    assert_eq!((again.id(), attempt), (ids[2], 2), "only the third comes again");
    assert_eq!(acker.ack_all([ids[2]]), 1);
    assert_eq!((broker.stats().acked, sub.stats().unacked), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn raw_messages_are_acknowledged_when_taken_and_unsettled_ones_are_not() {
    let broker = broker_with(exact(1000));
    let mut acked = broker.messages(qos1("a")).unwrap();
    let mut unsettled = broker.messages(qos1("u")).unwrap();
    broker.publish("a", &1u32).unwrap();
    broker.publish("u", &2u32).unwrap();
    assert_eq!(soon(acked.recv_message()).await.unwrap().decode::<u32>().unwrap(), 1);
    let (message, attempt) = unsettled.try_recv_unsettled().expect("queued");
    assert_eq!((message.decode::<u32>().unwrap(), attempt), (2, 1));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(acked.try_recv_message().is_none(), "taken with recv_message: acknowledged");
    // Left unacknowledged: back after its ack timeout, as its second attempt, until settled.
    let (again, attempt) =
        soon(std::future::poll_fn(|cx| unsettled.poll_recv_unsettled(cx))).await.unwrap();
    assert_eq!((again.id(), attempt), (message.id(), 2));
    assert!(unsettled.acker().unwrap().ack(again.id()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(unsettled.try_recv_unsettled().is_none());
    assert_eq!(broker.stats().acked, 2);
}

#[tokio::test(start_paused = true)]
async fn prefetch_bounds_the_unacknowledged_messages_of_a_subscriber() {
    let broker = broker_with(exact(60_000));
    let mut sub = broker.subscription::<u32>(qos1("t").prefetch(2)).unwrap();
    for i in 0..5u32 {
        broker.publish("t", &i).unwrap();
    }
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    assert!(sub.try_recv_delivery().is_none(), "no credit left");
    assert_eq!(sub.stats().queued, 3);
    let waiting = tokio::spawn(async move {
        let c = next(&mut sub).await;
        (*c.value(), sub)
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiting.is_finished(), "still no credit");
    assert!(a.ack());
    let (value, _sub) = soon(waiting).await.unwrap();
    assert_eq!(value, 2, "an ack gives the credit back, in order");
    drop(b);
}

#[tokio::test(start_paused = true)]
async fn nack_requeues_at_once_or_dead_letters() {
    let broker = broker_with(exact(60_000));
    let mut sub = broker.subscription::<u32>(qos1("t")).unwrap();
    let mut dead = broker.messages("$dlq/t").unwrap();
    broker.publish("t", &1u32).unwrap();
    let start = Instant::now();
    assert!(next(&mut sub).await.nack(true));
    let again = next(&mut sub).await;
    assert_eq!((again.attempt(), start.elapsed()), (2, Duration::ZERO));
    assert!(again.nack(false));
    let letter = soon(dead.recv_message()).await.unwrap().dead_letter().unwrap();
    assert_eq!((letter.reason.as_str(), letter.attempts), ("rejected", 2));
    assert_eq!(broker.stats().nacked, 2);
}

#[tokio::test(start_paused = true)]
async fn undecodable_qos1_messages_are_dead_lettered_not_retried() {
    let broker = broker_with(exact(1000));
    let mut sub = broker.subscription::<u32>(qos1("t")).unwrap();
    let mut dead = broker.messages("$dlq/t").unwrap();
    broker.publish_bytes("t", vec![1, 2, 3]).unwrap(); // raw bytes are no u32
    broker.publish("t", &5u32).unwrap();
    assert_eq!(*next(&mut sub).await.value(), 5);
    let letter = soon(dead.recv_message()).await.unwrap().dead_letter().unwrap();
    assert_eq!(letter.reason, "undecodable");
    assert_eq!(sub.stats().decode_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn callbacks_ack_on_return_and_requeue_on_panic() {
    let broker = broker_with(exact(60_000));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let _sub = broker
        .subscribe(qos1("t"), move |n: u32| {
            let mut log = log.lock().unwrap();
            log.push(n);
            let first_time = log.iter().filter(|&&m| m == n).count() == 1;
            drop(log);
            assert!(!(n == 2 && first_time), "fails once");
        })
        .unwrap();
    for n in 1..=3u32 {
        broker.publish("t", &n).unwrap();
    }
    soon(async {
        while broker.stats().acked < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    // A message to deliver again goes before new ones.
    assert_eq!(*seen.lock().unwrap(), [1, 2, 2, 3], "the panicked message came back first");
    let stats = broker.stats();
    assert_eq!((stats.callback_panics, stats.redelivered, stats.nacked), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn expired_messages_are_never_delivered_and_are_counted() {
    let mut options = BrokerOptions::default();
    options.topic_ttl = vec![(Filter::parse("quotes/#").unwrap(), Duration::from_millis(500))];
    let broker = Broker::builder(options).build();
    let mut plain = broker.subscription::<u32>("#").unwrap();
    let mut acked = broker.subscription::<u32>(qos1("#")).unwrap();
    broker
        .publish_with("news/a", &1u32, &PublishOptions::new().ttl(Duration::from_secs(1)))
        .unwrap();
    broker.publish("quotes/x", &2u32).unwrap(); // the topic's default: 500 ms
    broker.publish("news/b", &3u32).unwrap(); // no time to live
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(soon(plain.recv()).await, Some(1));
    assert_eq!(soon(plain.recv()).await, Some(3));
    assert_eq!(plain.stats().expired, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(soon(acked.recv()).await, Some(3));
    assert_eq!(acked.stats().expired, 2);
    assert_eq!(broker.stats().expired, 3);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_expires_while_unacknowledged_is_not_redelivered() {
    let broker = broker_with(exact(1000));
    let mut sub = broker.subscription::<u32>(qos1("t")).unwrap();
    let ttl = PublishOptions::new().ttl(Duration::from_millis(1500));
    broker.publish_with("t", &1u32, &ttl).unwrap();
    broker.publish("t", &2u32).unwrap();
    drop(next(&mut sub).await); // 1, left unacknowledged
    assert!(next(&mut sub).await.ack()); // 2
    drop(next(&mut sub).await); // 1 again at 1 s
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(sub.try_recv_delivery().is_none());
    assert_eq!((sub.stats().expired, sub.stats().unacked), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn idempotency_keys_drop_repeats_within_the_window_only() {
    let mut options = BrokerOptions::default();
    options.dedup_window = Duration::from_secs(10);
    let broker = Broker::builder(options).build();
    let mut sub = broker.subscription::<u32>("orders").unwrap();
    let key = PublishOptions::new().idempotency_key("order-42");
    let first = broker.publish_with("orders", &1u32, &key).unwrap();
    let repeat = broker.publish_with("orders", &2u32, &key).unwrap();
    assert!(!first.duplicate && repeat.duplicate);
    assert_eq!(repeat.subscribers, 0);
    // The same key on another topic is another message.
    broker.publish_with("other", &3u32, &key).unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(!broker.publish_with("orders", &4u32, &key).unwrap().duplicate);
    assert_eq!(soon(sub.recv()).await, Some(1));
    assert_eq!(soon(sub.recv()).await, Some(4));
    assert_eq!(broker.stats().duplicates, 1);
}

/// What each member of a group got: (member, value).
type Got = Arc<Mutex<Vec<(usize, u32)>>>;

/// Subscribes `members` callback subscribers with `options` and returns what each one got.
fn group_members(
    broker: &Broker,
    options: &SubscribeOptions,
    members: usize,
) -> (Vec<whispeer::Subscriber>, Got) {
    let got = Got::default();
    let subs = (0..members)
        .map(|member| {
            let got = Arc::clone(&got);
            let record = move |n: u32| got.lock().expect("not poisoned").push((member, n));
            broker.subscribe(options.clone(), record).expect("subscribed")
        })
        .collect();
    (subs, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_gives_each_message_to_exactly_one_member() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    // Queues large enough that nothing is dropped while the publisher outruns the members.
    let mut solo =
        broker.subscription::<u32>(SubscribeOptions::new("work/#").capacity(8192)).unwrap();
    for qos in [Qos::AtMostOnce, Qos::AtLeastOnce] {
        let options =
            SubscribeOptions::new("work/#").group(format!("g{qos:?}")).qos(qos).capacity(4096);
        let (members, got) = group_members(&broker, &options, 3);
        let receipt = broker.publish("work/0", &0u32).unwrap();
        assert_eq!(receipt.subscribers, 2, "the group counts once, beside the solo subscriber");
        for n in 1..3000u32 {
            broker.publish(&format!("work/{}", n % 7), &n).unwrap();
        }
        soon(async {
            while got.lock().unwrap().len() < 3000 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let got = got.lock().unwrap();
        let values: BTreeSet<u32> = got.iter().map(|(_, n)| *n).collect();
        assert_eq!((got.len(), values.len()), (3000, 3000), "each message exactly once");
        drop(members);
    }
    for n in 0..6000u32 {
        let _ = n;
        assert!(soon(solo.recv()).await.is_some(), "a plain subscriber still gets everything");
    }
}

#[tokio::test(start_paused = true)]
async fn a_member_that_leaves_hands_its_unacked_messages_to_another() {
    let broker = broker_with(exact(60_000));
    let options = qos1("jobs").group("workers");
    let mut a = broker.subscription::<u32>(options.clone()).unwrap();
    let mut b = broker.subscription::<u32>(options.clone()).unwrap();
    for n in 0..4u32 {
        broker.publish("jobs", &n).unwrap();
    }
    let held: Vec<u32> =
        [next(&mut a).await, next(&mut a).await].iter().map(|d| *d.value()).collect();
    assert_eq!(held, [0, 1]);
    // A member holds at most its share of what there is; the rest is the other's.
    assert!(a.try_recv_delivery().is_none(), "a holds its share");
    let others = [next(&mut b).await, next(&mut b).await];
    assert_eq!(others.iter().map(|d| *d.value()).collect::<Vec<_>>(), [2, 3]);
    drop(a); // killed with two unacknowledged messages
    for n in 0..2u32 {
        let d = next(&mut b).await;
        assert_eq!((*d.value(), d.attempt()), (n, 2), "redelivered in order, marked");
        assert!(d.ack());
    }
    assert!(others.into_iter().all(Delivery::ack));
    assert_eq!(b.stats().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn a_group_lingers_for_a_member_that_comes_back_then_goes() {
    let mut options = BrokerOptions::default();
    options.group_linger = Duration::from_secs(30);
    options.redelivery = exact(60_000);
    let broker = Broker::builder(options).build();
    let durable = qos1("inbox/ada").group("ada-phone");
    let mut phone = broker.subscription::<u32>(durable.clone()).unwrap();
    broker.publish("inbox/ada", &1u32).unwrap();
    drop(next(&mut phone).await);
    drop(phone); // offline, with message 1 unacknowledged
    broker.publish("inbox/ada", &2u32).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut phone = broker.subscription::<u32>(durable.clone()).unwrap();
    let again = next(&mut phone).await;
    assert_eq!((*again.value(), again.attempt()), (1, 2));
    let missed = next(&mut phone).await;
    assert_eq!((*missed.value(), missed.attempt()), (2, 1));
    drop(phone);
    assert_eq!(broker.stats().subscriptions, 1, "the group lingers");
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(broker.stats().subscriptions, 0, "then it is removed");
    assert_eq!(broker.publish("inbox/ada", &3u32).unwrap().subscribers, 0);
}

#[tokio::test]
async fn group_members_must_agree_and_names_are_checked() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let _a = broker.messages(SubscribeOptions::new("t").group("g")).unwrap();
    let mismatch = broker.messages(qos1("t").group("g")).unwrap_err();
    assert!(matches!(mismatch, SubscribeError::GroupMismatch { existing: Qos::AtMostOnce, .. }));
    // The same name on another filter is another group.
    assert!(broker.messages(qos1("u").group("g")).is_ok());
    for bad in ["", "tab\there", &"x".repeat(256)] {
        let err = broker.messages(SubscribeOptions::new("t").group(bad)).unwrap_err();
        assert!(matches!(err, SubscribeError::InvalidGroup { .. }), "{bad:?}");
    }
    let err = broker.messages(qos1("t").prefetch(0)).unwrap_err();
    assert!(matches!(err, SubscribeError::InvalidPrefetch { prefetch: 0, .. }));
}

#[tokio::test]
async fn subscriptions_sharing_a_budget_hold_at_most_its_bytes_together() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    // Room for about four 1 KiB messages (each weighs payload + 256).
    let budget = ByteBudget::new(4 * 1280);
    let options = |filter: &str| {
        SubscribeOptions::new(filter).budget(budget.clone()).slow_consumer(SlowConsumer::DropNewest)
    };
    let a: Subscription<Message> = broker.messages(options("a")).unwrap();
    let b: Subscription<Message> = broker.messages(options("b")).unwrap();
    for _ in 0..10 {
        broker.publish_bytes("a", vec![0u8; 1024]).unwrap();
        broker.publish_bytes("b", vec![0u8; 1024]).unwrap();
    }
    let held = a.stats().queued + b.stats().queued;
    assert_eq!(held, 4, "four messages between them, not four each");
    assert!(budget.used() <= budget.max());
    assert_eq!(broker.stats().dropped_newest, 16);
    drop((a, b));
    assert_eq!(budget.used(), 0, "dropped queues give their bytes back");
}

#[tokio::test]
async fn every_message_dropped_to_make_room_is_counted_once() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    // Room for four small messages (each weighs its payload + 256 bytes).
    let options =
        SubscribeOptions::new("t").max_bytes(4 * 266).slow_consumer(SlowConsumer::DropOldest);
    let sub: Subscription<Message> = broker.messages(options).unwrap();
    for _ in 0..4 {
        broker.publish_bytes("t", vec![0u8; 10]).unwrap();
    }
    // A large one makes room by dropping three of the small ones at once.
    broker.publish_bytes("t", vec![0u8; 3 * 266 - 256]).unwrap();
    assert_eq!(sub.stats().dropped_oldest, 3);
    assert_eq!(broker.stats().dropped_oldest, 3, "the broker counts each, not one per publish");
    assert_eq!(sub.stats().queued, 2);
}

#[tokio::test]
async fn messages_still_queued_when_a_subscription_closes_are_counted_as_discarded() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let sub: Subscription<Message> = broker.messages("t").unwrap();
    for _ in 0..5 {
        broker.publish_bytes("t", vec![0u8; 10]).unwrap();
    }
    drop(sub);
    let stats = broker.stats();
    assert_eq!((stats.deliveries, stats.discarded), (5, 5), "queued, never taken");
}

#[tokio::test]
async fn budgets_within_a_server_wide_one_hold_at_most_its_bytes_together() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    // Two connections of room for four 1 KiB messages each, within a server's room for five.
    let server = ByteBudget::new(5 * 1280);
    let connections =
        [ByteBudget::within(4 * 1280, &server), ByteBudget::within(4 * 1280, &server)];
    let options = |filter: &str, budget: &ByteBudget| {
        SubscribeOptions::new(filter).budget(budget.clone()).slow_consumer(SlowConsumer::DropNewest)
    };
    let a: Subscription<Message> = broker.messages(options("a", &connections[0])).unwrap();
    let b: Subscription<Message> = broker.messages(options("b", &connections[1])).unwrap();
    for _ in 0..10 {
        broker.publish_bytes("a", vec![0u8; 1024]).unwrap();
    }
    assert_eq!(a.stats().queued, 4, "its own budget bounds the first");
    for _ in 0..10 {
        broker.publish_bytes("b", vec![0u8; 1024]).unwrap();
    }
    assert_eq!(b.stats().queued, 1, "the server's bounds the second");
    assert_eq!((server.used(), connections[1].used()), (5 * 1280, 1280));
    drop(a);
    assert_eq!(server.used(), 1280, "a dropped queue gives its bytes back to both");
    for _ in 0..10 {
        broker.publish_bytes("b", vec![0u8; 1024]).unwrap();
    }
    assert_eq!(b.stats().queued, 4, "room again, up to its own budget");
}

#[tokio::test]
async fn a_drain_takes_in_order_until_told_to_stop_and_gives_the_room_back_once() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let budget = ByteBudget::new(1 << 20);
    let options = SubscribeOptions::new("t").budget(budget.clone());
    let mut sub: Subscription<Message> = broker.messages(options).unwrap();
    // What one 1 KiB message counts against a budget: its payload and 256 bytes.
    let weight = 1024 + 256;
    for n in 0..10u8 {
        broker.publish_bytes("t", vec![n; 1024]).unwrap();
    }
    let (mut seen, mut used_while_taking) = (Vec::new(), Vec::new());
    let drained = sub.drain_unsettled(None, |message, attempt| {
        assert_eq!(attempt, 1);
        seen.push(message.payload()[0]);
        used_while_taking.push(budget.used());
        seen.len() < 4
    });
    assert_eq!((drained, seen.clone()), (Drained::More, vec![0, 1, 2, 3]));
    // Given back at the end, for all four at once: until then the budget still held them.
    assert_eq!(used_while_taking, vec![10 * weight; 4]);
    assert_eq!((budget.used(), sub.stats().queued, sub.stats().received), (6 * weight, 6, 4));

    // A panic while it takes gives back what it took all the same.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sub.drain_unsettled(None, |message, _| {
            assert_ne!(message.payload()[0], 5, "the second one taken");
            true
        })
    }));
    assert!(panicked.is_err());
    assert_eq!((budget.used(), sub.stats().queued, sub.stats().received), (4 * weight, 4, 6));

    // With a context, running out registers its waker: a publish wakes it.
    let woken = Arc::new(Flag::default());
    let waker = std::task::Waker::from(Arc::clone(&woken));
    let mut cx = std::task::Context::from_waker(&waker);
    seen.clear();
    let drained = sub.drain_unsettled(Some(&mut cx), |message, _| {
        seen.push(message.payload()[0]);
        true
    });
    assert_eq!((drained, seen.clone()), (Drained::Empty, vec![6, 7, 8, 9]));
    assert_eq!((budget.used(), sub.stats().received), (0, 10));
    assert!(!woken.0.load(Ordering::Acquire));
    broker.publish_bytes("t", vec![10; 1024]).unwrap();
    assert!(woken.0.load(Ordering::Acquire), "woken by the next publish");

    // A subscription its policy closed ends the drain.
    let options = SubscribeOptions::new("d").capacity(1).slow_consumer(SlowConsumer::Disconnect);
    let mut closed: Subscription<Message> = broker.messages(options).unwrap();
    broker.publish_bytes("d", vec![0; 8]).unwrap();
    broker.publish_bytes("d", vec![1; 8]).unwrap();
    assert_eq!(closed.drain_unsettled(Some(&mut cx), |_, _| true), Drained::Ended);
}

/// A waker that records that it was woken.
#[derive(Default)]
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// A subscriber that always finds a message waiting still lets the other tasks of its runtime
/// run: taking messages spends the task's share of tokio's cooperative budget (a unit for 32
/// of them: on one thread, the other task waits for 4,096 at most, not for all 6,000).
#[tokio::test(flavor = "current_thread")]
async fn a_subscriber_that_always_finds_a_message_still_yields_to_other_tasks() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let mut sub = broker.messages(SubscribeOptions::new("busy").capacity(8192)).unwrap();
    for n in 0..6000u32 {
        broker.publish_bytes("busy", n.to_be_bytes().to_vec()).unwrap();
    }
    let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&other_ran);
    tokio::spawn(async move { flag.store(true, Ordering::Relaxed) });
    let mut taken_before_it_ran = None;
    for n in 0..6000u32 {
        let message = soon(sub.recv()).await.expect("subscription open");
        assert_eq!(&message.payload()[..], n.to_be_bytes());
        if taken_before_it_ran.is_none() && other_ran.load(Ordering::Relaxed) {
            taken_before_it_ran = Some(n);
        }
    }
    let taken = taken_before_it_ran.expect("the other task ran only once the queue was empty");
    assert!(taken <= 4096, "the other task waited for {taken} messages");
}
