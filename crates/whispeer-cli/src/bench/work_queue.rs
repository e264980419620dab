//! `whispeer bench --work-queue`: an acknowledged work queue beside NATS JetStream, in the same
//! run.
//!
//! One publisher whose every publish is acknowledged by the broker, and a pool of
//! [`MEMBERS`](super::group::MEMBERS) workers, each on a connection of its own, that share the
//! messages and acknowledge each one as they take it. The publisher keeps at most the window
//! (`--window-bytes` of 128-byte payloads) unacknowledged, and at most as many ahead of what
//! the workers took. A message lost stalls the run (an error, no figure); a message delivered
//! again is counted as a redelivery.
//!
//! - whispeer through its SDK: QoS 1 publishes (`publish_acked_bytes_deferred`) and a QoS 1
//!   queue group at the SDK's defaults (its prefetch), each delivery acknowledged as taken.
//! - NATS JetStream (`--nats-raw`, a nats-server started with `-js`) through its text protocol
//!   written and parsed here, the server at its best: a stream with work-queue retention (in
//!   memory, then in files) and one durable pull consumer that the workers share, its
//!   `max_ack_pending` the window. Each worker keeps [`PULL_BATCH`] messages requested (a pull
//!   for half of them each time half arrived) and acknowledges each with an empty `PUB` to its
//!   reply subject, a read's acknowledgements written together; the publisher writes `PUB`s
//!   with a reply subject and reads the stream's acknowledgements.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use whispeer_client::{Qos, SubscribeOptions};

use super::STALL;
use super::durable::Cpu;
use super::group::MEMBERS;
use super::nats_text::{Frame, RawNats, ascii, frame};
use super::qos1::{Delivered, publish_acked_all};

/// `whispeer bench --work-queue` and its settings.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkQueueBenchArgs {
    /// Measure an acknowledged work queue instead: one publisher whose publishes are
    /// acknowledged, a group of 8 workers sharing the messages and acknowledging each; on the
    /// whispeer server (`--server`, QoS 1), and on NATS JetStream when `--nats-raw` names a
    /// nats-server started with `-js` (a work-queue stream in memory and in files, one pull
    /// consumer the workers share).
    #[arg(long)]
    pub(super) work_queue: bool,
    /// Work queue: messages per system and round.
    #[arg(long, default_value_t = 200_000)]
    pub(super) work_messages: u64,
    /// Work queue: also a whispeer server whose `bench/#` topics are durable (in its log, at
    /// its `fsync` setting; `scripts/bench-work-queue` starts one at the defaults), measured
    /// the same way.
    #[arg(long, value_name = "ADDR")]
    pub(super) work_queue_durable: Option<String>,
    /// Work queue: the process id of the `--work-queue-durable` server, to report its CPU time
    /// per message.
    #[arg(long, value_name = "PID")]
    pub(super) work_queue_durable_pid: Option<u32>,
}

const PAYLOAD: usize = 128;
/// Messages each JetStream worker keeps requested.
pub(super) const PULL_BATCH: u64 = 1024;
const STREAM: &str = "WHISPEER_BENCH";
const CONSUMER: &str = "workers";
const SUBJECT: &str = "bench.work";
/// whispeer's topic; the group's name is [`CONSUMER`].
const TOPIC: &str = "bench/work";

/// One system's figures: messages per second (published, acknowledged, taken and
/// acknowledged by a worker), the smallest worker's share against an even one, redeliveries,
/// and CPU time per message of the server (NaN without its pid) and of this process.
struct Line {
    name: String,
    rate: f64,
    least: f64,
    redelivered: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
}

/// What the workers took: first deliveries (which pace the publisher), each worker's share,
/// and redeliveries.
struct Taken {
    messages: u64,
    first: Arc<Delivered>,
    each: [AtomicU64; MEMBERS],
    again: AtomicU64,
}

impl Taken {
    fn new(messages: u64) -> Self {
        let each = std::array::from_fn(|_| AtomicU64::new(0));
        Self { messages, first: Arc::default(), each, again: AtomicU64::new(0) }
    }

