//! Floods and slow consumers against `whispeer serve`: a subscriber that stops reading while
//! 1 GiB is published (the server's memory stays within its connection budget, every drop is
//! counted by its policy, a healthy subscriber beside it is served), eight of them under a
//! server-wide cap (`max_queued_bytes`) smaller than their budgets together, and 5,000 idle plus
//! 500 slowloris connections that never log in (memory per connection, a normal client's
//! latency beside them). Figures are printed; `scripts/reliability` puts them in RELIABILITY.md.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use whispeer_client::Client;

/// Samples `pid`'s resident memory every 20 ms until stopped; returns the peak.
fn watch_rss(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let peak = std::thread::spawn(move || {
        let mut peak = 0;
        while !stopped.load(Ordering::Relaxed) {
            peak = peak.max(common::rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (stop, peak)
}

/// An MQTT 3.1.1 client that connects, subscribes to `filter` at QoS 0 and never reads again.
fn stalled_mqtt_subscriber(addr: &str, filter: &str, n: usize) -> TcpStream {
    let mut stream = common::mqtt_subscribe(addr, &format!("stalled-{n:02}"), filter);
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0], "SUBACK granted QoS 0");
    stream
}

fn metric(admin: &str, name: &str) -> f64 {
    common::sample(&common::http_get(admin, "/metrics").1, name)
}

/// Publishes `messages` of 64 KiB to `flood` while `stalled` MQTT subscribers stop reading
/// and a healthy one reads, on a server started with `envs`; prints and checks the figures.
async fn flood(stalled: usize, messages: u64, envs: &[(&str, &str)], cap_mib: f64) {
    const PAYLOAD: usize = 64 << 10;
    let (mut server, native, mqtt, admin) = common::serve_mqtt_admin(envs);
    let pid = server.id();
    let healthy = Client::connect(&native).await.unwrap();
    let mut reader = healthy.messages("flood").await.unwrap();
    let stalled: Vec<TcpStream> =
        (0..stalled).map(|n| stalled_mqtt_subscriber(&mqtt, "flood", n)).collect();
    let before = common::rss_kib(pid);
    let (stop, peak) = watch_rss(pid);

    let received = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&received);
    let reading = tokio::spawn(async move {
        // Until everything came, or nothing more for two seconds.
        while counted.load(Ordering::Relaxed) < messages {
            match tokio::time::timeout(Duration::from_secs(2), reader.recv()).await {
                Ok(Some(_)) => counted.fetch_add(1, Ordering::Relaxed),
                _ => break,
            };
        }
    });
    let publisher = Client::connect(&native).await.unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let started = Instant::now();
    for _ in 0..messages {
        publisher.publish_bytes("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    reading.await.unwrap();
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap();
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;

    let drops: f64 = ["drop_oldest", "drop_newest", "queue_full", "disconnect"]
        .iter()
        .map(|reason| metric(&admin, &format!("whispeer_drops_total{{reason=\"{reason}\"}}")))
        .sum();
    let got = received.load(Ordering::Relaxed);
    println!(
        "stalled subscribers: {} MiB published in {:.1} s to {} stalled and one healthy \
         subscriber; server RSS {} MiB before, peak {} MiB (+{growth_mib:.0} MiB, cap \
         {cap_mib} MiB); {drops} dropped by policy (all subscribers); the healthy one got {got} \
         of {messages}",
        (messages * PAYLOAD as u64) >> 20,
        elapsed.as_secs_f64(),
        stalled.len(),
        before / 1024,
        peak / 1024,
    );
    assert!(drops > 0.0, "the stalled subscribers' policy dropped messages, and counted them");
    assert!(
        growth_mib < cap_mib * 2.0 + 32.0,
        "memory within the cap and the buffers around it: +{growth_mib:.0} MiB"
    );
    drop(stalled);
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_while_1_gib_is_published_holds_memory_within_its_budget() {
    // The connection budget (64 MiB) bounds it.
    flood(1, 16_384, &[], 64.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_stalled_subscribers_hold_no_more_than_the_server_wide_cap() {
    // Eight connection budgets would be 512 MiB; the server's cap is set to 64 MiB.
    let cap = [("WHISPEER_DELIVERY__MAX_QUEUED_BYTES", "67108864")];
    flood(8, 8_192, &cap, 64.0).await;
}

/// Round trips of one small message through the server: (p50, p99) in µs.
async fn round_trips(addr: &str, count: usize) -> (u128, u128) {
    let client = Client::connect(addr).await.unwrap();
    let mut echo = client.messages("ping").await.unwrap();
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        client.publish_bytes("ping", Bytes::from_static(b"x")).await.unwrap();
        echo.recv().await.unwrap();
        times.push(sent.elapsed().as_micros());
    }
    times.sort_unstable();
    (times[count / 2], times[count * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_cost_little_memory_and_latency() {
    const IDLE: usize = 5_000;
    const SLOW: usize = 500;
    let (mut server, native, _, _) = common::serve_mqtt_admin(&[]);
    let pid = server.id();
    let (p50_quiet, p99_quiet) = round_trips(&native, 2_000).await;
    let before = common::rss_kib(pid);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(&native).unwrap());
    }
    // Slowloris: a frame's length prefix, then one byte of it every 100 ms.
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut stream = TcpStream::connect(&native).unwrap();
        stream.write_all(&[0, 0, 0, 64]).unwrap();
        slow.push(stream);
    }
    let dripping = Arc::new(AtomicBool::new(true));
    let drip = Arc::clone(&dripping);
    let dripper = std::thread::spawn(move || {
        while drip.load(Ordering::Relaxed) {
            for stream in &mut slow {
                let _ = stream.write_all(&[1]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = common::rss_kib(pid);
    let per_connection = (after.saturating_sub(before) * 1024) as f64 / (IDLE + SLOW) as f64;
    let (p50_loaded, p99_loaded) = round_trips(&native, 2_000).await;
    dripping.store(false, Ordering::Relaxed);
    dripper.join().unwrap();
    println!(
        "idle and slowloris: {IDLE} idle + {SLOW} slowloris connections, \
         server RSS +{} KiB = {per_connection:.0} bytes a connection; a normal client's round \
         trip p50/p99 {p50_quiet}/{p99_quiet} µs alone, {p50_loaded}/{p99_loaded} µs beside them",
        after.saturating_sub(before)
    );
    assert!(
        per_connection <= 16.0 * 1024.0,
        "an unauthenticated connection costs {per_connection:.0} bytes (bar: 16 KiB)"
    );
    drop(idle);
    let _ = server.kill();
    let _ = server.wait();
}
