//! Retained history and replay: bounds by count, bytes and age; starting at the earliest
//! message, an offset or a time; evicted offsets refused with where history begins; and no gap
//! or repeat between replayed and live messages while publishers keep going.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::timeout;
use whispeer::{
    Broker, BrokerOptions, Filter, Message, Qos, Retention, StartAt, SubscribeError,
    SubscribeOptions, Subscription,
};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out waiting")
}

fn broker(rules: &[(&str, Retention)]) -> Broker {
    let mut options = BrokerOptions::default();
    options.retention = rules.iter().map(|(f, r)| (Filter::parse(f).unwrap(), *r)).collect();
    Broker::builder(options).build()
}

fn from(filter: &str, start: StartAt) -> SubscribeOptions {
    SubscribeOptions::new(filter).start(start)
}

/// (topic, value, offset) of the next `n` messages.
async fn take(sub: &mut Subscription<Message>, n: usize) -> Vec<(String, u32, u64)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = soon(sub.recv_message()).await.unwrap();
        got.push((m.topic().to_string(), m.decode::<u32>().unwrap(), m.offset().unwrap_or(0)));
    }
    got
}

fn values(got: &[(String, u32, u64)]) -> Vec<u32> {
    got.iter().map(|(_, v, _)| *v).collect()
}

#[tokio::test]
async fn history_is_bounded_by_count_and_replays_from_earliest_or_an_offset() {
    let broker = broker(&[("log/#", Retention::messages(3))]);
    for n in 1..=5u32 {
        broker.publish("log/a", &n).unwrap();
    }
    let mut all = broker.messages(from("log/a", StartAt::Earliest)).unwrap();
    let got = take(&mut all, 3).await;
    assert_eq!(got.iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(), [(3, 3), (4, 4), (5, 5)]);
    let evicted = broker.messages(from("log/a", StartAt::Offset(1))).unwrap_err();
    assert!(matches!(evicted, SubscribeError::OffsetEvicted { requested: 1, first: 3 }));
    assert_eq!(broker.stats().subscriptions, 1, "the refused subscription left no route");
    let mut tail = broker.messages(from("log/a", StartAt::Offset(4))).unwrap();
    broker.publish("log/a", &6u32).unwrap();
    assert_eq!(values(&take(&mut tail, 3).await), [4, 5, 6], "history, then live");
    assert_eq!(values(&take(&mut all, 1).await), [6]);
    let mut future = broker.messages(from("log/a", StartAt::Offset(100))).unwrap();
    broker.publish("log/a", &7u32).unwrap();
    assert_eq!(values(&take(&mut future, 1).await), [7], "past the end: live only");
}

#[tokio::test]
async fn history_is_bounded_by_bytes_and_unretained_topics_keep_none() {
    // Each 1 KiB message weighs 1024 + 256 bytes: room for two.
    let broker = broker(&[("big", Retention::messages(100).max_bytes(2 * 1280))]);
    for n in 0..5u8 {
        broker.publish_bytes("big", vec![n; 1024]).unwrap();
        broker.publish("other", &u32::from(n)).unwrap();
    }
    let mut big = broker.messages(from("big", StartAt::Earliest)).unwrap();
    let first = soon(big.recv_message()).await.unwrap();
    assert_eq!((first.payload()[0], first.offset()), (3, Some(4)));
    let second = soon(big.recv_message()).await.unwrap();
    assert_eq!(second.payload()[0], 4);
    assert!(big.try_recv_message().is_none());
    let mut other = broker.messages(from("other", StartAt::Earliest)).unwrap();
    assert!(other.try_recv_message().is_none(), "no rule, no history");
    broker.publish("other", &9u32).unwrap();
    let live = soon(other.recv_message()).await.unwrap();
    assert_eq!((live.decode::<u32>().unwrap(), live.offset()), (9, None));
}

/// (first offset, messages) of each retained topic, by name.
fn held(broker: &Broker) -> Vec<(String, u64, usize)> {
    let topics = broker.topics().into_iter();
    topics.map(|t| (t.topic.to_string(), t.first_offset, t.messages)).collect()
}

