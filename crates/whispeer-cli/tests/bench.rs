//! `whispeer bench` against a real server, beside a real forwarder and nats-server: the tables
//! it prints hold a figure where a system was measured, NaN where it has none.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;

use common::{BIN, Server};

/// A short run of the main workloads: 20,000 messages (with the default 8 MiB window, every one
/// in flight at once), one second of latency at 1,000 a second.
const SHORT: [&str; 6] = ["--messages", "20000", "--latency-secs", "1", "--rate", "1000"];

/// Runs `whispeer bench` with `args` and `rounds` rounds: it succeeds, gives each round's table
/// on standard error as the round ends, and prints the medians' table, which it returns.
fn bench(args: &[&str], rounds: u32) -> String {
    let rounds_text = rounds.to_string();
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--rounds", &rounds_text])
        .output()
        .expect("whispeer bench runs");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{progress}");
    for round in 1..=rounds {
        assert!(progress.contains(&format!("round {round} of {rounds}:")), "{progress}");
    }
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with(&format!("medians of {rounds} rounds")), "{table}");
    table
}

/// The figures of the table's row `label`, up to a ratio (a word ending in ×), if any.
fn row_of(table: &str, label: &str) -> Vec<f64> {
    let row = table.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{table}"));
    row[label.len()..]
        .split_whitespace()
        .take_while(|w| !w.ends_with('×'))
        .map(|w| w.parse().expect("a figure"))
        .collect()
}

