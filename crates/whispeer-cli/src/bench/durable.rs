//! `whispeer bench --durable LABEL=ADDR`: acknowledged durable publishing beside Redis with
//! `appendfsync always` and the disk's own group-commit ceiling, in the same run.
//!
//! Each figure keeps `IN_FLIGHT` 128-byte publishes unacknowledged from one publisher:
//! whispeer through the SDK (QoS 1 to `bench/durable`, which the server must make durable with
//! `fsync = "always"`: `scripts/bench-durable` starts it so), Redis through `XADD` pipelined on
//! one connection (under `appendfsync always` Redis replies after its fsync), and the disk
//! through a file this process writes: `IN_FLIGHT` records, one `fdatasync`, and again. Then
//! the same with one publish in flight: the time of one acknowledged publish beside one
//! record's write and `fdatasync`.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `whispeer bench --durable` and its settings.
#[derive(Debug, clap::Args)]
pub(crate) struct DurableBenchArgs {
    /// Measure acknowledged durable publishing instead, on each whispeer server named
    /// `LABEL=ADDR` (its `bench/#` topics durable, `fsync = "always"`), beside the other
    /// `--durable-*` systems given.
    #[arg(long, value_name = "LABEL=ADDR")]
    pub(super) durable: Vec<String>,
    /// Durable: a redis-server with `appendonly yes` and `appendfsync always`, through XADD.
    #[arg(long, value_name = "ADDR")]
    pub(super) durable_redis: Option<String>,
    /// Durable: a directory on the same disk, for the disk's own ceiling (records written and
    /// `fdatasync`ed by this process).
    #[arg(long, value_name = "DIR")]
    pub(super) durable_disk: Option<std::path::PathBuf>,
    /// Durable: acknowledged publishes per system with 64 in flight (and a tenth of them with
    /// one in flight).
    #[arg(long, default_value_t = 100_000)]
    pub(super) durable_messages: u64,
    /// Durable: the process id of the whispeer server `LABEL`, to report its CPU time per
    /// acknowledged publish (64 in flight).
    #[arg(long, value_name = "LABEL=PID")]
    pub(super) durable_pid: Vec<String>,
    /// Durable: the process id of the redis-server, to report its CPU time per `XADD`.
    #[arg(long, value_name = "PID")]
    pub(super) durable_redis_pid: Option<u32>,
}

/// Measures every system given, `rounds` times in turn, and prints one line each: the medians
/// over the rounds of acknowledged publishes per second with 64 in flight, and of microseconds
/// per publish with one in flight (each round's lines go to standard error).
pub(super) async fn run(
    args: &DurableBenchArgs,
    api_key: Option<&str>,
    rounds: u64,
) -> anyhow::Result<()> {
    let mut each = Vec::new();
    for round in 1..=rounds {
        let rows = measure(args, api_key).await?;
        eprint!("round {round} of {rounds}:\n{}", table(&rows));
        each.push(rows);
    }
    let medians = medians(&each);
    println!("medians of {rounds} rounds (each measured every system in turn):");
    print!("{}", table(&medians));
    Ok(())
}

/// Each system's line as the medians of its figures over the rounds (every round measured the
/// same systems in the same order).
fn medians(each: &[Vec<Line>]) -> Vec<Line> {
    super::table::medians_of(each, |first, of| Line {
        name: first.name.clone(),
        many: of(|row| row.many),
        one_us: of(|row| row.one_us),
        server_cpu_us: of(|row| row.server_cpu_us),
        client_cpu_us: of(|row| row.client_cpu_us),
    })
}

