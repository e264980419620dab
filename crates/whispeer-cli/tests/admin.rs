//! The admin API beyond snapshots: `whispeer replay --admin` reads a durable topic's history
//! (beyond memory, opened with the client's key), `whispeer replay --group` moves a durable
//! subscription, and the store's latency histograms appear in the metrics.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::process::{Command, Output};

use whispeer_client::engines::Keyring;

mod common;

use common::{BIN, Server, http_get, output_of, subscriber};

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN).args(args).envs(envs.iter().copied()).output().unwrap()
}

#[test]
fn replay_through_the_admin_api_reaches_into_the_store_and_rewinds_a_group() {
    let dir = std::env::temp_dir().join(format!("whispeer-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().to_string();
    let server = Server::start_with(
        &["--admin-listen", "127.0.0.1:0"],
        &[
            ("WHISPEER_STORAGE__DIR", dir_text.as_str()),
            ("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#),
            ("WHISPEER_STORAGE__SEGMENT_BYTES", "4096"),
            // orders/eu keeps two messages in memory (the log has them all); the rest keep 100.
            (
                "WHISPEER_RETENTION",
                r#"[{filter="orders/eu",max_messages=2},{filter="orders/#",max_messages=100}]"#,
            ),
            ("WHISPEER_ADMIN_TOKEN", "t0ken"),
        ],
    );
    let admin = format!("http://{}", server.admin.clone().unwrap());
    let key = Keyring::generate().unwrap().to_text().to_string();
    let sealed = [("WHISPEER_KEY", key.trim())];
    let addr = server.addr.as_str();
    for line in ["one", "two", "three", "four", "five"] {
        for topic in ["orders/eu", "orders/us"] {
            let out = run(&["pub", topic, line, "--ack", "--server", addr], &sealed);
            assert!(out.status.success(), "{out:?}");
        }
    }

    // Memory holds the last two; the admin API reads the rest from the write-ahead log, and
    // the CLI opens what the server only ever saw sealed.
    let replay = |extra: &[&str], envs: &[(&str, &str)]| {
        let base = ["replay", "orders/eu", "--admin", &admin, "--token", "t0ken"];
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        run(&args, envs)
    };
    let all = replay(&["-v"], &sealed);
    assert!(all.status.success(), "{all:?}");
    let printed = String::from_utf8_lossy(&all.stdout);
    let expected =
        "1 orders/eu one\n2 orders/eu two\n3 orders/eu three\n4 orders/eu four\n5 orders/eu five\n";
    assert_eq!(printed, expected);
    let tail = replay(&["--from", "4"], &sealed);
    assert_eq!(String::from_utf8_lossy(&tail.stdout), "four\nfive\n");
    let keyless = replay(&[], &[]);
    let stderr = String::from_utf8_lossy(&keyless.stderr);
    assert!(keyless.stdout.is_empty() && stderr.contains("skipped"), "{stderr}");
    let wrong_token = run(&["replay", "orders/eu", "--admin", &admin, "--token", "nope"], &[]);
    assert!(!wrong_token.status.success());

    // A durable subscription reads everything and acks, leaves, and is moved back to offset 3:
    // the next member gets 3, 4 and 5 again.
    let group = ["--group", "billing", "--ack", "--from", "earliest", "--server", addr];
    let first = subscriber(&[&["orders/us", "--count", "5"][..], &group].concat(), &sealed);
    assert_eq!(output_of(first), "one\ntwo\nthree\nfour\nfive\n");
    let rewind = |group: &str| {
        let base = ["replay", "orders/us", "--admin", &admin, "--token", "t0ken"];
        run(&[&base[..], &["--group", group, "--from", "3"]].concat(), &[])
    };
    // The server may not have seen the member leave yet: 409 until it has.
    let mut moved = rewind("billing");
    for _ in 0..50 {
        if moved.status.success() {
            break;
        }
        assert!(String::from_utf8_lossy(&moved.stderr).contains("409"), "{moved:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        moved = rewind("billing");
    }
    assert_eq!(String::from_utf8_lossy(&moved.stdout), "orders/us from 3\n", "{moved:?}");
    let again = subscriber(&[&["orders/us", "--count", "3"][..], &group].concat(), &sealed);
    assert_eq!(output_of(again), "three\nfour\nfive\n");
    let unknown = rewind("nobody");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"), "{unknown:?}");

    // Storing went through the log: its latencies are histograms with buckets.
    let (_, metrics) = http_get(server.admin.as_deref().unwrap(), "/metrics");
    assert!(
        metrics.contains(r#"whispeer_store_fsync_seconds_bucket{store="wal",le="0.001"}"#),
        "{metrics}"
    );
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"whispeer_store_batch_records_count{store="wal"} "#))
        .unwrap();
    assert!(count.trim().parse::<u64>().unwrap() >= 5, "five publishes stored: {count}");

    // The log's directory is replaced by a file: at its next segment the writer fails, durable
    // publishes are refused, and /readyz says so.
    let admin_addr = server.admin.as_deref().unwrap();
    assert_eq!(http_get(admin_addr, "/readyz").0, "HTTP/1.1 200 OK");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    let payload = "x".repeat(1000);
    let refused = (0..20).any(|_| {
        !run(&["pub", "orders/eu", &payload, "--ack", "--server", addr], &[]).status.success()
    });
    assert!(refused, "a durable publish is refused once the log has failed");
    let (status, body) = http_get(admin_addr, "/readyz");
    assert_eq!(
        (status.as_str(), body.trim()),
        ("HTTP/1.1 503 Service Unavailable", "store failed: durable publishes are refused")
    );
    drop(server);
    let _ = std::fs::remove_file(&dir);
}
