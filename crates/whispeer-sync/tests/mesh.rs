//! Embedded brokers that mesh through a real relay: a message published on one arrives once on
//! the others; a node that was away catches up on what it missed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use whispeer::{
    Broker, BrokerOptions, Encryption, Filter, Keyring, Retention, StartAt, SubscribeOptions,
    Subscription,
};
use whispeer_server::{Relay, RelayConfig, ServerConfig, WebSocket};
use whispeer_sync::{PeerOptions, Sync, SyncEvent, TransportConfig, TransportMode};

const WAIT: Duration = Duration::from_secs(10);

fn relay_server() -> (Broker, String) {
    let mut server = ServerConfig::default();
    server.relay = Some(Arc::new(Relay::new(RelayConfig::default())));
    let broker = Broker::builder(BrokerOptions::default())
        .with(WebSocket::new("127.0.0.1:0").config(server))
        .build();
    let url = format!("ws://{}", broker.local_addrs()[0]);
    (broker, url)
}

struct Node {
    broker: Broker,
    docs: Subscription<String>,
    events: tokio::sync::broadcast::Receiver<SyncEvent>,
}

/// A broker meshed on `url`, keeping `docs/#` (so late subscribers replay it), sharing
/// `docs/#`, with its key in `key`.
fn node(url: &str, key: &Path) -> Node {
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some(url.into()),
        timeout_ms: 5_000,
        encryption: true,
    };
    let sync = Sync::new(config)
        .topic("mesh test")
        .share("docs/#")
        .options(PeerOptions { key_file: Some(key.to_path_buf()), ..PeerOptions::default() });
    let events = sync.events().subscribe();
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("#").expect("filter"), Retention::messages(1000))];
    let broker = Broker::builder(options).with(sync).build();
    let docs = broker
        .subscription::<String>(SubscribeOptions::from("docs/#").start(StartAt::Earliest))
        .expect("subscribe");
    Node { broker, docs, events }
}

async fn connected(node: &mut Node, peers: usize) {
    let mut seen = 0;
    while seen < peers {
        match tokio::time::timeout(WAIT, node.events.recv()).await.expect("peers in time") {
            Ok(SyncEvent::PeerConnected { .. }) => seen += 1,
            Ok(_) => {}
            Err(err) => panic!("events: {err}"),
        }
    }
}

async fn next(node: &mut Node) -> String {
    tokio::time::timeout(WAIT, node.docs.recv()).await.expect("a message in time").expect("open")
}

/// Nothing more arrives for a while.
async fn quiet(node: &mut Node) {
    let more = tokio::time::timeout(Duration::from_millis(300), node.docs.recv()).await;
    assert!(more.is_err(), "unexpected: {more:?}");
}

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whispeer-mesh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_share_once_each_and_a_restarted_one_catches_up() {
    let (_relay, url) = relay_server();
    let dir = dir();
    let mut a = node(&url, &dir.join("a.key"));
    let mut b = node(&url, &dir.join("b.key"));
    let mut c = node(&url, &dir.join("c.key"));
    connected(&mut a, 2).await;
    connected(&mut b, 2).await;
    connected(&mut c, 2).await;

    a.broker.publish("docs/readme", &"from a".to_string()).expect("publish");
    a.broker.publish("notes/private", &"not shared".to_string()).expect("publish");
    b.broker.publish("docs/b", &"from b".to_string()).expect("publish");
    for node in [&mut a, &mut b, &mut c] {
        let mut got = vec![next(node).await, next(node).await];
        got.sort();
        assert_eq!(got, ["from a", "from b"]);
        quiet(node).await;
    }
    let notes = c.broker.messages(SubscribeOptions::from("notes/#").start(StartAt::Earliest));
    assert!(notes.expect("subscribe").try_recv_message().is_none(), "an unshared topic stays home");

    // C goes away; A and B go on; C comes back with its key and gets what it missed, once.
    c.broker.close_transports();
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        a.broker.publish("docs/log", &format!("a missed {i}")).expect("publish");
    }
    b.broker.publish("docs/b", &"missed from b".to_string()).expect("publish");
    for node in [&mut a, &mut b] {
        for _ in 0..6 {
            next(node).await;
        }
    }
    let mut c = node(&url, &dir.join("c.key"));
    connected(&mut c, 2).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next(&mut c).await);
    }
    let from_a: Vec<&String> = got.iter().filter(|m| m.starts_with("a missed ")).collect();
    assert_eq!(
        from_a,
        ["a missed 0", "a missed 1", "a missed 2", "a missed 3", "a missed 4"],
        "in order"
    );
    assert!(got.contains(&"missed from b".to_string()));
    quiet(&mut c).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker meshed on `url` with `encryption`, sharing `docs/#`.
fn sealed_node(url: &str, encryption: Encryption) -> Broker {
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some(url.into()),
        timeout_ms: 5_000,
        encryption: true,
    };
    let sync = Sync::new(config).topic("sealed mesh").share("docs/#");
    Broker::builder(BrokerOptions::default()).with(encryption).with(sync).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_envelopes_cross_the_mesh_as_they_are() {
    let (_relay, url) = relay_server();
    let keyring = Keyring::generate().expect("key");
    let a = sealed_node(&url, Encryption::with_keyring(keyring.clone()));
    let b = sealed_node(&url, Encryption::with_keyring(keyring));
    let c = sealed_node(&url, Encryption::generated().expect("another key"));
    let mut at_b = b.subscription::<String>("docs/#").expect("subscribe");
    let mut raw_at_c = c.messages("docs/#").expect("subscribe");
    // Published before the mesh has formed: it arrives with the catch-up.
    let secret = "only holders of the key read this".to_string();
    a.publish("docs/secret", &secret).expect("publish");
    let got = tokio::time::timeout(WAIT, at_b.recv()).await.expect("in time").expect("open");
    assert_eq!(got, secret, "a node with the key opens it");
    let raw =
        tokio::time::timeout(WAIT, raw_at_c.recv_message()).await.expect("in time").expect("open");
    assert!(!raw.payload().windows(8).any(|w| w == &secret.as_bytes()[..8]), "sealed on the way");
    assert!(raw.plaintext().is_err(), "a node without the key cannot open it");
}
