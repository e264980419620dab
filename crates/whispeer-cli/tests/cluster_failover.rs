//! Failures in a cluster of `whispeer serve` nodes on real nats-servers: a node killed while its
//! clients publish QoS 1 (they move to another node, and every acknowledged message arrives),
//! and one engine server of three killed (the nodes on it move to another, and messages cross
//! again).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use whispeer_client::{
    Client, ClientOptions, ClientSubscription, PublishOptions, Qos, StartAt, SubscribeOptions,
};

mod common;

const WAIT: Duration = Duration::from_secs(10);

use common::engines::{Nats, group_once, node};

/// Publishes `(0, 0)` on `topic` from `client` until `sub` has had one: the nodes' engine
/// subscriptions are in place.
async fn warm_up(client: &Client, topic: &str, sub: &mut ClientSubscription<(u32, u64)>) {
    for _ in 0..200 {
        client.publish(topic, &(u32::MAX, 0u64)).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {}
            return;
        }
    }
    panic!("the subscriber's node never heard the warm-up on {topic}");
}

/// What one publisher did: the numbers acknowledged, and those it sent more than once.
#[derive(Default)]
struct Published {
    acked: Vec<u64>,
    retried: BTreeSet<u64>,
}

/// Publishes `0..count` as `(publisher, n)` with QoS 1, one at a time, retrying each until it
/// is acknowledged (the client moves to another node meanwhile).
async fn publish_all(
    client: Client,
    publisher: u32,
    count: u64,
    acked: Arc<AtomicU64>,
) -> Published {
    let topic = format!("orders/p{publisher}");
    let mut out = Published::default();
    for n in 0..count {
        let mut tries = 0;
        while let Err(err) = client.publish_acked(&topic, &(publisher, n)).await {
            tries += 1;
            assert!(tries < 500, "{n} never acknowledged: {err}");
            out.retried.insert(n);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.acked.push(n);
        acked.fetch_add(1, Ordering::Relaxed);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_fail_over_and_every_acknowledged_message_arrives() {
    let nats = Nats::start(0);
    let urls = [nats.url.as_str()];
    let (a, b, c) = (node(&urls, "a", &[]), node(&urls, "b", &[]), node(&urls, "c", &[]));
    // At least once on the surviving node: a QoS 1 group keeps what arrives while its member
    // reconnects (on two busy cores a subscriber can miss heartbeats too).
    let on_c = Client::connect(c.addr.clone()).await.unwrap();
    let audit = SubscribeOptions::new("orders/+").group("audit").qos(Qos::AtLeastOnce);
    let mut sub = on_c.subscribe::<(u32, u64)>(audit).await.unwrap();
    // A subscriber on the node that dies, with the others to fall back on.
    let failing_over =
        ClientOptions::new(a.addr.clone()).failover([b.addr.clone(), c.addr.clone()]);
    let moving = Client::connect_with(failing_over).await.unwrap();
    let mut moved = moving.subscribe::<(u32, u64)>("orders/+").await.unwrap();
    let mut publishers = Vec::new();
    for _ in 0..2 {
        let options = ClientOptions::new(a.addr.clone()).failover([b.addr.clone()]);
        publishers.push(Client::connect_with(options).await.unwrap());
    }
    warm_up(&publishers[0], "orders/warm", &mut sub).await;

    let count = 1_500;
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, client)| tokio::spawn(publish_all(client, p as u32, count, Arc::clone(&acked))))
        .collect();
    while acked.load(Ordering::Relaxed) < 600 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(a); // SIGKILL, in the middle of the publishing
    let mut published = Vec::new();
    for task in tasks {
        published.push(task.await.unwrap());
    }
    let retried: usize = published.iter().map(|p| p.retried.len()).sum();
    assert!(retried > 0, "the kill happened while the publishers were on the node");

    // Every acknowledged message reaches the subscriber on the surviving node (at least once:
    // a message its publisher sent again, or one redelivered, may come twice).
    let want: usize = published.iter().map(|p| p.acked.len()).sum();
    let mut seen: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut distinct = BTreeSet::new();
    while distinct.len() < want {
        let Ok(Some((p, n))) = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await
        else {
            break;
        };
        if p == u32::MAX {
            continue;
        }
        if distinct.insert((p, n)) {
            seen.entry(p).or_default().insert(n);
        }
    }
    for (p, done) in published.iter().enumerate() {
        let got = seen.remove(&(p as u32)).unwrap_or_default();
        let missing: Vec<_> = done.acked.iter().filter(|n| !got.contains(n)).collect();
        assert!(missing.is_empty(), "publisher {p}: acknowledged but lost: {missing:?}");
    }

    // The subscriber of the dead node went on on another one (what it had before the kill is
    // still buffered ahead of the marker).
    let marker = Client::connect(c.addr.clone()).await.unwrap();
    let mut back = false;
    'marker: for _ in 0..200 {
        marker.publish("orders/marker", &(7u32, 7u64)).await.unwrap();
        while let Ok(Some(got)) =
            tokio::time::timeout(Duration::from_millis(50), moved.recv()).await
        {
            if got == (7, 7) {
                back = true;
                break 'marker;
            }
        }
    }
    assert!(back, "the subscriber moved to another node and subscribed there again");
}

