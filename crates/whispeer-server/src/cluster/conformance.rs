//! The engine conformance suite: what every `Engine` must do, run against each engine on a real
//! server it starts on loopback (nats-server with JetStream, redis-server): fan-out by interest
//! (wildcards, `#` also matching zero levels, order per publisher), queue groups (each message
//! to one subscriber), flush, the durable topics' history (offsets in order, the same read by
//! another node, a repeat id kept once, reading from an offset), membership entries, and
//! retained messages (the last of each topic for every node, an empty marker once caught up, then
//! each new one in order, one replaced before it was read perhaps skipped).

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use whispeer_core::Interest;
use whispeer_core::proto::{Filter, Topic};

use super::engine::{Engine, Inbox};
use super::{ClusterConfig, nats, redis};

/// A server child, killed when dropped.
struct ServerChild(Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Waits until something listens on `port`.
async fn listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

async fn start_nats() -> (ServerChild, String, std::path::PathBuf) {
    let port = free_port();
    let dir =
        std::env::temp_dir().join(format!("whispeer-conformance-{}-{port}", std::process::id()));
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (scripts/install-servers installs it)");
    listening(port).await;
    (ServerChild(child), format!("nats://127.0.0.1:{port}"), dir)
}

async fn start_redis() -> (ServerChild, String) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/install-servers installs it)");
    listening(port).await;
    (ServerChild(child), format!("redis://127.0.0.1:{port}"))
}

async fn engine(config: &ClusterConfig) -> Arc<dyn Engine> {
    let up = Arc::new(AtomicBool::new(false));
    match config.engine {
        super::EngineKind::Nats => Arc::new(nats::Nats::connect(config, up).await.unwrap()),
        super::EngineKind::Redis => Arc::new(redis::Redis::connect(config, up).await.unwrap()),
    }
}

fn topic(text: &str) -> Topic {
    Topic::parse(text).unwrap()
}

fn topics(text: &str) -> Interest {
    Interest::Topics(Filter::parse(text).unwrap())
}

/// Everything `inbox` yields within `wait` of silence.
async fn drain(inbox: &mut Inbox, wait: Duration) -> Vec<Bytes> {
    let mut got = Vec::new();
    while let Ok(Some(bytes)) = tokio::time::timeout(wait, inbox.next()).await {
        got.push(bytes);
    }
    got
}

/// Publishes `probe` from `engine` on `on` until `inbox` has one: the subscription is in place.
async fn settled(engine: &dyn Engine, on: &str, inbox: &mut Inbox) {
    for _ in 0..100 {
        engine.publish(&topic(on), Bytes::from_static(b"probe")).await.unwrap();
        engine.flush().await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), inbox.next()).await {
            drain(inbox, Duration::from_millis(200)).await;
            return;
        }
    }
    panic!("the subscription never received");
}