    fn took(&self, worker: usize, redelivery: bool) {
        if redelivery {
            self.again.fetch_add(1, Ordering::Relaxed);
        } else {
            self.each[worker].fetch_add(1, Ordering::Relaxed);
            self.first.took_one(self.messages);
        }
    }

    fn least_share(&self, messages: u64) -> f64 {
        let least = self.each.iter().map(|t| t.load(Ordering::Relaxed)).min().unwrap_or(0);
        least as f64 / (messages as f64 / MEMBERS as f64)
    }
}

/// Measures every system given `rounds` times in turn and prints each figure's median.
pub(super) async fn run(args: &WorkQueueBenchArgs, bench: &super::BenchArgs) -> anyhow::Result<()> {
    let window = (bench.window_bytes / PAYLOAD as u64).max(1);
    let messages = args.work_messages;
    let mut each = Vec::new();
    for round in 1..=bench.rounds {
        let mut rows = Vec::new();
        eprintln!("whispeer: acknowledged work queue …");
        let cpu = Cpu::start(bench.server_pid);
        let taken = whispeer(&bench.server, bench.api_key.as_deref(), messages, window).await?;
        rows.push(line("whispeer (QoS 1 group)", &cpu, &taken, messages)?);
        if let Some(addr) = &args.work_queue_durable {
            eprintln!("whispeer: acknowledged work queue, durable …");
            let cpu = Cpu::start(args.work_queue_durable_pid);
            let taken = whispeer(addr, bench.api_key.as_deref(), messages, window).await?;
            rows.push(line("whispeer (QoS 1 group, durable log)", &cpu, &taken, messages)?);
        }
        if let Some(addr) = &bench.nats_raw {
            for storage in ["memory", "file"] {
                eprintln!("nats: JetStream work queue ({storage}) …");
                let cpu = Cpu::start(bench.nats_pid);
                let taken = jetstream(addr, storage, messages, window).await?;
                let name = format!("nats JetStream ({storage}, raw protocol)");
                rows.push(line(&name, &cpu, &taken, messages)?);
            }
        }
        eprint!("round {round} of {}:\n{}", bench.rounds, table(&rows));
        each.push(rows);
    }
    let medians = super::table::medians_of(&each, |first, of| Line {
        name: first.name.clone(),
        rate: of(|l| l.rate),
        least: of(|l| l.least),
        redelivered: of(|l| l.redelivered),
        server_cpu_us: of(|l| l.server_cpu_us),
        client_cpu_us: of(|l| l.client_cpu_us),
    });
    println!("medians of {} rounds (each measured every system in turn):", bench.rounds);
    print!("{}", table(&medians));
    Ok(())
}

/// A system's line from a run that took `messages` in `seconds`.
fn line(name: &str, cpu: &Cpu, run: &(Arc<Taken>, f64), messages: u64) -> anyhow::Result<Line> {
    let (taken, seconds) = run;
    let (server_cpu_us, client_cpu_us) = cpu.per(messages);
    let each: Vec<u64> = taken.each.iter().map(|t| t.load(Ordering::Relaxed)).collect();
    eprintln!("{name}: each worker took {each:?}");
    Ok(Line {
        name: name.to_string(),
        rate: messages as f64 / seconds,
        least: taken.least_share(messages),
        redelivered: taken.again.load(Ordering::Relaxed) as f64,
        server_cpu_us,
        client_cpu_us,
    })
}

fn table(rows: &[Line]) -> String {
    let mut out = format!(
        "{:<44}{:>14}{:>14}{:>13}{:>20}{:>20}\n",
        format!("128 B acked work queue, {MEMBERS} workers"),
        "msgs/s",
        "least share",
        "redelivered",
        "server CPU µs/msg",
        "client CPU µs/msg"
    );
    for Line { name, rate, least, redelivered, server_cpu_us, client_cpu_us } in rows {
        let _ = writeln!(
            out,
            "{name:<44}{rate:>14.0}{least:>14.2}{redelivered:>13.0}{server_cpu_us:>20.2}\
             {client_cpu_us:>20.2}"
        );
    }
    out
}

