//! Durable topics through the embedded broker: what was acknowledged as durable comes back,
//! in order and with its offsets, when a broker is built again on the same log.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::timeout;
use whispeer::{
    Broker, BrokerOptions, Durability, Filter, FsyncPolicy, Message, Retention, StartAt,
    SubscribeOptions, Subscription, WalOptions,
};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out waiting")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("whispeer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn broker(dir: &TempDir, fsync: FsyncPolicy) -> Broker {
    let mut options = BrokerOptions::default();
    let wal = WalOptions::new(&dir.0).fsync(fsync);
    options.durability = Some(Durability::new(wal).topic(Filter::parse("orders/#").unwrap()));
    options.retention = vec![(Filter::parse("orders/#").unwrap(), Retention::messages(1000))];
    Broker::builder(options).try_build().unwrap()
}

async fn replay(
    broker: &Broker,
    topic: &str,
    n: usize,
) -> (Vec<(u32, u64)>, Subscription<Message>) {
    let options = SubscribeOptions::new(topic).start(StartAt::Earliest).capacity(4096);
    let mut sub = broker.messages(options).unwrap();
    let mut got = Vec::new();
    for _ in 0..n {
        let m = soon(sub.recv_message()).await.unwrap();
        got.push((m.decode::<u32>().unwrap(), m.offset().unwrap()));
    }
    (got, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_messages_come_back_after_a_restart_with_their_offsets() {
    let dir = TempDir::new("durable-restart");
    for fsync in [FsyncPolicy::Always, FsyncPolicy::EveryN(7), FsyncPolicy::Never] {
        let _ = std::fs::remove_dir_all(&dir.0);
        let first = broker(&dir, fsync);
        let mut receipts = Vec::new();
        for n in 0..100u32 {
            receipts.push(first.publish("orders/eu", &n).unwrap());
            first.publish("chat/x", &n).unwrap(); // not durable
        }
        for receipt in &receipts {
            assert!(receipt.is_durable_pending());
            assert!(first.durable(receipt).await, "{fsync:?}");
        }
        drop(first);

        let second = broker(&dir, fsync);
        let (got, mut sub) = replay(&second, "orders/eu", 100).await;
        let expected: Vec<(u32, u64)> = (0..100).map(|n| (n, u64::from(n) + 1)).collect();
        assert_eq!(got, expected, "{fsync:?}");
        second.publish("orders/eu", &100u32).unwrap();
        let next = soon(sub.recv_message()).await.unwrap();
        assert_eq!(next.offset(), Some(101), "offsets continue after the restart");
        let mut chat =
            second.messages(SubscribeOptions::new("chat/x").start(StartAt::Earliest)).unwrap();
        assert!(chat.try_recv_message().is_none(), "only durable topics survive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_publishes_are_all_stored_once_in_offset_order() {
    let dir = TempDir::new("durable-concurrent");
    let first = broker(&dir, FsyncPolicy::Always);
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let broker = first.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..50u32 {
                let receipt = broker.publish(&format!("orders/{t}"), &(t * 1000 + n)).unwrap();
                assert!(broker.durable(&receipt).await);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    drop(first);
    let second = broker(&dir, FsyncPolicy::Always);
    for t in 0..4u32 {
        let (got, _) = replay(&second, &format!("orders/{t}"), 50).await;
        let expected: Vec<(u32, u64)> = (0..50).map(|n| (t * 1000 + n, u64::from(n) + 1)).collect();
        assert_eq!(got, expected);
    }
}

fn durable_group() -> SubscribeOptions {
    SubscribeOptions::new("orders/ada").qos(whispeer::Qos::AtLeastOnce).group("ada-phone")
}

/// Takes `n` deliveries and acknowledges those whose value `ack` picks.
async fn settle(sub: &mut Subscription<u32>, n: usize, ack: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut got = Vec::new();
    for _ in 0..n {
        let delivery = soon(sub.recv_delivery()).await.unwrap();
        got.push(*delivery.value());
        if ack(*delivery.value()) {
            assert!(delivery.ack());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_resumes_after_its_last_contiguous_ack_across_a_restart() {
    let dir = TempDir::new("durable-subscription");
    let first = broker(&dir, FsyncPolicy::Always);
    let mut phone = first.subscription::<u32>(durable_group()).unwrap();
    for n in 1..=3u32 {
        first.publish("orders/ada", &n).unwrap();
    }
    // 2 stays unacknowledged: the commit stops at 1; 3 waits above it.
    assert_eq!(settle(&mut phone, 3, |n| n != 2).await, [1, 2, 3]);
    drop(phone);
    let last = first.publish("orders/ada", &4u32).unwrap();
    assert!(first.durable(&last).await);
    drop(first);

    let second = broker(&dir, FsyncPolicy::Always);
    let mut phone = second.subscription::<u32>(durable_group()).unwrap();
    assert_eq!(settle(&mut phone, 3, |_| true).await, [2, 3, 4], "from the first unsettled one");
    let fresh = SubscribeOptions::new("orders/ada").qos(whispeer::Qos::AtLeastOnce).group("tablet");
    let mut tablet = second.subscription::<u32>(fresh).unwrap();
    assert!(tablet.try_recv_delivery().is_none(), "a new name starts with new messages");
    drop(phone);
    let done = second.publish("orders/ada", &5u32).unwrap();
    assert!(second.durable(&done).await);
    // Commits are written to the log: after another restart only 5 is left for the phone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop((tablet, second));
    let third = broker(&dir, FsyncPolicy::Always);
    let mut phone = third.subscription::<u32>(durable_group()).unwrap();
    assert_eq!(settle(&mut phone, 1, |_| true).await, [5]);
    assert!(phone.try_recv_delivery().is_none());
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_broker_with_sqlite_persistence_keeps_sealed_history_across_a_restart() {
    use whispeer::{Encryption, Keyring, PersistenceType};
    let dir = TempDir::new("sqlite-default");
    let file = dir.0.join("whispeer.db");
    let sqlite = || PersistenceType::Sqlite(file.clone());
    // Without WHISPEER_KEY the key is this process's: the stored payload is sealed anyway.
    let first = Broker::build_default_with_persistence(sqlite()).unwrap().try_build().unwrap();
    let receipt = first.publish("notes/today", &"buy milk".to_string()).unwrap();
    assert!(first.durable(&receipt).await);
    drop(first);
    let second = Broker::build_default_with_persistence(sqlite()).unwrap().try_build().unwrap();
    let stored = second.stored(&whispeer::Topic::parse("notes/today").unwrap(), 1, 10).unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].plaintext().is_err(), "another process's key: still sealed on disk");
    drop(second);

    // With one keyring across restarts, the history opens.
    let keyring = Keyring::generate().unwrap();
    let keyed = || {
        Broker::builder(BrokerOptions::default())
            .with(whispeer::Persistence::sqlite(&file))
            .with(Encryption::with_keyring(keyring.clone()))
            .try_build()
            .unwrap()
    };
    let first = keyed();
    let receipt = first.publish("notes/today", &"call Ada".to_string()).unwrap();
    assert!(first.durable(&receipt).await);
    drop(first);
    let second = keyed();
    let options = SubscribeOptions::new("notes/today").start(StartAt::Offset(2));
    let mut notes = second.subscription::<String>(options).unwrap();
    assert_eq!(soon(notes.recv()).await.as_deref(), Some("call Ada"));
}

#[tokio::test]
async fn a_failed_log_is_reported_and_acknowledges_nothing_more() {
    let dir = TempDir::new("failing");
    let mut options = BrokerOptions::default();
    let wal = WalOptions::new(&dir.0).segment_bytes(1024);
    options.durability = Some(Durability::new(wal).topic(Filter::parse("orders/#").unwrap()));
    let broker = Broker::builder(options).try_build().unwrap();
    let receipt = broker.publish("orders/a", &0u32).unwrap();
    assert!(soon(broker.durable(&receipt)).await);
    assert!(broker.store_healthy());
    // The log's directory goes away and a file takes its name: the next segment cannot be
    // created, the writer fails, and from then on nothing is acknowledged as durable.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"in the way").unwrap();
    let mut last = receipt;
    let mut refused = None;
    for n in 1..200u32 {
        match broker.publish("orders/a", &n) {
            Ok(receipt) => last = receipt,
            Err(err) => {
                refused = Some(err.to_string());
                break;
            }
        }
    }
    assert!(!soon(broker.durable(&last)).await, "not durable: the writer failed");
    assert!(!broker.store_healthy());
    // Once the writer has failed, durable publishes are refused, saying why.
    let refused =
        refused.unwrap_or_else(|| broker.publish("orders/a", &0u32).unwrap_err().to_string());
    assert!(refused.contains("failed to write"), "{refused}");
    drop(broker);
    let _ = std::fs::remove_file(&dir.0);
}

#[tokio::test]
async fn idempotency_keys_of_stored_messages_hold_across_a_restart() {
    let dir = TempDir::new("idempotent");
    let keyed = |key: &str| whispeer::PublishOptions::new().idempotency_key(key.to_string());
    {
        let broker = broker(&dir, FsyncPolicy::Always);
        let receipt = broker.publish_with("orders/a", &1u32, &keyed("order-1")).unwrap();
        assert!(soon(broker.durable(&receipt)).await);
    }
    // The publisher never saw its acknowledgement and retries after the restart: once only.
    let broker = broker(&dir, FsyncPolicy::Always);
    let retry = broker.publish_with("orders/a", &1u32, &keyed("order-1")).unwrap();
    assert!(retry.duplicate, "the key came back with the log");
    let other = broker.publish_with("orders/a", &2u32, &keyed("order-2")).unwrap();
    assert!(!other.duplicate);
    assert!(soon(broker.durable(&other)).await);
    let elsewhere = broker.publish_with("orders/b", &1u32, &keyed("order-1")).unwrap();
    assert!(!elsewhere.duplicate, "keys are per topic");
    let stored = broker.stored(&whispeer::Topic::parse("orders/a").unwrap(), 1, 10).unwrap();
    assert_eq!(stored.len(), 2, "order-1 once, order-2");
}

#[tokio::test]
async fn a_key_whose_message_was_never_stored_lets_its_retry_through() {
    let dir = TempDir::new("unkept-key");
    let keyed = |n: u32| whispeer::PublishOptions::new().idempotency_key(format!("order-{n}"));
    let mut options = BrokerOptions::default();
    let wal = WalOptions::new(&dir.0).segment_bytes(1024);
    options.durability = Some(Durability::new(wal).topic(Filter::parse("orders/#").unwrap()));
    let broker = Broker::builder(options).try_build().unwrap();
    // As above: the next segment cannot be created, so what is accepted now is never stored.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"in the way").unwrap();
    let mut accepted = Vec::new();
    for n in 0..200u32 {
        match broker.publish_with("orders/a", &n, &keyed(n)) {
            Ok(receipt) => accepted.push((n, receipt)),
            Err(_) => break,
        }
    }
    let (n, receipt) = accepted.pop().expect("accepted before the writer failed");
    assert!(soon(broker.confirmed(&receipt)).await.is_err(), "never stored");
    // The publisher retries with the same key: not taken for a repeat of what was kept.
    let retry = broker.publish_with("orders/a", &n, &keyed(n));
    assert!(!matches!(retry, Ok(receipt) if receipt.duplicate), "{retry:?}");
    drop(broker);
    let _ = std::fs::remove_file(&dir.0);
}

/// A broker whose durable topics keep only `memory` messages in memory (the store has all).
fn small_memory_broker(dir: &TempDir, memory: usize) -> Broker {
    let mut options = BrokerOptions::default();
    let wal = WalOptions::new(&dir.0).fsync(FsyncPolicy::Never);
    options.durability = Some(Durability::new(wal).topic(Filter::parse("hist/#").unwrap()));
    options.retention = vec![(Filter::parse("hist/#").unwrap(), Retention::messages(memory))];
    Broker::builder(options).try_build().unwrap()
}

async fn publish_durably(broker: &Broker, topic: &str, values: std::ops::Range<u32>) {
    let mut last = None;
    for n in values {
        last = Some(broker.publish(topic, &n).unwrap());
    }
    if let Some(last) = last {
        assert!(broker.durable(&last).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_memory_is_replayed_from_the_store_never_skipped() {
    let dir = TempDir::new("durable-beyond-memory");
    let broker = small_memory_broker(&dir, 100);
    publish_durably(&broker, "hist/a", 0..2500).await;
    publish_durably(&broker, "hist/b", 0..300).await;

    // QoS 0 from the earliest: all 2,500, in order, with their offsets, then live messages.
    let (got, mut sub) = replay(&broker, "hist/a", 2500).await;
    let expected: Vec<(u32, u64)> = (0..2500).map(|n| (n, u64::from(n) + 1)).collect();
    assert_eq!(got, expected);
    broker.publish("hist/a", &2500u32).unwrap();
    let live = soon(sub.recv_message()).await.unwrap();
    assert_eq!((live.decode::<u32>().unwrap(), live.offset()), (2500, Some(2501)));
    assert!(sub.try_recv_message().is_none(), "nothing twice");

    // An offset older than memory starts there.
    let options = SubscribeOptions::new("hist/a").start(StartAt::Offset(1234)).capacity(4096);
    let mut from = broker.subscription::<u32>(options).unwrap();
    for n in 1233..=2500u32 {
        assert_eq!(soon(from.recv()).await.unwrap(), n);
    }

    // QoS 1 through a credit window, and a wildcard: each topic's stored part in offset order.
    let options = SubscribeOptions::new("hist/+")
        .start(StartAt::Earliest)
        .qos(whispeer::Qos::AtLeastOnce)
        .prefetch(64);
    let mut all = broker.subscription::<u32>(options).unwrap();
    let mut per_topic: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for _ in 0..2501 + 300 {
        let delivery = soon(all.recv_delivery()).await.unwrap();
        let topic = delivery.message().topic().to_string();
        per_topic.entry(topic).or_default().push(*delivery.value());
        assert!(delivery.ack());
    }
    assert_eq!(per_topic["hist/a"], (0..=2500).collect::<Vec<_>>());
    assert_eq!(per_topic["hist/b"], (0..300).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_bound_on_all_history_evicts_of_a_durable_topic_replays_from_the_store() {
    let dir = TempDir::new("durable-beyond-all-history");
    let mut options = BrokerOptions::default();
    let wal = WalOptions::new(&dir.0).fsync(FsyncPolicy::Never);
    options.durability = Some(Durability::new(wal).topic(Filter::parse("hist/#").unwrap()));
    // No retention rule: each durable topic would keep 10,000 in memory. All together keep
    // about fifty (a u32 weighs its one to five bytes plus 256).
    options.history_max_bytes = 50 * 260;
    let broker = Broker::builder(options).try_build().unwrap();
    publish_durably(&broker, "hist/a", 0..1000).await;
    publish_durably(&broker, "hist/b", 0..1000).await;
    let in_memory: usize = broker.topics().iter().map(|t| t.messages).sum();
    assert!((40..=50).contains(&in_memory), "{in_memory} in memory");
    assert_eq!(broker.stats().history_evicted, 2000 - in_memory as u64);
    assert_eq!(broker.topics()[0].first_offset, 1001, "hist/a left memory first: the oldest");
    let (got, _sub) = replay(&broker, "hist/a", 1000).await;
    assert_eq!(got, (0..1000).map(|n| (n, u64::from(n) + 1)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_resumes_from_the_store_after_a_commit_older_than_memory() {
    let dir = TempDir::new("durable-resume-beyond-memory");
    let group = || {
        SubscribeOptions::new("hist/inbox").qos(whispeer::Qos::AtLeastOnce).group("offline-phone")
    };
    let first = small_memory_broker(&dir, 50);
    let mut phone = first.subscription::<u32>(group()).unwrap();
    publish_durably(&first, "hist/inbox", 0..10).await;
    assert_eq!(settle(&mut phone, 10, |_| true).await, (0..10).collect::<Vec<_>>());
    drop(phone);
    // While the phone is away, far more than memory holds.
    publish_durably(&first, "hist/inbox", 10..1000).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(first);

    let second = small_memory_broker(&dir, 50);
    let mut phone = second.subscription::<u32>(group()).unwrap();
    assert_eq!(settle(&mut phone, 990, |_| true).await, (10..1000).collect::<Vec<_>>());
    assert!(phone.try_recv_delivery().is_none());
}

/// The offset the next message of `topic` gets.
#[cfg(feature = "sqlite")]
fn next_offset(broker: &Broker, topic: &str) -> u64 {
    let topic = whispeer::Topic::parse(topic).unwrap();
    broker.history(&topic, StartAt::Earliest, 1).unwrap().next_offset
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn after_sqlite_stops_uncleanly_no_offset_is_given_twice() {
    let dir = TempDir::new("sqlite-offsets");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("whispeer.db");
    let open = |file: &std::path::Path| {
        Broker::builder(BrokerOptions::default())
            .with(whispeer::Persistence::sqlite(file))
            .try_build()
            .unwrap()
    };
    let broker = open(&file);
    for n in 0..3u32 {
        let receipt = broker.publish("orders/a", &n).unwrap();
        assert!(soon(broker.durable(&receipt)).await);
    }
    // A copy taken while the broker runs is what a crash leaves: the store is marked in use.
    let crashed = dir.0.join("crashed.db");
    std::fs::copy(&file, &crashed).unwrap();
    let _ = std::fs::copy(dir.0.join("whispeer.db-wal"), dir.0.join("crashed.db-wal"));
    drop(broker);
    // A clean stop: offsets go on from the next one.
    let broker = open(&file);
    assert_eq!(next_offset(&broker, "orders/a"), 4, "after a clean stop, no gap");
    drop(broker);
    // After the crash, the offsets in flight may have been seen: they are not given again.
    let broker = open(&crashed);
    assert!(next_offset(&broker, "orders/a") > 4 + 65_000, "past what may have been in flight");
    assert!(next_offset(&broker, "orders/new") > 65_000, "new topics start past the floor");
    let receipt = broker.publish("orders/a", &9u32).unwrap();
    assert!(soon(broker.durable(&receipt)).await);
    drop(broker);
    // The floor is kept: a clean restart does not lower it.
    let broker = open(&crashed);
    assert!(next_offset(&broker, "orders/other") > 65_000, "the floor holds");
}
