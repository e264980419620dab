//! `whispeer bench`: throughput and latency against a running server, and against nats-server
//! with the same workloads in the same run (`--nats`, feature `nats`).
//!
//! Every system runs through one harness: each subscriber has its own connection; the publisher
//! stays at most `--window-bytes` (8 MiB) of payload ahead of the slowest subscriber, as a real
//! burst would; throughput counts delivered messages, and a lost message stalls the run with an
//! error. Baselines: nats-server through async-nats (`--nats`) and its raw text protocol
//! (`--nats-raw`), and a byte-copying forwarder (`--forwarder`), the limit. Latency publishes
//! at a fixed rate (each message released when due by a thread that sleeps, and published from
//! a task), throughput from the thread blocking on
//! the runtime: where the raw clients do best at each (ARCHITECTURE.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

mod chat;
mod durable;
mod fan_in;
mod group;
mod nats_text;
mod qos1;
mod raw;
mod requests;
mod stats;
mod subscriptions;
mod table;
mod target;
mod work_queue;

use stats::{cpu_seconds, percentiles, pid_of};
use table::Report;
use target::{Conn, Target, nats_target};

pub(crate) use raw::serve_forwarder;

/// Default publisher lead over the slowest subscriber, in payload bytes: 8 MiB in flight, as a
/// real burst has (65 536 messages of 128 bytes, 128 of 64 KiB). The defaults of the server
/// and the SDK hold it without loss.
const WINDOW_BYTES: u64 = 8 << 20;
/// A subscriber that receives nothing this long has lost messages.
const STALL: Duration = Duration::from_secs(10);

/// How many messages subscribers receive between two reports of their progress, and how much
/// room in the window a waiting publisher waits for: a sixteenth of the window, at most 4,096
/// messages. A publisher woken for less (every 64 messages, as before) spent up to a sixth of
/// a harness's CPU in wake-ups and thread switches when the receiving side was the bound,
/// which a real burst does not pay.
fn cadence(window: u64) -> u64 {
    (window / 16).clamp(1, 4096)
}

/// Waits until `count` reaches `goal`, woken by `moved` as it grows; `Err` with where it stood
/// once it stood still for [`STALL`] (messages lost).
async fn reached(count: &AtomicU64, moved: &tokio::sync::Notify, goal: u64) -> Result<(), u64> {
    loop {
        let notified = moved.notified();
        let at = count.load(Ordering::Acquire);
        if at >= goal {
            return Ok(());
        }
        if tokio::time::timeout(STALL, notified).await.is_err()
            && count.load(Ordering::Acquire) == at
        {
            return Err(at);
        }
    }
}

