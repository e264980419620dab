//! `whispeer bench --chat <url>`: the chat listener under load, through the SDK's `Chat` —
//! idle users (the server's memory per connection, with `--server-pid`), direct messages
//! between pairs of users (delivered msgs/s, p50/p99 from send to delivery), and one group's
//! fan-out (deliveries/s). Senders keep `--chat-window` sends in flight each, so the figures
//! are the server's, not round trips'. Messages are sealed end to end, as the SDK does by
//! default (`--chat-plain` measures without sealing: the server alone). Run it against a
//! server whose `max_messages_per_sec` is raised: the default (20 a user) is an anti-abuse
//! limit, and would be measured instead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use tokio::task::JoinSet;
use whispeer_client::{Chat, ChatEvent, ChatEvents, ChatOptions};

use super::{cpu_seconds, percentiles};

/// `whispeer bench --chat` and its settings.
#[derive(Debug, clap::Args)]
pub(crate) struct ChatBenchArgs {
    /// Measure a chat listener instead (`ws://host:port/ws`): idle users, direct messages,
    /// a group's fan-out. Raise the server's `chat.max_messages_per_sec` first.
    #[arg(long, value_name = "URL")]
    pub(super) chat: Option<String>,
    /// Chat: idle users connected at once.
    #[arg(long, default_value_t = 10_000)]
    pub(super) chat_idle: usize,
    /// Chat: pairs of users exchanging direct messages.
    #[arg(long, default_value_t = 50)]
    pub(super) chat_pairs: usize,
    /// Chat: members of the fan-out group.
    #[arg(long, default_value_t = 100)]
    pub(super) chat_group: usize,
    /// Chat: direct messages in all (and the group's deliveries, about).
    #[arg(long, default_value_t = 50_000)]
    pub(super) chat_messages: usize,
    /// Chat: sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    pub(super) chat_window: usize,
    /// Chat: send plain messages (the default seals them end to end, as the SDK does).
    #[arg(long)]
    pub(super) chat_plain: bool,
}

/// Resident memory of a process, from `/proc/<pid>/status`, in bytes.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

async fn connect(url: &str, user: &str, plain: bool) -> anyhow::Result<(Chat, ChatEvents)> {
    let options = ChatOptions::new(url).user(user).device("bench");
    let options = if plain { options.plain() } else { options };
    Chat::connect(options).await.with_context(|| format!("connecting {user}"))
}

/// The time a message carries: nanoseconds since `start`.
fn stamp(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Waits for `count` messages on `events`; their latencies from the stamp in `msg`. A stall
/// says what else came meanwhile (events by kind, and the last one).
async fn receive(mut events: ChatEvents, count: usize, start: Instant) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(count);
    let mut others: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = None;
    while latencies.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .with_context(|| {
                format!(
                    "stalled after {} of {count} messages; other events {others:?}, the last {last:?}",
                    latencies.len()
                )
            })?
            .context("connection closed")?;
        match event {
            ChatEvent::Message(message) if message.unreadable.is_none() => {
                if let Some(sent) = message.msg.as_u64() {
                    latencies.push(stamp(start).saturating_sub(sent));
                }
            }
            event => {
                let text = format!("{event:?}");
                let kind = text.split([' ', '(', '{']).next().unwrap_or_default().to_string();
                *others.entry(kind).or_default() += 1;
                last = Some(text);
            }
        }
    }
    // Acknowledged before the connection goes: none of it comes again.
    events.close().await;
    Ok(latencies)
}

/// Sends `count` stamped messages to `to` (a user, or `#group`), `window` in flight.
async fn send(
    chat: Chat,
    to: String,
    count: usize,
    window: usize,
    start: Instant,
) -> anyhow::Result<()> {
    let mut flight = JoinSet::new();
    for _ in 0..count {
        if flight.len() >= window
            && let Some(done) = flight.join_next().await
        {
            done??;
        }
        let (chat, to) = (chat.clone(), to.clone());
        flight.spawn(async move {
            let stamp = stamp(start);
            match to.strip_prefix('#') {
                Some(group) => chat.send_group(group, stamp).await.map(drop),
                None => chat.send_to(&to, stamp).await.map(drop),
            }
        });
    }
    while let Some(done) = flight.join_next().await {
        done??;
    }
    Ok(())
}