/// Waits until the workers took every message, or fails after a stall.
async fn all_taken(taken: &Taken, messages: u64) -> anyhow::Result<()> {
    let (count, moved) = (&taken.first.count, &taken.first.moved);
    super::reached(count, moved, messages).await.map_err(|at| {
        anyhow::anyhow!("no progress for {STALL:?}: the workers took {at} of {messages}")
    })
}

/// whispeer: the SDK's QoS 1 publishes to a QoS 1 queue group of [`MEMBERS`].
async fn whispeer(
    addr: &str,
    api_key: Option<&str>,
    messages: u64,
    window: u64,
) -> anyhow::Result<(Arc<Taken>, f64)> {
    let taken = Arc::new(Taken::new(messages));
    let mut workers = Vec::new();
    for worker in 0..MEMBERS {
        let client = super::qos1::connect(addr, api_key).await?;
        let options = SubscribeOptions::new(TOPIC).qos(Qos::AtLeastOnce).group(CONSUMER);
        let mut sub = client.messages(options).await?;
        let taken = Arc::clone(&taken);
        workers.push(tokio::spawn(async move {
            let _client = client;
            while let Some((_, delivery)) = sub.recv_delivery().await {
                delivery.ack();
                taken.took(worker, delivery.is_redelivery());
            }
        }));
    }
    let publisher = super::qos1::connect(addr, api_key).await?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    let pace = Some(Arc::clone(&taken.first));
    let published = publish_acked_all(&publisher, TOPIC, &payload, messages, window, pace).await;
    let done = match published {
        Ok(()) => all_taken(&taken, messages).await,
        Err(err) => Err(err),
    };
    let seconds = start.elapsed().as_secs_f64();
    workers.iter().for_each(tokio::task::JoinHandle::abort);
    done?;
    Ok((taken, seconds))
}

/// NATS JetStream through its text protocol: a work-queue stream kept in `storage` ("memory"
/// or "file") and one pull consumer shared by [`MEMBERS`] workers.
async fn jetstream(
    addr: &str,
    storage: &str,
    messages: u64,
    window: u64,
) -> anyhow::Result<(Arc<Taken>, f64)> {
    let mut admin = Admin::connect(addr).await?;
    admin.set_up(storage, window).await?;
    let taken = Arc::new(Taken::new(messages));
    let mut workers = Vec::new();
    for worker in 0..MEMBERS {
        let conn = RawNats::connect(addr, &format!("SUB _INBOX.work.{worker} 1\r\n")).await?;
        let taken = Arc::clone(&taken);
        workers.push(tokio::spawn(pull(conn, worker, taken)));
    }
    let publisher = RawNats::connect(addr, "SUB _INBOX.published 1\r\n").await?;
    let start = Instant::now();
    let published = publish(publisher, &taken.first, messages, window).await;
    let done = match published {
        Ok(()) => all_taken(&taken, messages).await,
        Err(err) => Err(err),
    };
    let seconds = start.elapsed().as_secs_f64();
    // A worker ends only on an error: the run's own, where there is one.
    for worker in workers {
        if worker.is_finished() {
            worker.await??;
        } else {
            worker.abort();
        }
    }
    admin.delete().await?;
    done?;
    Ok((taken, seconds))
}

