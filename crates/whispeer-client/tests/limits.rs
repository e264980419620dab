//! The server's limits over the network: connections, subscriptions per connection, topic
//! length and depth, and message size — each enforced with a clear error, the connection (where
//! it was admitted) still served.

use std::net::SocketAddr;

use whispeer::server::{ServerConfig, Tcp};
use whispeer::{Broker, BrokerOptions};
use whispeer_client::proto::ErrorCode;
use whispeer_client::{Client, ClientError, ClientOptions};

/// A server admitting 2 connections of 2 subscriptions each, topics of at most 16 bytes and 3
/// levels, and messages of at most 64 bytes.
fn server() -> (Broker, SocketAddr) {
    let mut config = ServerConfig::default();
    config.max_connections = 2;
    config.max_subscriptions = 2;
    let mut options = BrokerOptions::default();
    options.limits.max_topic_len = 16;
    options.limits.max_topic_depth = 3;
    options.limits.max_message_bytes = 64;
    let broker = Broker::builder(options).with(Tcp::new("127.0.0.1:0").config(config)).build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

fn code(err: &ClientError) -> Option<ErrorCode> {
    match err {
        ClientError::Server { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_enforced_with_a_clear_error() {
    let (_broker, addr) = server();
    let options = || ClientOptions::new(addr.to_string()).reconnect(false);
    let client = Client::connect_with(options()).await.unwrap();
    let _second = Client::connect_with(options()).await.unwrap();
    let third = Client::connect_with(options()).await.unwrap_err();
    assert!(third.to_string().contains("too many connections"), "{third}");

    let mut a = client.subscribe::<u32>("a").await.unwrap();
    let _b = client.subscribe::<u32>("b").await.unwrap();
    let err = client.subscribe::<u32>("c").await.unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::LIMIT_REACHED), "{err}");
    assert!(err.to_string().contains('2'), "names the limit: {err}");

    let long = client.publish_acked("abcdefghijklmnopq", &1u32).await.unwrap_err();
    assert_eq!(code(&long), Some(ErrorCode::INVALID_TOPIC), "{long}");
    let deep = client.publish_acked("a/b/c/d", &1u32).await.unwrap_err();
    assert_eq!(code(&deep), Some(ErrorCode::INVALID_TOPIC), "{deep}");
    let deep_filter = client.subscribe::<u32>("a/b/c/#").await.unwrap_err();
    assert_eq!(code(&deep_filter), Some(ErrorCode::INVALID_TOPIC), "{deep_filter}");
    // The server announced its message limit in WELCOME: the SDK refuses before sending.
    let big = client.publish_acked_bytes("a", vec![0u8; 65]).await.unwrap_err();
    assert!(matches!(big, ClientError::TooLarge { max: 64, .. }), "{big:?}");

    // Within the limits, the same connection is served as before.
    client.publish_acked("a", &7u32).await.unwrap();
    assert_eq!(a.recv().await, Some(7));
}