/// One round: every system given, in turn.
async fn measure(args: &DurableBenchArgs, api_key: Option<&str>) -> anyhow::Result<Vec<Line>> {
    let (messages, single) = (args.durable_messages, (args.durable_messages / 10).max(100));
    let mut rows: Vec<Line> = Vec::new();
    for named in &args.durable {
        let (label, addr) = named.split_once('=').context("--durable takes LABEL=ADDR")?;
        eprintln!("whispeer ({label}): durable publishing …");
        let pid = pid_of(&args.durable_pid, label)?;
        let cpu = Cpu::start(pid);
        let many = whispeer(addr, api_key, TOPIC, messages, IN_FLIGHT).await?;
        let (server_cpu_us, client_cpu_us) = cpu.per(messages);
        let one = whispeer(addr, api_key, TOPIC, single, 1).await?;
        let name = format!("whispeer ({label})");
        rows.push(Line { name, many, one_us: 1e6 / one, server_cpu_us, client_cpu_us });
        // The same without the disk: what the round trip alone costs.
        let many = whispeer(addr, api_key, MEMORY_TOPIC, messages, IN_FLIGHT).await?;
        let one = whispeer(addr, api_key, MEMORY_TOPIC, single, 1).await?;
        let name = format!("whispeer ({label}), {MEMORY_TOPIC}: not durable");
        let (server_cpu_us, client_cpu_us) = (f64::NAN, f64::NAN);
        rows.push(Line { name, many, one_us: 1e6 / one, server_cpu_us, client_cpu_us });
    }
    if let Some(addr) = &args.durable_redis {
        eprintln!("redis (XADD, appendfsync always): durable publishing …");
        let cpu = Cpu::start(args.durable_redis_pid);
        let many = redis(addr, messages, IN_FLIGHT).await?;
        let (server_cpu_us, client_cpu_us) = cpu.per(messages);
        let one = redis(addr, single, 1).await?;
        let name = "redis (XADD, appendfsync always)".into();
        rows.push(Line { name, many, one_us: 1e6 / one, server_cpu_us, client_cpu_us });
    }
    if let Some(dir) = &args.durable_disk {
        eprintln!("disk: records and fdatasync …");
        for (file, laid) in [("appended", false), ("over zeroes laid first", true)] {
            let (dir, per) = (dir.clone(), IN_FLIGHT);
            let many = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || disk(&dir, messages, per, laid)
            })
            .await??;
            let one = tokio::task::spawn_blocking(move || disk(&dir, single, 1, laid)).await??;
            let name = format!("disk ({IN_FLIGHT} per fdatasync, {file})");
            let (server_cpu_us, client_cpu_us) = (f64::NAN, f64::NAN);
            rows.push(Line { name, many, one_us: 1e6 / one, server_cpu_us, client_cpu_us });
        }
    }
    Ok(rows)
}

/// The lines for `rows`, under their heading.
fn table(rows: &[Line]) -> String {
    let mut out = format!(
        "{:<50}{:>22}{:>22}{:>20}{:>20}\n",
        "128 B durable publish",
        "acked/s, 64 in flight",
        "µs each, 1 in flight",
        "server CPU µs/ack",
        "client CPU µs/ack"
    );
    for Line { name, many, one_us, server_cpu_us, client_cpu_us } in rows {
        let _ = writeln!(
            out,
            "{name:<50}{many:>22.0}{one_us:>22.1}{server_cpu_us:>20.2}{client_cpu_us:>20.2}"
        );
    }
    out
}

/// One system's figures: acknowledged publishes per second with `IN_FLIGHT` in flight,
/// microseconds per publish with one, and with `IN_FLIGHT` the CPU time per acknowledged
/// publish of the server (NaN without its pid) and of this process, the client (the SDK for
/// whispeer, RESP written and parsed here for Redis).
struct Line {
    name: String,
    many: f64,
    one_us: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
}

/// The pid `--durable-pid` gives for `label`, if any.
fn pid_of(pids: &[String], label: &str) -> anyhow::Result<Option<u32>> {
    for named in pids {
        let (name, pid) = named.split_once('=').context("--durable-pid takes LABEL=PID")?;
        if name == label {
            return Ok(Some(pid.parse().context("--durable-pid: a process id")?));
        }
    }
    Ok(None)
}

/// CPU seconds of the server (given its pid) and of this process when a phase started.
pub(super) struct Cpu {
    pid: Option<u32>,
    server: Option<f64>,
    client: Option<f64>,
}

impl Cpu {
    pub(super) fn start(pid: Option<u32>) -> Self {
        let server = pid.and_then(|pid| super::stats::cpu_seconds(Some(pid)));
        Self { pid, server, client: super::stats::cpu_seconds(None) }
    }

    /// Microseconds of CPU a publish since the start, of the server and of this process
    /// (NaN where not known).
    pub(super) fn per(&self, publishes: u64) -> (f64, f64) {
        let since = |before: Option<f64>, pid: Option<u32>| match before {
            Some(before) => super::stats::cpu_seconds(pid)
                .map_or(f64::NAN, |now| (now - before) * 1e6 / publishes.max(1) as f64),
            None => f64::NAN,
        };
        (since(self.server, self.pid), since(self.client, None))
    }
}

/// Publishes awaiting their acknowledgement at once.
pub(super) const IN_FLIGHT: u64 = 64;
const PAYLOAD: usize = 128;
const TOPIC: &str = "bench/durable";
/// A topic outside `bench/#`, which `scripts/bench-durable` makes durable: its PUBACK comes once
/// the message is routed, so its time with one in flight is the round trip without the disk.
const MEMORY_TOPIC: &str = "probe/memory";