/// `whispeer inspect nodes --json` against `server`'s admin port: the nodes it lists.
fn nodes_seen_by(server: &common::Server) -> Vec<serde_json::Value> {
    let admin = format!("http://{}", server.admin.as_deref().unwrap());
    let out = std::process::Command::new(common::BIN)
        .args(["inspect", "nodes", "--json", "--admin", &admin, "--token", TOKEN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if !out.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `server` lists exactly the nodes `names`, each on an engine server; returns
/// them.
async fn wait_for_nodes(server: &common::Server, names: &[&str]) -> Vec<serde_json::Value> {
    let mut listed = Vec::new();
    for _ in 0..150 {
        listed = nodes_seen_by(server);
        let seen: Vec<&str> = listed.iter().filter_map(|n| n["node"].as_str()).collect();
        if seen == names && listed.iter().all(|n| n["engine_server"].is_string()) {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("expected nodes {names:?}, the node lists {listed:?}");
}

const TOKEN: &str = "admin-t0ken";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_engine_server_of_three_dies_and_the_cluster_goes_on() {
    let mut servers: Vec<Option<Nats>> = Nats::cluster().into_iter().map(Some).collect();
    let urls: Vec<String> = servers.iter().flatten().map(|n| n.url.clone()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let token = [("WHISPEER_ADMIN_TOKEN", TOKEN)];
    let (a, b) = (node(&urls, "a", &token), node(&urls, "b", &token));
    // Both nodes announce themselves (the NATS cluster elects its JetStream leader first).
    let listed = wait_for_nodes(&a, &["a", "b"]).await;
    assert_eq!(listed[1]["addrs"][0].as_str(), Some(b.addr.as_str()), "{listed:?}");

    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let audit = SubscribeOptions::new("orders/+").group("audit").qos(Qos::AtLeastOnce);
    let mut sub = on_b.subscribe::<(u32, u64)>(audit).await.unwrap();
    warm_up(&on_a, "orders/warm", &mut sub).await;

    // Kill the engine server node a is on.
    let server = listed[0]["engine_server"].as_str().unwrap().to_string();
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let dead = servers.iter().position(|s| s.as_ref().is_some_and(|s| s.port() == port)).unwrap();
    drop(servers[dead].take());

    // a (and b, if it was there too) moves to another server, and a's messages reach b again.
    // Core NATS keeps nothing: what crossed while a node was moving may be lost (durable topics
    // are what JetStream is for), so this waits for a message to cross first.
    let mut crossed = false;
    for n in 0..500u64 {
        if on_a.publish_acked("orders/probe", &(1u32, n)).await.is_ok()
            && let Ok(Some((1, _))) =
                tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
        {
            crossed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crossed, "messages cross again after the engine server died");
    // From then on, everything a acknowledges arrives.
    let mut acked = BTreeSet::new();
    for n in 0..300u64 {
        on_a.publish_acked("orders/x", &(0u32, n)).await.unwrap();
        acked.insert(n);
    }
    let mut got = BTreeSet::new();
    while got.len() < acked.len() {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some((0, n))) => {
                got.insert(n);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let missing: Vec<_> = acked.difference(&got).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let mut now_on = server.clone();
    for _ in 0..50 {
        let listed = wait_for_nodes(&a, &["a", "b"]).await;
        now_on = listed[0]["engine_server"].as_str().unwrap_or_default().to_string();
        if now_on != server {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(now_on, server, "a lists the engine server it moved to");

    // A node that dies drops out of the membership when its entry expires.
    drop(b);
    wait_for_nodes(&a, &["a"]).await;
}

/// Subscribes to `filter` on `client` from the earliest retained message and takes `count`
/// messages: (offset, value).
async fn replayed(client: &Client, filter: &str, count: usize) -> Vec<(u64, u64)> {
    let options = SubscribeOptions::new(filter).start(StartAt::Earliest);
    let mut sub = client.subscribe::<u64>(options).await.unwrap();
    let mut got = Vec::new();
    while got.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.recv_delivery()).await;
        let Ok(Some((value, delivery))) = next else { break };
        got.push((delivery.offset().unwrap(), value));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topics_live_in_the_engine_with_the_same_offsets_on_every_node() {
    let nats = Nats::start(0);
    let urls = [nats.url.as_str()];
    let durable = [("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#)];
    let (a, b) = (node(&urls, "a", &durable), node(&urls, "b", &durable));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let mut live = on_b.subscribe::<u64>("orders/+").await.unwrap();
    // Acknowledged once the engine stored them: interleaved on two topics, from two nodes.
    for n in 0..40u64 {
        let (client, topic) = if n % 2 == 0 { (&on_a, "orders/x") } else { (&on_b, "orders/y") };
        client.publish_acked(topic, &n).await.unwrap();
    }
    let mut heard = Vec::new();
    while heard.len() < 40 {
        let next = tokio::time::timeout(Duration::from_secs(10), live.recv()).await;
        let Ok(Some(n)) = next else { break };
        heard.push(n);
    }
    assert_eq!(heard, (0..40).collect::<Vec<_>>(), "live on b, in the order they were acked");

    // Replay on either node: the same messages at the same offsets, which are the engine's
    // (one sequence across topics, so a topic's offsets have gaps).
    let from_a = replayed(&on_a, "orders/x", 20).await;
    let from_b = replayed(&on_b, "orders/x", 20).await;
    assert_eq!(from_a.len(), 20, "{from_a:?}");
    assert_eq!(from_a, from_b, "the same history at the same offsets on both nodes");
    let values: Vec<u64> = from_a.iter().map(|(_, v)| *v).collect();
    assert_eq!(values, (0..40).step_by(2).collect::<Vec<_>>());
    assert!(from_a.windows(2).all(|w| w[1].0 == w[0].0 + 2), "offsets interleave: {from_a:?}");

    // A node that starts later reads the history from the engine.
    let c = node(&urls, "c", &durable);
    // Ready once it has read the history as far as it reached.
    let mut ready = false;
    for _ in 0..100 {
        let (status, _) = common::http_get(c.admin.as_deref().unwrap(), "/readyz");
        if status.contains("200") {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the new node becomes ready");
    let on_c = Client::connect(c.addr.clone()).await.unwrap();
    let from_c = replayed(&on_c, "orders/x", 20).await;
    assert_eq!(from_c, from_a, "a new node has the same history");
    // And resumes after an offset like the others.
    let after = from_a[9].0;
    let options = SubscribeOptions::new("orders/x").start(StartAt::Offset(after + 1));
    let mut resumed = on_c.subscribe::<u64>(options).await.unwrap();
    let (value, delivery) = resumed.recv_delivery().await.unwrap();
    assert_eq!((delivery.offset(), value), (Some(from_a[10].0), from_a[10].1));

    // A queue group with a member on each node gets each durable message once.
    let mut members = Vec::new();
    for client in [&on_a, &on_b] {
        let options = SubscribeOptions::new("orders/#").group("workers").qos(Qos::AtLeastOnce);
        members.push(client.subscribe::<u64>(options).await.unwrap());
    }
    let mut got = BTreeMap::new();
    let mut n = 1_000u64;
    // Until both members' nodes have their group subscription on the engine.
    while got.len() < 2 {
        on_a.publish_acked("orders/z", &n).await.unwrap();
        n += 1;
        for (i, member) in members.iter_mut().enumerate() {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(20), member.recv()).await
            {
                got.insert(i, ());
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for member in &mut members {
        while tokio::time::timeout(Duration::from_millis(50), member.recv()).await.is_ok() {}
    }
    for n in 0..200u64 {
        on_c.publish_acked("orders/z", &n).await.unwrap();
    }
    let once = group_once(&mut members, 200).await;
    assert_eq!(once.len(), 200, "each durable message reached the group once");

    // Without the engine, a durable topic's publish is refused (never acknowledged).
    drop(nats);
    let mut refused = false;
    for _ in 0..100 {
        if on_a.publish_acked("orders/x", &99u64).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "QoS 1 on a durable topic is refused while the engine is away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_resume_a_durable_topic_elsewhere_and_read_each_message_once() {
    let nats = Nats::start(0);
    let urls = [nats.url.as_str()];
    let durable = [("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#)];
    let (a, b) = (node(&urls, "a", &durable), node(&urls, "b", &durable));
    // Everyone on a, with b to move to; the subscriber resumes after its last offset there.
    let options = || ClientOptions::new(a.addr.clone()).failover([b.addr.clone()]);
    let reader = Client::connect_with(options().shared_offsets(true)).await.unwrap();
    let mut sub = reader.subscribe::<(u32, u64)>("orders/x").await.unwrap();
    let mut publishers = Vec::new();
    for _ in 0..2 {
        publishers.push(Client::connect_with(options()).await.unwrap());
    }
    let count = 1_000u64;
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, client)| {
            let acked = Arc::clone(&acked);
            tokio::spawn(async move {
                let mut retried = 0;
                for n in 0..count {
                    // A retry carries the same idempotency key: the engine keeps one copy.
                    let key = format!("{p}-{n}");
                    let once = PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key(key);
                    while client.publish_with("orders/x", &(p as u32, n), &once).await.is_err() {
                        retried += 1;
                        assert!(retried < 500, "{n} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                retried
            })
        })
        .collect();
    while acked.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(a); // SIGKILL, in the middle of the publishing and the reading
    let mut retried = 0;
    for task in tasks {
        retried += task.await.unwrap();
    }
    assert!(retried > 0, "the kill happened while the publishers were on the node");

    // Every acknowledged message is read, each once, in the order the engine keeps.
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    while seen.len() < 2 * count as usize {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await;
        let Ok(Some((p, n))) = next else { break };
        assert!(seen.insert((p, n)), "({p}, {n}) read twice");
        if let Some(before) = last.insert(p, n) {
            assert!(before < n, "publisher {p}: {n} after {before}");
        }
    }
    assert_eq!(seen.len(), 2 * count as usize, "every acknowledged message read once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_group_resumes_on_another_node_where_it_stopped() {
    let nats = Nats::start(0);
    let urls = [nats.url.as_str()];
    let envs = [
        ("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#),
        ("WHISPEER_DELIVERY__GROUP_LINGER_MS", "200"),
    ];
    let (a, b) = (node(&urls, "a", &envs), node(&urls, "b", &envs));
    let publisher = Client::connect(b.addr.clone()).await.unwrap();
    let billing = || SubscribeOptions::new("orders/+").group("billing").qos(Qos::AtLeastOnce);

    // A member on a takes the first ten (and acknowledges each: recv does).
    let first = Client::connect(a.addr.clone()).await.unwrap();
    let mut member = first.subscribe::<u64>(billing()).await.unwrap();
    let mut probe = 1_000_000u64;
    loop {
        publisher.publish_acked("orders/x", &probe).await.unwrap();
        probe += 1;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), member.recv()).await {
            break;
        }
        assert!(probe < 1_000_100, "the group never got a message");
    }
    while tokio::time::timeout(Duration::from_millis(300), member.recv()).await.is_ok() {}
    for n in 0..10u64 {
        publisher.publish_acked("orders/x", &n).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let Ok(Some(n)) = tokio::time::timeout(WAIT, member.recv()).await else { break };
        got.push(n);
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(300)).await; // the acknowledgements reach the engine
    drop(member);
    first.close().await;
    // The group's linger ends on a, and its last pull request to the engine lapses (2 s).
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Published while the group has no member anywhere: kept for it by the engine.
    for n in 10..20u64 {
        publisher.publish_acked("orders/x", &n).await.unwrap();
    }
    let second = Client::connect(b.addr.clone()).await.unwrap();
    let mut member = second.subscribe::<u64>(billing()).await.unwrap();
    let mut resumed = Vec::new();
    while resumed.len() < 10 {
        let Ok(Some(n)) = tokio::time::timeout(WAIT, member.recv()).await else { break };
        resumed.push(n);
    }
    assert_eq!(resumed, (10..20).collect::<Vec<_>>(), "resumed on b where the group stopped");
    let extra = tokio::time::timeout(Duration::from_millis(500), member.recv()).await;
    assert!(extra.is_err(), "nothing settled came again: {extra:?}");
}