/// The suite, against two engines (two nodes) of one kind.
async fn conforms(a: Arc<dyn Engine>, b: Arc<dyn Engine>) {
    let name = a.name();
    assert!(
        a.connected() || {
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.connected()
        }
    );

    // Fan-out by interest, with wildcards; a pattern may carry more than its filter (the relay
    // drops what does not match), never less; order per publisher holds.
    let mut one = b.subscribe(&topics("s/+/t")).await.unwrap();
    let mut rest = b.subscribe(&topics("x/#")).await.unwrap();
    settled(&*a, "s/probe/t", &mut one).await;
    settled(&*a, "x/probe", &mut rest).await;
    for (on, body) in [("s/k/t", "1"), ("s/k/u", "2"), ("x", "3"), ("x/y/z", "4"), ("s/k/t", "5")] {
        a.publish(&topic(on), Bytes::from(body)).await.unwrap();
    }
    a.flush().await.unwrap();
    let one = drain(&mut one, Duration::from_millis(300)).await;
    assert_eq!(one, [Bytes::from("1"), Bytes::from("5")], "{name}: s/+/t, in order");
    let rest = drain(&mut rest, Duration::from_millis(300)).await;
    assert_eq!(rest, [Bytes::from("3"), Bytes::from("4")], "{name}: x/# also matches x");

    // Queue groups: each message to one subscriber, none lost.
    let group = Interest::Group { filter: Filter::parse("jobs/+").unwrap(), name: "w".into() };
    let mut members = [a.subscribe(&group).await.unwrap(), b.subscribe(&group).await.unwrap()];
    // Until publishers know of the group (Redis lists groups each second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in 0..100u32 {
        a.publish(&topic("jobs/x"), Bytes::from(n.to_string())).await.unwrap();
    }
    a.flush().await.unwrap();
    let mut seen = BTreeSet::new();
    for member in &mut members {
        for bytes in drain(member, Duration::from_millis(500)).await {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            if text != "probe" {
                assert!(seen.insert(text.clone()), "{name}: {text} reached the group twice");
            }
        }
    }
    assert_eq!(seen.len(), 100, "{name}: every message reached the group once");

    // History: offsets in order, the same read by another node, a repeat id kept once.
    let mut offsets = Vec::new();
    for (body, id) in [("h1", "i1"), ("h2", "i2"), ("h1 again", "i1"), ("h3", "i3")] {
        let appended = a.append(&topic("d/a"), Bytes::from(body), id.into()).await.unwrap();
        offsets.push(appended.await.unwrap());
    }
    assert_eq!(offsets[2], offsets[0], "{name}: a repeat id is the first one's offset");
    assert!(offsets[0] < offsets[1] && offsets[1] < offsets[3], "{name}: {offsets:?}");
    assert_eq!(b.history_end().await.unwrap(), offsets[3], "{name}: the end");
    let mut history = b.history(1).await.unwrap();
    let mut read = Vec::new();
    while read.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(5), history.next()).await;
        let item = next.unwrap().unwrap().unwrap();
        read.push((item.offset, item.bytes));
    }
    let want = [(offsets[0], "h1"), (offsets[1], "h2"), (offsets[3], "h3")];
    let want: Vec<(u64, Bytes)> = want.iter().map(|(o, b)| (*o, Bytes::from(*b))).collect();
    assert_eq!(read, want, "{name}: the history, in order, once each");
    let mut from = b.history(offsets[1]).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), from.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap().offset, offsets[1], "{name}: reading from an offset");

    // A group's share of the history: each message to one reader, from the position the
    // engine keeps for the group (a group that comes back resumes there).
    let filter = Filter::parse("d/#").unwrap();
    let mut readers = [
        a.group_history(&filter, "g").await.unwrap(),
        b.group_history(&filter, "g").await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut appended = BTreeSet::new();
    for n in 0..20u32 {
        let id = format!("g{n}");
        let offset =
            a.append(&topic("d/a"), Bytes::from(n.to_string()), id).await.unwrap().await.unwrap();
        appended.insert(offset);
    }
    let mut handed = BTreeSet::new();
    let mut quiet = 0;
    while handed.len() < 20 && quiet < 50 {
        quiet += 1;
        for reader in &mut readers {
            while let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_millis(50), reader.next()).await
            {
                let delivery = delivery.unwrap();
                assert!(handed.insert(delivery.sequenced.offset), "{name}: handed out twice");
                (delivery.settle)(true).await;
                quiet = 0;
            }
        }
    }
    assert_eq!(handed, appended, "{name}: every message to the group once");
    drop(readers);
    // Until the readers' last pull requests lapse (NATS: 2 s; what reaches them meanwhile
    // comes back after the ack wait).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for n in 20..25u32 {
        a.append(&topic("d/a"), Bytes::from(n.to_string()), format!("g{n}"))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // What waits for the group, as the engine says (NATS counts it; Redis's readers poll and
    // keep the default, 0).
    let pending = b.group_pending(&filter, "g").await.unwrap();
    assert_eq!(pending, if name == "nats" { 5 } else { 0 }, "{name}: pending for the group");
    let mut back = b.group_history(&filter, "g").await.unwrap();
    let mut resumed = Vec::new();
    while resumed.len() < 5 {
        let next = tokio::time::timeout(Duration::from_secs(5), back.next()).await;
        let delivery = next.unwrap().unwrap().unwrap();
        resumed.push(String::from_utf8(delivery.sequenced.bytes.to_vec()).unwrap());
        (delivery.settle)(true).await;
    }
    assert_eq!(
        resumed,
        ["20", "21", "22", "23", "24"],
        "{name}: the group resumes where it stopped"
    );
    assert_eq!(a.group_pending(&filter, "g").await.unwrap(), 0, "{name}: none left");

    // Membership entries reach every node, the sender's included.
    let mut heard = b.membership().await.unwrap();
    let mut own = a.membership().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.announce(Bytes::from_static(b"{\"hello\":1}")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), heard.next()).await.unwrap();
    assert_eq!(got, Some(Bytes::from_static(b"{\"hello\":1}")), "{name}: membership");
    let got = tokio::time::timeout(Duration::from_secs(5), own.next()).await.unwrap();
    assert!(got.is_some(), "{name}: the sender hears itself");
    assert!(a.server().is_some(), "{name}: names its server");

    // Retained messages: the last of each topic, for every node, then each new one in order.
    a.retain(&topic("r/a"), Bytes::from_static(b"a1")).await.unwrap();
    a.retain(&topic("r/b"), Bytes::from_static(b"b1")).await.unwrap();
    b.retain(&topic("r/a"), Bytes::from_static(b"a2")).await.unwrap();
    let mut watching = b.retained().await.unwrap();
    let mut kept: Vec<Bytes> = drain(&mut watching, Duration::from_millis(500)).await;
    assert_eq!(kept.last().map(Bytes::len), Some(0), "{name}: caught up, marked: {kept:?}");
    kept.pop();
    kept.sort();
    assert_eq!(kept, [Bytes::from_static(b"a2"), Bytes::from_static(b"b1")], "{name}: retained");
    let mut own = a.retained().await.unwrap();
    drain(&mut own, Duration::from_millis(500)).await;
    a.retain(&topic("r/b"), Bytes::from_static(b"b2")).await.unwrap();
    a.retain(&topic("r/b"), Bytes::from_static(b"b3")).await.unwrap();
    // b2 may be skipped if b3 replaced it before the node read it (JetStream keeps one per
    // subject), but nothing older may come after the newest.
    let later = drain(&mut watching, Duration::from_millis(500)).await;
    assert!(newest_last(&later), "{name}: in order, the newest last: {later:?}");
    let mine = drain(&mut own, Duration::from_millis(500)).await;
    assert!(newest_last(&mine), "{name}: the node that kept them hears them: {mine:?}");
}

/// Whether `got` is `b2, b3` or `b3` alone: in the order kept, a replaced one perhaps skipped.
fn newest_last(got: &[Bytes]) -> bool {
    got == [&b"b2"[..], b"b3"] || got == [&b"b3"[..]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_conforms() {
    let (_server, url, dir) = start_nats().await;
    let a = engine(&ClusterConfig::nats(vec![url.clone()], "a")).await;
    let b = engine(&ClusterConfig::nats(vec![url], "b")).await;
    conforms(a, b).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conforms() {
    let (_server, url) = start_redis().await;
    let a = engine(&ClusterConfig::redis(url.clone(), "a")).await;
    let b = engine(&ClusterConfig::redis(url, "b")).await;
    conforms(a, b).await;
}