#[tokio::test]
async fn all_topics_history_together_keeps_to_its_bound_the_oldest_going_first() {
    // Each message weighs 744 + 256 = 1,000 bytes: room for ten in all, though each topic's
    // own rule would keep a hundred.
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("log/#").unwrap(), Retention::messages(100))];
    options.history_max_bytes = 10_000;
    let broker = Broker::builder(options).build();
    let publish = |topic: &str, n: u8| {
        broker.publish_bytes(topic, vec![n; 744]).unwrap();
    };
    (1..=6).for_each(|n| publish("log/a", n));
    (1..=4).for_each(|n| publish("log/b", n));
    assert_eq!(broker.stats().history_evicted, 0, "ten fit");
    assert_eq!(broker.stats().history_bytes, 10_000);
    // The eleventh passes the bound: the oldest goes, log/a's first.
    publish("log/b", 5);
    assert_eq!(held(&broker), [("log/a".into(), 2, 5), ("log/b".into(), 1, 5)]);
    assert_eq!((broker.stats().history_evicted, broker.stats().history_bytes), (1, 10_000));
    // Publishing to log/a takes log/a's own 2–4: older than anything of log/b's.
    (7..=9).for_each(|n| publish("log/a", n));
    assert_eq!(held(&broker), [("log/a".into(), 5, 5), ("log/b".into(), 1, 5)]);
    // Still publishing to log/a: its 5 and 6 go, then log/b's 1, now the oldest there is.
    (10..=12).for_each(|n| publish("log/a", n));
    assert_eq!(held(&broker), [("log/a".into(), 7, 6), ("log/b".into(), 2, 4)]);
    assert_eq!((broker.stats().history_evicted, broker.stats().history_bytes), (7, 10_000));
    // What is left replays in the order it was accepted; what went is refused as evicted.
    let mut all = broker.messages(from("log/#", StartAt::Earliest)).unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        let m = soon(all.recv_message()).await.unwrap();
        got.push((m.topic().to_string(), m.payload()[0]));
    }
    let b = |n| ("log/b".to_string(), n);
    let a = |n| ("log/a".to_string(), n);
    assert_eq!(got, [b(2), b(3), b(4), b(5), a(7), a(8), a(9), a(10), a(11), a(12)]);
    assert!(all.try_recv_message().is_none());
    let evicted = broker.messages(from("log/b", StartAt::Offset(1))).unwrap_err();
    assert!(matches!(evicted, SubscribeError::OffsetEvicted { requested: 1, first: 2 }));
}

#[test]
fn the_bound_on_all_history_still_takes_the_oldest_after_a_topic_evicted_by_its_own_rule() {
    // `x` keeps two messages, `y` a hundred; all together five (1,000 bytes each).
    let mut options = BrokerOptions::default();
    options.retention = vec![
        (Filter::parse("x").unwrap(), Retention::messages(2)),
        (Filter::parse("y").unwrap(), Retention::messages(100)),
    ];
    options.history_max_bytes = 5_000;
    let broker = Broker::builder(options).build();
    let publish = |topic: &str, n: u8| {
        broker.publish_bytes(topic, vec![n; 744]).unwrap();
    };
    // x1, y1, x2, x3 (x's own rule lets x1 go), y2, y3: five held.
    for (topic, n) in [("x", 1), ("y", 1), ("x", 2), ("x", 3), ("y", 2), ("y", 3)] {
        publish(topic, n);
    }
    assert_eq!(held(&broker), [("x".into(), 2, 2), ("y".into(), 1, 3)]);
    // The sixth passes the bound: the oldest held is y1, not x2 (x's oldest was x1 once).
    publish("y", 4);
    assert_eq!(held(&broker), [("x".into(), 2, 2), ("y".into(), 2, 3)]);
    assert_eq!(broker.stats().history_evicted, 1);
}

#[test]
fn a_bound_of_zero_keeps_no_history_in_memory() {
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("log").unwrap(), Retention::messages(100))];
    options.history_max_bytes = 0;
    let broker = Broker::builder(options).build();
    for n in 0..3u32 {
        broker.publish("log", &n).unwrap();
    }
    assert_eq!(held(&broker), [("log".into(), 4, 0)]);
    assert_eq!((broker.stats().history_evicted, broker.stats().history_bytes), (3, 0));
    let mut all = broker.messages(from("log", StartAt::Earliest)).unwrap();
    assert!(all.try_recv_message().is_none());
}

#[test]
fn publishers_on_many_threads_keep_all_history_within_its_bound_and_every_message_counted() {
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("t/#").unwrap(), Retention::messages(10_000))];
    options.history_max_bytes = 200 * 1_000;
    let broker = Broker::builder(options).build();
    std::thread::scope(|threads| {
        for t in 0..4 {
            let broker = &broker;
            threads.spawn(move || {
                for n in 0..5_000u32 {
                    let topic = format!("t/{t}/{}", n % 7);
                    broker.publish_bytes(&topic, vec![0; 744]).unwrap();
                }
            });
        }
    });
    let stats = broker.stats();
    let topics = broker.topics();
    let messages: usize = topics.iter().map(|t| t.messages).sum();
    let bytes: usize = topics.iter().map(|t| t.bytes).sum();
    assert_eq!(stats.history_bytes, bytes, "the count is what the topics hold");
    assert!(bytes <= 200 * 1_000, "{bytes} bytes held");
    assert_eq!(stats.history_evicted + messages as u64, 20_000, "each message held or evicted");
}

