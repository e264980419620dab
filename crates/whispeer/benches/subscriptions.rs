//! What a subscription costs as their number grows, in process: resident memory per idle
//! subscription, and publish → deliver throughput with 1,000 and 100,000 exact-topic
//! subscriptions (sync callbacks counting deliveries; two passes of 1,000,000 messages to
//! topics drawn among the subscribed ones). Each shape runs with short topics (`w/<i>`) and
//! with longer ones as devices name them (`devices/<i>/telemetry/temperature`, 34–39 bytes).
//! Prints figures; asserts nothing about them.
//!
//! Beside them, this machine's floor: a hash map from each topic to a counter of its own,
//! looked up for the same random topics on one thread, with 1,000 and 100,000 topics. Any
//! router that keeps state per subscription pays at least its misses (the bench's own topic
//! text, the map's bucket and key, the subscription's state); with 100,000 they leave the
//! cache. The last line says the most whispeer's 100,000 could reach beside its own 1,000 if
//! it paid exactly the floor's extra time a message and nothing more.
//!
//! Run with `cargo bench -p whispeer --bench subscriptions`: each case runs in a process of its
//! own (run after the other in one process, the 1,000 case inherited the 100,000 case's heap and
//! ran at 0.6–0.8× its rate alone, which flattered the ratio). `… -- 100000` runs one case in
//! this process (`… -- 100000 long`: with the longer topics; `WHISPEER_BENCH_MESSAGES` sets the
//! messages a pass, default 1,000,000).
//!
//! `… -- 100000 stepped` runs the case on one thread, which publishes 64 messages and then
//! runs the dispatchers until they delivered them, and so on: a run that a cache simulator
//! replays the same way each time, where two threads interleave differently. The cache
//! lines a message misses, which the throughput above swings too much on this machine to
//! show, then come out as a count (the difference of two message counts, so that subscribing
//! falls out):
//!
//! ```text
//! valgrind --tool=cachegrind --cache-sim=yes --LL=33554432,16,64 <the bench> -- 100000 stepped
//! ```

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use whispeer::{Broker, BrokerOptions};

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The topic of subscription `i`: short, or as a device would name it.
fn topic(i: usize, long: bool) -> String {
    if long { format!("devices/{i:06}/telemetry/temperature") } else { format!("w/{i}") }
}

/// Messages published between two runs of the one-thread runtime, stepped (`-- N stepped`).
const STEP: u64 = 64;

/// The topics a run publishes to, drawn by xorshift from the same seed in every case.
struct Draws(u64);

impl Default for Draws {
    fn default() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }
}

impl Draws {
    fn among<'a>(&mut self, topics: &'a [String]) -> &'a String {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        &topics[(self.0 % topics.len() as u64) as usize]
    }
}

/// Subscribes `count` callbacks to [`topic`]s, then publishes two passes of `messages` to
/// random ones; gives the KiB per subscription and the delivered messages per second of each
/// pass (the first also pays for each subscription's first messages: its queue's buffers).
/// With `stepped`, the runtime is `runtime`, of one thread: every [`STEP`] messages it runs
/// until they are delivered.
fn case(
    count: usize,
    messages: u64,
    long: bool,
    stepped: Option<&tokio::runtime::Runtime>,
) -> (f64, [f64; 2]) {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let delivered = Arc::new(AtomicU64::new(0));
    let before = rss_bytes().unwrap_or(0);
    let subscriptions: Vec<_> = (0..count)
        .map(|i| {
            let delivered = Arc::clone(&delivered);
            broker
                .subscribe(topic(i, long).as_str(), move |_: Bytes| {
                    delivered.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap()
        })
        .collect();
    let per = rss_bytes().unwrap_or(0).saturating_sub(before) as f64 / count as f64 / 1024.0;
    let topics: Vec<String> = (0..count).map(|i| topic(i, long)).collect();
    let payload = Bytes::from(vec![7u8; 128]);
    let mut draws = Draws::default();
    let mut rates = [0.0; 2];
    for (pass, rate) in rates.iter_mut().enumerate() {
        let start = Instant::now();
        for sent in 1..=messages {
            let topic = draws.among(&topics);
            while broker.publish(topic, &payload).is_err() {
                std::thread::yield_now();
            }
            if let Some(runtime) = stepped
                && sent % STEP == 0
            {
                let goal = messages * pass as u64 + sent;
                runtime.block_on(async {
                    while delivered.load(Ordering::Relaxed) < goal {
                        assert!(start.elapsed() < Duration::from_secs(600), "deliveries stalled");
                        tokio::task::yield_now().await;
                    }
                });
            }
        }
        let goal = messages * (pass as u64 + 1);
        while delivered.load(Ordering::Relaxed) < goal && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let done = delivered.load(Ordering::Relaxed) - messages * pass as u64;
        *rate = done as f64 / start.elapsed().as_secs_f64();
    }
    drop(subscriptions);
    (per, rates)
}

/// The floor: `messages` look-ups of random topics among `count` in a hash map to a counter
/// of each topic's own (a cache line, as a subscription's state is at least), on one thread,
/// one after another; gives look-ups a second.
fn floor(count: usize, messages: u64, long: bool) -> f64 {
    struct Counter {
        count: AtomicU64,
        _line: [u64; 7],
    }
    let mut map: HashMap<String, Box<Counter>, foldhash::fast::RandomState> = HashMap::default();
    for i in 0..count {
        map.insert(topic(i, long), Box::new(Counter { count: AtomicU64::new(0), _line: [0; 7] }));
    }
    let topics: Vec<String> = (0..count).map(|i| topic(i, long)).collect();
    let mut draws = Draws::default();
    let start = Instant::now();
    for _ in 0..messages {
        let topic = draws.among(&topics);
        let before = map.get(topic.as_str()).unwrap().count.fetch_add(1, Ordering::Relaxed);
        // The next draw waits for this look-up (the bits mixed in are always 0): one
        // publish's misses do not overlap the next one's, as a publish hundreds of
        // instructions long leaves them no room to.
        draws.0 ^= before >> 63;
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    let counted: u64 = map.values().map(|c| c.count.load(Ordering::Relaxed)).sum();
    assert_eq!(counted, messages);
    rate
}

/// Runs one case in a process of its own (this benchmark again, with `-- N`), so that neither
/// case inherits the other's heap, and reads its figures back.
fn case_alone(count: usize, long: bool) -> (f64, [f64; 2]) {
    let text = alone(count, long, false);
    let figures =
        text.lines().find_map(|line| line.strip_prefix(&format!("{count} subscriptions: ")));
    let figures = figures.unwrap_or_else(|| panic!("the case of {count} said: {text}"));
    let numbers: Vec<f64> = figures
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], [numbers[1] * 1e3, numbers[2] * 1e3])
}

/// The floor with `count` topics, in a process of its own; gives look-ups a second.
fn floor_alone(count: usize, long: bool) -> f64 {
    let text = alone(count, long, true);
    let rate = text.lines().find_map(|line| line.strip_prefix(&format!("{count} floor: ")));
    let rate = rate.unwrap_or_else(|| panic!("the floor of {count} said: {text}"));
    rate.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()).unwrap() * 1e3
}

