//! Topic access control over the network: a matrix of bypass attempts — wildcards, reserved and
//! addressed topics, unicode look-alikes, case, empty segments, long and deep topics, replay
//! subscriptions, queue groups — each refused with a clear error and counted, beside the grants
//! that must keep working.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use whispeer::server::{AccessCounters, ApiKeys, Permissions, Principal, ServerConfig, Tcp};
use whispeer::{Broker, BrokerOptions, Filter, Retention};
use whispeer_client::proto::ErrorCode;
use whispeer_client::{Client, ClientError, ClientOptions, Qos, StartAt, SubscribeOptions};

fn filters(list: &[&str]) -> Vec<Filter> {
    list.iter().map(|f| Filter::parse(f).unwrap()).collect()
}

/// A server where `alice` may publish to `chat/+` (not `chat/admin`) and subscribe to `chat/+`
/// and `feeds/public/#` (not `feeds/public/admin/#`), and join groups `chat-*` and her own;
/// `root` may do everything ordinary.
fn server() -> (Broker, SocketAddr, Arc<AccessCounters>) {
    let mut alice = Permissions::none();
    alice.publish = filters(&["chat/+"]);
    alice.deny_publish = filters(&["chat/admin"]);
    alice.subscribe = filters(&["chat/+", "feeds/public/#"]);
    alice.deny_subscribe = filters(&["feeds/public/admin/#"]);
    alice.groups = vec!["chat-*".into()];
    let mut keys = ApiKeys::default();
    keys.add(0, "alice-key", Principal::new("alice", alice)).unwrap();
    keys.add(1, "root-key", Principal::new("root", Permissions::everything())).unwrap();
    let mut config = ServerConfig::default();
    config.api_keys = keys;
    let access = Arc::clone(&config.access);
    let mut options = BrokerOptions::default();
    options.retention = vec![(Filter::parse("#").unwrap(), Retention::messages(10))];
    let broker = Broker::builder(options).with(Tcp::new("127.0.0.1:0").config(config)).build();
    let addr = broker.local_addrs()[0];
    (broker, addr, access)
}

async fn client(addr: SocketAddr, key: &str) -> Client {
    Client::connect_with(ClientOptions::new(addr.to_string()).api_key(key)).await.unwrap()
}

