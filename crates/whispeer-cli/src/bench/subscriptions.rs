//! `whispeer bench --subscriptions N`: what subscriptions cost over the server as their number
//! grows. N exact-topic subscriptions (`bench/subs/<i>`) spread over
//! `--subscription-connections` connections, then 128-byte messages published to topics drawn
//! among them, the publisher at most `--window-bytes` ahead of what was delivered; the same
//! with 1,000 subscriptions first, in the same run. With `--nats-raw`, nats-server the same
//! way in the same run (its text protocol written and parsed here, one connection's
//! subscriptions in one write). Prints delivered msgs/s for both counts, their ratio, CPU per
//! delivery and (with `--server-pid` / `--nats-pid`) the server's resident memory per
//! subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::task::JoinSet;
use whispeer_client::{Client, ClientOptions};

use super::raw::{Kind, RawConn};

use super::chat::rss_bytes;
use super::{STALL, cpu_seconds};

/// `whispeer bench --subscriptions` and its settings.
#[derive(Debug, clap::Args)]
pub(crate) struct SubscriptionsBenchArgs {
    /// Measure many exact-topic subscriptions instead: this many (beside 1,000), publishing
    /// to topics drawn among them.
    #[arg(long, value_name = "N")]
    pub(super) subscriptions: Option<usize>,
    /// Subscriptions: the connections they are spread over.
    #[arg(long, default_value_t = 100)]
    pub(super) subscription_connections: usize,
}

/// One system under test.
#[derive(Clone, Copy)]
enum System<'a> {
    Whispeer,
    NatsRaw(&'a str),
}

impl System<'_> {
    fn name(self) -> &'static str {
        match self {
            Self::Whispeer => "whispeer",
            Self::NatsRaw(_) => "nats (raw protocol)",
        }
    }

    /// Subject `i` in the system's own syntax.
    fn subject(self, i: usize) -> String {
        match self {
            Self::Whispeer => format!("bench/subs/{i}"),
            Self::NatsRaw(_) => format!("bench.subs.{i}"),
        }
    }
}

/// A publisher of either system.
enum Publisher {
    Whispeer(Client),
    Nats(RawConn),
}

impl Publisher {
    async fn publish(&self, subject: &str, payload: &Bytes) -> anyhow::Result<()> {
        match self {
            Self::Whispeer(client) => drop(client.publish_bytes(subject, payload.clone()).await?),
            Self::Nats(conn) => conn.publish(subject, payload).await?,
        }
        Ok(())
    }

    async fn flush(&self) -> anyhow::Result<()> {
        match self {
            // The SDK writes what it has as soon as it can.
            Self::Whispeer(_) => {}
            Self::Nats(conn) => conn.flush().await?,
        }
        Ok(())
    }
}

/// What one case measured.
struct Case {
    rate: f64,
    rss_per_subscription: Option<f64>,
    /// CPU µs per delivery of the server (with its pid) and of this process.
    cpu_us: (Option<f64>, Option<f64>),
}

/// Runs both cases on each system and prints them.
pub(super) async fn run(
    args: &SubscriptionsBenchArgs,
    count: usize,
    bench: &super::BenchArgs,
) -> anyhow::Result<()> {
    let systems = std::iter::once((System::Whispeer, bench.server_pid))
        .chain(bench.nats_raw.as_deref().map(|addr| (System::NatsRaw(addr), bench.nats_pid)));
    let mut rows = Vec::new();
    for (system, pid) in systems {
        let small = case(bench, system, pid, 1_000, args.subscription_connections).await?;
        let large = case(bench, system, pid, count, args.subscription_connections).await?;
        rows.push((system.name(), small, large));
    }
    let us = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
    println!("exact-topic subscriptions over {} connections, 128 B", args.subscription_connections);
    print!("{:<48}", "");
    rows.iter().for_each(|(name, ..)| print!("{name:>22}"));
    println!();
    let line = |label: String, cell: &dyn Fn(&Case, &Case) -> String| {
        print!("{label:<48}");
        rows.iter().for_each(|(_, small, large)| print!("{:>22}", cell(small, large)));
        println!();
    };
    line("1,000: delivered msgs/s".into(), &|small, _| format!("{:.0}", small.rate));
    line(format!("{count}: delivered msgs/s"), &|_, large| format!("{:.0}", large.rate));
    line("ratio".into(), &|small, large| format!("{:.2}×", large.rate / small.rate));
    line("server CPU µs/delivery, 1,000".into(), &|small, _| us(small.cpu_us.0));
    line(format!("server CPU µs/delivery, {count}"), &|_, large| us(large.cpu_us.0));
    line(format!("bench CPU µs/delivery, {count}"), &|_, large| us(large.cpu_us.1));
    line(format!("server KiB per subscription, {count}"), &|_, large| {
        us(large.rss_per_subscription)
    });
    Ok(())
}

