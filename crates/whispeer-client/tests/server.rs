//! The client SDK against a real server on a loopback socket.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use whispeer::server::{ApiKeys, ServerConfig, serve};
use whispeer::{Broker, BrokerOptions, Plugin, Rejection};
use whispeer_client::engines::{Encryption, Keyring};
use whispeer_client::proto::{Body, Envelope, ErrorCode, Frame, Limits};
use whispeer_client::{Client, ClientError, ClientOptions};

#[path = "support/raw_client.rs"]
mod raw_client;
use raw_client::RawClient;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    celsius: f32,
}

fn reading(n: u32) -> Reading {
    Reading { sensor: format!("s{n}"), celsius: n as f32 / 2.0 }
}

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(10), f).await.expect("timed out")
}

/// Records every envelope the server routes.
#[derive(Clone, Default)]
struct Spy(Arc<Mutex<Vec<Envelope>>>);

impl Plugin for Spy {
    fn name(&self) -> &'static str {
        "spy"
    }

    fn on_publish(&self, envelope: &mut Envelope) -> Result<(), Rejection> {
        self.0.lock().expect("spy lock").push(envelope.clone());
        Ok(())
    }
}

struct TestServer {
    addr: SocketAddr,
    broker: Broker,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(config: ServerConfig, spy: Option<Spy>) -> Self {
        Self::start_on("127.0.0.1:0", config, spy).await
    }

    async fn start_on(addr: &str, config: ServerConfig, spy: Option<Spy>) -> Self {
        Self::start_with(addr, BrokerOptions::default(), config, spy).await
    }

    async fn start_with(
        addr: &str,
        options: BrokerOptions,
        config: ServerConfig,
        spy: Option<Spy>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut builder = Broker::builder(options);
        if let Some(spy) = spy {
            builder = builder.with(spy);
        }
        let broker = builder.build();
        let served = broker.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let broker = served;
            serve(listener, broker, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self { addr, broker, stop: Some(stop), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        soon(&mut self.task).await.unwrap();
    }

    fn options(&self) -> ClientOptions {
        ClientOptions::new(self.addr.to_string())
    }
}

fn fast_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.heartbeat = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

#[tokio::test]
async fn typed_publish_reaches_wildcard_subscriber_on_another_connection() {
    let server = TestServer::start(fast_config(), None).await;
    let subscriber = Client::connect(server.addr.to_string()).await.unwrap();
    let publisher = Client::connect(server.addr.to_string()).await.unwrap();
    let mut temps = subscriber.subscribe::<Reading>("sensor/+/temperature").await.unwrap();
    for n in 0..100 {
        publisher.publish(&format!("sensor/k{}/temperature", n % 3), &reading(n)).await.unwrap();
    }
    publisher.publish("sensor/k1/humidity", &reading(999)).await.unwrap();
    publisher.flush().await.unwrap();
    for n in 0..100 {
        assert_eq!(soon(temps.recv()).await, Some(reading(n)), "in publish order");
    }
    server.stop().await;
}

#[tokio::test]
async fn server_sees_only_ciphertext_and_strangers_cannot_open() {
    let spy = Spy::default();
    let server = TestServer::start(fast_config(), Some(spy.clone())).await;
    let keys = Keyring::generate().unwrap();
    let sealed = || server.options().encryption(Encryption::with_keyring(keys.clone()));
    let alice = Client::connect_with(sealed()).await.unwrap();
    let bob = Client::connect_with(sealed()).await.unwrap();
    let eve = Client::connect(server.addr.to_string()).await.unwrap();
    let mut bob_sub = bob.subscribe::<String>("dm/bob").await.unwrap();
    let mut eve_sub = eve.subscribe::<String>("dm/bob").await.unwrap();
    let mut eve_raw = eve.messages("dm/bob").await.unwrap();

    alice.publish_acked("dm/bob", &"the password is swordfish".to_string()).await.unwrap();
    assert_eq!(soon(bob_sub.recv()).await.as_deref(), Some("the password is swordfish"));

    let seen = spy.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].payload.windows(9).any(|w| w == b"swordfish"), "the server saw plaintext");
    let raw = soon(eve_raw.recv()).await.unwrap();
    assert_eq!(raw.payload(), &seen[0].payload, "forwarded unopened");
    assert!(raw.plaintext().is_err());
    // Eve's typed subscription skips what she cannot open.
    alice.publish("dm/bob", &"second".to_string()).await.unwrap();
    bob.flush().await.unwrap();
    assert_eq!(soon(bob_sub.recv()).await.as_deref(), Some("second"));
    assert!(timeout(Duration::from_millis(200), eve_sub.recv()).await.is_err());
    assert_eq!(eve_sub.stats().open_errors, 2);
    server.stop().await;
}

