//! Network faults between the SDK and the server, through a proxy in the test that delays,
//! slices into small pieces, pauses, resets (RST) and black-holes connections: QoS 1 loses
//! nothing, clients reconnect and resume, and a black-holed connection is given up after three
//! silent heartbeats, as documented.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use whispeer::server::{ServerConfig, Tcp};
use whispeer::{Broker, BrokerOptions, Redelivery, SlowConsumer};
use whispeer_client::{Client, ClientOptions, PublishOptions, Qos, SubscribeOptions};

#[path = "support/proxy.rs"]
mod proxy;

use proxy::{Fault, Proxy, Script};

const HEARTBEAT: Duration = Duration::from_millis(200);

fn server() -> (Broker, SocketAddr) {
    let mut options = BrokerOptions::default();
    let ack_timeout = Duration::from_millis(300);
    options.redelivery =
        Redelivery::new(ack_timeout).backoff(1.5, ack_timeout * 4).max_attempts(1000);
    options.group_linger = Duration::from_secs(60);
    options.slow_consumer = SlowConsumer::FailPublish;
    let mut config = ServerConfig::default();
    config.heartbeat = HEARTBEAT;
    let broker = Broker::builder(options).with(Tcp::new("127.0.0.1:0").config(config)).build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

fn options(addr: SocketAddr) -> ClientOptions {
    let mut options = ClientOptions::new(addr.to_string());
    options.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    options.connect_timeout = Duration::from_secs(2);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_through_delays_slices_pauses_resets_and_black_holes_loses_nothing() {
    const MESSAGES: u32 = 4_000;
    let (broker, server_addr) = server();
    let proxy = Proxy::start(server_addr).await;
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();

    let reader = Client::connect_with(options(proxy.addr)).await.unwrap();
    let group = SubscribeOptions::new("faults/+").qos(Qos::AtLeastOnce).group("w").prefetch(64);
    let mut work = reader.subscribe::<u32>(group).await.unwrap();
    let record = Arc::clone(&seen);
    let subscriber = tokio::spawn(async move {
        while let Some((n, delivery)) = work.recv_delivery().await {
            *record.lock().unwrap().entry(n).or_default() += 1;
            delivery.ack();
        }
    });

    let publish_addr = proxy.addr;
    let publisher = tokio::spawn(async move {
        let client = Client::connect_with(options(publish_addr)).await.unwrap();
        let mut retries = 0u32;
        for n in 0..MESSAGES {
            let key = PublishOptions::new().qos(Qos::AtLeastOnce).idempotency_key(n.to_string());
            let topic = format!("faults/{}", n % 4);
            while client.publish_with(&topic, &n, &key).await.is_err() {
                retries += 1;
                sleep(Duration::from_millis(20)).await;
            }
            // About a thousand a second, so the faults meet traffic.
            sleep(Duration::from_millis(1)).await;
        }
        retries
    });

    // Faults in turn until everything was seen.
    let steps = vec![
        (Fault::Pass, 200),
        (Fault::Delay(Duration::from_millis(15)), 300),
        (Fault::Slice, 300),
        (Fault::Pause, 300),
        (Fault::Pass, 200),
        (Fault::Pause, 1_000),
        (Fault::Pass, 300),
        (Fault::Pass, 1_200),
    ];
    let mut script = Script::new(steps, 4, 7);
    let started = Instant::now();
    while seen.lock().unwrap().len() < MESSAGES as usize {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "stalled: {} seen",
            seen.lock().unwrap().len()
        );
        script.step(&proxy).await;
    }
    let (resets, holes) = (script.resets, script.holes);
    proxy.set(Fault::Pass);
    let retries = timeout(Duration::from_secs(60), publisher).await.unwrap().unwrap();
    let seen = seen.lock().unwrap();
    let missing: Vec<u32> = (0..MESSAGES).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let again: u32 = seen.values().map(|times| times - 1).sum();
    println!(
        "network faults: {MESSAGES} messages, {} connections, {resets} resets, {holes} black holes, {retries} publish retries, {again} deliveries again, {} redelivered by the server",
        proxy.accepted(),
        broker.stats().redelivered
    );
    assert!(resets > 0 && holes > 0, "the faults met the traffic");
    assert!(proxy.accepted() > 4, "clients reconnected after each reset and black hole");
    subscriber.abort();
}

#[tokio::test]
async fn a_black_holed_connection_is_given_up_after_three_silent_heartbeats() {
    let (_broker, server_addr) = server();
    let proxy = Proxy::start(server_addr).await;
    let client = Client::connect_with(options(proxy.addr)).await.unwrap();
    client.publish_acked("x", &1u32).await.unwrap();
    assert_eq!(proxy.accepted(), 1);
    proxy.black_hole_all();
    let holed = Instant::now();
    // The old connection stays dead; the client notices the silence and connects again.
    while proxy.accepted() < 2 {
        assert!(holed.elapsed() < Duration::from_secs(20), "the client never gave up");
        sleep(Duration::from_millis(10)).await;
    }
    let gave_up = holed.elapsed();
    assert!(gave_up >= HEARTBEAT * 2, "not before the heartbeats went silent ({gave_up:?})");
    timeout(Duration::from_secs(10), client.publish_acked("x", &2u32)).await.unwrap().unwrap();
    println!("black hole: the client connected again after {} ms", gave_up.as_millis());
}
