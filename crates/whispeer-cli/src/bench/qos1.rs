//! `whispeer bench --qos1`: the QoS 1 path end to end — publish, PUBACK, deliver, ACK — beside
//! the QoS 0 figures of the same run.
//!
//! Throughput: one publisher keeps as many publishes unacknowledged on its connection, and at
//! most as many ahead of the subscriber, as the QoS 0 runs keep in flight (`--window-bytes` of
//! 128-byte payloads; past them it awaits the oldest PUBACK, or the subscriber), and the
//! subscriber's prefetch is as deep; it acknowledges every delivery as it takes it. Latency: one
//! publisher at a fixed rate, each publish waiting for its PUBACK; measured from before the
//! publish to the delivery.
//! Both publish from a task on the runtime's workers (a publish from the thread that blocks on
//! the runtime wakes the connection task on another thread: see the client's crate docs).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::Notify;
use whispeer_client::proto::ErrorCode;
use whispeer_client::{
    Client, ClientError, ClientOptions, ClientSubscription, Delivery, Qos, SubscribeOptions,
};

pub(super) async fn connect(addr: &str, api_key: Option<&str>) -> anyhow::Result<Client> {
    let mut options = ClientOptions::new(addr);
    if let Some(key) = api_key {
        options = options.api_key(key);
    }
    Ok(Client::connect_with(options).await?)
}

async fn subscriber(
    addr: &str,
    api_key: Option<&str>,
    topic: &str,
    prefetch: u32,
) -> anyhow::Result<(Client, ClientSubscription<Delivery>)> {
    let client = connect(addr, api_key).await?;
    let options = SubscribeOptions::new(topic).qos(Qos::AtLeastOnce).prefetch(prefetch);
    let sub = client.messages(options).await?;
    Ok((client, sub))
}