#[tokio::test]
async fn api_keys_gate_the_server() {
    let mut config = fast_config();
    config.api_keys = ApiKeys::parse(&["right-key"]).unwrap();
    let server = TestServer::start(config, None).await;

    let err = Client::connect(server.addr.to_string()).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { code: ErrorCode::UNAUTHENTICATED, .. }), "{err:?}");
    let err = Client::connect_with(server.options().api_key("wrong")).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { code: ErrorCode::FORBIDDEN, .. }), "{err:?}");

    let client = Client::connect_with(server.options().api_key("right-key")).await.unwrap();
    let mut sub = client.subscribe::<u32>("ok").await.unwrap();
    client.publish_acked("ok", &7u32).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(7));

    // A raw connection that skips AUTH gets a clear error, not service.
    let mut raw = RawClient::connect(server.addr).await;
    raw.hello().await;
    raw.send(Frame::new(9, Body::Unsubscribe { sub: 1 })).await;
    let reply = raw.next_frame().await.unwrap();
    assert_eq!(reply.correlation, 9);
    assert!(
        matches!(reply.body, Body::Error { code: ErrorCode::UNAUTHENTICATED, .. }),
        "{reply:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn refused_publishes_and_subscriptions_report_the_server_error() {
    let server = TestServer::start(fast_config(), None).await;
    let client = Client::connect(server.addr.to_string()).await.unwrap();
    let err = client.publish_acked("$sys/forged", &1u8).await.unwrap_err();
    assert!(matches!(err, ClientError::Server { code: ErrorCode::INVALID_TOPIC, .. }), "{err:?}");
    assert!(matches!(client.subscribe::<u8>("a/#/b").await, Err(ClientError::InvalidTopic(_))));
    assert!(matches!(client.publish("a/+", &1u8).await, Err(ClientError::InvalidTopic(_))));
    // The connection is still good.
    let mut sub = client.subscribe::<u8>("fine").await.unwrap();
    client.publish("fine", &1u8).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(1));
    server.stop().await;
}

#[tokio::test]
async fn client_reconnects_and_resubscribes_after_a_server_restart() {
    let server = TestServer::start(fast_config(), None).await;
    let addr = server.addr;
    let mut options = server.options();
    options.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    let client = Client::connect_with(options).await.unwrap();
    let mut sub = client.subscribe::<u32>("events/#").await.unwrap();
    client.publish("events/a", &1u32).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(1));

    server.stop().await;
    let server = TestServer::start_on(&addr.to_string(), fast_config(), None).await;
    let publisher = Client::connect(addr.to_string()).await.unwrap();
    // Publish until the re-subscription is in place on the new server.
    let got = soon(async {
        let mut n = 2u32;
        loop {
            publisher.publish("events/b", &n).await.unwrap();
            if let Ok(Some(v)) = timeout(Duration::from_millis(50), sub.recv()).await {
                return v;
            }
            n += 1;
        }
    })
    .await;
    assert!(got >= 2);
    server.stop().await;
}

