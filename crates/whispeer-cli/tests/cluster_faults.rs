//! Network faults between a cluster node and its engine: a proxy in the test between node `a`
//! and nats-server delays, slices, pauses, resets and black-holes the node's engine
//! connections while a client on `a` publishes QoS 1 to a durable topic (with idempotency keys,
//! retrying what is refused) and a client on node `b` reads. Every acknowledged message reaches
//! `b` once; the node reconnects after each reset and black hole; a black hole is noticed within
//! the engine ping's bound (`CLUSTER.md`).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use whispeer_client::{Client, PublishOptions, Qos, StartAt, SubscribeOptions};

mod common;
#[path = "../../whispeer-client/tests/support/proxy.rs"]
mod proxy;

use common::engines::{Nats, node};
use common::http_get;
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

    let seen: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    // One subscription per exact topic: were the reader's connection to drop, each resumes
    // after the last offset it received.
    let reader = Client::connect(&b.addr).await.unwrap();
    let mut readers = Vec::new();
    for topic in 0..4 {
        let mut orders = reader.subscribe::<u64>(format!("orders/{topic}")).await.unwrap();
        let counted = Arc::clone(&seen);
        readers.push(tokio::spawn(async move {
            while let Some(n) = orders.recv().await {
                *counted.lock().unwrap().entry(n).or_default() += 1;
            }
        }));
    }

    let publisher = Client::connect(&a.addr).await.unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = Arc::clone(&done);
    let publishing = tokio::spawn(async move {
        let (mut refused, mut longest) = (0u32, Duration::ZERO);
        let mut retried = std::collections::BTreeSet::new();
        for n in 0..MESSAGES {
            let options =
                PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key(format!("o{n}"));
            let topic = format!("orders/{}", n % 4);
            let started = Instant::now();
            while publisher.publish_with(&topic, &n, &options).await.is_err() {
                refused += 1;
                retried.insert(n);
                sleep(Duration::from_millis(20)).await;
            }
            longest = longest.max(started.elapsed());
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
    let waited = Instant::now();
    while seen.lock().unwrap().len() < MESSAGES as usize
        && waited.elapsed() < Duration::from_secs(30)
    {
        sleep(Duration::from_millis(50)).await;
    }
    readers.iter().for_each(tokio::task::JoinHandle::abort);
    let seen = seen.lock().unwrap().clone();
    let missing: Vec<u64> = (0..MESSAGES).filter(|n| !seen.contains_key(n)).collect();
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
    let again: u32 = seen.values().map(|times| times - 1).sum();
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