/// What this benchmark printed, run again with `-- count [long] [floor]`.
fn alone(count: usize, long: bool, floor: bool) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut command = std::process::Command::new(exe);
    command.arg("--").arg(count.to_string());
    if long {
        command.arg("long");
    }
    if floor {
        command.arg("floor");
    }
    let out = command.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    // `-- N [long]`: only the case with N subscriptions, in this process (also for a profiler).
    let long = std::env::args().skip(1).any(|a| a == "long");
    let messages = std::env::var("WHISPEER_BENCH_MESSAGES").ok().and_then(|m| m.parse().ok());
    if let Some(count) = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()) {
        if std::env::args().skip(1).any(|a| a == "floor") {
            let rate = floor(count, 2 * messages.unwrap_or(1_000_000), long);
            println!("{count} floor: {:.0} k look-ups/s", rate / 1e3);
            return;
        }
        // `stepped`: one thread, for a cache simulator (see the module's documentation).
        let stepped = std::env::args().skip(1).any(|a| a == "stepped");
        let runtime = if stepped {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        };
        let runtime = runtime.unwrap();
        let _entered = runtime.enter();
        // `WHISPEER_BENCH_MESSAGES`: messages a pass (default 1,000,000), fewer under a
        // profiler.
        let messages = messages.unwrap_or(1_000_000);
        let (per, [first, second]) = case(count, messages, long, stepped.then_some(&runtime));
        println!(
            "{count} subscriptions: {per:.2} KiB each, {:.0} k msgs/s first, {:.0} k msgs/s then",
            first / 1e3,
            second / 1e3
        );
        return;
    }
    for (long, shape) in [(false, "short topics"), (true, "device topics")] {
        let (large_per, large) = case_alone(100_000, long);
        let (_, small) = case_alone(1_000, long);
        println!("{shape}: idle subscription, 100,000 of them: {large_per:.2} KiB each");
        for (pass, name) in ["first million", "second million"].iter().enumerate() {
            println!(
                "{shape}: publish -> deliver, {name}: 1,000 subscriptions {:.0} k msgs/s, \
                 100,000 {:.0} k ({:.2}x)",
                small[pass] / 1e3,
                large[pass] / 1e3,
                large[pass] / small[pass]
            );
        }
        let (floor_large, floor_small) = (floor_alone(100_000, long), floor_alone(1_000, long));
        // Each message of the 1,000 case plus the floor's extra time with 100,000.
        let extra = 1.0 / floor_large - 1.0 / floor_small;
        let most = (1.0 / small[1]) / (1.0 / small[1] + extra);
        println!(
            "{shape}: floor, a hash map to a counter each on one thread: 1,000 topics {:.1} M \
             look-ups/s, 100,000 {:.1} M ({:.2}x); at most {most:.2}x for whispeer's 100,000 \
             beside its 1,000 if it paid only the floor's extra {:.0} ns a message",
            floor_small / 1e6,
            floor_large / 1e6,
            floor_large / floor_small,
            extra * 1e9
        );
    }
}