/// A JetStream worker: keeps [`PULL_BATCH`] messages requested and acknowledges each message
/// it takes; ends on an error (or when aborted).
async fn pull(mut conn: RawNats, worker: usize, taken: Arc<Taken>) -> anyhow::Result<()> {
    let request = |batch: u64| {
        // Expires (ns) long after any run: a request stands until it is met.
        let body = format!("{{\"batch\":{batch},\"expires\":600000000000}}");
        format!(
            "PUB $JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER} _INBOX.work.{worker} {}\r\n{body}\r\n",
            body.len()
        )
    };
    let mut out = request(PULL_BATCH).into_bytes();
    let mut since_pull = 0;
    loop {
        if !out.is_empty() {
            conn.stream.write_all(&out).await?;
            out.clear();
        }
        conn.fill().await?;
        while let Some((frame, used)) = frame(&conn.buf)? {
            match &frame {
                Frame::Msg { reply: Some(reply), .. } => {
                    let ack = &conn.buf[reply.clone()];
                    taken.took(worker, deliveries(ack) > 1);
                    out.extend_from_slice(b"PUB ");
                    out.extend_from_slice(ack);
                    out.extend_from_slice(b" 0\r\n\r\n");
                    since_pull += 1;
                    if since_pull >= PULL_BATCH / 2 {
                        out.extend_from_slice(request(PULL_BATCH / 2).as_bytes());
                        since_pull -= PULL_BATCH / 2;
                    }
                }
                // A request that ended (it expired, or the consumer is gone): another.
                Frame::Status { .. } => out.extend_from_slice(request(PULL_BATCH).as_bytes()),
                Frame::Ping => out.extend_from_slice(b"PONG\r\n"),
                Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                _ => {}
            }
            conn.buf.advance(used);
        }
    }
}

/// How many times JetStream delivered the message whose acknowledgement subject is `ack`:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or with `<domain>.<account hash>` after `$JS.ACK` and a token at the end (newer servers).
fn deliveries(ack: &[u8]) -> u64 {
    let tokens: Vec<&[u8]> = ack.split(|&b| b == b'.').collect();
    let at = if tokens.len() >= 12 { 6 } else { 4 };
    tokens.get(at).and_then(|t| ascii(t).parse().ok()).unwrap_or(1)
}

/// The JetStream publisher: `PUB`s with a reply subject, at most `window` of them
/// unacknowledged and ahead of what the workers took.
async fn publish(
    mut conn: RawNats,
    taken: &Delivered,
    messages: u64,
    window: u64,
) -> anyhow::Result<()> {
    let record = [
        format!("PUB {SUBJECT} _INBOX.published {PAYLOAD}\r\n").as_bytes(),
        &[b'x'; PAYLOAD][..],
        b"\r\n",
    ]
    .concat();
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut out = Vec::new();
    while acked < messages {
        let moved = taken.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let ahead = sent - taken.count.load(Ordering::Acquire).min(sent);
        let room = window.saturating_sub(sent - acked).min(window.saturating_sub(ahead));
        let room = room.min(messages - sent);
        if room > 0 {
            out.clear();
            (0..room).for_each(|_| out.extend_from_slice(&record));
            conn.stream.write_all(&out).await?;
            sent += room;
        }
        // Held back by the workers alone: wait for them (or for acknowledgements).
        let by_workers = room == 0 && sent - acked < window && sent < messages;
        tokio::select! {
            read = conn.fill() => read?,
            () = &mut moved, if by_workers => continue,
            () = tokio::time::sleep(STALL) => {
                anyhow::bail!("no acknowledgement for {STALL:?}: {acked} of {sent} acknowledged");
            }
        }
        while let Some((frame, used)) = frame(&conn.buf)? {
            match &frame {
                Frame::Msg { payload, .. } => {
                    let reply = &conn.buf[payload.clone()];
                    if reply.windows(7).any(|w| w == b"\"error\"") {
                        anyhow::bail!("JetStream refused a publish: {}", ascii(reply));
                    }
                    acked += 1;
                }
                Frame::Ping => conn.stream.write_all(b"PONG\r\n").await?,
                Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                _ => {}
            }
            conn.buf.advance(used);
        }
    }
    Ok(())
}

/// The connection that makes the stream and its consumer through JetStream's API.
struct Admin {
    conn: RawNats,
    asked: u64,
}