/// The server's error code, or `None` for a refusal before anything was sent (an invalid
/// filter or topic, caught by the SDK with the same rules the server applies).
fn refusal(err: &ClientError) -> Option<ErrorCode> {
    match err {
        ClientError::Server { code, .. } => Some(*code),
        ClientError::InvalidTopic(_) => None,
        other => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bypass_attempt_is_refused_and_counted() {
    let (_broker, addr, access) = server();
    let alice = client(addr, "alice-key").await;
    let long = format!("chat/{}", "x".repeat(2000));
    let deep = ["chat"; 100].join("/");
    let subscribe_attempts: Vec<(&str, SubscribeOptions)> = vec![
        ("a wider wildcard", SubscribeOptions::new("chat/#")),
        ("everything", SubscribeOptions::new("#")),
        ("one level everywhere", SubscribeOptions::new("+/+")),
        ("deeper than granted", SubscribeOptions::new("chat/+/x")),
        ("a wildcard first segment", SubscribeOptions::new("+/lobby")),
        ("the parent topic", SubscribeOptions::new("chat")),
        ("the broker's topics", SubscribeOptions::new("$sys/#")),
        ("a broker topic", SubscribeOptions::new("$sys/+")),
        ("another inbox", SubscribeOptions::new("@inbox/bob")),
        ("every inbox", SubscribeOptions::new("@inbox/+")),
        ("every inbox, deep", SubscribeOptions::new("@inbox/#")),
        ("everything below one level", SubscribeOptions::new("+/#")),
        ("the other single-level wildcard", SubscribeOptions::new("*")),
        ("a cyrillic look-alike", SubscribeOptions::new("chаt/lobby")),
        ("another case", SubscribeOptions::new("CHAT/lobby")),
        ("an empty segment", SubscribeOptions::new("chat//lobby")),
        ("a trailing slash", SubscribeOptions::new("chat/lobby/")),
        ("a wildcard reaching a denied subtree", SubscribeOptions::new("feeds/public/+/x")),
        ("the denied subtree itself", SubscribeOptions::new("feeds/public/admin")),
        ("above the grant", SubscribeOptions::new("feeds/#")),
        ("a long filter", SubscribeOptions::new(long.as_str())),
        ("a deep filter", SubscribeOptions::new(deep.as_str())),
        ("a replay of a wider filter", SubscribeOptions::new("chat/#").start(StartAt::Earliest)),
        ("a replay of another inbox", SubscribeOptions::new("@inbox/bob").start(StartAt::Earliest)),
        ("a queue group on everything", SubscribeOptions::new("#").group("g")),
        (
            "another's durable subscription",
            SubscribeOptions::new("@inbox/bob").qos(Qos::AtLeastOnce).group("bob-phone"),
        ),
        ("a group not granted", SubscribeOptions::new("chat/lobby").group("billing")),
        ("another's group", SubscribeOptions::new("chat/lobby").group("bob-phone")),
        ("a group that only starts like a grant", SubscribeOptions::new("chat/x").group("chat")),
        ("a group named like her, not hers", SubscribeOptions::new("chat/x").group("alice2")),
    ];
    let mut forbidden = 0u64;
    for (what, options) in subscribe_attempts {
        let err = alice.subscribe::<u32>(options).await.expect_err(what);
        match refusal(&err) {
            Some(ErrorCode::FORBIDDEN) => forbidden += 1,
            Some(ErrorCode::INVALID_TOPIC) | None => {}
            Some(other) => panic!("{what}: refused with {other}"),
        }
    }
    assert_eq!(access.denied_subscribe(), forbidden);
    assert!(forbidden >= 20, "{forbidden} forbidden");

    let publish_attempts = [
        ("a deeper topic", "chat/a/b"),
        ("the parent topic", "chat"),
        ("an ungranted topic", "news/x"),
        ("a denied topic", "chat/admin"),
        ("another inbox", "@inbox/bob"),
        ("a cyrillic look-alike", "chаt/x"),
        ("a broker topic", "$sys/x"),
        ("a wildcard as a topic", "chat/+"),
    ];
    let mut denied = 0u64;
    for (what, topic) in publish_attempts {
        let err = alice.publish_acked(topic, &1u32).await.expect_err(what);
        match refusal(&err) {
            Some(ErrorCode::FORBIDDEN) => denied += 1,
            Some(ErrorCode::INVALID_TOPIC) | None => {}
            Some(other) => panic!("{what}: refused with {other}"),
        }
    }
    assert_eq!(access.denied_publish(), denied);
    assert!(denied >= 5, "{denied} denied");
    // At QoS 0 nothing waits for the answer: the refusal is counted by the client.
    let before = alice.stats().refused_publishes;
    alice.publish("chat/admin", &1u32).await.unwrap();
    alice.publish("chat/lobby", &2u32).await.unwrap();
    alice.flush().await.unwrap();
    assert_eq!(alice.stats().refused_publishes, before + 1, "one of the two refused");
    assert_eq!(access.denied_publish(), denied + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_topics_and_the_own_inbox_keep_working() {
    let (broker, addr, access) = server();
    let alice = client(addr, "alice-key").await;
    let root = client(addr, "root-key").await;
    let mut lobby = alice.subscribe::<u32>("chat/lobby").await.unwrap();
    let mut any_chat = alice.subscribe::<u32>("chat/*").await.unwrap();
    let mut news = alice.subscribe::<u32>("feeds/public/news/#").await.unwrap();
    let mut inbox = alice.subscribe::<u32>("@inbox/alice/#").await.unwrap();
    // Granted groups, and her own: a durable subscription to her inbox for her phone.
    let group = |name: &str| SubscribeOptions::new("chat/lobby").group(name);
    let mut shared = alice.subscribe::<u32>(group("chat-readers")).await.unwrap();
    let phone = SubscribeOptions::new("@inbox/alice/#").qos(Qos::AtLeastOnce).group("alice-phone");
    let mut phone = alice.messages(phone).await.unwrap();
    alice.publish_acked("chat/lobby", &1u32).await.unwrap();
    root.publish_acked("feeds/public/news/today", &2u32).await.unwrap();
    // Root's grant of everything ordinary does not open anyone's inbox either.
    let err = root.publish_acked("@inbox/alice/dm", &3u32).await.unwrap_err();
    assert_eq!(refusal(&err), Some(ErrorCode::FORBIDDEN));
    // A request the grants refuse fails with the refusal, not at its timeout.
    let asked = std::time::Instant::now();
    let err = root.request("@inbox/alice/dm", "q", Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(refusal(&err), Some(ErrorCode::FORBIDDEN), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(5), "at once, not at the timeout");
    assert_eq!(lobby.recv().await, Some(1));
    assert_eq!(any_chat.recv().await, Some(1));
    assert_eq!(news.recv().await, Some(2));
    // A direct message, sent by the broker's own application code, reaches her inbox.
    broker.publish("@inbox/alice/dm", &4u32).unwrap();
    assert_eq!(inbox.recv().await, Some(4));
    assert_eq!(shared.recv().await, Some(1));
    assert_eq!(phone.recv().await.unwrap().decode::<u32>().unwrap(), 4);
    let wrong = Client::connect_with(ClientOptions::new(addr.to_string()).api_key("guess")).await;
    assert!(wrong.is_err());
    assert_eq!(access.auth_failures(), 1);
    assert_eq!(access.denied_subscribe(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_in_auth_names_the_principal_and_its_permissions() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use whispeer::server::JwtVerifier;
    let secret = b"shared secret for this test only!";
    let mut config = ServerConfig::default();
    config.jwt = Some(Arc::new(JwtVerifier::new().hs256(secret)));
    let access = Arc::clone(&config.access);
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config))
        .build();
    let addr = broker.local_addrs()[0];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = |exp: u64, key: &[u8]| {
        let claims = serde_json::json!({
            "sub": "ada", "exp": exp,
            "whispeer": { "publish": ["chat/+"], "subscribe": ["chat/+"] },
        });
        encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).unwrap()
    };
    let ada = client(addr, &token(now + 300, secret)).await;
    let mut lobby = ada.subscribe::<u32>("chat/lobby").await.unwrap();
    ada.publish_acked("chat/lobby", &1u32).await.unwrap();
    assert_eq!(lobby.recv().await, Some(1));
    let err = ada.subscribe::<u32>("chat/#").await.unwrap_err();
    assert_eq!(refusal(&err), Some(ErrorCode::FORBIDDEN));
    let mut inbox = ada.subscribe::<u32>("@inbox/ada").await.unwrap();
    broker.publish("@inbox/ada", &2u32).unwrap();
    assert_eq!(inbox.recv().await, Some(2), "the subject's own inbox");
    for bad in [token(now - 3600, secret), token(now + 300, b"not the server's secret")] {
        let options = ClientOptions::new(addr.to_string()).api_key(bad);
        assert!(Client::connect_with(options).await.is_err());
    }
    assert_eq!(access.auth_failures(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_publishing_past_its_rate_is_refused_then_recovers() {
    let mut config = ServerConfig::default();
    config.max_publish_rate = Some(50);
    config.max_publish_bytes_rate = Some(10_000);
    let access = Arc::clone(&config.access);
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config))
        .build();
    let addr = broker.local_addrs()[0];
    let publisher = Client::connect(addr.to_string()).await.unwrap();
    let start = std::time::Instant::now();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for n in 0..200u32 {
        match publisher.publish_acked("t", &n).await {
            Ok(_) => accepted += 1,
            Err(err) => {
                assert_eq!(refusal(&err), Some(ErrorCode::LIMIT_REACHED));
                let text = err.to_string();
                assert!(text.contains("at most 50 publishes per second and 10000 bytes"), "{text}");
                refused += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // A burst of one second's worth, then the rate.
    assert!(accepted as f64 <= 50.0 + 50.0 * elapsed + 1.0, "{accepted} in {elapsed:.3} s");
    assert!(refused > 0 && access.rate_limited() == refused);
    // Both budgets refill; then 4 KB payloads spend the 10 000 bytes per second after two.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publisher.publish_acked_bytes("t", vec![0u8; 4000]).await.expect("within the byte budget");
    publisher.publish_acked_bytes("t", vec![0u8; 4000]).await.expect("within the byte budget");
    let third = publisher.publish_acked_bytes("t", vec![0u8; 4000]).await.unwrap_err();
    assert_eq!(refusal(&third), Some(ErrorCode::LIMIT_REACHED));
}

/// Reads frames from a raw socket until it closes; answers the server's pings when `pong`.
async fn frames_until_closed(
    stream: &mut tokio::net::TcpStream,
    pong: bool,
) -> Vec<whispeer_client::proto::Frame> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use whispeer_client::proto::{Body, Frame, Limits};
    let (mut buf, mut frames) = (bytes::BytesMut::new(), Vec::new());
    loop {
        while let Some(frame) = Frame::decode(&mut buf, &Limits::default()).unwrap() {
            if pong && frame.body == Body::Ping {
                let mut out = bytes::BytesMut::new();
                Frame::new(frame.correlation, Body::Pong).encode(&mut out, usize::MAX).unwrap();
                let _ = stream.write_all(&out).await;
            }
            frames.push(frame);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return frames,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_are_closed_after_the_auth_timeout_and_counted() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use whispeer_client::proto::{Body, Frame};
    let mut keys = ApiKeys::default();
    keys.add(0, "root-key", Principal::new("root", Permissions::everything())).unwrap();
    let mut config = ServerConfig::default();
    config.api_keys = keys;
    config.auth_timeout = Duration::from_millis(400);
    // Pings come often enough that a client answering them would otherwise stay.
    config.heartbeat = Duration::from_millis(200);
    let access = Arc::clone(&config.access);
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config))
        .build();
    let addr = broker.local_addrs()[0];
    let authenticated = client(addr, "root-key").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..60 {
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            if n % 3 > 0 {
                let mut hello = bytes::BytesMut::new();
                let body = Body::Hello { version: 1, capabilities: 0, name: "idle".into() };
                Frame::new(1, body).encode(&mut hello, usize::MAX).unwrap();
                stream.write_all(&hello).await.unwrap();
            }
            // A third say nothing, a third only HELLO, a third HELLO and every PONG.
            frames_until_closed(&mut stream, n % 3 == 2).await
        }));
    }
    for task in tasks {
        let frames = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        let last = frames.last().unwrap();
        match &last.body {
            Body::Error { code, message } => {
                assert_eq!(*code, ErrorCode::UNAUTHENTICATED, "{message}");
                assert!(message.contains("within 400 ms"), "{message}");
            }
            other => panic!("closed without an error: {other:?}"),
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(access.auth_timeouts(), 60);
    // The authenticated client is not affected.
    authenticated.publish("chat/x", &1u32).await.unwrap();
    authenticated.flush().await.unwrap();
    assert_eq!(access.auth_timeouts(), 60);
}
