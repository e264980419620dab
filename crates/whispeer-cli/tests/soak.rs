//! A soak run against `whispeer serve` at its defaults: publishers at half the rate one burst
//! measured, an exact and a wildcard subscriber, a slow MQTT reader (its queue overflows), a
//! QoS 1 queue group that acknowledges, and subscribers that keep coming and going — for
//! `WHISPEER_SOAK_SECONDS` (120 by default; `scripts/reliability` runs longer), sampling the
//! server's RSS, file descriptors and counters. At the end the counters reconcile exactly:
//! every publish is counted, and every message queued for a subscriber was taken and written,
//! dropped by a policy, expired, or discarded with its subscription. The descriptors are back
//! where they started. Figures are printed.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod common;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use whispeer_client::{Client, ClientStats, PublishOptions, Qos, SubscribeOptions};

/// The server's open descriptors, by what they point to.
fn open_fds(pid: u32) -> Vec<String> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let target = |e: std::fs::DirEntry| std::fs::read_link(e.path()).ok();
    let mut fds: Vec<String> =
        entries.filter_map(|e| target(e.ok()?)).map(|t| t.display().to_string()).collect();
    fds.sort();
    fds
}

/// The sum of every sample of `name` (all label sets) in the admin port's metrics.
fn total(admin: &str, name: &str) -> u64 {
    let metrics = common::http_get(admin, "/metrics").1;
    let samples = metrics.lines().filter(|l| l.starts_with(name)).filter_map(|line| {
        let rest = &line[name.len()..];
        let value =
            if rest.starts_with('{') { rest.split_once("} ")?.1 } else { rest.strip_prefix(' ')? };
        value.trim().parse::<f64>().ok()
    });
    samples.sum::<f64>() as u64
}