#[test]
fn bench_measures_the_server_beside_the_forwarder_with_a_deep_window() {
    let server = Server::start(&[]);
    let mut forwarder = Command::new(BIN)
        .args(["bench", "--serve-forwarder", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(forwarder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let forwarder_addr =
        line.trim().strip_prefix("whispeer: forwarder listening on ").unwrap().to_string();
    // At defaults: every message in flight at once.
    let pid = server.child.id().to_string();
    let args = ["--server", &server.addr, "--forwarder", &forwarder_addr, "--server-pid", &pid];
    let table = bench(&[&args[..], &SHORT, &["--qos1"]].concat(), 2);
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    // Each system's figure (then their ratio).
    let figures = row_of(&table, "1→1 128 B, delivered msgs/s");
    assert_eq!(figures.len(), 2, "whispeer and the forwarder: {table}");
    assert!(figures.iter().all(|&f| f > 0.0), "{table}");
    assert!(table.contains("forwarder (limit)"), "{table}");
    // The work queue: the forwarder has no queue groups; nor fan-in (it copies whole reads,
    // which would interleave eight publishers' frames).
    for label in ["1→group of 8 128 B, msgs/s", "8→1 128 B, delivered msgs/s"] {
        let figures = row_of(&table, label);
        assert!(figures[0] > 0.0 && figures[1].is_nan(), "{table}");
    }
    // The server's CPU time per delivery is read from its pid; the forwarder's is not known.
    for label in ["server CPU µs/delivery (1→1)", "server CPU µs/delivery (1→8)"] {
        let cpu = row_of(&table, label);
        assert!(cpu[0].is_finite() && cpu[0] >= 0.0 && cpu[1].is_nan(), "{table}");
    }
    // The harness's own CPU time per delivery, for both runs.
    for label in ["harness CPU µs/delivery (1→1)", "harness CPU µs/delivery (1→8)"] {
        assert!(row_of(&table, label).iter().all(|c| c.is_finite() && *c > 0.0), "{table}");
    }
    // QoS 1 with the same window, every message acknowledged: a rate and a latency.
    for label in ["QoS 1 1→1 128 B, acked msgs/s", "QoS 1 latency p50 µs"] {
        assert!(row_of(&table, label)[0] > 0.0, "{table}");
    }
}

#[test]
fn the_durable_bench_gives_the_medians_of_its_rounds_beside_the_disk() {
    let dir = std::env::temp_dir().join(format!("whispeer-bench-durable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (log, disk) = (dir.join("log"), dir.join("disk"));
    std::fs::create_dir_all(&disk).unwrap();
    let log_text = log.to_string_lossy().to_string();
    let server = Server::start(&[
        ("WHISPEER_STORAGE__DIR", log_text.as_str()),
        ("WHISPEER_STORAGE__DURABLE", r#"["bench/#"]"#),
    ]);
    let (wal, pid) = (format!("wal={}", server.addr), format!("wal={}", server.child.id()));
    let disk_text = disk.to_string_lossy();
    let args = ["--durable", &wal, "--durable-disk", &disk_text, "--durable-pid", &pid];
    let table = bench(&[&args[..], &["--durable-messages", "300"]].concat(), 2);
    // One line each for the log and the disk's two files: rates and times, and for the log the
    // CPU time per acknowledged publish of the server (its pid given) and of the client, which
    // the disk's lines have not (NaN).
    let figures = |name: &str| -> Vec<f64> {
        let line = table.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{table}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        words[words.len() - 4..].iter().map(|w| w.parse().unwrap()).collect()
    };
    // (CPU time is counted in ticks of 10 ms: a short run's may be 0, never NaN with a pid.)
    let wal = figures("whispeer (wal)");
    assert!(wal[..2].iter().all(|&f| f > 0.0) && wal[2..].iter().all(|&f| f >= 0.0), "{table}");
    // And beside it the same server without the disk (a topic outside `bench/#`): the round
    // trip alone, its CPU not counted.
    let memory = figures("whispeer (wal), probe/memory: not durable");
    assert!(memory[..2].iter().all(|&f| f > 0.0) && memory[2..].iter().all(|f| f.is_nan()));
    for name in ["disk (64 per fdatasync, appended)", "over zeroes laid first)"] {
        let disk = figures(name);
        assert!(
            disk[..2].iter().all(|&f| f > 0.0) && disk[2..].iter().all(|f| f.is_nan()),
            "{table}"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_request_bench_measures_the_server_beside_nats_on_its_own_protocol() {
    let server = Server::start(&[]);
    let nats = common::engines::Nats::start(0);
    let nats_addr = nats.url.trim_start_matches("nats://").to_string();
    let pid = server.child.id().to_string();
    let args = ["--requests", "--server", &server.addr, "--nats-raw", &nats_addr];
    let table = bench(&[&args[..], &["--server-pid", &pid, "--request-count", "2000"]].concat(), 2);
    // Replies a second with 64 in flight, p50 and p99 of one at a time, then the CPU time per
    // request of the server (known only for whispeer, whose pid was given) and of the client.
    for name in ["whispeer", "nats (raw protocol)"] {
        let f = row_of(&table, name);
        assert_eq!(f.len(), 5, "{table}");
        assert!(f[0] > 0.0 && f[1] > 0.0 && f[2] >= f[1] && f[4] >= 0.0, "{table}");
    }
    assert!(row_of(&table, "whispeer")[3] >= 0.0, "{table}");
    assert!(row_of(&table, "nats (raw protocol)")[3].is_nan(), "{table}");
}

#[test]
fn the_work_queue_and_fan_in_deliver_every_message_on_whispeer_and_on_nats() {
    let server = Server::start(&[]);
    let nats = common::engines::Nats::start(0);
    let nats_addr = nats.url.trim_start_matches("nats://").to_string();
    let table =
        bench(&[&["--server", &server.addr, "--nats-raw", &nats_addr][..], &SHORT].concat(), 1);
    // Every message reached exactly one member (the run fails otherwise), on both systems.
    let rates = row_of(&table, "1→group of 8 128 B, msgs/s");
    assert!(rates.len() == 2 && rates.iter().all(|&r| r > 0.0), "{table}");
    // The smallest member's share against an even one: between none and all of them.
    let shares = row_of(&table, "group: least share / even");
    assert!(shares.len() == 2 && shares.iter().all(|&s| (0.0..=1.0).contains(&s)), "{table}");
    // And eight publishers to one subscriber: every message arrived, on both systems.
    let fan_in = row_of(&table, "8→1 128 B, delivered msgs/s");
    assert!(fan_in.len() == 2 && fan_in.iter().all(|&r| r > 0.0), "{table}");
}

#[test]
fn the_acked_work_queue_bench_measures_the_server_beside_jetstream_on_its_own_protocol() {
    let server = Server::start(&[]);
    let nats = common::engines::Nats::start(0);
    let nats_addr = nats.url.trim_start_matches("nats://").to_string();
    let pid = server.child.id().to_string();
    let args = ["--work-queue", "--server", &server.addr, "--server-pid", &pid];
    let table =
        bench(&[&args[..], &["--nats-raw", &nats_addr, "--work-messages", "3000"]].concat(), 2);
    // Messages a second, the smallest worker's share against an even one, redeliveries, then
    // the CPU time per message of the server (known only for whispeer, whose pid was given) and
    // of the client: for whispeer, and for a JetStream stream in memory and in files.
    let systems = [
        "whispeer (QoS 1 group)",
        "nats JetStream (memory, raw protocol)",
        "nats JetStream (file, raw protocol)",
    ];
    for name in systems {
        let f = row_of(&table, name);
        assert_eq!(f.len(), 5, "{table}");
        assert!(f[0] > 0.0 && (0.0..=1.0).contains(&f[1]), "{table}");
        assert!(f[2] == 0.0 && f[4] >= 0.0, "no redelivery in a run this short: {table}");
    }
    assert!(row_of(&table, "whispeer (QoS 1 group)")[3] >= 0.0, "{table}");
    assert!(row_of(&table, "nats JetStream (memory, raw protocol)")[3].is_nan(), "{table}");
}
