//! Three `whispeer serve` nodes on a real nats-server: messages, wildcards and queue groups
//! across nodes, and what a node does while its engine is away.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use whispeer_client::proto::ErrorCode;
use whispeer_client::{
    Client, ClientError, ClientOptions, ClientSubscription, Qos, SubscribeOptions,
};

mod common;

use common::engines::{Nats, heals, node, node_with, refused_while_away};
use common::http_get;

/// The engine servers a node lists: `nats`, and a server that is not running, which the
/// engine's client skips.
fn on(nats: &Nats) -> [&str; 2] {
    [nats.url.as_str(), "nats://127.0.0.1:1"]
}

const WAIT: Duration = Duration::from_secs(10);

async fn next<T: serde::de::DeserializeOwned + Send + 'static>(
    sub: &mut ClientSubscription<T>,
) -> Option<T> {
    tokio::time::timeout(WAIT, sub.recv()).await.ok().flatten()
}

/// Publishes `topic` from `client` until every subscriber in `subs` has had one (the nodes'
/// engine subscriptions are in place).
async fn warm_up(client: &Client, topic: &str, subs: &mut [&mut ClientSubscription<u64>]) {
    for sub in subs.iter_mut() {
        let mut got = false;
        for _ in 0..200 {
            client.publish(topic, &u64::MAX).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {
                got = true;
                break;
            }
        }
        assert!(got, "a node never heard the warm-up on {topic}");
    }
}

