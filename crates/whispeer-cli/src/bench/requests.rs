//! `whispeer bench --requests`: request/reply beside nats-server, in the same run.
//!
//! One requester keeps `--request-window` 128-byte requests awaiting their replies, and
//! `--responders` responders, each on a connection of its own, share them as one queue group
//! and answer each with its payload. Then one request at a time: the round trip's p50 and p99.
//!
//! - whispeer through its SDK: `Client::request` (a QoS 1 publish with a reply topic, awaited
//!   until its reply comes) and `Client::respond` (which acknowledges each request once it has
//!   answered it).
//! - nats-server through async-nats (`--nats`): `Client::request` and queue subscribers that
//!   publish each payload to its message's reply subject.
//! - nats-server through its text protocol written and parsed here (`--nats-raw`): the
//!   requester's one `_INBOX` wildcard subscription and a closed loop on one connection, the
//!   responders writing a `PUB` to each `MSG`'s reply subject: the server at its best.
//!
//! CPU time per request: the server's (its pid given) and this process's, which is the
//! requester and the responders together.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use super::BenchArgs;
use super::durable::Cpu;
use super::nats_text::{Frame, RawNats, ascii, frame};
use super::stats::percentiles;
use super::target::{Target, nats_target};

/// `whispeer bench --requests` and its settings.
#[derive(Debug, clap::Args)]
pub(crate) struct RequestBenchArgs {
    /// Measure request/reply instead: on the whispeer server (`--server`), and on nats-server
    /// when `--nats` (async-nats) or `--nats-raw` (its text protocol) is given.
    #[arg(long)]
    pub(super) requests: bool,
    /// Requests: how many with `--request-window` in flight (and a tenth of them, at least
    /// 100, one at a time).
    #[arg(long, default_value_t = 200_000)]
    pub(super) request_count: u64,
    /// Requests: how many await their replies at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) request_window: u64,
    /// Requests: responders sharing them as one queue group, each on a connection of its own.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) responders: u64,
}

const PAYLOAD: usize = 128;
/// A request without its reply this long fails the run.
const TIMEOUT: Duration = Duration::from_secs(10);
const GROUP: &str = "bench";

/// One system under test.
enum System {
    Whispeer {
        addr: String,
        api_key: Option<String>,
    },
    #[cfg(feature = "nats")]
    Nats {
        addr: String,
    },
    NatsRaw {
        addr: String,
    },
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            Self::Whispeer { .. } => "whispeer",
            #[cfg(feature = "nats")]
            Self::Nats { .. } => "nats (async-nats)",
            Self::NatsRaw { .. } => "nats (raw protocol)",
        }
    }

    /// A subject of the round's own, in the system's syntax.
    fn subject(&self, round: u64) -> String {
        match self {
            Self::Whispeer { .. } => format!("bench/requests/{round}"),
            #[cfg(feature = "nats")]
            Self::Nats { .. } => format!("bench.requests.{round}"),
            Self::NatsRaw { .. } => format!("bench.requests.{round}"),
        }
    }
}

/// One system's figures: replies per second with the window in flight, the round trip of one
/// request at a time (p50, p99), and CPU time per request with the window in flight of the
/// server (NaN without its pid) and of this process.
struct Line {
    name: String,
    rate: f64,
    p50: f64,
    p99: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
}

/// Measures every system given `rounds` times in turn and prints each figure's median.
pub(super) async fn run(args: &RequestBenchArgs, bench: &BenchArgs) -> anyhow::Result<()> {
    let mut systems =
        vec![System::Whispeer { addr: bench.server.clone(), api_key: bench.api_key.clone() }];
    #[cfg(feature = "nats")]
    if let Some(Target::Nats { addr }) = nats_target(bench)? {
        systems.push(System::Nats { addr });
    }
    #[cfg(not(feature = "nats"))]
    let _: Option<Target> = nats_target(bench)?;
    if let Some(addr) = &bench.nats_raw {
        systems.push(System::NatsRaw { addr: addr.clone() });
    }
    let mut each = Vec::new();
    for round in 1..=bench.rounds {
        let mut rows = Vec::new();
        for system in &systems {
            eprintln!("{}: requests …", system.name());
            let pid = match system {
                System::Whispeer { .. } => bench.server_pid,
                _ => bench.nats_pid,
            };
            let line = measure(system, args, pid, round)
                .await
                .with_context(|| format!("benchmarking requests on {}", system.name()))?;
            rows.push(line);
        }
        eprint!("round {round} of {}:\n{}", bench.rounds, table(args, &rows));
        each.push(rows);
    }
    println!("medians of {} rounds (each measured every system in turn):", bench.rounds);
    print!("{}", table(args, &medians(&each)));
    Ok(())
}

