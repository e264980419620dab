//! Failures in a cluster of `whispeer serve` nodes on real nats-servers: a node killed while its
//! clients publish QoS 1 (they move to another node, and every acknowledged message arrives),
//! and one engine server of three killed (the nodes on it move to another, and messages cross
//! again).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use whispeer_client::{Client, ClientOptions, ClientSubscription, Qos, SubscribeOptions};

mod common;

use common::nats::{Nats, node};

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

    // a moves to another server, and its messages reach b again; what a acknowledges from
    // then on arrives.
    let mut acked = BTreeSet::new();
    for n in 0..300u64 {
        let mut tries = 0;
        while on_a.publish_acked("orders/x", &(0u32, n)).await.is_err() {
            tries += 1;
            assert!(tries < 500, "{n} never acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    // Acknowledged just before the kill, a message may be lost with the server (core NATS
    // keeps nothing); after the move, none is.
    let missing: Vec<_> = acked.difference(&got).collect();
    assert!(missing.len() <= 5 && missing.iter().all(|&&n| n < 5), "lost: {missing:?}");
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