/// An MQTT 3.1.1 QoS 0 subscriber that reads 4 KiB every 50 ms, until `stop`.
fn slow_mqtt_reader(
    addr: &str,
    filter: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut stream = common::mqtt_subscribe(addr, "soak-slow", filter);
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Err(err)
                    if err.kind() != std::io::ErrorKind::WouldBlock
                        && err.kind() != std::io::ErrorKind::TimedOut =>
                {
                    return;
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// Publishes `rate` messages a second (in steps of 10 ms) to `soak/<n % 8>` until `stop`;
/// returns how many, and what its client counted (reconnections, refusals).
async fn publish_at(addr: String, rate: u64, stop: Arc<AtomicBool>) -> (u64, ClientStats) {
    let client = Client::connect(&addr).await.unwrap();
    let payload = Bytes::from(vec![1u8; 128]);
    let per_step = (rate / 100).max(1);
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..per_step {
            let topic = format!("soak/{}", sent % 8);
            client.publish_bytes(&topic, payload.clone()).await.unwrap();
            sent += 1;
        }
        let due = started + Duration::from_millis(10 * sent / per_step);
        tokio::time::sleep_until(due.into()).await;
    }
    client.flush().await.unwrap();
    (sent, client.stats())
}

/// The most messages a second one publisher gets through to one subscriber, over `for`.
async fn burst_rate(addr: &str, over: Duration) -> u64 {
    let publisher = Client::connect(addr).await.unwrap();
    let reader = Client::connect(addr).await.unwrap();
    let mut messages = reader.messages("burst").await.unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&got);
    let reading = tokio::spawn(async move {
        while messages.recv().await.is_some() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    let payload = Bytes::from(vec![1u8; 128]);
    let started = Instant::now();
    while started.elapsed() < over {
        for _ in 0..1000 {
            publisher.publish_bytes("burst", payload.clone()).await.unwrap();
        }
    }
    let rate = got.load(Ordering::Relaxed) * 1000 / over.as_millis() as u64;
    publisher.flush().await.unwrap();
    reading.abort();
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_run_keeps_memory_level_and_its_counters_reconcile_exactly() {
    let seconds: u64 =
        std::env::var("WHISPEER_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    // At the default heartbeat (10 s): a connection is given up after three silent ones.
    let (mut server, native, mqtt, admin) =
        common::serve_mqtt_admin(&[("WHISPEER_HEARTBEAT_MS", "10000")]);
    let pid = server.id();
    let fds_before = open_fds(pid);
    let rate = burst_rate(&native, Duration::from_secs(2)).await / 2;
    let published_before = total(&admin, "whispeer_messages_published_total");

    let stop = Arc::new(AtomicBool::new(false));
    // Subscribers: exact, wildcard, a QoS 1 group that acknowledges, a slow MQTT reader.
    let readers = Client::connect(&native).await.unwrap();
    let mut exact = readers.messages("soak/3").await.unwrap();
    let mut wildcard = readers.messages("soak/+").await.unwrap();
    let group = SubscribeOptions::new("jobs/#").qos(Qos::AtLeastOnce).group("soak");
    let mut jobs = readers.messages(group).await.unwrap();
    let reading = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = exact.recv() => if m.is_none() { break },
                m = wildcard.recv() => if m.is_none() { break },
                d = jobs.recv_delivery() => match d { Some((_, d)) => { d.ack(); } None => break },
            }
        }
    });
    let slow_stop = Arc::new(AtomicBool::new(false));
    let slow = slow_mqtt_reader(&mqtt, "soak/#", Arc::clone(&slow_stop));
    // Subscribers that come and go, each for a second.
    let churn_stop = Arc::clone(&stop);
    let churn_addr = native.clone();
    let churn = tokio::spawn(async move {
        let mut rounds = 0u64;
        while !churn_stop.load(Ordering::Relaxed) {
            let client = Client::connect(&churn_addr).await.unwrap();
            let mut messages = client.messages("soak/#").await.unwrap();
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                let _ = tokio::time::timeout(Duration::from_millis(50), messages.recv()).await;
            }
            drop(messages);
            drop(client);
            rounds += 1;
        }
        rounds
    });
    // Publishers: QoS 0 at half the burst rate; QoS 1 jobs, acknowledged, 100 a second.
    let publishers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(publish_at(native.clone(), rate / 2, Arc::clone(&stop))))
        .collect();
    let jobs_stop = Arc::clone(&stop);
    let jobs_addr = native.clone();
    let jobs_publisher = tokio::spawn(async move {
        let client = Client::connect(&jobs_addr).await.unwrap();
        let mut sent = 0u64;
        let acked = PublishOptions::new().qos(Qos::AtLeastOnce);
        while !jobs_stop.load(Ordering::Relaxed) {
            client.publish_with(&format!("jobs/{}", sent % 4), &sent, &acked).await.unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    });

    // Samples every five seconds.
    let started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(5).min(Duration::from_secs(seconds))).await;
        samples.push((started.elapsed().as_secs_f64(), common::rss_kib(pid) as f64 / 1024.0));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut reconnects, mut refused) = (0, 0, 0);
    for publisher in publishers {
        let (published, stats) = publisher.await.unwrap();
        sent += published;
        reconnects += stats.reconnects;
        refused += stats.refused_publishes;
    }
    sent += jobs_publisher.await.unwrap();
    let churned = churn.await.unwrap();
    // Every subscriber goes; what their queues still hold is discarded, and counted.
    slow_stop.store(true, Ordering::Relaxed);
    slow.join().unwrap();
    reading.abort();
    let _ = reading.await;
    drop(readers);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let count = |name| total(&admin, name);
    let published = count("whispeer_messages_published_total") - published_before;
    let queued = count("whispeer_deliveries_total") + count("whispeer_redeliveries_total");
    let written = count("whispeer_messages_out_total");
    let dropped = total(&admin, "whispeer_drops_total{reason=\"drop_oldest\"}");
    let discarded = total(&admin, "whispeer_drops_total{reason=\"closed\"}");
    let expired = count("whispeer_messages_expired_total");
    // A closing connection may hold its descriptor a moment longer.
    let mut fds_after = open_fds(pid);
    let closing = Instant::now();
    while fds_after.len() > fds_before.len() && closing.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds_after = open_fds(pid);
    }
    // Memory: the slope over the second half of the run.
    let late: Vec<&(f64, f64)> = samples.iter().skip(samples.len() / 2).collect();
    let n = late.len() as f64;
    let (mx, my) =
        (late.iter().map(|s| s.0).sum::<f64>() / n, late.iter().map(|s| s.1).sum::<f64>() / n);
    let cov: f64 = late.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    let var: f64 = late.iter().map(|s| (s.0 - mx).powi(2)).sum();
    let slope_mib_per_hour = if var > 0.0 { cov / var * 3600.0 } else { 0.0 };
    println!(
        "soak: {seconds} s at {rate} msgs/s (half a burst), {sent} published ({reconnects} \
         publisher reconnections, {refused} refused), {churned} subscribers came and went; \
         RSS {:.0} → {:.0} MiB, slope over the second half {slope_mib_per_hour:.1} MiB/h; \
         descriptors {} → {}; queued {queued} = written {written} + dropped {dropped} + \
         expired {expired} + discarded {discarded}",
        samples.first().map_or(0.0, |s| s.1),
        samples.last().map_or(0.0, |s| s.1),
        fds_before.len(),
        fds_after.len(),
    );
    // A QoS 0 publisher whose connection is lost loses what that connection had taken.
    assert_eq!((reconnects, refused), (0, 0), "no publisher's connection lost, no publish refused");
    assert_eq!(published, sent, "every publish counted once");
    assert_eq!(
        queued,
        written + dropped + expired + discarded,
        "every queued message accounted for"
    );
    assert!(
        fds_after.len() <= fds_before.len(),
        "descriptors back: {fds_before:?} → {fds_after:?}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
