//! QoS 1 over the network: acks, redelivery to a reconnecting subscriber or a group peer, SDK
//! de-duplication, a prefetch held whole past a small buffer, idempotent publishing, a
//! compressed payload opened by a client without keys, and a randomized run of 100 000
//! messages through subscribers that keep being killed.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use whispeer::server::Tcp;
use whispeer::{Broker, BrokerOptions, Redelivery, SlowConsumer};
use whispeer_client::engines::{Compression, OpenError};
use whispeer_client::proto::{Body, ErrorCode, Filter, Frame, Limits, MessageId};
use whispeer_client::{
    Client, ClientOptions, ClientSubscription, PublishOptions, Qos, StartAt, SubscribeOptions,
};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(60), f).await.expect("timed out")
}

/// A broker serving TCP on an ephemeral loopback port, with short QoS 1 timeouts.
fn server(ack_timeout: Duration, max_attempts: u32) -> (Broker, SocketAddr) {
    let mut options = BrokerOptions::default();
    options.redelivery =
        Redelivery::new(ack_timeout).backoff(1.5, ack_timeout * 4).max_attempts(max_attempts);
    options.group_linger = Duration::from_secs(30);
    options.queue_capacity = 1 << 17;
    options.slow_consumer = SlowConsumer::FailPublish;
    let broker = Broker::builder(options).with(Tcp::new("127.0.0.1:0")).build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

async fn client(addr: SocketAddr) -> Client {
    Client::connect_with(ClientOptions::new(addr.to_string())).await.unwrap()
}

fn group(filter: &str, name: &str) -> SubscribeOptions {
    SubscribeOptions::new(filter).qos(Qos::AtLeastOnce).group(name)
}

/// A payload whose bytes say which message and which offset they are.
fn patterned(n: usize) -> Vec<u8> {
    // Sizes on both sides of the by-reference threshold (16 KiB) of the server's deliveries
    // and the SDK's publishes, large and small.
    const SIZES: [usize; 7] = [0, 100, 16 * 1024 - 1, 16 * 1024, 40, 200_000, 70_000];
    (0..SIZES[n % SIZES.len()]).map(|i| ((n * 31 + i) % 251) as u8).collect()
}

#[tokio::test]
async fn large_and_small_payloads_interleaved_arrive_whole_and_in_order() {
    let (_broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let subscriber = client(addr).await;
    let mut deliveries = subscriber.messages("mixed").await.unwrap();
    for n in 0..350 {
        publisher.publish_bytes("mixed", patterned(n)).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for n in 0..350 {
        let delivery = soon(deliveries.recv()).await.unwrap();
        assert_eq!(&delivery.plaintext().unwrap()[..], &patterned(n)[..], "message {n}");
        // Nothing sealed it: the payload taken out is the plaintext.
        assert_eq!(&delivery.into_payload()[..], &patterned(n)[..], "message {n}");
    }
}

#[tokio::test]
async fn a_compressed_payload_opens_for_a_client_without_engines_within_its_limit() {
    let (_broker, addr) = server(Duration::from_secs(60), 5);
    let compressing = ClientOptions::new(addr.to_string()).compression(Compression::new());
    let publisher = Client::connect_with(compressing).await.unwrap();
    let plain = client(addr).await;
    let mut small_limit = ClientOptions::new(addr.to_string());
    small_limit.limits.max_message_bytes = 10_000;
    let small = Client::connect_with(small_limit).await.unwrap();
    let (mut opened, mut refused) =
        (plain.messages("zipped").await.unwrap(), small.messages("zipped").await.unwrap());
    let text = vec![b'a'; 50_000];
    publisher.publish_bytes("zipped", text.clone()).await.unwrap();
    publisher.flush().await.unwrap();
    let delivery = soon(opened.recv()).await.unwrap();
    assert!(delivery.payload().len() < text.len(), "it travelled compressed");
    assert_eq!(&delivery.plaintext().unwrap()[..], &text[..]);
    let over = soon(refused.recv()).await.unwrap();
    assert!(matches!(over.plaintext(), Err(OpenError::TooLarge { max: 10_000 })), "{over:?}");
}

#[tokio::test]
async fn a_killed_subscriber_sees_its_unacked_messages_again_when_it_comes_back() {
    let (broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let phone = client(addr).await;
    let mut inbox = phone.subscribe::<u32>(group("inbox/ada", "ada")).await.unwrap();
    for n in 0..5u32 {
        publisher.publish_acked("inbox/ada", &n).await.unwrap();
    }
    // Processes two, acknowledges them, holds three more, and dies.
    for n in 0..2u32 {
        let (value, delivery) = soon(inbox.recv_delivery()).await.unwrap();
        assert_eq!((value, delivery.attempt()), (n, 1));
        assert!(delivery.ack());
    }
    for _ in 2..5u32 {
        let _held = soon(inbox.recv_delivery()).await.unwrap();
    }
    drop((inbox, phone));
    publisher.publish_acked("inbox/ada", &5u32).await.unwrap();

    let phone = client(addr).await;
    let mut inbox = phone.subscribe::<u32>(group("inbox/ada", "ada")).await.unwrap();
    let mut again = Vec::new();
    for _ in 2..6u32 {
        let (value, delivery) = soon(inbox.recv_delivery()).await.unwrap();
        again.push((value, delivery.attempt()));
        assert!(delivery.ack());
    }
    assert_eq!(again, [(2, 2), (3, 2), (4, 2), (5, 1)], "what was held comes back, marked");
    publisher.flush().await.unwrap();
    soon(async {
        while broker.stats().acked < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_group_peer_gets_what_a_dead_member_left_unacknowledged() {
    let (_broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let (a, b) = (client(addr).await, client(addr).await);
    let mut first = a.subscribe::<u32>(group("jobs", "w").prefetch(4)).await.unwrap();
    for n in 0..4u32 {
        publisher.publish_acked("jobs", &n).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(soon(first.recv_delivery()).await.unwrap().0);
    }
    // The second member joins while the first holds its whole credit window.
    let mut second = b.subscribe::<u32>(group("jobs", "w")).await.unwrap();
    drop((first, a));
    let mut got = Vec::new();
    for _ in 0..4 {
        let (value, delivery) = soon(second.recv_delivery()).await.unwrap();
        assert!(delivery.is_redelivery());
        got.push(value);
        delivery.ack();
    }
    assert_eq!(got, held);
}

#[tokio::test]
async fn a_timeout_redelivers_marked_and_a_late_ack_is_harmless() {
    let (broker, addr) = server(Duration::from_millis(100), 10);
    let publisher = client(addr).await;
    let worker = client(addr).await;
    let mut jobs = worker.subscribe::<u32>(group("jobs", "w")).await.unwrap();
    publisher.publish_acked("jobs", &1u32).await.unwrap();
    let (_, first) = soon(jobs.recv_delivery()).await.unwrap();
    let (value, again) = soon(jobs.recv_delivery()).await.unwrap();
    assert_eq!((value, again.attempt()), (1, 2), "redelivered after the ack timeout");
    assert!(first.ack() && again.ack());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.stats().redelivered, 1);
    assert_eq!(jobs.stats().duplicates, 0);
}

#[tokio::test]
async fn a_qos1_subscription_holds_its_whole_prefetch_past_a_small_buffer() {
    let (_broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let mut options = ClientOptions::new(addr.to_string());
    (options.subscription_capacity, options.subscription_max_bytes) = (4, 1024);
    let reader = Client::connect_with(options).await.unwrap();
    let at_most_once = reader.subscribe::<u32>("burst").await.unwrap();
    let options = SubscribeOptions::new("burst").qos(Qos::AtLeastOnce).prefetch(64);
    let mut at_least_once = reader.subscribe::<u32>(options).await.unwrap();
    for n in 0..64u32 {
        publisher.publish_acked("burst", &n).await.unwrap();
    }
    // Everything reaches the reader before either subscription takes a message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..64 {
        // Well within the 60 s ack timeout: nothing waits to be delivered again.
        let next = timeout(Duration::from_secs(10), at_least_once.recv_delivery()).await;
        let (value, delivery) = next.expect("held, not dropped").unwrap();
        assert_eq!((value, delivery.attempt()), (n, 1));
        assert!(delivery.ack());
    }
    assert_eq!(at_least_once.stats().dropped, 0);
    assert!(at_most_once.stats().dropped > 0, "the QoS 0 buffer's bounds still apply");
}

#[tokio::test]
async fn an_idempotent_publisher_can_retry_without_duplicates() {
    let (broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let reader = client(addr).await;
    let mut orders = reader.subscribe::<u32>("orders").await.unwrap();
    let key = PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key("order-42");
    for _ in 0..3 {
        publisher.publish_with("orders", &42u32, &key).await.unwrap();
    }
    publisher.publish_acked("orders", &43u32).await.unwrap();
    assert_eq!(soon(orders.recv()).await, Some(42));
    assert_eq!(soon(orders.recv()).await, Some(43));
    assert_eq!(broker.stats().duplicates, 2);
}

#[tokio::test]
async fn expired_messages_are_not_delivered_over_the_network() {
    let (broker, addr) = server(Duration::from_secs(60), 5);
    let publisher = client(addr).await;
    let reader = client(addr).await;
    // A group queues while its member is away; the message's time to live runs out there.
    let mut away = reader.subscribe::<u32>(group("news", "r")).await.unwrap();
    drop(away);
    let ttl = PublishOptions::new().qos(Qos::AtLeastOnce).ttl(Duration::from_millis(50));
    publisher.publish_with("news", &1u32, &ttl).await.unwrap();
    publisher.publish_acked("news", &2u32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    away = reader.subscribe::<u32>(group("news", "r")).await.unwrap();
    assert_eq!(soon(away.recv()).await, Some(2));
    assert_eq!(broker.stats().expired, 1);
}

/// What the subscribers saw: per message, the attempt numbers it was delivered with.
type Seen = Arc<Mutex<HashMap<u32, Vec<u32>>>>;

/// A group member that records and acknowledges what it gets, leaving a few messages
/// unacknowledged (so they time out) until it is killed.
fn member(addr: SocketAddr, seen: Seen, seed: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let worker = client(addr).await;
        let options = group("load/+", "workers").prefetch(64);
        let mut work: ClientSubscription<u32> = worker.subscribe(options).await.unwrap();
        let mut rng = seed;
        while let Some((n, delivery)) = work.recv_delivery().await {
            seen.lock().unwrap().entry(n).or_default().push(delivery.attempt());
            rng =
                rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            if !(rng >> 33).is_multiple_of(100) {
                delivery.ack();
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_qos1_run_loses_nothing_and_marks_every_duplicate() {
    const MESSAGES: u32 = 100_000;
    const PUBLISHERS: u32 = 8;
    let (broker, addr) = server(Duration::from_millis(300), 1000);
    let seen = Seen::default();
    let mut members: Vec<JoinHandle<()>> =
        (0..3).map(|k| member(addr, Arc::clone(&seen), k)).collect();
    // Give the group its first members before publishing.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let publishers: Vec<JoinHandle<()>> = (0..PUBLISHERS)
        .map(|p| {
            tokio::spawn(async move {
                let publisher = client(addr).await;
                for n in (p..MESSAGES).step_by(PUBLISHERS as usize) {
                    let key =
                        PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key(n.to_string());
                    let topic = format!("load/{}", n % 16);
                    while publisher.publish_with(&topic, &n, &key).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();

    // Kill a random member every 30 ms and start a fresh one, until everything was seen.
    let mut rng: u64 = 0x5eed;
    let mut kills = 0u64;
    let complete = soon(async {
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            if seen.lock().unwrap().len() == MESSAGES as usize {
                break;
            }
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let victim = (rng >> 33) as usize % members.len();
            members[victim].abort();
            members[victim] = member(addr, Arc::clone(&seen), rng);
            kills += 1;
        }
    });
    tokio::time::timeout(Duration::from_secs(240), complete).await.expect("every message seen");
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), MESSAGES as usize, "no message lost");
    let mut duplicates = 0;
    for (n, attempts) in seen.iter() {
        let firsts = attempts.iter().filter(|&&a| a == 1).count();
        assert!(firsts <= 1, "message {n} delivered as new twice: {attempts:?}");
        duplicates += attempts.len() - 1;
    }
    let stats = broker.stats();
    println!(
        "randomized run: {MESSAGES} messages, {kills} kills, {duplicates} duplicates seen (all marked), {} redeliveries, {} dead letters",
        stats.redelivered, stats.dead_lettered
    );
    assert!(kills > 0 && stats.redelivered > 0, "the run exercised redelivery");
    assert_eq!(stats.dead_lettered, 0);
    for member in members {
        member.abort();
    }
}

/// A client's subscriber that always finds a message waiting still lets the other tasks of its
/// runtime run: taking messages spends the task's share of tokio's cooperative budget (a unit
/// for 128 of them: on one thread, the other task waits for 16,384 at most, not for all 20,000).
#[tokio::test(flavor = "current_thread")]
async fn a_client_subscriber_that_always_finds_a_message_still_yields_to_other_tasks() {
    const MESSAGES: u32 = 20_000;
    let (broker, addr) = server(Duration::from_secs(60), 5);
    let subscriber = client(addr).await;
    let mut deliveries = subscriber.messages("busy").await.unwrap();
    for n in 0..MESSAGES {
        broker.publish_bytes("busy", n.to_be_bytes().to_vec()).unwrap();
    }
    // The server and the client's connection run on this thread too: let them bring the
    // messages over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&other_ran);
    tokio::spawn(async move { flag.store(true, std::sync::atomic::Ordering::Relaxed) });
    let mut taken_before_it_ran = None;
    for n in 0..MESSAGES {
        let delivery = soon(deliveries.recv()).await.unwrap();
        assert_eq!(&delivery.payload()[..], n.to_be_bytes());
        if taken_before_it_ran.is_none() && other_ran.load(std::sync::atomic::Ordering::Relaxed) {
            taken_before_it_ran = Some(n);
        }
    }
    let taken = taken_before_it_ran.expect("the other task ran only once no message waited");
    assert!(taken <= 16_384, "the other task waited for {taken} messages");
}

/// The frames the server sends on `stream` within `wait` (pings left out), read into `buf`.
async fn frames_within(stream: &mut TcpStream, buf: &mut BytesMut, wait: Duration) -> Vec<Frame> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        while let Some(frame) = Frame::decode(buf, &Limits::default()).unwrap() {
            if frame.body != Body::Ping {
                frames.push(frame);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return frames,
        }
    }
}

/// Many ACKs in one write — two subscriptions' interleaved, with an ACK of an unknown
/// subscription among them — settle every message they name (none comes again after its ack
/// timeout), and the unknown subscription's ACK alone is refused.
#[tokio::test]
async fn acks_written_together_settle_all_they_name_and_refuse_an_unknown_subscription() {
    let (broker, addr) = server(Duration::from_millis(300), 10);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    let hello = Body::Hello { version: 1, capabilities: 0, name: "acks".into() };
    Frame::new(1, hello).encode(&mut out, usize::MAX).unwrap();
    for (sub, topic) in [(1, "acks/a"), (2, "acks/b")] {
        let filter = Filter::parse(topic).unwrap();
        let (qos, start) = (Qos::AtLeastOnce, StartAt::Latest);
        let body = Body::Subscribe { sub, qos, filter, prefetch: 100, group: None, start };
        Frame::new(1 + sub, body).encode(&mut out, usize::MAX).unwrap();
    }
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let answers = frames_within(&mut stream, &mut buf, Duration::from_millis(500)).await;
    let oks = answers.iter().filter(|frame| frame.body == Body::Ok).count();
    assert_eq!(oks, 2, "both subscribed: {answers:?}");
    for n in 0..20u32 {
        broker.publish(if n % 2 == 0 { "acks/a" } else { "acks/b" }, &n).unwrap();
    }
    let mut delivered = Vec::new();
    while delivered.len() < 20 {
        let frames = frames_within(&mut stream, &mut buf, Duration::from_millis(100)).await;
        for frame in frames {
            if let Body::Deliver { sub, envelope, .. } = frame.body {
                delivered.push((sub, envelope.id));
            }
        }
    }
    out.clear();
    for (i, &(sub, id)) in delivered.iter().enumerate() {
        if i == 7 {
            let unknown = Body::Ack { sub: 9, id: MessageId(1) };
            Frame::new(77, unknown).encode(&mut out, usize::MAX).unwrap();
        }
        Frame::new(0, Body::Ack { sub, id }).encode(&mut out, usize::MAX).unwrap();
    }
    stream.write_all(&out).await.unwrap();
    // Past the ack timeout: nothing comes again, and the one refusal came.
    let after = frames_within(&mut stream, &mut buf, Duration::from_millis(1500)).await;
    let refused: Vec<_> = after.iter().map(|frame| (frame.correlation, &frame.body)).collect();
    assert!(
        matches!(refused[..], [(77, Body::Error { code: ErrorCode::UNKNOWN_SUBSCRIPTION, .. })]),
        "{} frames after the acks, the first {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(broker.stats().acked, 20);
}
