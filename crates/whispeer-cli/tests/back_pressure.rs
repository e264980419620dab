//! `slow_consumer = "back-pressure"` against `whispeer serve`: a real `whispeer sub` is
//! stopped (SIGSTOP) while 64 MiB is published to it, far past its queue and every socket
//! buffer between. The publisher is held until the subscriber runs again, and it gets every
//! message; under the default policy the same run drops. One that stays stopped past
//! `back_pressure_timeout_ms` is disconnected and the publisher goes on; one killed lets it go
//! at once. A WebSocket publisher (the SDK over `ws://`) and an MQTT one (packets written here
//! by hand, blocking writes) are held the same way.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use whispeer_client::Client;

const PAYLOAD: usize = 16 << 10;
const MESSAGES: usize = 4096;
/// A server under back-pressure with 16-message queues and no heartbeat within a run.
const HELD: [(&str, &str); 3] = [
    ("WHISPEER_QUEUES__SLOW_CONSUMER", "back-pressure"),
    ("WHISPEER_QUEUES__CAPACITY", "16"),
    ("WHISPEER_HEARTBEAT_MS", "60000"),
];

/// `whispeer sub flood --count MESSAGES`, its output discarded, once it has subscribed.
fn subscriber(addr: &str) -> Child {
    let count = MESSAGES.to_string();
    let args = ["flood", "--count", &count, "--server", addr];
    common::subscriber_to(&args, &[], Stdio::null())
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
}