/// Delivered (and acknowledged) messages per second, 1 → 1, 128-byte payloads, `window` of
/// them in flight.
pub(super) async fn throughput(
    addr: &str,
    api_key: Option<&str>,
    messages: u64,
    window: u32,
) -> anyhow::Result<f64> {
    let topic = "bench/qos1";
    let (_receiver, mut sub) = subscriber(addr, api_key, topic, window).await?;
    let delivered = Arc::new(Delivered::default());
    let reader = tokio::spawn({
        let delivered = Arc::clone(&delivered);
        async move {
            for n in 1..=messages {
                let next = tokio::time::timeout(super::STALL, sub.recv()).await;
                anyhow::ensure!(matches!(next, Ok(Some(_))), "stalled after {n} of {messages}");
                delivered.count.store(n, Ordering::Release);
                if n % 64 == 0 || n == messages {
                    delivered.moved.notify_waiters();
                }
            }
            Ok(())
        }
    });
    let publisher = connect(addr, api_key).await?;
    let payload = Bytes::from(vec![b'x'; 128]);
    let start = Instant::now();
    let in_flight = u64::from(window);
    publish_acked_all(&publisher, topic, &payload, messages, in_flight, Some(delivered)).await?;
    reader.await??;
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

/// How many messages the subscriber has taken, and a wake-up every 64 of them.
#[derive(Default)]
pub(super) struct Delivered {
    pub(super) count: AtomicU64,
    pub(super) moved: Notify,
}

impl Delivered {
    /// One more taken: wakes the waiters every 64 and at `last`.
    pub(super) fn took_one(&self, last: u64) {
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if n.is_multiple_of(64) || n >= last {
            self.moved.notify_waiters();
        }
    }
}

/// Publishes `messages` copies of `payload` at QoS 1 from one task that keeps `in_flight`
/// unacknowledged, as a user's pipelined publisher does
/// ([`Client::publish_acked_bytes_deferred`]): past the window, each publish first awaits the
/// oldest acknowledgement. With `delivered`, it also keeps at most `in_flight` messages ahead
/// of the subscriber, as the QoS 0 runs do (a PUBACK says a message was queued, not taken: a
/// publisher held back by PUBACKs alone fills a slower subscriber's queue, and the rest is
/// refusals). A publish refused because a QoS 1 queue is full (refused, not dropped) is made
/// again after a pause. The task runs on the runtime's workers, where the connection's task
/// wakes it without a thread of its own to wake.
pub(super) async fn publish_acked_all(
    publisher: &Client,
    topic: &'static str,
    payload: &Bytes,
    messages: u64,
    in_flight: u64,
    delivered: Option<Arc<Delivered>>,
) -> anyhow::Result<()> {
    let (publisher, payload) = (publisher.clone(), payload.clone());
    tokio::spawn(async move {
        let window_len = usize::try_from(in_flight.max(1)).unwrap_or(usize::MAX);
        let mut window = VecDeque::with_capacity(window_len.min(1 << 16));
        let (mut acked, mut sent) = (0u64, 0u64);
        while acked < messages {
            if sent < messages && window.len() < window_len {
                if let Some(delivered) = &delivered {
                    // Fewer than `in_flight` ahead of the subscriber.
                    let goal = (sent + 1).saturating_sub(in_flight);
                    let paced = super::reached(&delivered.count, &delivered.moved, goal).await;
                    anyhow::ensure!(paced.is_ok(), "the subscriber stalled at {sent} sent");
                }
                let pending = publisher.publish_acked_bytes_deferred(topic, payload.clone());
                window.push_back(pending.await?);
                sent += 1;
                continue;
            }
            let Some(oldest) = window.pop_front() else {
                anyhow::bail!("{acked} of {messages} acknowledged and nothing in flight");
            };
            match oldest.await {
                Ok(_) => acked += 1,
                Err(ClientError::Server { code: ErrorCode::QUEUE_FULL, .. }) => {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    // Made again.
                    sent -= 1;
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok(())
    })
    .await?
}

/// Publish-to-delivery latency at a fixed rate with acknowledged publishes: p50, p99, p99.9 µs.
pub(super) async fn latency(
    addr: &str,
    api_key: Option<&str>,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<[f64; 3]> {
    let topic = "bench/qos1-latency";
    let total = rate * seconds;
    let base = Instant::now();
    let (_receiver, mut sub) = subscriber(addr, api_key, topic, 1024).await?;
    let reader = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        while (samples.len() as u64) < total {
            let Some(delivery) = sub.recv().await else { break };
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&delivery.payload()[..8]);
            let now = base.elapsed().as_nanos() as u64;
            samples.push(now.saturating_sub(u64::from_be_bytes(sent)));
        }
        samples
    });
    let publisher = connect(addr, api_key).await?;
    let period = Duration::from_secs(1).as_nanos() as u64 / rate.max(1);
    // From a task on the runtime's workers, as the QoS 0 latency run publishes.
    tokio::spawn(async move {
        let start = Instant::now();
        let mut payload = vec![0u8; 128];
        for i in 0..total {
            let due = start + Duration::from_nanos(i * period);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            payload[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
            publisher.publish_acked_bytes(topic, Bytes::copy_from_slice(&payload)).await?;
        }
        anyhow::Ok(())
    })
    .await??;
    let samples = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .context("QoS 1 latency run stalled")??;
    anyhow::ensure!(samples.len() as u64 == total, "received {} of {total}", samples.len());
    Ok(super::percentiles(samples))
}

/// `--qos1`: QoS 1 throughput and latency on the whispeer server, printed beside QoS 0's 1→1
/// figure (`qos0`).
pub(super) async fn report(args: &super::BenchArgs, qos0: f64) -> anyhow::Result<()> {
    let (addr, key) = (args.server.as_str(), args.api_key.as_deref());
    eprintln!("whispeer: QoS 1 1→1, 128 B …");
    let window = u32::try_from((args.window_bytes / 128).clamp(1, 1 << 20)).unwrap_or(u32::MAX);
    let rate = throughput(addr, key, args.messages, window).await?;
    eprintln!("whispeer: QoS 1 latency at {} msgs/s …", args.rate);
    let [p50, p99, p999] = latency(addr, key, args.rate, args.latency_secs).await?;
    println!("{:<32}{rate:>14.1}{:>15.2}× QoS 0", "QoS 1 1→1 128 B, acked msgs/s", rate / qos0);
    println!("{:<32}{p50:>14.1}", "QoS 1 latency p50 µs");
    println!("{:<32}{p99:>14.1}", "QoS 1 latency p99 µs");
    println!("{:<32}{p999:>14.1}", "QoS 1 latency p99.9 µs");
    Ok(())
}