/// `whispeer bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// whispeer server address.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    server: String,
    /// API key for the whispeer server.
    #[arg(long, env = "WHISPEER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// nats-server address, to measure it with the same workloads (needs feature `nats`).
    #[arg(long)]
    nats: Option<String>,
    /// nats-server address, measured through its text protocol written and parsed here (a
    /// client that costs next to nothing): the server at its best.
    #[arg(long)]
    nats_raw: Option<String>,
    /// redis-server address, measured through RESP written and parsed here (`PUBLISH`,
    /// `SUBSCRIBE`): Redis pub/sub at its best.
    #[arg(long)]
    redis_raw: Option<String>,
    /// Process id of redis-server, to report its CPU time per delivery.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The whispeer server's MQTT listener, measured through MQTT 3.1.1 QoS 0 packets written
    /// and parsed here (its CPU time is `--server-pid`'s).
    #[arg(long)]
    mqtt: Option<String>,
    /// A Mosquitto broker, measured through the same MQTT packets.
    #[arg(long)]
    mosquitto: Option<String>,
    /// Process id of Mosquitto, to report its CPU time per delivery.
    #[arg(long)]
    mosquitto_pid: Option<u32>,
    /// An rumqttd broker, measured through the same MQTT packets (`--rumqttd-pid`: its pid).
    #[arg(long)]
    rumqttd: Option<String>,
    #[arg(long, hide = true)]
    rumqttd_pid: Option<u32>,
    /// Address of a forwarder (`whispeer bench --serve-forwarder ADDR`): a process that only
    /// copies bytes between sockets, measured with the same workloads as this machine's limit.
    #[arg(long)]
    forwarder: Option<String>,
    /// Process id of the whispeer server, to report its CPU time per delivery.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Process id of nats-server, to report its CPU time per delivery.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Process id of the forwarder, to report its CPU time per delivery.
    #[arg(long)]
    forwarder_pid: Option<u32>,
    /// Serve the forwarder on this address instead of measuring (until killed).
    #[arg(long, hide = true)]
    serve_forwarder: Option<String>,
    /// Messages of the 1→1 run with 128-byte payloads (a second or so here); the 1→8 run
    /// sends a quarter as many, the 64 KiB run a fortieth.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Seconds of the fixed-rate latency run.
    #[arg(long, default_value_t = 3)]
    latency_secs: u64,
    /// Rate of the latency run, messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Most payload bytes the publisher may be ahead of the slowest subscriber (messages in
    /// flight = this / payload size). A subscriber that gets nothing for 10 s ends the run
    /// with an error saying how many of the messages arrived.
    #[arg(long, default_value_t = WINDOW_BYTES)]
    window_bytes: u64,
    /// Topics the throughput runs (1→1, 1→8, 64 KiB) publish to, in turn: with more than one,
    /// each subscriber subscribes once with a wildcard over them (`bench/<run>/+`; NATS
    /// `bench.<run>.*`, a Redis pattern), as a dashboard of many devices does. The forwarder,
    /// which has no topics, copies them all alike.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    topics: u64,
    /// Rounds of the comparison (and of `--durable`): each measures every system in turn,
    /// each round's table goes to standard error, and the table printed is each figure's
    /// median over the rounds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Also measure QoS 1 (publish, PUBACK, deliver, ACK) on the whispeer server.
    #[arg(long)]
    qos1: bool,
    /// Nodes of a whispeer cluster (comma-separated), measured with the same workloads: the
    /// publisher on the first node, subscriber `i` on node `i + 1` (round robin), so every
    /// delivery crosses the engine when there are several nodes.
    #[arg(long, value_delimiter = ',', value_name = "ADDRS")]
    cluster: Vec<String>,
    /// Process ids of the cluster's processes (nodes and engine servers), to report their CPU
    /// time per delivery together.
    #[arg(long, value_delimiter = ',', value_name = "PIDS")]
    cluster_pids: Vec<u32>,
    #[command(flatten)]
    chat: chat::ChatBenchArgs,
    #[command(flatten)]
    durable: durable::DurableBenchArgs,
    #[command(flatten)]
    subscriptions: subscriptions::SubscriptionsBenchArgs,
    #[command(flatten)]
    requests: requests::RequestBenchArgs,
    #[command(flatten)]
    work_queue: work_queue::WorkQueueBenchArgs,
}

