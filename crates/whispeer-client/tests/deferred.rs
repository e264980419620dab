//! QoS 1 publishes acknowledged later (`Client::publish_acked_deferred`): one task keeps a
//! window of them in flight to a broker with a write-ahead log, and every acknowledged message
//! is in the log, in the order published; a refused publish in a window is answered with its
//! error while those around it are stored; a dropped `PendingAck` withdraws nothing.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::timeout;
use whispeer::server::Tcp;
use whispeer::{Broker, BrokerOptions, Persistence};
use whispeer_client::proto::{ErrorCode, MessageId, Topic};
use whispeer_client::{Client, ClientError, PendingAck};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out")
}

/// A directory of its own under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let name = format!("whispeer-deferred-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker keeping every topic in a write-ahead log in `dir` (its default fsync policy: a
/// QoS 1 acknowledgement waits for the sync), serving TCP on an ephemeral loopback port.
fn durable_broker(dir: &TempDir) -> (Broker, SocketAddr) {
    let broker = Broker::builder(BrokerOptions::default())
        .with(Persistence::wal(&dir.0))
        .with(Tcp::new("127.0.0.1:0"))
        .build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

fn stored(broker: &Broker, topic: &str) -> Vec<whispeer::Message> {
    broker.stored(&Topic::parse(topic).unwrap(), 1, 10_000).unwrap()
}

fn stored_ids(broker: &Broker, topic: &str) -> Vec<MessageId> {
    stored(broker, topic).iter().map(whispeer::Message::id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_deferred_acks_from_one_task_is_stored_in_order() {
    const MESSAGES: u32 = 3_000;
    const WINDOW: usize = 64;
    let dir = TempDir::new("window");
    let (broker, addr) = durable_broker(&dir);
    let client = Client::connect(addr.to_string()).await.unwrap();
    let (mut window, mut acked) = (VecDeque::<PendingAck>::new(), Vec::new());
    for n in 0..MESSAGES {
        if window.len() == WINDOW {
            let oldest = window.pop_front().unwrap();
            let id = oldest.id();
            assert_eq!(soon(oldest).await.unwrap(), id);
            acked.push(id);
        }
        window.push_back(client.publish_acked_deferred("orders/eu", &n).await.unwrap());
    }
    for pending in window {
        acked.push(soon(pending).await.unwrap());
    }
    assert_eq!(acked.len(), MESSAGES as usize);
    // Acknowledged means in the log: all of them, in the order they were published.
    assert_eq!(stored_ids(&broker, "orders/eu"), acked);
    let values: Vec<u32> =
        stored(&broker, "orders/eu").iter().map(|m| m.decode::<u32>().unwrap()).collect();
    assert_eq!(values, (0..MESSAGES).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_in_a_window_gets_its_error_and_a_dropped_answer_withdraws_nothing() {
    let dir = TempDir::new("refused");
    let (broker, addr) = durable_broker(&dir);
    let client = Client::connect(addr.to_string()).await.unwrap();
    let first = client.publish_acked_bytes_deferred("orders/a", &b"one"[..]).await.unwrap();
    // `$` topics are the server's own: refused there, not by the SDK.
    let refused = client.publish_acked_bytes_deferred("$sys/forged", &b"two"[..]).await.unwrap();
    let dropped = client.publish_acked_bytes_deferred("orders/a", &b"three"[..]).await.unwrap();
    let dropped_id = dropped.id();
    drop(dropped);
    let last = client.publish_acked_bytes_deferred("orders/a", &b"four"[..]).await.unwrap();
    // Awaited out of order: each answer waits in its own `PendingAck`.
    let last_id = soon(last).await.unwrap();
    let err = soon(refused).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { code: ErrorCode::INVALID_TOPIC, .. }), "{err:?}");
    let first_id = soon(first).await.unwrap();
    assert_eq!(stored_ids(&broker, "orders/a"), [first_id, dropped_id, last_id]);
    // The connection is still good for the next one.
    client.publish_acked_bytes("orders/a", &b"five"[..]).await.unwrap();
    assert_eq!(stored_ids(&broker, "orders/a").len(), 4);
}
