//! Durable publishing and recovery figures, printed (not asserted):
//!
//! ```sh
//! cargo run --release -p whispeer --features sqlite --example wal_bench -- [messages] [recovery-bytes] [dir]
//! ```
//!
//! - Durable publish throughput under each fsync policy: `TASKS` tasks each publish 128-byte
//!   messages to a durable topic and wait until each is durable before the next (what a QoS 1
//!   PUBACK waits for), so concurrent publishes share fsyncs (group commit).
//! - Recovery: a log of `recovery-bytes` (default 1 GiB) of 1 KiB messages, then the time to
//!   open it again (scan, checksum, restore the history), and to read a page of one topic from
//!   the middle of the log (through its index).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use whispeer::{
    Broker, BrokerOptions, Durability, Filter, FsyncPolicy, PersistenceType, WalOptions,
};

const TASKS: usize = 16;

fn options(dir: &PathBuf, fsync: FsyncPolicy) -> BrokerOptions {
    let mut wal = WalOptions::new(dir).fsync(fsync);
    wal.max_bytes = u64::MAX;
    store_options(PersistenceType::Wal(wal))
}

fn store_options(store: PersistenceType) -> BrokerOptions {
    let mut options = BrokerOptions::default();
    let topics = Filter::parse("bench/#").expect("a valid filter");
    options.durability = Some(Durability::in_store(store).topic(topics));
    options
}

async fn publish_rate(dir: &PathBuf, options: BrokerOptions, messages: usize) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let broker = Broker::builder(options).try_build().expect("the store opens");
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let topic = format!("bench/{t}");
                for _ in 0..messages / TASKS {
                    let receipt = broker.publish_bytes(&topic, vec![b'x'; 128]).expect("published");
                    assert!(broker.durable(&receipt).await, "stored");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher finished");
    }
    (messages / TASKS * TASKS) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let recovery_bytes: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1 << 30);
    let dir =
        args.get(3).map_or_else(|| std::env::temp_dir().join("whispeer-wal-bench"), PathBuf::from);
    println!("durable publish, {TASKS} tasks, 128 B, each waiting for its message to be durable:");
    for (name, fsync) in [
        ("always (group commit)", FsyncPolicy::Always),
        ("every_n 100", FsyncPolicy::EveryN(100)),
        ("interval 10 ms", FsyncPolicy::Interval(Duration::from_millis(10))),
        ("never", FsyncPolicy::Never),
    ] {
        let rate = publish_rate(&dir, options(&dir, fsync), messages).await;
        println!("  {name:<24} {rate:>12.0} msgs/s");
    }
    #[cfg(feature = "sqlite")]
    {
        let sqlite = store_options(PersistenceType::Sqlite(dir.join("whispeer.db")));
        let rate = publish_rate(&dir, sqlite, messages).await;
        println!("  {:<24} {rate:>12.0} msgs/s", "sqlite (synchronous)");
    }

    let _ = std::fs::remove_dir_all(&dir);
    let count = recovery_bytes / 1100;
    {
        let broker = Broker::builder(options(&dir, FsyncPolicy::Never)).try_build().expect("opens");
        let payload = vec![b'r'; 1024];
        let mut last = None;
        for n in 0..count {
            last = Some(
                broker
                    .publish_bytes(&format!("bench/{}", n % 64), payload.clone())
                    .expect("published"),
            );
        }
        if let Some(last) = last {
            broker.durable(&last).await;
        }
    }
    let size: u64 = std::fs::read_dir(&dir)
        .expect("the log directory")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let start = Instant::now();
    let broker = Broker::builder(options(&dir, FsyncPolicy::Never)).try_build().expect("recovers");
    let elapsed = start.elapsed();
    println!(
        "recovery: {count} records, {:.0} MiB in {:.2} s ({:.0} MiB/s), history restored for {} topics",
        size as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64(),
        size as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        64
    );
    // A page of one topic's history from the middle of the log, beyond what memory holds:
    // through the log's index, scanning from the segment it points to.
    let topic = whispeer::Topic::parse("bench/7").expect("a topic");
    let middle = count / 64 / 2;
    let start = Instant::now();
    let page = broker.stored(&topic, middle, 1000).expect("read");
    println!(
        "read: 1000 messages of one topic (of 64) from offset {middle}: {} in {:.1} ms",
        page.len(),
        start.elapsed().as_secs_f64() * 1000.0
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
