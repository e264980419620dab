//! Memory per idle subscription, printed (not asserted): builds a broker, holds `N` pull
//! subscriptions to exact topics and `N` to `w/<i>/+` filters, and reports the resident set
//! growth per subscription (Linux `/proc/self/statm`), then the publish → deliver throughput to
//! random subscribed topics with all of them in place.
//!
//! ```sh
//! cargo run --release -p whispeer --example idle_subscriptions -- [N] [messages]
//! ```

use std::time::Instant;

use whispeer::{Broker, BrokerOptions, Subscription};

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), whispeer::Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let broker = Broker::builder(BrokerOptions::default()).build();
    let before = resident_bytes().unwrap_or(0);
    let mut subs: Vec<Subscription<whispeer::Message>> = Vec::with_capacity(2 * n);
    for i in 0..n {
        subs.push(broker.messages(format!("e/{i}").as_str())?);
    }
    let exact = resident_bytes().unwrap_or(0);
    for i in 0..n {
        subs.push(broker.messages(format!("w/{i}/+").as_str())?);
    }
    let all = resident_bytes().unwrap_or(0);
    let per = |from: u64, to: u64| to.saturating_sub(from) as f64 / n as f64;
    println!("{n} exact subscriptions: {:.0} bytes of RSS each", per(before, exact));
    println!("{n} wildcard subscriptions: {:.0} bytes of RSS each", per(exact, all));

    // Throughput with everything in place: publish to random subscribed topics, drain as we go.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let start = Instant::now();
    let mut delivered = 0usize;
    for m in 0..messages {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = usize::try_from(seed % n as u64).unwrap_or(0);
        let topic = if m % 2 == 0 { format!("e/{i}") } else { format!("w/{i}/x") };
        broker.publish_bytes(&topic, vec![0u8; 16])?;
        let sub = if m % 2 == 0 { &mut subs[i] } else { &mut subs[n + i] };
        delivered += usize::from(sub.try_recv_message().is_some());
    }
    let rate = delivered as f64 / start.elapsed().as_secs_f64();
    println!("{messages} messages to random subscribed topics: {rate:.0} delivered/s");
    Ok(())
}
