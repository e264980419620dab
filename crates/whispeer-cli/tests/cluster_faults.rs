//! Network faults between a cluster node and its engine: a proxy in the test between node `a`
//! and nats-server delays, slices, pauses, resets and black-holes the node's engine
//! connections while a client on `a` publishes QoS 1 to a durable topic (with idempotency keys,
//! retrying what is refused) and a client on node `b` reads. Every acknowledged message reaches
//! `b` once; the node reconnects after each reset and black hole; a black hole is noticed within
//! the engine ping's bound (`CLUSTER.md`).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use whispeer_client::{Client, StartAt, SubscribeOptions};

mod common;
#[path = "../../whispeer-client/tests/support/proxy.rs"]
mod proxy;

use common::engines::{Nats, node};
use common::http_get;
use common::traffic::{count_reads, missing_and_repeats, publish_acked};
use proxy::{Fault, Proxy, Script};

const MESSAGES: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_cross_nodes_through_engine_link_faults() {
    let nats = Nats::start(0);
    let engine: std::net::SocketAddr = nats.url.trim_start_matches("nats://").parse().unwrap();
    let proxy = Proxy::start(engine).await;
    let durable = [("WHISPEER_STORAGE__DURABLE", "[\"orders/#\"]")];
    let proxied = format!("nats://{}", proxy.addr);
    let a = node(&[proxied.as_str()], "a", &durable);
    let b = node(&[nats.url.as_str()], "b", &durable);

    // One QoS 0 wildcard subscription: it gets everything only if its connection to b stays
    // up (a receive-only client answers the server's pings; see `RELIABILITY.md`).
    let (seen, reading) = count_reads(&b.addr, "orders/#").await;

    let publisher = Client::connect(&a.addr).await.unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = Arc::clone(&done);
    let publishing = tokio::spawn(async move {
        let (mut refused, mut longest) = (0u32, Duration::ZERO);
        let mut retried = std::collections::BTreeSet::new();
        for n in 0..MESSAGES {
            let (times, took) = publish_acked(&publisher, n, Duration::from_millis(20)).await;
            if times > 0 {
                retried.insert(n);
            }
            (refused, longest) = (refused + times, longest.max(took));
            progress.store(n + 1, std::sync::atomic::Ordering::Relaxed);
            sleep(Duration::from_millis(1)).await;
        }
        (refused, longest, retried)
    });

    let steps = vec![
        (Fault::Pass, 300),
        (Fault::Delay(Duration::from_millis(15)), 400),
        (Fault::Slice, 400),
        (Fault::Pause, 1_500),
        (Fault::Pass, 300),
        (Fault::Pass, 1_000),
    ];
    let mut script = Script::new(steps, 4, 5);
    let started = Instant::now();
    while !publishing.is_finished() {
        let published = done.load(std::sync::atomic::Ordering::Relaxed);
        assert!(started.elapsed() < Duration::from_secs(240), "publishing stalled at {published}");
        script.step(&proxy).await;
    }
    let (resets, holes) = (script.resets, script.holes);
    proxy.set(Fault::Pass);
    let (refused, longest, retried) = publishing.await.unwrap();
    let (missing, again) = missing_and_repeats(&seen, MESSAGES).await;
    reading.abort();
    if !missing.is_empty() {
        let were_retried = missing.iter().filter(|n| retried.contains(n)).count();
        eprintln!(
            "{were_retried} of the {} missing were retried ({} retried in all): {:?}",
            missing.len(),
            retried.len(),
            &missing[..missing.len().min(20)]
        );
        // Where they went: the engine's history, read again from its start on either node.
        for (name, node) in [("a", &a), ("b", &b)] {
            let replay = Client::connect(&node.addr).await.unwrap();
            let options = SubscribeOptions::new("orders/#").start(StartAt::Earliest);
            let mut history = replay.subscribe::<u64>(options).await.unwrap();
            let mut found = std::collections::BTreeSet::new();
            while let Ok(Some(n)) =
                tokio::time::timeout(Duration::from_secs(2), history.recv()).await
            {
                found.insert(n);
            }
            let kept = missing.iter().filter(|n| found.contains(n)).count();
            eprintln!(
                "history read on node {name}: {} messages, {kept} of the {} missing",
                found.len(),
                missing.len()
            );
            let metrics = http_get(node.admin.as_deref().unwrap(), "/metrics").1;
            for line in metrics.lines().filter(|l| {
                !l.starts_with('#')
                    && ["drops", "duplicate", "deliveries_total", "published", "reconnect"]
                        .iter()
                        .any(|m| l.contains(m))
            }) {
                eprintln!("  {name}: {line}");
            }
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged and lost: {} (first {:?})",
        missing.len(),
        missing.first()
    );
    let metrics = http_get(a.admin.as_deref().unwrap(), "/metrics").1;
    let reconnects = common::sample(&metrics, "whispeer_cluster_reconnects_total");
    println!(
        "engine link faults: {MESSAGES} QoS 1 messages, {resets} resets, {holes} black holes, \
         {refused} publishes refused and retried, {again} delivered twice, {reconnects} engine \
         reconnections of node a, longest wait for one acknowledgement {} ms, {} proxied connections",
        longest.as_millis(),
        proxy.accepted()
    );
    assert_eq!(again, 0, "a repeated idempotency key is kept once");
    assert!(resets > 0 && holes > 0, "the faults met the traffic");
    assert!(reconnects >= 2.0, "node a connected again after resets and black holes");
}