/// Waits up to `limit` for the subscriber to exit: whether it did so successfully (it got all
/// `MESSAGES`); one still running is killed.
fn got_everything(sub: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = sub.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = sub.kill();
            let _ = sub.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(admin: &str, name: &str) -> f64 {
    common::sample(&common::http_get(admin, "/metrics").1, name)
}

fn drops(admin: &str, reason: &str) -> f64 {
    metric(admin, &format!("whispeer_drops_total{{reason=\"{reason}\"}}"))
}

/// Publishes `MESSAGES` of `PAYLOAD` to "flood" and flushes; returns when it was done.
async fn publish_all(addr: String) -> Instant {
    let publisher = Client::connect(&addr).await.unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    for _ in 0..MESSAGES {
        publisher.publish_bytes("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    Instant::now()
}

/// A server with `envs` (a 16-message queue, no heartbeat within the run), a subscriber
/// stopped while everything is published, resumed after `pause`: (when the publisher was
/// done, when the subscriber resumed, whether it got everything, the admin address, the
/// server).
async fn stopped_while_published(
    envs: &[(&str, &str)],
    pause: Duration,
) -> (Instant, Instant, bool, String, common::Server) {
    let base = [("WHISPEER_QUEUES__CAPACITY", "16"), ("WHISPEER_HEARTBEAT_MS", "60000")];
    let server =
        common::Server::start_with(&["--admin-listen", "127.0.0.1:0"], &[&base, envs].concat());
    let admin = server.admin.clone().unwrap();
    let mut sub = subscriber(&server.addr);
    signal(&sub, "-STOP");
    let publishing = tokio::spawn(publish_all(server.addr.clone()));
    tokio::time::sleep(pause).await;
    let resumed = Instant::now();
    signal(&sub, "-CONT");
    let done = tokio::time::timeout(Duration::from_secs(60), publishing).await.unwrap().unwrap();
    let complete = got_everything(&mut sub, Duration::from_secs(10));
    (done, resumed, complete, admin, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_subscriber_holds_its_publisher_back_and_gets_every_message() {
    let policy = [("WHISPEER_QUEUES__SLOW_CONSUMER", "back-pressure")];
    let (done, resumed, complete, admin, _server) =
        stopped_while_published(&policy, Duration::from_millis(1500)).await;
    assert!(complete, "the subscriber got all {MESSAGES} messages");
    assert!(done > resumed, "the publisher was held until the subscriber read again");
    assert!(metric(&admin, "whispeer_publishers_held_back_total") > 0.0);
    for reason in ["drop_oldest", "drop_newest", "queue_full", "disconnect"] {
        assert_eq!(drops(&admin, reason), 0.0, "{reason}");
    }

    // The same run under the default policy: the publisher is done while the subscriber is
    // stopped, and the subscriber misses what its queue dropped.
    let (done, resumed, complete, admin, _server) =
        stopped_while_published(&[], Duration::from_millis(1500)).await;
    assert!(!complete && done < resumed, "drop-oldest lets the publisher run on and drops");
    assert!(drops(&admin, "drop_oldest") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_stopped_past_the_timeout_is_disconnected_and_the_publisher_goes_on() {
    let envs = [
        ("WHISPEER_QUEUES__SLOW_CONSUMER", "back-pressure"),
        ("WHISPEER_QUEUES__BACK_PRESSURE_TIMEOUT_MS", "300"),
    ];
    // Stopped for far longer than the timeout: the publisher finishes meanwhile.
    let (done, resumed, complete, admin, _server) =
        stopped_while_published(&envs, Duration::from_secs(8)).await;
    assert!(done < resumed, "the publisher went on while the subscriber was stopped");
    assert!(!complete, "the disconnected subscriber did not get everything");
    assert_eq!(drops(&admin, "disconnect"), 1.0);
    assert!(metric(&admin, "whispeer_publishers_held_back_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_publisher_goes_on_as_soon_as_its_subscriber_dies() {
    let server = common::Server::start(&HELD);
    let mut sub = subscriber(&server.addr);
    signal(&sub, "-STOP");
    let publishing = tokio::spawn(publish_all(server.addr.clone()));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!publishing.is_finished(), "held while the subscriber is stopped");
    // Killed: its connection ends, its queue closes, and the publisher is let go at once,
    // long before the 10 s timeout.
    let killed = Instant::now();
    let _ = sub.kill();
    let _ = sub.wait();
    let done = tokio::time::timeout(Duration::from_secs(30), publishing).await.unwrap().unwrap();
    let after = done.duration_since(killed);
    assert!(after < Duration::from_secs(5), "the publisher went on {after:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_publisher_is_held_back_too() {
    let mut server = common::serve_command(&["--ws-listen", "127.0.0.1:0"], &HELD).spawn().unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let native = lines.next().unwrap().unwrap();
    let native = native.strip_prefix("whispeer: listening on ").unwrap().to_string();
    let ws = lines.next().unwrap().unwrap();
    let url = ws.strip_prefix("whispeer: websocket listening on ").unwrap().to_string();
    let mut sub = subscriber(&native);
    signal(&sub, "-STOP");
    // The Rust SDK over ws://: its frames travel in WebSocket messages.
    let publishing = tokio::spawn(publish_all(url));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resumed = Instant::now();
    signal(&sub, "-CONT");
    let complete = got_everything(&mut sub, Duration::from_secs(60));
    let done = tokio::time::timeout(Duration::from_secs(60), publishing).await.unwrap().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(complete, "the subscriber got all {MESSAGES} messages");
    assert!(done > resumed, "the WebSocket publisher waited for the subscriber");
}

/// An MQTT 3.1.1 client: CONNECT (clean session, no keep-alive), then `MESSAGES` QoS 0
/// PUBLISH packets of `PAYLOAD` to "flood" with blocking writes; returns when the last one
/// was written.
fn mqtt_publish_all(addr: &str) -> Instant {
    let mut stream = common::mqtt_connect(addr, "bp-publisher");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    let topic = b"flood";
    let remaining = 2 + topic.len() + PAYLOAD;
    // The remaining length as MQTT's variable-length integer (7 bits a byte).
    let mut packet = vec![0x30];
    let mut left = remaining;
    loop {
        let byte = (left % 128) as u8;
        left /= 128;
        packet.push(if left > 0 { byte | 0x80 } else { byte });
        if left == 0 {
            break;
        }
    }
    packet.extend_from_slice(&[0, topic.len() as u8]);
    packet.extend_from_slice(topic);
    packet.resize(packet.len() + PAYLOAD, 7);
    for _ in 0..MESSAGES {
        stream.write_all(&packet).unwrap();
    }
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_publisher_is_held_back_like_any_other() {
    let (mut server, native, mqtt, admin) = common::serve_mqtt_admin(&HELD);
    let mut sub = subscriber(&native);
    signal(&sub, "-STOP");
    let publishing = std::thread::spawn(move || mqtt_publish_all(&mqtt));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resumed = Instant::now();
    signal(&sub, "-CONT");
    let complete = got_everything(&mut sub, Duration::from_secs(60));
    let done = publishing.join().unwrap();
    assert!(complete, "the subscriber got all {MESSAGES} messages");
    assert!(done > resumed, "the MQTT publisher's writes waited for the subscriber");
    assert!(metric(&admin, "whispeer_publishers_held_back_total") > 0.0);
    assert_eq!(drops(&admin, "drop_oldest"), 0.0);
    let _ = server.kill();
    let _ = server.wait();
}