/// `count` subscriptions of `system` over `connections` connections, then `bench.messages`
/// publishes.
async fn case(
    bench: &super::BenchArgs,
    system: System<'_>,
    pid: Option<u32>,
    count: usize,
    connections: usize,
) -> anyhow::Result<Case> {
    let connections = connections.clamp(1, count.max(1));
    let options = |addr: &str| {
        let mut options = ClientOptions::new(addr);
        options.api_key.clone_from(&bench.api_key);
        options
    };
    let name = system.name();
    let before = pid.and_then(rss_bytes);
    eprintln!("{name}: {count} subscriptions over {connections} connections …");
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    let mut clients = Vec::new();
    for c in 0..connections {
        let subjects: Vec<String> =
            (c..count).step_by(connections).map(|i| system.subject(i)).collect();
        match system {
            System::Whispeer => {
                let client = Client::connect_with(options(&bench.server)).await?;
                for subject in subjects {
                    let mut sub = client
                        .messages(subject.as_str())
                        .await
                        .with_context(|| format!("subscribing to {subject}"))?;
                    let delivered = Arc::clone(&delivered);
                    readers.spawn(async move {
                        while sub.recv().await.is_some() {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                // Every subscription is in place once a flush returns.
                client.flush().await?;
                clients.push(client);
            }
            System::NatsRaw(addr) => {
                let mut sub = RawConn::connect(Kind::Nats, addr)
                    .await?
                    .subscribe_nats(&subjects, None)
                    .await?;
                let delivered = Arc::clone(&delivered);
                readers.spawn(async move {
                    while sub.next().await.is_some() {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
    let after = pid.and_then(rss_bytes);
    let rss_per_subscription = before
        .zip(after)
        .map(|(before, after)| after.saturating_sub(before) as f64 / count as f64 / 1024.0);

    eprintln!("{name}: {} messages to subjects drawn among them …", bench.messages);
    let publisher = match system {
        System::Whispeer => {
            Publisher::Whispeer(Client::connect_with(options(&bench.server)).await?)
        }
        System::NatsRaw(addr) => Publisher::Nats(RawConn::connect(Kind::Nats, addr).await?),
    };
    let subjects: Vec<String> = (0..count).map(|i| system.subject(i)).collect();
    let payload = Bytes::from(vec![7u8; 128]);
    let window = (bench.window_bytes / 128).max(1);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let cpu = (cpu_seconds(pid), cpu_seconds(None));
    let started = Instant::now();
    for sent in 0..bench.messages {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        publisher.publish(&subjects[(state % count as u64) as usize], &payload).await?;
        if sent % 256 == 0 {
            publisher.flush().await?;
            wait_for(&delivered, sent.saturating_sub(window)).await?;
        }
    }
    publisher.flush().await?;
    wait_for(&delivered, bench.messages).await?;
    let rate = bench.messages as f64 / started.elapsed().as_secs_f64();
    let per = |before: Option<f64>, now: Option<f64>| {
        Some((now? - before?) * 1e6 / bench.messages as f64)
    };
    let cpu_us = (per(cpu.0, cpu_seconds(pid)), per(cpu.1, cpu_seconds(None)));
    drop(clients);
    readers.shutdown().await;
    Ok(Case { rate, rss_per_subscription, cpu_us })
}
/// Waits until `delivered` reaches `target`; fails when it stops moving for `STALL`.
async fn wait_for(delivered: &AtomicU64, target: u64) -> anyhow::Result<()> {
    let (mut last, mut moved) = (delivered.load(Ordering::Relaxed), Instant::now());
    while last < target {
        tokio::time::sleep(Duration::from_micros(200)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > STALL {
            anyhow::bail!("{now} of {target} messages delivered, then none for {STALL:?}: lost");
        }
    }
    Ok(())
}