/// Acknowledged publishes per second to `topic` with `in_flight` at once, through the SDK.
pub(super) async fn whispeer(
    addr: &str,
    api_key: Option<&str>,
    topic: &'static str,
    messages: u64,
    in_flight: u64,
) -> anyhow::Result<f64> {
    let publisher = super::qos1::connect(addr, api_key).await?;
    // A subscriber-less QoS 1 publish to a durable topic is acknowledged once it is on disk; to
    // another, once it is routed.
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    super::qos1::publish_acked_all(&publisher, topic, &payload, messages, in_flight, None).await?;
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

/// `XADD`s acknowledged per second with `in_flight` pipelined on one connection.
pub(super) async fn redis(addr: &str, messages: u64, in_flight: u64) -> anyhow::Result<f64> {
    let mut stream = TcpStream::connect(addr).await.context("connecting to redis-server")?;
    stream.set_nodelay(true)?;
    let payload = vec![b'x'; PAYLOAD];
    let command = super::raw::resp(&[b"XADD", b"bench:durable", b"*", b"data", &payload]);
    let start = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while acked < messages {
        let room = (in_flight - (sent - acked)).min(messages - sent);
        if room > 0 {
            stream.write_all(&command.repeat(room as usize)).await?;
            sent += room;
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "redis-server closed the connection after {acked} replies");
        buf.extend_from_slice(&chunk[..n]);
        let (replies, used) = bulk_replies(&buf)?;
        buf.drain(..used);
        acked += replies;
    }
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

/// How many whole bulk-string replies `buf` starts with, and their bytes; an error reply is
/// an error.
fn bulk_replies(buf: &[u8]) -> anyhow::Result<(u64, usize)> {
    let (mut count, mut at) = (0, 0);
    while let Some(line) = buf[at..].windows(2).position(|w| w == b"\r\n") {
        let header = &buf[at..at + line];
        match header.first() {
            Some(b'$') => {
                let len: usize = std::str::from_utf8(&header[1..])?.parse()?;
                let end = at + line + 2 + len + 2;
                if buf.len() < end {
                    break;
                }
                (count, at) = (count + 1, end);
            }
            _ => anyhow::bail!("redis-server replied {}", String::from_utf8_lossy(header)),
        }
    }
    Ok((count, at))
}

/// Records per second the disk takes when `per_sync` 128-byte records share an `fdatasync`,
/// written to a file in `dir` (removed afterwards): appended to it as it grows (as Redis's
/// append-only file is), or, if `laid`, over zeroes written and synced before the clock starts
/// (as whispeer's log lays them ahead): a sync then has no new size or blocks to commit.
pub(super) fn disk(dir: &Path, records: u64, per_sync: u64, laid: bool) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("bench-disk.log");
    let mut file = std::fs::File::create(&path).context("creating the disk probe's file")?;
    let batch = vec![b'x'; PAYLOAD * per_sync as usize];
    if laid {
        let zeroes = vec![0u8; 1 << 20];
        let mut left = records * PAYLOAD as u64;
        while left > 0 {
            let len = left.min(zeroes.len() as u64) as usize;
            file.write_all(&zeroes[..len])?;
            left -= len as u64;
        }
        file.sync_all()?;
        std::io::Seek::rewind(&mut file)?;
    }
    let start = Instant::now();
    for _ in 0..records / per_sync {
        file.write_all(&batch)?;
        file.sync_data()?;
    }
    let rate = (records / per_sync * per_sync) as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_replies_are_counted_only_when_whole() {
        let two = b"$15\r\n1700000000000-0\r\n$15\r\n1700000000000-1\r\n$15\r\n17";
        assert_eq!(bulk_replies(two).unwrap(), (2, 44));
        assert_eq!(bulk_replies(b"$15\r\n17000").unwrap(), (0, 0));
        assert!(bulk_replies(b"-ERR wrong\r\n").is_err());
    }

    #[test]
    fn each_line_is_the_medians_of_its_system_over_the_rounds() {
        let line = |name: &str, many: f64, one_us: f64, server_cpu_us: f64| Line {
            name: name.to_string(),
            many,
            one_us,
            server_cpu_us,
            client_cpu_us: many / 1000.0,
        };
        let round = |wal: f64, disk: f64, cpu: f64| {
            vec![line("wal", wal, wal / 100.0, cpu), line("disk", disk, disk / 10.0, f64::NAN)]
        };
        let each =
            [round(300.0, 10.0, 4.0), round(100.0, f64::NAN, f64::NAN), round(200.0, 30.0, 6.0)];
        let lines = medians(&each);
        let figures =
            |l: &Line| (l.name.clone(), l.many, l.one_us, l.server_cpu_us, l.client_cpu_us);
        assert_eq!(figures(&lines[0]), ("wal".to_string(), 200.0, 2.0, 5.0, 0.2));
        let disk = figures(&lines[1]);
        assert_eq!((disk.1, disk.2), (20.0, 2.0), "a missing figure left out");
        assert!(disk.3.is_nan(), "none known in any round: NaN");
        assert!(medians(&[]).is_empty());
    }
}
