//! Faults of the Redis engine's one server: nodes `a` and `b` on a redis-server that keeps an
//! append-only file synced before each reply (`appendfsync always`). While a client on `a`
//! publishes QoS 1 to a durable topic (idempotency keys, retrying what is refused) and a client
//! on `b` reads with one wildcard subscription, the server is frozen (SIGSTOP) and let go, then
//! killed (SIGKILL) and started again on its file, twice. Every acknowledged message reaches
//! `b` once, and a node started afterwards reads every one from the engine's history.

use std::time::Duration;

use std::collections::BTreeSet;

use tokio::time::timeout;
use whispeer_client::{Client, StartAt, SubscribeOptions};

mod common;

use common::engines::{Redis, node};
use common::traffic::{Publishing, count_reads, every_one_read, freeze_then_crash, warm_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_cross_nodes_while_redis_freezes_and_crashes() {
    let mut redis = Redis::start_persistent();
    let url = redis.url.clone();
    let urls = [url.as_str()];
    let envs =
        [("WHISPEER_CLUSTER__ENGINE", "redis"), ("WHISPEER_STORAGE__DURABLE", "[\"orders/#\"]")];
    let a = node(&urls, "a", &envs);
    let b = node(&urls, "b", &envs);

    let (seen, reading) = count_reads(&b.addr, "orders/#").await;
    let publisher = Client::connect(&a.addr).await.unwrap();
    warm_up(&publisher, &seen).await;
    let publishing = Publishing::start(publisher);

    for _ in 0..2 {
        freeze_then_crash(&publishing, &mut redis).await;
    }
    let (published, refused, longest) = publishing.stop().await;

    let again = every_one_read(&seen, published).await;
    reading.abort();

    // What Redis acknowledged, it kept: a node started now replays all of it.
    let c = node(&urls, "c", &envs);
    let late = Client::connect(&c.addr).await.unwrap();
    let options = SubscribeOptions::new("orders/#").start(StartAt::Earliest);
    let mut replay = late.subscribe::<u64>(options).await.unwrap();
    let mut kept = BTreeSet::new();
    while (kept.range(..published).count() as u64) < published {
        match timeout(Duration::from_secs(10), replay.recv()).await {
            Ok(Some(n)) => kept.insert(n),
            _ => break,
        };
    }
    let lost: Vec<u64> = (0..published).filter(|n| !kept.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "not in the engine's history: {} (first {:?})",
        lost.len(),
        lost.first()
    );
    println!(
        "redis engine faults: {published} QoS 1 messages while redis-server was frozen 3 s and \
         killed and restarted on its append-only file, twice, {refused} publishes refused and \
         retried, {again} delivered twice, longest wait for one acknowledgement {} ms",
        longest.as_millis()
    );
    assert_eq!(again, 0, "a repeated idempotency key is kept once");
}
