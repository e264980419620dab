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
