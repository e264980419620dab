//! QoS 1 traffic across cluster nodes for the fault tests: numbered publishes retried until
//! acknowledged, and one wildcard QoS 0 reader counting what it reads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use whispeer_client::{Client, PublishOptions, Qos, SubscribeOptions};

use super::engines::EngineServer;

/// Every number read, with how many times.
pub(crate) type Seen = Arc<Mutex<BTreeMap<u64, u32>>>;

/// Reads numbers on the server at `addr` with one subscription (a filter alone: QoS 0, which
/// does not resume after a reconnection, so it gets everything only if its connection stays
/// up), counting each.
pub(crate) async fn count_reads(
    addr: &str,
    filter: impl Into<SubscribeOptions>,
) -> (Seen, JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let reader = Client::connect(addr).await.unwrap();
    let mut numbers = reader.subscribe::<u64>(filter).await.unwrap();
    let counted = Arc::clone(&seen);
    let reading = tokio::spawn(async move {
        let _reader = reader;
        while let Some(n) = numbers.recv().await {
            *counted.lock().unwrap().entry(n).or_default() += 1;
        }
    });
    (seen, reading)
}

/// Publishes `n` QoS 1 to `orders/<n % 4>` with the idempotency key `o<n>`, again every
/// `retry` while it is refused. Returns how often it was refused and how long it took.
pub(crate) async fn publish_acked(publisher: &Client, n: u64, retry: Duration) -> (u32, Duration) {
    let options = PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key(format!("o{n}"));
    let topic = format!("orders/{}", n % 4);
    let (started, mut refused) = (Instant::now(), 0);
    while publisher.publish_with(&topic, &n, &options).await.is_err() {
        refused += 1;
        sleep(retry).await;
    }
    (refused, started.elapsed())
}

/// Waits up to 30 s for `count` distinct numbers; returns those below `count` never read and
/// how many reads were repeats.
pub(crate) async fn missing_and_repeats(seen: &Seen, count: u64) -> (Vec<u64>, u32) {
    let waited = Instant::now();
    while (seen.lock().unwrap().len() as u64) < count && waited.elapsed() < Duration::from_secs(30)
    {
        sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap();
    let missing = (0..count).filter(|n| !seen.contains_key(n)).collect();
    (missing, seen.values().map(|times| times - 1).sum())
}

/// Publishes QoS 1 to `orders/warm` until something reaches `seen` (a JetStream cluster elects
/// its leaders first), then forgets what was read.
pub(crate) async fn warm_up(publisher: &Client, seen: &Seen) {
    let started = Instant::now();
    let warm = PublishOptions::new().qos(Qos::AtLeastOnce);
    while seen.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "nothing crossed the cluster");
        let _ = publisher.publish_with("orders/warm", &u64::MAX, &warm).await;
        sleep(Duration::from_millis(200)).await;
    }
    seen.lock().unwrap().clear();
}

/// Numbers published from 0 with [`publish_acked`] (again every 50 ms while refused), 5 ms
/// apart, until stopped.
pub(crate) struct Publishing {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: JoinHandle<(u64, u32, Duration)>,
}

impl Publishing {
    pub(crate) fn start(publisher: Client) -> Self {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stopping, progress) = (Arc::clone(&stop), Arc::clone(&done));
        let task = tokio::spawn(async move {
            let (mut refused, mut longest, mut n) = (0u32, Duration::ZERO, 0u64);
            while !stopping.load(Ordering::Relaxed) {
                let (times, took) = publish_acked(&publisher, n, Duration::from_millis(50)).await;
                (refused, longest) = (refused + times, longest.max(took));
                n += 1;
                progress.store(n, Ordering::Relaxed);
                sleep(Duration::from_millis(5)).await;
            }
            (n, refused, longest)
        });
        Self { stop, done, task }
    }

    /// How many were acknowledged so far.
    pub(crate) fn acknowledged(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops after the publish under way: how many were published, how often one was
    /// refused, and the longest wait for one.
    pub(crate) async fn stop(self) -> (u64, u32, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// An engine server frozen (SIGSTOP) for 3 s and let go, 2 s later killed and started again,
/// then 4 s for the nodes to come back; asserts that `publishing` went on meanwhile.
pub(crate) async fn freeze_then_crash(publishing: &Publishing, server: &mut impl EngineServer) {
    let before = publishing.acknowledged();
    server.freeze(true);
    sleep(Duration::from_secs(3)).await;
    server.freeze(false);
    sleep(Duration::from_secs(2)).await;
    server.crash_and_restart();
    sleep(Duration::from_secs(4)).await;
    let after = publishing.acknowledged();
    assert!(after > before, "publishing stalled at {after}");
}

/// Asserts that every number below `published` was read (waiting up to 30 s) and nothing
/// else; returns how many reads were repeats.
pub(crate) async fn every_one_read(seen: &Seen, published: u64) -> u32 {
    let (missing, again) = missing_and_repeats(seen, published).await;
    assert!(
        missing.is_empty(),
        "acknowledged and lost: {} of {published} (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let seen = seen.lock().unwrap();
    let unexpected: Vec<u64> = seen.keys().filter(|&&n| n >= published).copied().collect();
    assert!(unexpected.is_empty(), "never published: {unexpected:?}");
    again
}
