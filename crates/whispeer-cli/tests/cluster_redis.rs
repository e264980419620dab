//! Two `whispeer serve` nodes on a real redis-server (the second engine): fan-out with
//! wildcards, a queue group spanning the nodes, and durable topics with the same offsets on both.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::time::Duration;

use whispeer_client::{Client, ClientSubscription, Qos, StartAt, SubscribeOptions};

mod common;

use common::engines::{Redis, group_once, heals, node, refused_while_away};

const WAIT: Duration = Duration::from_secs(10);

/// Publishes `u64::MAX` on `topic` until `sub` has one, then drops what came.
async fn warm_up(client: &Client, topic: &str, sub: &mut ClientSubscription<u64>) {
    for _ in 0..200 {
        client.publish(topic, &u64::MAX).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {}
            return;
        }
    }
    panic!("never heard the warm-up on {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_redis_share_topics_groups_and_durable_history() {
    let redis = Redis::start();
    let envs =
        [("WHISPEER_CLUSTER__ENGINE", "redis"), ("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#)];
    let urls = [redis.url.as_str()];
    let (a, b) = (node(&urls, "a", &envs), node(&urls, "b", &envs));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();

    // Wildcards: what a glob would also match but the filter does not stays out.
    let mut one = on_b.subscribe::<u64>("s/+/t").await.unwrap();
    warm_up(&on_a, "s/w/t", &mut one).await;
    for (topic, n) in [("s/k/t", 1u64), ("s/k/l/t", 2), ("s/q/t", 3)] {
        on_a.publish_acked(topic, &n).await.unwrap();
    }
    let mut got = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(500), one.recv()).await {
        got.push(n);
    }
    assert_eq!(got, [1, 3], "s/+/t across nodes, in order, nothing else");

    // A queue group with a member on each node: each message once.
    let mut members = Vec::new();
    for client in [&on_a, &on_b] {
        let options = SubscribeOptions::new("jobs/+").group("w").qos(Qos::AtLeastOnce);
        members.push(client.subscribe::<u64>(options).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // the nodes list their group
    for n in 0..200u64 {
        on_a.publish_acked("jobs/x", &n).await.unwrap();
    }
    let once = group_once(&mut members, 200).await;
    assert_eq!(once.len(), 200, "each message reached the group once");

    // Durable topics: acknowledged once Redis stored them, the same offsets on both nodes.
    for n in 0..10u64 {
        let client = if n % 2 == 0 { &on_a } else { &on_b };
        client.publish_acked("orders/x", &n).await.unwrap();
    }
    let mut histories = Vec::new();
    for client in [&on_a, &on_b] {
        let options = SubscribeOptions::new("orders/x").start(StartAt::Earliest);
        let mut sub = client.subscribe::<u64>(options).await.unwrap();
        let mut read = Vec::new();
        while read.len() < 10 {
            let Ok(Some((n, delivery))) = tokio::time::timeout(WAIT, sub.recv_delivery()).await
            else {
                break;
            };
            read.push((delivery.offset().unwrap(), n));
        }
        histories.push(read);
    }
    assert_eq!(
        histories[0].iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(histories[0], histories[1], "the same history at the same offsets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_qos1_is_refused_then_it_heals() {
    let redis = Redis::start();
    let port = redis.port();
    let envs = [("WHISPEER_CLUSTER__ENGINE", "redis")];
    let urls = [redis.url.as_str()];
    let (a, b) = (node(&urls, "a", &envs), node(&urls, "b", &envs));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let mut remote = on_b.subscribe::<u64>("t").await.unwrap();
    warm_up(&on_a, "t", &mut remote).await;

    drop(redis);
    refused_while_away(&on_a, "t").await;
    // The health check notices within a second or two.
    let mut unready = String::new();
    for _ in 0..60 {
        let (status, body) = common::http_get(a.admin.as_deref().unwrap(), "/readyz");
        if status.contains("503") && body.contains("cluster") {
            unready = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!unready.is_empty(), "/readyz says the engine is unreachable");

    // Redis comes back on the same port: the nodes reconnect and subscribe again.
    let _redis = Redis::start_on(port);
    heals(&on_a, "t", &mut remote).await;
}
