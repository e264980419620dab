//! In-process publish → deliver throughput, whispeer beside `tokio::sync::broadcast`.
//!
//! Every case moves 128-byte payloads from one publisher task to 1 or 8 subscriber tasks on a
//! two-worker tokio runtime. Both sides run the same harness: the publisher stays at most
//! `WINDOW` messages ahead of the slowest subscriber, so no queue overflows and every message is
//! delivered. Throughput is reported in delivered messages per second.
//!
//! Cases: `broadcast` (Bytes through `tokio::sync::broadcast`), `whispeer-raw`
//! (`publish_bytes` → `Subscription<Message>`), `whispeer-typed` (`publish::<Bytes>` →
//! `Subscription<Bytes>`, encode and decode included), `whispeer-sealed` (the typed case on
//! `Broker::build_default()`: XChaCha20-Poly1305 sealing and opening included; 128-byte payloads
//! are under the compression threshold).
//!
//! Run with `cargo bench -p whispeer --bench fanout`.

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]
#![expect(missing_docs, reason = "criterion_group! generates an undocumented function")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use whispeer::{Broker, BrokerOptions, SubscribeOptions};

const PAYLOAD: usize = 128;
const CAPACITY: usize = 1024;
const WINDOW: u64 = 512;
const TOPIC: &str = "bench/fanout";

/// Runs a case as a task on the runtime's workers, as an async application's publisher would be.
fn on_worker<F>(rt: &Runtime, case: F) -> Duration
where
    F: Future<Output = Duration> + Send + 'static,
{
    rt.block_on(async { tokio::spawn(case).await.unwrap() })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Progress of every subscriber; the publisher waits on the slowest.
struct Progress(Vec<AtomicU64>);

impl Progress {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self((0..n).map(|_| AtomicU64::new(0)).collect()))
    }

    fn slowest(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Acquire)).min().unwrap_or(0)
    }

    /// Waits until the publisher, about to send message `sent`, is within the window.
    async fn throttle(&self, sent: u64) {
        if sent.is_multiple_of(64) {
            while sent - self.slowest() >= WINDOW {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Runs `messages` through `publish` to subscribers whose receive loops `spawn_subscribers`
/// starts, and returns the time from first publish to last delivery.
async fn run<P>(
    messages: u64,
    progress: Arc<Progress>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    mut publish: P,
) -> Duration
where
    P: FnMut(),
{
    let start = Instant::now();
    for sent in 0..messages {
        progress.throttle(sent).await;
        publish();
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

fn broadcast(rt: &Runtime, subscribers: usize, messages: u64) -> Duration {
    on_worker(rt, async move {
        let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(CAPACITY);
        let progress = Progress::new(subscribers);
        let handles = (0..subscribers)
            .map(|i| {
                let mut rx = tx.subscribe();
                let progress = Arc::clone(&progress);
                tokio::spawn(async move {
                    for n in 1..=messages {
                        let payload = rx.recv().await.unwrap();
                        assert_eq!(payload.len(), PAYLOAD);
                        progress.0[i].store(n, Ordering::Release);
                    }
                })
            })
            .collect();
        let payload = Bytes::from(vec![7u8; PAYLOAD]);
        run(messages, progress, handles, || {
            tx.send(payload.clone()).unwrap();
        })
        .await
    })
}

fn whispeer_raw(rt: &Runtime, subscribers: usize, messages: u64) -> Duration {
    on_worker(rt, async move {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let progress = Progress::new(subscribers);
        let handles = (0..subscribers)
            .map(|i| {
                let mut sub =
                    broker.messages(SubscribeOptions::new(TOPIC).capacity(CAPACITY)).unwrap();
                let progress = Arc::clone(&progress);
                tokio::spawn(async move {
                    for n in 1..=messages {
                        let message = sub.recv().await.unwrap();
                        assert_eq!(message.payload().len(), PAYLOAD);
                        progress.0[i].store(n, Ordering::Release);
                    }
                })
            })
            .collect();
        let payload = Bytes::from(vec![7u8; PAYLOAD]);
        run(messages, progress, handles, || {
            broker.publish_bytes(TOPIC, payload.clone()).unwrap();
        })
        .await
    })
}

fn whispeer_typed(rt: &Runtime, subscribers: usize, messages: u64, sealed: bool) -> Duration {
    on_worker(rt, async move {
        let broker = if sealed {
            Broker::build_default().build()
        } else {
            Broker::builder(BrokerOptions::default()).build()
        };
        let progress = Progress::new(subscribers);
        let handles = (0..subscribers)
            .map(|i| {
                let options = SubscribeOptions::new(TOPIC).capacity(CAPACITY);
                let mut sub = broker.subscription::<Bytes>(options).unwrap();
                let progress = Arc::clone(&progress);
                tokio::spawn(async move {
                    for n in 1..=messages {
                        let payload = sub.recv().await.unwrap();
                        assert_eq!(payload.len(), PAYLOAD);
                        progress.0[i].store(n, Ordering::Release);
                    }
                })
            })
            .collect();
        let payload = Bytes::from(vec![7u8; PAYLOAD]);
        run(messages, progress, handles, || {
            broker.publish(TOPIC, &payload).unwrap();
        })
        .await
    })
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("fanout-128B");
    group.sample_size(20).measurement_time(Duration::from_secs(4));
    for subscribers in [1usize, 8] {
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(BenchmarkId::new("broadcast", subscribers), |b| {
            b.iter_custom(|iters| broadcast(&rt, subscribers, iters))
        });
        group.bench_function(BenchmarkId::new("whispeer-raw", subscribers), |b| {
            b.iter_custom(|iters| whispeer_raw(&rt, subscribers, iters))
        });
        group.bench_function(BenchmarkId::new("whispeer-typed", subscribers), |b| {
            b.iter_custom(|iters| whispeer_typed(&rt, subscribers, iters, false))
        });
        group.bench_function(BenchmarkId::new("whispeer-sealed", subscribers), |b| {
            b.iter_custom(|iters| whispeer_typed(&rt, subscribers, iters, true))
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