/// One system's line, each figure the median over the rounds.
fn medians(each: &[Vec<Line>]) -> Vec<Line> {
    super::table::medians_of(each, |first, of| Line {
        name: first.name.clone(),
        rate: of(|l| l.rate),
        p50: of(|l| l.p50),
        p99: of(|l| l.p99),
        server_cpu_us: of(|l| l.server_cpu_us),
        client_cpu_us: of(|l| l.client_cpu_us),
    })
}

fn table(args: &RequestBenchArgs, rows: &[Line]) -> String {
    let heading = format!("128 B request/reply, {} responders", args.responders);
    let window = format!("replies/s, {} in flight", args.request_window);
    let mut out = format!(
        "{heading:<40}{window:>26}{:>14}{:>14}{:>20}{:>20}\n",
        "p50 µs, 1", "p99 µs, 1", "server CPU µs/req", "client CPU µs/req"
    );
    for Line { name, rate, p50, p99, server_cpu_us, client_cpu_us } in rows {
        let _ = writeln!(
            out,
            "{name:<40}{rate:>26.0}{p50:>14.1}{p99:>14.1}{server_cpu_us:>20.2}{client_cpu_us:>20.2}"
        );
    }
    out
}

async fn measure(
    system: &System,
    args: &RequestBenchArgs,
    pid: Option<u32>,
    round: u64,
) -> anyhow::Result<Line> {
    let subject = system.subject(round);
    let payload = Bytes::from(vec![b'r'; PAYLOAD]);
    let responders = Responders::start(system, &subject, args.responders).await?;
    let requester = Requester::connect(system).await?;
    let (count, single) = (args.request_count, (args.request_count / 10).max(100));
    let cpu = Cpu::start(pid);
    let start = Instant::now();
    requester.ask(&subject, &payload, count, args.request_window).await?;
    let rate = count as f64 / start.elapsed().as_secs_f64();
    let (server_cpu_us, client_cpu_us) = cpu.per(count);
    let [p50, p99, _] = percentiles(requester.ask(&subject, &payload, single, 1).await?);
    drop(responders);
    let name = system.name().to_string();
    Ok(Line { name, rate, p50, p99, server_cpu_us, client_cpu_us })
}

/// The responders of one measurement, stopped when dropped.
struct Responders {
    tasks: JoinSet<()>,
    _whispeer: Vec<(whispeer_client::Client, whispeer_client::Responder)>,
}