/// Delivered messages per second with `subscribers` subscribers, the publisher cycling through
/// `topics` topics; returns (msgs/s, bytes/s).
async fn throughput(
    target: &Target,
    subscribers: usize,
    messages: u64,
    size: usize,
    window: u64,
    topics: u64,
) -> anyhow::Result<(f64, f64)> {
    let (filter, subjects) = target.subjects(&format!("t{subscribers}x{size}"), topics);
    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    // Wakes the publisher when a subscriber moved on, so it waits for room without spinning
    // (a spin would count as the harness's CPU).
    let moved = Arc::new(tokio::sync::Notify::new());
    let every = cadence(window);
    let ready: Arc<Vec<std::sync::atomic::AtomicBool>> =
        Arc::new((0..subscribers).map(|_| std::sync::atomic::AtomicBool::default()).collect());
    let mut readers = Vec::new();
    for i in 0..subscribers {
        let conn = target.connect(i + 1).await?;
        let subscribed = tokio::time::timeout(STALL, conn.subscribe(&filter)).await;
        let mut sub = subscribed.context("subscribing took too long")??;
        let (progress, moved, ready) =
            (Arc::clone(&progress), Arc::clone(&moved), Arc::clone(&ready));
        readers.push(tokio::spawn(async move {
            let _conn = conn;
            let mut n = 0;
            // No timer per message (it would cost as much as a cheap client): the publisher
            // watches the progress counters for a stall instead.
            while n < messages {
                match sub.next().await {
                    // An empty payload is a probe (see `probe`), not a message.
                    Some(payload) if payload.is_empty() => {
                        ready[i].store(true, Ordering::Release);
                    }
                    Some(_) => {
                        n += 1;
                        progress[i].store(n, Ordering::Release);
                        if n % every == 0 || n == messages {
                            moved.notify_waiters();
                        }
                    }
                    None => anyhow::bail!("subscription ended after {n} messages"),
                }
            }
            Ok(())
        }));
    }
    let publisher = target.connect(0).await?;
    let all_ready = || ready.iter().all(|r| r.load(Ordering::Acquire));
    probe(target, &publisher, &subjects[0], all_ready).await?;
    let payload = Bytes::from(vec![b'x'; size]);
    // Drawn on standard error only when it is a terminal.
    let bar = ProgressBar::new(messages)
        .with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} ({per_sec})")?);
    let slowest = || progress.iter().map(|p| p.load(Ordering::Acquire)).min().unwrap_or(0);
    let stalled = |readers: &[tokio::task::JoinHandle<anyhow::Result<()>>], at: u64, sent: u64| {
        readers.iter().for_each(tokio::task::JoinHandle::abort);
        anyhow::anyhow!(
            "no progress for {STALL:?}: the slowest subscriber has {at} of the {sent} messages \
             sent: messages lost"
        )
    };
    let start = Instant::now();
    for sent in 0..messages {
        // Room for the next `every` messages, or a wait for it.
        if sent % every == 0 {
            bar.set_position(sent);
            loop {
                let notified = moved.notified();
                let at = slowest();
                if sent + every - at <= window {
                    break;
                }
                if tokio::time::timeout(STALL, notified).await.is_err() && slowest() == at {
                    return Err(stalled(&readers, at, sent));
                }
            }
        }
        let subject = &subjects[(sent % subjects.len() as u64) as usize];
        publisher.publish(subject, payload.clone()).await?;
    }
    publisher.flush().await?;
    let mut at = slowest();
    for i in 0..readers.len() {
        loop {
            match tokio::time::timeout(STALL, &mut readers[i]).await {
                Ok(done) => break done??,
                Err(_) if slowest() == at => return Err(stalled(&readers, at, messages)),
                Err(_) => at = slowest(),
            }
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let delivered = (messages * subscribers as u64) as f64;
    Ok((delivered / seconds, delivered * size as f64 / seconds))
}

/// Publish-to-receive latency at a fixed rate; returns p50, p99 and p99.9 in microseconds.
async fn latency(target: &Target, rate: u64, seconds: u64) -> anyhow::Result<[f64; 3]> {
    let subject = target.subject("latency");
    let total = rate * seconds;
    let base = Instant::now();
    let receiver = target.connect(1).await?;
    let subscribed = tokio::time::timeout(STALL, receiver.subscribe(&subject)).await;
    let mut sub = subscribed.context("subscribing took too long")??;
    let ready = Arc::new(std::sync::atomic::AtomicBool::default());
    let heard = Arc::clone(&ready);
    let reader = tokio::spawn(async move {
        let _receiver = receiver;
        let mut samples = Vec::with_capacity(total as usize);
        while (samples.len() as u64) < total {
            let Some(payload) = sub.next().await else { break };
            if payload.len() < 8 {
                heard.store(true, Ordering::Release);
                continue;
            }
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&payload[..8]);
            let now = base.elapsed().as_nanos() as u64;
            samples.push(now.saturating_sub(u64::from_be_bytes(sent)));
        }
        samples
    });
    let publisher = target.connect(0).await?;
    probe(target, &publisher, &subject, || ready.load(Ordering::Acquire)).await?;
    let period = Duration::from_secs(1).as_nanos() as u64 / rate.max(1);
    let (released, tick) = (Arc::new(AtomicU64::new(0)), Arc::new(tokio::sync::Notify::new()));
    let pacer = pace(total, Duration::from_nanos(period), &released, &tick);
    let mut payload = vec![0u8; 128];
    let mut sent = 0;
    while sent < total {
        // A permit is kept when no one waits: no release is missed.
        tick.notified().await;
        let due = released.load(Ordering::Acquire);
        while sent < due {
            payload[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
            publisher.publish(&subject, Bytes::copy_from_slice(&payload)).await?;
            sent += 1;
        }
        publisher.flush().await?;
    }
    pacer.join().map_err(|_| anyhow::anyhow!("the latency run's pacer panicked"))?;
    let samples = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .context("latency run stalled")??;
    anyhow::ensure!(
        samples.len() as u64 == total,
        "received {} of {total} messages",
        samples.len()
    );
    Ok(percentiles(samples))
}

/// Releases `total` publishes, one every `period`, from a thread of its own that sleeps until
/// each is due: `released` counts them, `tick` wakes the publisher. tokio's timer has a step of
/// a millisecond: paced by it, a run at 10 k msgs/s went out in bursts of ten or more messages
/// every millisecond or two, and its percentiles were how long a burst took to get through.
fn pace(
    total: u64,
    period: Duration,
    released: &Arc<AtomicU64>,
    tick: &Arc<tokio::sync::Notify>,
) -> std::thread::JoinHandle<()> {
    let (released, tick) = (Arc::clone(released), Arc::clone(tick));
    std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            released.store(i + 1, Ordering::Release);
            tick.notify_one();
        }
    })
}