/// Drops what arrived so far (the warm-ups).
async fn drain(subs: &mut [&mut ClientSubscription<u64>]) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    for sub in subs.iter_mut() {
        while tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.is_ok() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_wildcards_cross_nodes_once_and_in_order() {
    let nats = Nats::start(0);
    let (a, b, c) =
        (node(&on(&nats), "a", &[]), node(&on(&nats), "b", &[]), node(&on(&nats), "c", &[]));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let on_c = Client::connect(c.addr.clone()).await.unwrap();
    // On b, `s/#` covers `s/+/t`: one engine subscription. On c, `s/+/t` and `s/k1/#` overlap
    // without covering each other: two engine subscriptions, and each message once per
    // local subscription all the same.
    let mut b_all = on_b.subscribe::<u64>("s/#").await.unwrap();
    let mut b_temp = on_b.subscribe::<u64>("s/+/t").await.unwrap();
    let mut c_temp = on_c.subscribe::<u64>("s/+/t").await.unwrap();
    let mut c_k1 = on_c.subscribe::<u64>("s/k1/#").await.unwrap();
    let mut a_exact = on_a.subscribe::<u64>("s/k1/t").await.unwrap();
    let mut c_parent = on_c.subscribe::<u64>("s/k2/#").await.unwrap();
    warm_up(&on_a, "s/k1/t", &mut [&mut b_all, &mut b_temp, &mut c_temp, &mut c_k1, &mut a_exact])
        .await;
    warm_up(&on_b, "s/k2", &mut [&mut c_parent]).await;
    drain(&mut [&mut b_all, &mut b_temp, &mut c_temp, &mut c_k1, &mut a_exact, &mut c_parent])
        .await;
    // From a and from b, interleaved topics; `s/k2` (zero levels under `s/k2/#`).
    let topics = ["s/k1/t", "s/k2/t", "s/k1/x/y", "s/k2", "other/k1/t"];
    for n in 0..1_000u64 {
        let topic = topics[n as usize % topics.len()];
        let from = if n % 2 == 0 { &on_a } else { &on_b };
        from.publish(topic, &n).await.unwrap();
    }
    on_a.publish_acked("s/k1/t", &1_000u64).await.unwrap();
    on_b.publish_acked("s/k1/t", &1_001u64).await.unwrap();
    let expect = |filter: &str| -> Vec<u64> {
        let filter = whispeer::Filter::parse(filter).unwrap();
        (0..1_000u64)
            .filter(|n| {
                let topic = whispeer::Topic::parse(topics[*n as usize % topics.len()]).unwrap();
                filter.matches(&topic)
            })
            .chain(if filter.matches_str("s/k1/t") { vec![1_000, 1_001] } else { vec![] })
            .collect()
    };
    for (name, sub, filter) in [
        ("b s/#", &mut b_all, "s/#"),
        ("b s/+/t", &mut b_temp, "s/+/t"),
        ("c s/+/t", &mut c_temp, "s/+/t"),
        ("c s/k1/#", &mut c_k1, "s/k1/#"),
        ("a s/k1/t", &mut a_exact, "s/k1/t"),
        ("c s/k2/# (s/k2 too)", &mut c_parent, "s/k2/#"),
    ] {
        let wanted = expect(filter);
        let mut got = Vec::with_capacity(wanted.len());
        while got.len() < wanted.len() {
            got.push(
                next(sub)
                    .await
                    .unwrap_or_else(|| panic!("{name}: {} of {}", got.len(), wanted.len())),
            );
        }
        // Once each, and in order per publisher and topic (a sent the even ones; the topic
        // is n % 5, the acked ones were on `s/k1/t`).
        let key = |n: &u64| (n % 2, if *n >= 1_000 { 0 } else { n % 5 });
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, wanted, "{name}: every matching message once");
        for stream in sorted.iter().map(key).collect::<HashSet<_>>() {
            let got: Vec<u64> = got.iter().copied().filter(|n| key(n) == stream).collect();
            let want: Vec<u64> = wanted.iter().copied().filter(|n| key(n) == stream).collect();
            assert_eq!(got, want, "{name}: in order per publisher and topic");
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
        assert!(extra.is_err(), "{name}: nothing more");
    }
    let (_, metrics) = http_get(c.admin.as_deref().unwrap(), "/metrics");
    assert!(metrics.contains("whispeer_cluster_connected 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_spread_over_three_nodes_gets_each_message_once() {
    let nats = Nats::start(0);
    let nodes =
        [node(&on(&nats), "a", &[]), node(&on(&nats), "b", &[]), node(&on(&nats), "c", &[])];
    let mut members = Vec::new();
    let mut clients = Vec::new();
    for server in &nodes {
        let client = Client::connect(server.addr.clone()).await.unwrap();
        let options = SubscribeOptions::new("jobs/+").group("workers").qos(Qos::AtLeastOnce);
        members.push(client.subscribe::<u64>(options).await.unwrap());
        clients.push(client);
    }
    // Every node's group subscription in place: wait until each member has had a message.
    let publisher = &clients[0];
    let mut seen = HashSet::new();
    let mut warm = 0u64;
    'warm: for _ in 0..100 {
        for _ in 0..30 {
            publisher.publish_acked("jobs/warm", &(1_000_000 + warm)).await.unwrap();
            warm += 1;
        }
        for (index, member) in members.iter_mut().enumerate() {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(30), member.recv()).await
            {
                seen.insert(index);
            }
        }
        if seen.len() == 3 {
            break 'warm;
        }
    }
    assert_eq!(seen.len(), 3, "every node's member got warm-up messages");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for member in members.iter_mut() {
        while tokio::time::timeout(Duration::from_millis(50), member.recv()).await.is_ok() {}
    }
    let total = 3_000u64;
    for n in 0..total {
        clients[(n % 3) as usize].publish_acked("jobs/x", &n).await.unwrap();
    }
    let mut counts = BTreeMap::new();
    let mut got = HashSet::new();
    while got.len() < total as usize {
        let mut progressed = false;
        for (index, member) in members.iter_mut().enumerate() {
            while let Ok(Some(n)) =
                tokio::time::timeout(Duration::from_millis(20), member.recv()).await
            {
                assert!(got.insert(n), "{n} delivered twice");
                *counts.entry(index).or_insert(0) += 1;
                progressed = true;
            }
        }
        if !progressed {
            let late = tokio::time::timeout(WAIT, members[0].recv()).await;
            assert!(late.is_ok() || got.len() == total as usize, "stalled at {}", got.len());
            if let Ok(Some(n)) = late {
                assert!(got.insert(n), "{n} delivered twice");
                *counts.entry(0).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(got.len(), total as usize);
    assert_eq!(counts.len(), 3, "members on every node got work: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_engine_is_away_qos1_is_refused_and_qos0_stays_local_then_it_heals() {
    let nats = Nats::start(0);
    let port = nats.port();
    let (a, b) = (node(&on(&nats), "a", &[]), node(&on(&nats), "b", &[]));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let mut local = on_a.subscribe::<u64>("t").await.unwrap();
    let mut remote = on_b.subscribe::<u64>("t").await.unwrap();
    warm_up(&on_a, "t", &mut [&mut remote]).await;
    drain(&mut [&mut local, &mut remote]).await;
    drop(nats);
    let admin = a.admin.clone().unwrap();
    refused_while_away(&on_a, "t").await;
    let (status, body) = http_get(&admin, "/readyz");
    assert!(status.contains("503") && body.contains("cluster"), "{status} {body}");
    while tokio::time::timeout(Duration::from_millis(100), local.recv()).await.is_ok() {}
    on_a.publish("t", &7u64).await.unwrap();
    assert_eq!(next(&mut local).await, Some(7), "QoS 0 still reaches local subscribers");
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(metrics.contains("whispeer_cluster_lost_total{reason=\"unreachable\"}"), "{metrics}");
    // The engine comes back on the same port: the nodes reconnect and subscribe again.
    let _nats = Nats::start(port);
    heals(&on_a, "t", &mut remote).await;
    let (status, _) = http_get(&admin, "/readyz");
    assert!(status.contains("200"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_acls_refuse_the_same_things_on_every_node_and_presence_follows_principals() {
    let nats = Nats::start(0);
    let file =
        std::env::temp_dir().join(format!("whispeer-cluster-acl-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        r#"
        [[users]]
        name = "alice"
        api_key = "alice-key"
        publish = ["chat/+"]
        subscribe = ["chat/#"]
        deny_publish = ["chat/admin"]
        "#,
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let nodes: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let token = [("WHISPEER_ADMIN_TOKEN", "t0ken")];
            node_with(&on(&nats), name, &["--config", config], &token)
        })
        .collect();
    let alice = |addr: &str| ClientOptions::new(addr).api_key("alice-key");
    let mut clients = Vec::new();
    for server in &nodes {
        let client = Client::connect_with(alice(&server.addr)).await.unwrap();
        let code = |result: Result<(), ClientError>| match result {
            Err(ClientError::Server { code, .. }) => Some(code),
            _ => None,
        };
        assert_eq!(
            code(client.publish_acked("chat/admin", &1u64).await.map(drop)),
            Some(ErrorCode::FORBIDDEN)
        );
        assert_eq!(
            code(client.publish_acked("news/x", &1u64).await.map(drop)),
            Some(ErrorCode::FORBIDDEN)
        );
        let refused = client.subscribe::<u64>("news/#").await.map(drop);
        assert_eq!(code(refused), Some(ErrorCode::FORBIDDEN), "{}", server.addr);
        assert!(Client::connect(server.addr.clone()).await.is_err(), "no key, no entry");
        clients.push(client);
    }
    // What is allowed crosses nodes as usual.
    let mut sub = clients[2].subscribe::<u64>("chat/#").await.unwrap();
    warm_up(&clients[0], "chat/room", &mut [&mut sub]).await;
    drain(&mut [&mut sub]).await;
    clients[0].publish_acked("chat/room", &7u64).await.unwrap();
    assert_eq!(next(&mut sub).await, Some(7));
    let _ = std::fs::remove_file(&file);

    // Presence: alice is connected to every node; once she leaves b, b drops out of her list.
    let admin = format!("http://{}", nodes[0].admin.as_deref().unwrap());
    let nodes_of_alice = || {
        let out = std::process::Command::new(common::BIN)
            .args(["inspect", "presence", "--json", "--admin", &admin, "--token", "t0ken"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let alice = rows.iter().find(|row| row["principal"] == "alice");
        alice.map(|row| row["nodes"].clone()).unwrap_or_default()
    };
    let wait_for = |want: serde_json::Value| async move {
        for _ in 0..100 {
            if nodes_of_alice() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("alice's nodes never became {want}: {}", nodes_of_alice());
    };
    wait_for(serde_json::json!(["a", "b", "c"])).await;
    drop(clients.remove(1));
    wait_for(serde_json::json!(["a", "c"])).await;
}

/// The retained messages a new subscription to `filter` on `client` gets first.
async fn retained_on(client: &Client, filter: &str) -> Vec<String> {
    let mut sub = client.subscribe::<String>(filter).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(text)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
        got.push(text);
    }
    got.sort();
    got
}

/// Asks `retained_on` until it says `want` (the nodes share retained messages as they come).
async fn until_retained(client: &Client, filter: &str, want: &[&str]) {
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen = retained_on(client, filter).await;
        if seen == want {
            return;
        }
    }
    panic!("retained on {filter}: {seen:?}, wanted {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_every_node_and_a_node_that_starts_later() {
    let nats = Nats::start(0);
    let (a, b) = (node(&on(&nats), "a", &[]), node(&on(&nats), "b", &[]));
    let on_a = Client::connect(a.addr.clone()).await.unwrap();
    let on_b = Client::connect(b.addr.clone()).await.unwrap();
    let retain = whispeer_client::PublishOptions::new().qos(Qos::AtLeastOnce).retain();
    on_a.publish_with("home/lamp", "on", &retain).await.unwrap();
    on_b.publish_with("home/door", "shut", &retain).await.unwrap();
    until_retained(&on_b, "home/#", &["on", "shut"]).await;
    until_retained(&on_a, "home/#", &["on", "shut"]).await;
    // Replaced on one node, cleared on the other: the same on both.
    on_b.publish_with("home/lamp", "dim", &retain).await.unwrap();
    on_a.publish_bytes_with("home/door", Vec::new(), &retain).await.unwrap();
    until_retained(&on_a, "home/#", &["dim"]).await;
    until_retained(&on_b, "home/#", &["dim"]).await;
    // A node that starts now gets them from the engine.
    let c = node(&on(&nats), "c", &[]);
    let on_c = Client::connect(c.addr.clone()).await.unwrap();
    until_retained(&on_c, "home/#", &["dim"]).await;
}