/// Runs the three chat workloads and prints their figures.
pub(super) async fn run(url: &str, args: &ChatBenchArgs, pid: Option<u32>) -> anyhow::Result<()> {
    let plain = args.chat_plain;
    println!("chat: messages {}", if plain { "plain" } else { "sealed end to end (the default)" });
    let before = pid.and_then(rss_bytes);
    let idle_start = Instant::now();
    // Users of this run only: another run's leftovers (an inbox that a killed run never
    // acknowledged, keys that changed since) do not reach them.
    let run = std::process::id();
    let mut idle = Vec::with_capacity(args.chat_idle);
    for i in 0..args.chat_idle {
        idle.push(connect(url, &format!("idle{i}.{run}"), plain).await?);
    }
    let opened = idle_start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pid.and_then(rss_bytes);
    if args.chat_idle == 0 {
        // Nothing to measure.
    } else if let (Some(before), Some(after)) = (before, after) {
        let per = after.saturating_sub(before) as f64 / args.chat_idle as f64;
        println!(
            "chat idle: server RSS {:.1} MiB -> {:.1} MiB, {:.1} KiB per connection",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per / 1024.0
        );
    }
    println!(
        "chat idle: {} users connected in {:.1} s ({:.0}/s)",
        args.chat_idle,
        opened.as_secs_f64(),
        args.chat_idle as f64 / opened.as_secs_f64()
    );
    drop(idle);

    // Direct messages: pair i is s{i} -> r{i}.
    let (pairs, per_pair, window) =
        (args.chat_pairs, args.chat_messages / args.chat_pairs.max(1), args.chat_window);
    let start = Instant::now();
    let mut receivers = JoinSet::new();
    let mut senders = Vec::new();
    for i in 0..pairs {
        let (_, events) = connect(url, &format!("r{i}.{run}"), plain).await?;
        let (chat, _) = connect(url, &format!("s{i}.{run}"), plain).await?;
        receivers.spawn(receive(events, per_pair, start));
        senders.push(chat);
    }
    let cpu = cpu_seconds(pid);
    let began = Instant::now();
    let mut sending = JoinSet::new();
    for (i, chat) in senders.into_iter().enumerate() {
        sending.spawn(send(chat, format!("r{i}.{run}"), per_pair, window, start));
    }
    let mut latencies = Vec::new();
    while let Some(done) = receivers.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = began.elapsed().as_secs_f64();
    while let Some(done) = sending.join_next().await {
        done??;
    }
    let delivered = latencies.len();
    let [p50, p99, _] = percentiles(latencies);
    let server_cpu = cpu.zip(cpu_seconds(pid)).map(|(a, b)| (b - a) * 1e6 / delivered as f64);
    println!(
        "chat 1:1: {pairs} pairs, {delivered} messages, {:.0} msgs/s, p50 {p50:.0} µs, p99 {p99:.0} µs{}",
        delivered as f64 / elapsed,
        server_cpu.map_or(String::new(), |us| format!(", server CPU {us:.1} µs per message"))
    );

    // A group of `chat_group` members, one of them sending.
    let members = args.chat_group.max(2);
    let (owner, _) = connect(url, &format!("g0.{run}"), plain).await?;
    let group = format!("bench{run}");
    owner.create_group(&group, true).await?;
    let count = (args.chat_messages / members).max(10);
    let start = Instant::now();
    let mut receivers = JoinSet::new();
    for i in 1..members {
        let (chat, events) = connect(url, &format!("g{i}.{run}"), plain).await?;
        chat.join(&group).await?;
        receivers.spawn(async move {
            let _chat = chat;
            receive(events, count, start).await
        });
    }
    let cpu = cpu_seconds(pid);
    let began = Instant::now();
    send(owner, format!("#{group}"), count, window, start).await?;
    let mut latencies = Vec::new();
    while let Some(done) = receivers.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = began.elapsed().as_secs_f64();
    let delivered = latencies.len();
    let [p50, p99, _] = percentiles(latencies);
    let server_cpu = cpu.zip(cpu_seconds(pid)).map(|(a, b)| (b - a) * 1e6 / delivered as f64);
    println!(
        "chat group: {members} members, {count} messages, {:.0} messages/s, {:.0} deliveries/s, p50 {p50:.0} µs, p99 {p99:.0} µs{}",
        count as f64 / elapsed,
        delivered as f64 / elapsed,
        server_cpu.map_or(String::new(), |us| format!(", server CPU {us:.1} µs per delivery"))
    );
    Ok(())
}