/// For a cluster: publishes empty probes on `subject` until `heard` says every subscriber got
/// one, so the run starts once the nodes' engine subscriptions are in place (messages sent
/// before would reach no node). Subscribers skip probes.
async fn probe(
    target: &Target,
    publisher: &Conn,
    subject: &str,
    heard: impl Fn() -> bool,
) -> anyhow::Result<()> {
    if !matches!(target, Target::Cluster { .. }) {
        return Ok(());
    }
    let deadline = Instant::now() + STALL;
    while !heard() {
        anyhow::ensure!(Instant::now() < deadline, "the cluster's nodes never got a probe");
        publisher.publish(subject, Bytes::new()).await?;
        publisher.flush().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn measure(target: &Target, args: &BenchArgs, strict: bool) -> anyhow::Result<Report> {
    let name = target.name();
    eprintln!("{name}: 1→1, 128 B …");
    let window = |payload: u64| (args.window_bytes / payload).max(1);
    let pid = pid_of(target, args);
    // A target without a pid has no server figure (`cpu_seconds(None)` would be this process);
    // a cluster's figure is every process of it together.
    let server_cpu = || match target {
        Target::Cluster { .. } if !args.cluster_pids.is_empty() => {
            args.cluster_pids.iter().map(|&pid| cpu_seconds(Some(pid))).sum::<Option<f64>>()
        }
        _ => pid.and_then(|pid| cpu_seconds(Some(pid))),
    };
    // A system that loses messages in one workload gets no figure for it (said on standard
    // error), and the run goes on; whispeer, the first, may lose none.
    let lost = |workload: &str, result: anyhow::Result<(f64, f64)>| match result {
        Err(err) if !strict => {
            eprintln!("{name}: {workload}: {err:#}");
            Ok((f64::NAN, f64::NAN))
        }
        other => other,
    };
    let before = (server_cpu(), cpu_seconds(None));
    let (one_to_one, _) =
        lost("1→1", throughput(target, 1, args.messages, 128, window(128), args.topics).await)?;
    let per_delivery = |from: Option<f64>, to: Option<f64>, deliveries: u64| match (from, to) {
        (Some(from), Some(to)) => (to - from) * 1e6 / deliveries as f64,
        _ => f64::NAN,
    };
    let mut cpu_us = [f64::NAN; 4];
    cpu_us[0] = per_delivery(before.0, server_cpu(), args.messages);
    cpu_us[1] = per_delivery(before.1, cpu_seconds(None), args.messages);
    eprintln!("{name}: 1→8, 128 B …");
    let before = (server_cpu(), cpu_seconds(None));
    let (one_to_eight, _) =
        lost("1→8", throughput(target, 8, args.messages / 4, 128, window(128), args.topics).await)?;
    cpu_us[2] = per_delivery(before.0, server_cpu(), args.messages / 4 * 8);
    cpu_us[3] = per_delivery(before.1, cpu_seconds(None), args.messages / 4 * 8);
    let mut fan_in = f64::NAN;
    if fan_in::has_fan_in(target) {
        eprintln!("{name}: {}→1, 128 B …", fan_in::PUBLISHERS);
        let run = fan_in::throughput(target, args.messages / 2, 128, window(128)).await;
        (fan_in, _) = lost("fan-in", run.map(|rate| (rate, f64::NAN)))?;
    }
    let mut group = [f64::NAN; 2];
    if group::has_groups(target) {
        eprintln!("{name}: 1→group of {}, 128 B …", group::MEMBERS);
        let run = group::throughput(target, args.messages / 2, 128, window(128)).await;
        (group[0], group[1]) = lost("1→group", run)?;
    }
    eprintln!("{name}: 1→1, 64 KiB …");
    let large_run = throughput(
        target,
        1,
        (args.messages / 40).max(100),
        64 * 1024,
        window(64 * 1024),
        args.topics,
    );
    let (_, large) = lost("64 KiB", large_run.await)?;
    eprintln!("{name}: latency at {} msgs/s for {} s …", args.rate, args.latency_secs);
    let (target, rate, seconds) = (target.clone(), args.rate, args.latency_secs);
    let latency = tokio::spawn(async move { latency(&target, rate, seconds).await }).await??;
    let large_mb = large / 1e6;
    Ok(Report { one_to_one, one_to_eight, fan_in, group, large_mb, latency, cpu_us })
}

pub(crate) fn run(args: BenchArgs) -> std::process::ExitCode {
    crate::pubsub::block_on_multi(async move {
        let whispeer =
            Target::Whispeer { addr: args.server.clone(), api_key: args.api_key.clone() };
        if let Some(url) = &args.chat.chat {
            return chat::run(url, &args.chat, args.server_pid).await;
        }
        if !args.durable.durable.is_empty() || args.durable.durable_redis.is_some() {
            return durable::run(&args.durable, args.api_key.as_deref(), args.rounds).await;
        }
        if args.requests.requests {
            return requests::run(&args.requests, &args).await;
        }
        if args.work_queue.work_queue {
            return work_queue::run(&args.work_queue, &args).await;
        }
        if let Some(count) = args.subscriptions.subscriptions {
            return subscriptions::run(&args.subscriptions, count, &args).await;
        }
        if let Some(addr) = &args.serve_forwarder {
            let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
            println!("whispeer: forwarder listening on {}", listener.local_addr()?);
            return Ok(serve_forwarder(listener).await?);
        }
        let raw = [
            args.nats_raw.clone().map(|addr| Target::NatsRaw { addr }),
            args.redis_raw.clone().map(|addr| Target::RedisRaw { addr }),
            args.mqtt.clone().map(|addr| Target::Mqtt { addr, broker: raw::MqttBroker::Whispeer }),
            args.mosquitto
                .clone()
                .map(|addr| Target::Mqtt { addr, broker: raw::MqttBroker::Mosquitto }),
            args.rumqttd
                .clone()
                .map(|addr| Target::Mqtt { addr, broker: raw::MqttBroker::Rumqttd }),
            args.forwarder.clone().map(|addr| Target::Forwarder { addr }),
        ];
        let cluster = (!args.cluster.is_empty()).then(|| Target::Cluster {
            addrs: args.cluster.clone(),
            api_key: args.api_key.clone(),
        });
        let targets: Vec<Target> = std::iter::once(whispeer)
            .chain(cluster)
            .chain(nats_target(&args)?)
            .chain(raw.into_iter().flatten())
            .collect();
        // Rounds, each measuring every system in turn: a slow spell of the machine falls on
        // all of them, and the medians leave it out.
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let mut reports = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let report = measure(target, &args, i == 0)
                    .await
                    .with_context(|| format!("benchmarking {}", target.name()))?;
                reports.push((target.name(), report));
            }
            eprint!("round {round} of {}:\n{}", args.rounds, table::table(&reports));
            rounds.push(reports);
        }
        let reports = table::medians(&rounds);
        println!("medians of {} rounds (each measured every system in turn):", args.rounds);
        if args.topics > 1 {
            println!(
                "throughput runs over {} topics in turn, each subscriber on a wildcard over them",
                args.topics
            );
        }
        print!("{}", table::table(&reports));
        if args.qos1 {
            qos1::report(&args, reports.first().map_or(f64::NAN, |(_, r)| r.one_to_one)).await?;
        }
        Ok(())
    })
}