#[tokio::test]
async fn a_client_skips_a_dead_node_and_moves_on_when_its_node_stops() {
    let (first, second) = (
        TestServer::start(fast_config(), None).await,
        TestServer::start(fast_config(), None).await,
    );
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut options = ClientOptions::new(dead.to_string())
        .failover([first.addr.to_string(), second.addr.to_string()]);
    options.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    let client = Client::connect_with(options).await.unwrap();
    let mut sub = client.subscribe::<u32>("events/#").await.unwrap();
    let on_first = Client::connect(first.addr.to_string()).await.unwrap();
    on_first.publish("events/a", &1u32).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(1), "connected to the first live node");

    first.stop().await;
    let on_second = Client::connect(second.addr.to_string()).await.unwrap();
    let got = soon(async {
        for n in 2u32.. {
            on_second.publish("events/b", &n).await.unwrap();
            if let Ok(Some(v)) = timeout(Duration::from_millis(50), sub.recv()).await {
                return v;
            }
        }
        unreachable!()
    })
    .await;
    assert!(got >= 2, "subscribed again on the next node");
    second.stop().await;
}

#[tokio::test]
async fn shutdown_tells_clients_and_ends_their_subscriptions() {
    let server = TestServer::start(fast_config(), None).await;
    let client = Client::connect_with(server.options().reconnect(false)).await.unwrap();
    let mut sub = client.subscribe::<u8>("x").await.unwrap();
    let mut raw = RawClient::connect(server.addr).await;
    raw.hello().await;
    server.stop().await;
    assert_eq!(soon(sub.recv()).await, None);
    let last = soon(raw.next_frame()).await.unwrap();
    assert!(matches!(last.body, Body::Error { code: ErrorCode::SHUTTING_DOWN, .. }), "{last:?}");
}

