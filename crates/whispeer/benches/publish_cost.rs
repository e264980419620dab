//! What one publish and one take cost on one thread, without the scheduler: `publish_bytes` to
//! a topic with one raw subscription (or eight), the subscription(s) emptied with
//! `try_recv_message` every 64 messages. No other thread, no wake-up of a parked one: the
//! figure is the work per message itself, which a multi-threaded run (`--bench fanout`) mixes
//! with where its tasks ran and how often they parked.
//!
//! Prints nanoseconds a message; run under `valgrind --tool=callgrind` for instructions, a
//! count that does not move with the machine's load:
//!
//! ```text
//! cargo bench -p whispeer --bench publish_cost --no-run
//! valgrind --tool=callgrind <the bench binary> 200000 1
//! ```
//!
//! Each count runs twice: `publish_bytes` one at a time, and envelopes through
//! `publish_envelope` inside a `PushBatch` of 64, as a server connection's reader publishes a
//! read's frames.
//!
//! Arguments: messages (2,000,000), then the subscriber counts to run (1 and 8);
//! `WHISPEER_BENCH_WAY=bytes`, `read` or `broadcast` runs one way only (`broadcast`: the same
//! shape through `tokio::sync::broadcast`, for comparison); `WHISPEER_BENCH_TOPICS=N` publishes
//! to N topics in turn (each with the case's subscriber count), one topic by default.

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]

use std::time::Instant;

use bytes::Bytes;
use whispeer::proto::{Envelope, Flags};
use whispeer::{Broker, BrokerOptions, MessageId, PushBatch, SubscribeOptions, Topic};

const BATCH: u64 = 64;

/// How a case publishes.
#[derive(Clone, Copy)]
enum Way {
    /// `publish_bytes`, one at a time.
    Bytes,
    /// `publish_envelope` inside a `PushBatch` of [`BATCH`], as a server connection's read.
    Read,
}

/// Publishes `messages` to `subscribers` subscriptions of each of `topics` topics, in turn;
/// gives ns per message.
fn case(subscribers: usize, topics: usize, messages: u64, way: Way) -> f64 {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let topics: Vec<(String, Topic)> = (0..topics)
        .map(|i| {
            let text = if i == 0 { "bench/publish-cost".into() } else { format!("bench/{i}") };
            let parsed = Topic::parse(&text).unwrap();
            (text, parsed)
        })
        .collect();
    let mut subs: Vec<_> = (0..subscribers)
        .flat_map(|_| &topics)
        .map(|(topic, _)| broker.messages(SubscribeOptions::new(topic).capacity(1024)).unwrap())
        .collect();
    let payload = Bytes::from(vec![7u8; 128]);
    let start = Instant::now();
    let mut taken = 0u64;
    let mut batch = None;
    for sent in 1..=messages {
        let (topic, parsed) = &topics[sent as usize % topics.len()];
        match way {
            Way::Bytes => drop(broker.publish_bytes(topic, payload.clone()).unwrap()),
            Way::Read => {
                if batch.is_none() {
                    batch = Some(PushBatch::begin());
                }
                let id = MessageId(u128::from(sent));
                let envelope = Envelope::new(id, parsed.clone(), 0, Flags(0), payload.clone());
                broker.publish_envelope(envelope).unwrap();
            }
        }
        if sent % BATCH == 0 {
            // The read ends: its batch pushes what it held.
            drop(batch.take());
            for sub in &mut subs {
                while let Some(message) = sub.try_recv_message() {
                    assert_eq!(message.payload().len(), 128);
                    taken += 1;
                }
            }
        }
    }
    assert_eq!(taken, messages / BATCH * BATCH * subscribers as u64);
    start.elapsed().as_nanos() as f64 / messages as f64
}

/// The same shape through `tokio::sync::broadcast`: a send to `subscribers` receivers, each
/// emptied with `try_recv` every [`BATCH`] messages. What the in-process target compares with.
fn broadcast(subscribers: usize, messages: u64) -> f64 {
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(1024);
    let mut rxs: Vec<_> = (0..subscribers).map(|_| tx.subscribe()).collect();
    let payload = Bytes::from(vec![7u8; 128]);
    let start = Instant::now();
    let mut taken = 0u64;
    for sent in 1..=messages {
        tx.send(payload.clone()).unwrap();
        if sent % BATCH == 0 {
            for rx in &mut rxs {
                while let Ok(message) = rx.try_recv() {
                    assert_eq!(message.len(), 128);
                    taken += 1;
                }
            }
        }
    }
    assert_eq!(taken, messages / BATCH * BATCH * subscribers as u64);
    start.elapsed().as_nanos() as f64 / messages as f64
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _entered = runtime.enter();
    let mut args = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let messages = args.next().unwrap_or(2_000_000);
    let counts: Vec<u64> = args.collect();
    let counts = if counts.is_empty() { vec![1, 8] } else { counts };
    // `WHISPEER_BENCH_WAY=bytes`, `read` or `broadcast`: that way only (for callgrind).
    let only = std::env::var("WHISPEER_BENCH_WAY").ok();
    let topics = std::env::var("WHISPEER_BENCH_TOPICS").ok().and_then(|n| n.parse().ok());
    let topics = topics.unwrap_or(1usize).max(1);
    for subscribers in counts {
        let subscribers = subscribers as usize;
        if only.is_none() || only.as_deref() == Some("bytes") {
            let ns = case(subscribers, topics, messages, Way::Bytes);
            println!("publish + take, 1 → {subscribers}: {ns:.1} ns a message");
        }
        if only.is_none() || only.as_deref() == Some("read") {
            let ns = case(subscribers, topics, messages, Way::Read);
            println!("a read's publish_envelope + take, 1 → {subscribers}: {ns:.1} ns a message");
        }
        if only.is_none() || only.as_deref() == Some("broadcast") {
            let ns = broadcast(subscribers, messages);
            println!(
                "tokio::sync::broadcast send + try_recv, 1 → {subscribers}: {ns:.1} ns a message"
            );
        }
    }
}