impl Admin {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let conn = RawNats::connect(addr, "SUB _INBOX.admin.* 1\r\n").await?;
        Ok(Self { conn, asked: 0 })
    }

    /// A fresh stream in `storage` and its durable pull consumer, `window` unacknowledged
    /// messages at most.
    async fn set_up(&mut self, storage: &str, window: u64) -> anyhow::Result<()> {
        self.delete().await?;
        let stream = format!(
            "{{\"name\":\"{STREAM}\",\"subjects\":[\"{SUBJECT}\"],\"retention\":\"workqueue\",\
             \"storage\":\"{storage}\",\"num_replicas\":1}}"
        );
        let created = self.ask(&format!("$JS.API.STREAM.CREATE.{STREAM}"), &stream).await?;
        anyhow::ensure!(created.get("error").is_none(), "creating the stream: {created}");
        let consumer = format!(
            "{{\"stream_name\":\"{STREAM}\",\"config\":{{\"durable_name\":\"{CONSUMER}\",\
             \"ack_policy\":\"explicit\",\"deliver_policy\":\"all\",\"max_ack_pending\":{window}}}}}"
        );
        let subject = format!("$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{CONSUMER}");
        let created = self.ask(&subject, &consumer).await?;
        anyhow::ensure!(created.get("error").is_none(), "creating the consumer: {created}");
        Ok(())
    }

    /// Deletes the stream if there is one (with its consumer and messages).
    async fn delete(&mut self) -> anyhow::Result<()> {
        let deleted = self.ask(&format!("$JS.API.STREAM.DELETE.{STREAM}"), "").await?;
        // 10059: stream not found.
        let code = deleted.pointer("/error/err_code").and_then(serde_json::Value::as_u64);
        anyhow::ensure!(matches!(code, None | Some(10059)), "deleting the stream: {deleted}");
        Ok(())
    }

    /// JetStream's JSON answer to `body` sent to the API subject `subject`.
    async fn ask(&mut self, subject: &str, body: &str) -> anyhow::Result<serde_json::Value> {
        self.asked += 1;
        let inbox = format!("_INBOX.admin.{}", self.asked);
        let request = format!("PUB {subject} {inbox} {}\r\n{body}\r\n", body.len());
        self.conn.stream.write_all(request.as_bytes()).await?;
        let answer = async {
            loop {
                while let Some((frame, used)) = frame(&self.conn.buf)? {
                    let answer = match &frame {
                        Frame::Msg { subject, payload, .. }
                            if &self.conn.buf[subject.clone()] == inbox.as_bytes() =>
                        {
                            Some(serde_json::from_slice(&self.conn.buf[payload.clone()]))
                        }
                        Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                        _ => None,
                    };
                    self.conn.buf.advance(used);
                    if let Some(answer) = answer {
                        return answer.context("JetStream's answer is not JSON");
                    }
                }
                self.conn.fill().await?;
            }
        };
        tokio::time::timeout(STALL, answer)
            .await
            .with_context(|| format!("no answer from JetStream to {subject}: is it on (-js)?"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_count_is_read_from_either_form_of_jetstream_ack_subject() {
        assert_eq!(deliveries(b"$JS.ACK.S.workers.1.10.9.1700000000000000000.5"), 1);
        assert_eq!(deliveries(b"$JS.ACK.S.workers.3.10.9.1700000000000000000.5"), 3);
        let v2 = b"$JS.ACK.hub.ACCHASH.S.workers.2.10.9.1700000000000000000.5.tok";
        assert_eq!(deliveries(v2), 2);
        assert_eq!(deliveries(b"not.an.ack"), 1, "unreadable: a first delivery");
    }

    #[test]
    fn the_least_share_is_the_smallest_worker_against_an_even_one() {
        let messages = 100 * (MEMBERS as u64 - 1) + 50;
        let taken = Taken::new(messages);
        for worker in 0..MEMBERS {
            for _ in 0..(if worker == 3 { 50 } else { 100 }) {
                taken.took(worker, false);
            }
        }
        taken.took(0, true);
        assert_eq!(taken.first.count.load(Ordering::Relaxed), messages);
        assert_eq!(taken.again.load(Ordering::Relaxed), 1);
        let even = messages as f64 / MEMBERS as f64;
        assert!((taken.least_share(messages) - 50.0 / even).abs() < 1e-9);
    }
}