#[tokio::test]
async fn bad_clients_are_cut_off_and_others_are_served() {
    let server = TestServer::start(fast_config(), None).await;
    let good = Client::connect(server.addr.to_string()).await.unwrap();
    let mut sub = good.subscribe::<u32>("alive").await.unwrap();

    // Random bytes instead of HELLO.
    let mut noise = RawClient::connect(server.addr).await;
    noise.stream.write_all(&[0, 0, 0, 9, 0x66, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    assert_eq!(noise.drain_errors().await, [ErrorCode::MALFORMED]);

    // A length prefix claiming 4 GiB.
    let mut huge = RawClient::connect(server.addr).await;
    huge.stream.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(huge.drain_errors().await, [ErrorCode::TOO_LARGE]);

    // Frames before HELLO.
    let mut rude = RawClient::connect(server.addr).await;
    rude.send(Frame::new(3, Body::Ping)).await;
    assert_eq!(rude.drain_errors().await, [ErrorCode::PROTOCOL_VIOLATION]);
    // A publish before HELLO: refused alike, and published nowhere.
    let mut early = server.broker.messages("early").unwrap();
    let mut eager = RawClient::connect(server.addr).await;
    eager.send(raw_client::publish("early", 1, &b"too soon"[..])).await;
    assert_eq!(eager.drain_errors().await, [ErrorCode::PROTOCOL_VIOLATION]);

    // A half-open connection that says nothing, and one that trickles a byte at a time.
    let silent = RawClient::connect(server.addr).await;
    let mut trickle = RawClient::connect(server.addr).await;
    let mut hello = BytesMut::new();
    Frame::new(1, Body::Hello { version: 1, capabilities: 0, name: "slow".into() })
        .encode(&mut hello, usize::MAX)
        .unwrap();
    let trickler = tokio::spawn(async move {
        for byte in hello.iter().take(5) {
            if trickle.stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        trickle.drain_errors().await
    });

    // Meanwhile the good client is served as usual.
    for n in 0..50u32 {
        good.publish("alive", &n).await.unwrap();
        assert_eq!(soon(sub.recv()).await, Some(n));
    }
    // The trickler is cut off once its frame stays incomplete past the idle timeout.
    assert_eq!(soon(trickler).await.unwrap(), [ErrorCode::IDLE_TIMEOUT]);
    // The silent one is cut off after three heartbeats of silence.
    let mut silent = silent;
    assert_eq!(silent.drain_errors().await, [ErrorCode::IDLE_TIMEOUT]);
    good.publish_acked("alive", &99u32).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(99));
    // The first message on "early" is the one published after it.
    server.broker.publish_bytes("early", bytes::Bytes::from_static(b"in time")).unwrap();
    assert_eq!(&soon(early.recv_message()).await.unwrap().payload()[..], b"in time");
    server.stop().await;
}

#[tokio::test]
async fn oversized_publish_is_refused_with_too_large() {
    let server = TestServer::start(fast_config(), None).await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.hello().await;
    let limits = Limits::default();
    let mut frame = BytesMut::new();
    frame.put_u32((limits.max_frame_bytes + 1) as u32);
    frame.put_u8(0x20);
    raw.stream.write_all(&frame).await.unwrap();
    assert_eq!(raw.drain_errors().await, [ErrorCode::TOO_LARGE]);
    // And the SDK refuses before sending.
    let client = Client::connect(server.addr.to_string()).await.unwrap();
    let err =
        client.publish_bytes("big", vec![0u8; limits.max_message_bytes + 1]).await.unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
    server.stop().await;
}

async fn until(mut condition: impl FnMut() -> bool) {
    soon(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn dropping_a_client_subscription_removes_it_on_the_server() {
    let server = TestServer::start(fast_config(), None).await;
    let client = Client::connect(server.addr.to_string()).await.unwrap();
    let sub = client.subscribe::<u8>("gone").await.unwrap();
    let kept = client.subscribe::<u8>("kept").await.unwrap();
    assert_eq!(server.broker.stats().subscriptions, 2);
    drop(sub);
    client.flush().await.unwrap();
    until(|| server.broker.stats().subscriptions == 1).await;
    drop(kept);
    drop(client);
    until(|| server.broker.stats().subscriptions == 0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_its_drops_counted() {
    let mut options = BrokerOptions::default();
    options.queue_capacity = 16;
    let server = TestServer::start_with("127.0.0.1:0", options, fast_config(), None).await;
    let mut deaf = RawClient::connect(server.addr).await;
    deaf.hello().await;
    deaf.send(Frame::new(
        5,
        Body::Subscribe {
            sub: 1,
            qos: whispeer_client::proto::Qos::AtMostOnce,
            filter: whispeer_client::proto::Filter::parse("flood").unwrap(),
            prefetch: 0,
            group: None,
            start: whispeer_client::StartAt::Latest,
        },
    ))
    .await;
    let ok = deaf.next_frame().await.unwrap();
    assert_eq!((ok.correlation, ok.body), (5, Body::Ok));

    let publisher = Client::connect(server.addr.to_string()).await.unwrap();
    let mut other = publisher.subscribe::<u32>("other").await.unwrap();
    let big = vec![7u8; 64 * 1024];
    for _ in 0..600 {
        publisher.publish_bytes("flood", big.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // The deaf client's socket fills, its queue overflows (counted), and it is disconnected.
    until(|| server.broker.stats().subscriptions == 1).await;
    assert!(server.broker.stats().dropped_oldest > 0, "{:?}", server.broker.stats());
    // Meanwhile everyone else is served.
    publisher.publish("other", &1u32).await.unwrap();
    assert_eq!(soon(other.recv()).await, Some(1));
    server.stop().await;
}

#[tokio::test]
async fn the_sdk_works_over_websocket_beside_tcp() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let tcp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tcp, ws) = (tcp_listener.local_addr().unwrap(), ws_listener.local_addr().unwrap());
    let (b1, b2) = (broker.clone(), broker);
    tokio::spawn(
        async move { serve(tcp_listener, b1, fast_config(), std::future::pending()).await },
    );
    tokio::spawn(async move {
        whispeer::server::serve_websocket(ws_listener, b2, fast_config(), std::future::pending())
            .await
    });

    let keys = Keyring::generate().unwrap();
    let over_ws = ClientOptions::new(format!("ws://{ws}/ws"))
        .encryption(Encryption::with_keyring(keys.clone()));
    let over_tcp = ClientOptions::new(tcp.to_string()).encryption(Encryption::with_keyring(keys));
    let browserish = Client::connect_with(over_ws).await.unwrap();
    let service = Client::connect_with(over_tcp).await.unwrap();
    let mut at_ws = browserish.subscribe::<Reading>("sensor/#").await.unwrap();
    let mut at_tcp = service.subscribe::<Reading>("cmd/#").await.unwrap();

    for n in 0..200 {
        service.publish(&format!("sensor/{n}"), &reading(n)).await.unwrap();
    }
    service.flush().await.unwrap();
    for n in 0..200 {
        assert_eq!(soon(at_ws.recv()).await, Some(reading(n)));
    }
    browserish.publish_acked("cmd/reset", &reading(7)).await.unwrap();
    assert_eq!(soon(at_tcp.recv()).await, Some(reading(7)));

    let err = Client::connect("wss://127.0.0.1:1/ws").await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn a_busy_publisher_outlasting_the_idle_timeout_is_not_cut_off() {
    // Reads that end mid-frame for longer than the idle timeout (3 × 100 ms here) while frames
    // keep completing: see the partial-frame timer in the server's read loop.
    let mut config = fast_config();
    config.heartbeat = Duration::from_millis(100);
    let server = TestServer::start(config, None).await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.hello().await;
    let mut sub = server.broker.messages("busy").unwrap();
    let mut stream = BytesMut::new();
    for i in 0..400u32 {
        let frame = raw_client::publish("busy", u128::from(i), vec![0u8; 100]);
        frame.encode(&mut stream, usize::MAX).unwrap();
    }
    // Send it in pieces that never end on a frame boundary, for about a second.
    let started = std::time::Instant::now();
    for chunk in stream.chunks(97) {
        raw.stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_micros(2500)).await;
    }
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "the test must outlast the idle timeout"
    );
    for _ in 0..400 {
        soon(sub.recv_message()).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_only_receives_a_steady_stream_is_not_cut_off() {
    // A message every 10 ms: never a heartbeat (100 ms) idle, yet pinged, so the client answers.
    let mut config = fast_config();
    config.heartbeat = Duration::from_millis(100);
    let server = TestServer::start(config, None).await;
    let client = Client::connect_with(server.options().reconnect(false)).await.unwrap();
    let mut steady = client.subscribe::<Reading>("steady").await.unwrap();
    let broker = server.broker.clone();
    let publishing = tokio::spawn(async move {
        for n in 0..100 {
            broker.publish("steady", &reading(n)).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    for n in 0..100 {
        assert_eq!(soon(steady.recv()).await, Some(reading(n)), "connected, in order");
    }
    publishing.await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_embedded_broker_serves_itself_over_tcp_and_websocket() {
    use whispeer::server::{Tcp, WebSocket};
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(fast_config()))
        .with(WebSocket::new("127.0.0.1:0").config(fast_config()))
        .try_build()
        .unwrap();
    let addrs = broker.local_addrs();
    assert_eq!(addrs.len(), 2);
    let remote_tcp =
        Client::connect_with(ClientOptions::new(addrs[0].to_string()).reconnect(false))
            .await
            .unwrap();
    let remote_ws = Client::connect(format!("ws://{}/ws", addrs[1])).await.unwrap();

    // Remote → in process.
    let mut local = broker.subscription::<Reading>("from/remote").unwrap();
    remote_tcp.publish_acked("from/remote", &reading(1)).await.unwrap();
    assert_eq!(soon(local.recv()).await, Some(reading(1)));
    // In process → remote, over both transports.
    let mut at_tcp = remote_tcp.subscribe::<Reading>("from/local").await.unwrap();
    let mut at_ws = remote_ws.subscribe::<Reading>("from/local").await.unwrap();
    broker.publish("from/local", &reading(2)).unwrap();
    assert_eq!(soon(at_tcp.recv()).await, Some(reading(2)));
    assert_eq!(soon(at_ws.recv()).await, Some(reading(2)));

    // A second broker on a taken port fails to build, with the address in the error.
    let taken = addrs[0].to_string();
    let err = Broker::builder(BrokerOptions::default())
        .with(Tcp::new(taken.clone()))
        .try_build()
        .unwrap_err();
    let whispeer::BuildError::Service { service, source } = err else { panic!("{err:?}") };
    assert!(service.contains(&taken), "{service}");
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);

    broker.close_transports();
    assert_eq!(soon(at_tcp.recv()).await, None, "remote clients are told and disconnected");
}