#[tokio::test(start_paused = true)]
async fn history_older_than_its_age_bound_is_swept_away() {
    let broker = broker(&[("#", Retention::messages(100).max_age(Duration::from_secs(1)))]);
    broker.publish("a", &1u32).unwrap();
    broker.publish("b", &2u32).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    broker.publish("a", &3u32).unwrap();
    // The background sweep evicts the first two without any further publish.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut sub = broker.messages(from("#", StartAt::Earliest)).unwrap();
    assert_eq!(values(&take(&mut sub, 1).await), [3]);
    assert!(sub.try_recv_message().is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut empty = broker.messages(from("#", StartAt::Earliest)).unwrap();
    assert!(empty.try_recv_message().is_none(), "everything aged out");
}

#[tokio::test]
async fn a_time_start_replays_what_was_accepted_since() {
    let broker = broker(&[("t", Retention::messages(100))]);
    broker.publish("t", &1u32).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    std::thread::sleep(Duration::from_millis(5));
    broker.publish("t", &2u32).unwrap();
    broker.publish("t", &3u32).unwrap();
    let mut sub = broker.messages(from("t", StartAt::Time(since))).unwrap();
    assert_eq!(values(&take(&mut sub, 2).await), [2, 3]);
    assert!(sub.try_recv_message().is_none());
}

/// A time read from the wall clock just before publishing replays what was published after it,
/// with no margin: the broker stamps with the precise clock (a coarse one, a timer tick old,
/// would stamp some of them before the time that was read).
#[tokio::test]
async fn a_time_read_just_before_publishing_replays_every_message_published_after() {
    let broker = broker(&[("t", Retention::messages(10_000))]);
    let mut times = Vec::new();
    for n in 0..2_000u32 {
        times.push(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64);
        broker.publish("t", &n).unwrap();
    }
    for n in [0usize, 500, 1_999] {
        let mut sub = broker.messages(from("t", StartAt::Time(times[n]))).unwrap();
        let first = values(&take(&mut sub, 1).await)[0] as usize;
        assert!(first <= n, "replay from the time read before message {n} began at {first}");
    }
}

#[tokio::test]
async fn a_wildcard_replay_merges_topics_in_acceptance_order() {
    let broker = broker(&[("room/#", Retention::messages(10))]);
    let order = [("room/b", 1u32), ("room/a", 2), ("room/b", 3), ("room/c", 4), ("room/a", 5)];
    for (topic, value) in order {
        broker.publish(topic, &value).unwrap();
    }
    let mut sub = broker.messages(from("room/#", StartAt::Earliest)).unwrap();
    let got = take(&mut sub, 5).await;
    assert_eq!(values(&got), [1, 2, 3, 4, 5]);
    let offsets: Vec<(&str, u64)> = got.iter().map(|(t, _, o)| (t.as_str(), *o)).collect();
    assert_eq!(
        offsets,
        [("room/b", 1), ("room/a", 1), ("room/b", 2), ("room/c", 1), ("room/a", 2)]
    );
    let wild_offset = broker.messages(from("room/#", StartAt::Offset(1))).unwrap_err();
    assert!(matches!(wild_offset, SubscribeError::InvalidStart { .. }));
    let grouped = broker.messages(from("room/a", StartAt::Earliest).group("g")).unwrap_err();
    assert!(matches!(grouped, SubscribeError::InvalidStart { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_while_publishers_run_leaves_no_gap_and_no_repeat() {
    const COUNT: u32 = 20_000;
    let broker = broker(&[("seq", Retention::messages(COUNT as usize))]);
    let publisher = broker.clone();
    let writer = std::thread::spawn(move || {
        for n in 0..COUNT {
            publisher.publish("seq", &n).unwrap();
        }
    });
    // Join partway through.
    while broker.stats().published < u64::from(COUNT / 4) {
        tokio::task::yield_now().await;
    }
    let options = from("seq", StartAt::Earliest).capacity(COUNT as usize);
    let mut sub = broker.messages(options).unwrap();
    let got = take(&mut sub, COUNT as usize).await;
    writer.join().unwrap();
    let expected: Vec<(u32, u64)> = (0..COUNT).map(|n| (n, u64::from(n) + 1)).collect();
    assert_eq!(got.iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(), expected);
    assert!(sub.try_recv_message().is_none(), "nothing twice");
}

#[tokio::test(start_paused = true)]
async fn a_qos1_replay_is_acknowledged_and_redelivered_like_live_messages() {
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("jobs").unwrap(), Retention::messages(10))];
    options.redelivery = whispeer::Redelivery::new(Duration::from_secs(1)).jitter(0.0);
    let broker = Broker::builder(options).build();
    broker.publish("jobs", &1u32).unwrap();
    broker.publish("jobs", &2u32).unwrap();
    let acked = SubscribeOptions::new("jobs").qos(Qos::AtLeastOnce).start(StartAt::Earliest);
    let mut sub = broker.subscription::<u32>(acked).unwrap();
    let first = soon(sub.recv_delivery()).await.unwrap();
    assert_eq!((*first.value(), first.attempt()), (1, 1));
    assert!(first.ack());
    let second = soon(sub.recv_delivery()).await.unwrap();
    assert_eq!(*second.value(), 2);
    drop(second);
    let again = soon(sub.recv_delivery()).await.unwrap();
    assert_eq!((*again.value(), again.attempt()), (2, 2));
}
