//! What the bound on all topics' history (`BrokerOptions::history_max_bytes`) costs a publish:
//! retained topics (each allowed 100 messages by its rule), first filled with one 128-byte
//! message each, then 1,000,000 more publishes spread over them, with the bound out of reach
//! and at 16 MiB, where every publish past it evicts the broker's oldest message, of whatever
//! topic. Prints nanoseconds a publish, the slowest single publish, and what was evicted and
//! held; asserts nothing about them.
//!
//! Run with `cargo bench -p whispeer --bench history_bound`; `… -- 100000` runs one topic count,
//! `WHISPEER_BENCH_MESSAGES` sets the publishes a case.

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]
#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::time::{Duration, Instant};

use whispeer::{Broker, BrokerOptions, Filter, Retention};

fn case(topics: usize, bound: Option<usize>, messages: usize) {
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("t/#").unwrap(), Retention::messages(100))];
    options.history_max_bytes = bound.unwrap_or(usize::MAX);
    let broker = Broker::builder(options).build();
    let names: Vec<String> = (0..topics).map(|i| format!("t/{i}")).collect();
    let payload = vec![1u8; 128];
    for name in &names {
        broker.publish_bytes(name, payload.clone()).unwrap();
    }
    let (start, mut slowest) = (Instant::now(), Duration::ZERO);
    for i in 0..messages {
        let at = Instant::now();
        // A stride prime to the topic count visits every topic in a scattered order.
        broker.publish_bytes(&names[(i * 7919) % topics], payload.clone()).unwrap();
        slowest = slowest.max(at.elapsed());
    }
    let ns = start.elapsed().as_nanos() as f64 / messages as f64;
    let stats = broker.stats();
    let bound = bound.map_or("out of reach".to_string(), |b| format!("{} MiB", b >> 20));
    println!(
        "{topics} topics, bound {bound}: {ns:.0} ns a publish, slowest {slowest:?}, \
         {} evicted, {} MiB held",
        stats.history_evicted,
        stats.history_bytes >> 20
    );
}

fn main() {
    let messages = std::env::var("WHISPEER_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() { vec![1_000, 100_000] } else { counts };
    for topics in counts {
        case(topics, None, messages);
        case(topics, Some(16 << 20), messages);
    }
}