impl Responders {
    async fn start(system: &System, subject: &str, count: u64) -> anyhow::Result<Self> {
        let mut this = Self { tasks: JoinSet::new(), _whispeer: Vec::new() };
        for _ in 0..count {
            match system {
                System::Whispeer { addr, api_key } => {
                    let client = super::qos1::connect(addr, api_key.as_deref()).await?;
                    let answer =
                        |request: &whispeer_client::Delivery| Some(request.payload().clone());
                    let responder = client.respond(subject, GROUP, answer).await?;
                    this._whispeer.push((client, responder));
                }
                #[cfg(feature = "nats")]
                System::Nats { addr } => {
                    use futures_util::StreamExt;
                    let client = async_nats::connect(addr.as_str()).await?;
                    let mut requests =
                        client.queue_subscribe(subject.to_string(), GROUP.into()).await?;
                    // The subscription is in place once the server has answered a PING.
                    client.flush().await?;
                    this.tasks.spawn(async move {
                        while let Some(request) = requests.next().await {
                            let Some(reply) = request.reply else { continue };
                            if client.publish(reply, request.payload).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                System::NatsRaw { addr } => {
                    let sub = format!("SUB {subject} {GROUP} 1\r\n");
                    let conn = RawNats::connect(addr, &sub).await?;
                    this.tasks.spawn(async move {
                        let _ = conn.answer().await;
                    });
                }
            }
        }
        Ok(this)
    }
}

/// The requester of one measurement.
enum Requester {
    Whispeer(whispeer_client::Client),
    #[cfg(feature = "nats")]
    Nats(async_nats::Client),
    NatsRaw(String),
}

impl Requester {
    async fn connect(system: &System) -> anyhow::Result<Self> {
        Ok(match system {
            System::Whispeer { addr, api_key } => {
                Self::Whispeer(super::qos1::connect(addr, api_key.as_deref()).await?)
            }
            #[cfg(feature = "nats")]
            System::Nats { addr } => Self::Nats(async_nats::connect(addr.as_str()).await?),
            System::NatsRaw { addr } => Self::NatsRaw(addr.clone()),
        })
    }

    /// Asks `count` requests with `window` awaiting their replies at once; with a window of
    /// one, gives each round trip in nanoseconds.
    async fn ask(
        &self,
        subject: &str,
        payload: &Bytes,
        count: u64,
        window: u64,
    ) -> anyhow::Result<Vec<u64>> {
        match self {
            Self::Whispeer(client) => {
                let (client, subject, payload) =
                    (client.clone(), subject.to_string(), payload.clone());
                spread(count, window, move || {
                    let (client, subject, payload) =
                        (client.clone(), subject.clone(), payload.clone());
                    async move {
                        let reply = client.request(&subject, payload, TIMEOUT).await?;
                        anyhow::ensure!(
                            reply.payload().len() == PAYLOAD,
                            "a reply of another size"
                        );
                        Ok(())
                    }
                })
                .await
            }
            #[cfg(feature = "nats")]
            Self::Nats(client) => {
                let (client, subject, payload) =
                    (client.clone(), subject.to_string(), payload.clone());
                spread(count, window, move || {
                    let (client, subject, payload) =
                        (client.clone(), subject.clone(), payload.clone());
                    async move {
                        let ask = client.request(subject, payload);
                        let reply =
                            tokio::time::timeout(TIMEOUT, ask).await.context("no reply")??;
                        anyhow::ensure!(reply.payload.len() == PAYLOAD, "a reply of another size");
                        Ok(())
                    }
                })
                .await
            }
            Self::NatsRaw(addr) => {
                let conn = RawNats::connect(addr, "SUB _INBOX.bench.* 1\r\n").await?;
                tokio::time::timeout(TIMEOUT * 6, conn.ask(subject, payload, count, window))
                    .await
                    .context("requests unanswered")?
            }
        }
    }
}

/// Runs `ask` `count` times from `window` tasks at once; with a window of one, in this task,
/// giving each round trip in nanoseconds.
async fn spread<F, Fut>(count: u64, window: u64, ask: F) -> anyhow::Result<Vec<u64>>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    if window == 1 {
        let mut times = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for _ in 0..count {
            let start = Instant::now();
            ask().await?;
            times.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        return Ok(times);
    }
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..window.min(count) {
        let (next, ask) = (Arc::clone(&next), ask.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                ask().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(Vec::new())
}

impl RawNats {
    /// Answers every request with its payload until the connection ends: a read's replies
    /// written together.
    async fn answer(mut self) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(64 * 1024);
        loop {
            while let Some((frame, used)) = frame(&self.buf)? {
                match &frame {
                    Frame::Msg { reply: Some(reply), payload, .. } => {
                        let head = format!(
                            "PUB {} {}\r\n",
                            ascii(&self.buf[reply.clone()]),
                            payload.len()
                        );
                        out.extend_from_slice(head.as_bytes());
                        out.extend_from_slice(&self.buf[payload.clone()]);
                        out.extend_from_slice(b"\r\n");
                    }
                    Frame::Ping => out.extend_from_slice(b"PONG\r\n"),
                    Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                    _ => {}
                }
                self.buf.advance(used);
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
                out.clear();
            }
            self.fill().await?;
        }
    }

    /// Asks `count` requests to `subject` with `window` awaiting their replies, each reply
    /// answered by the next request (written together per read); gives each round trip in
    /// nanoseconds.
    async fn ask(
        mut self,
        subject: &str,
        payload: &[u8],
        count: u64,
        window: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let mut sent_at: Vec<Instant> = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut times = Vec::with_capacity(sent_at.capacity());
        let mut out = Vec::with_capacity(64 * 1024);
        let request = |out: &mut Vec<u8>, sent_at: &mut Vec<Instant>| {
            let head =
                format!("PUB {subject} _INBOX.bench.{} {}\r\n", sent_at.len(), payload.len());
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
            sent_at.push(Instant::now());
        };
        for _ in 0..window.min(count) {
            request(&mut out, &mut sent_at);
        }
        while (times.len() as u64) < count {
            self.stream.write_all(&out).await?;
            out.clear();
            self.fill().await?;
            while let Some((frame, used)) = frame(&self.buf)? {
                match &frame {
                    Frame::Msg { subject: inbox, payload: body, .. } => {
                        anyhow::ensure!(body.len() == payload.len(), "a reply of another size");
                        let id = ascii(&self.buf[inbox.clone()]).rsplit('.').next().unwrap_or("");
                        let sent = id.parse().ok().and_then(|id: usize| sent_at.get(id));
                        let sent = sent.context("a reply to no request")?;
                        times.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        if (sent_at.len() as u64) < count {
                            request(&mut out, &mut sent_at);
                        }
                    }
                    Frame::Ping => out.extend_from_slice(b"PONG\r\n"),
                    Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                    _ => {}
                }
                self.buf.advance(used);
            }
        }
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_is_the_medians_of_its_system_over_the_rounds() {
        let line = |rate: f64, cpu: f64| Line {
            name: "w".into(),
            rate,
            p50: rate / 10.0,
            p99: rate / 5.0,
            server_cpu_us: cpu,
            client_cpu_us: 1.0,
        };
        let each = [vec![line(300.0, 4.0)], vec![line(100.0, f64::NAN)], vec![line(200.0, 6.0)]];
        let lines = medians(&each);
        let l = &lines[0];
        assert_eq!(
            (l.rate, l.p50, l.p99, l.server_cpu_us, l.client_cpu_us),
            (200.0, 20.0, 40.0, 5.0, 1.0)
        );
    }
}
