//! A publisher cycling through more topics than any per-connection table holds, over a real
//! socket: the SDK's numbered topics past 1,024 (reused in turn), the server's reader numbers
//! redefined, its writer's numbers past 1,024 (then topics in full), and both sides' traffic
//! caches past their 128 topics. Every message arrives once, in order, under its own topic,
//! and the server counts each topic's messages in and out exactly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use whispeer::server::{ServerConfig, Tcp, Traffic};
use whispeer::{Broker, BrokerOptions};
use whispeer_client::{Client, ClientOptions};

/// Distinct topics: past the SDK's and the writer's 1,024 numbers.
const TOPICS: usize = 1_100;

/// Times the publisher goes through them.
const ROUNDS: usize = 3;

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out")
}

#[tokio::test]
async fn a_publisher_cycling_through_many_topics_reaches_a_wildcard_under_each_and_is_counted() {
    let config = ServerConfig::default();
    let traffic: Arc<Traffic> = Arc::clone(&config.traffic);
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config))
        .build();
    let addr = broker.local_addrs()[0].to_string();
    let subscriber = Client::connect_with(ClientOptions::new(addr.clone())).await.unwrap();
    let mut sub = subscriber.messages("many/+").await.unwrap();
    let publisher = Client::connect_with(ClientOptions::new(addr)).await.unwrap();
    let topic = |n: usize| format!("many/{}", n % TOPICS);
    for n in 0..TOPICS * ROUNDS {
        let payload = Bytes::from((n as u32).to_be_bytes().to_vec());
        publisher.publish_bytes(&topic(n), payload).await.unwrap();
    }
    for n in 0..TOPICS * ROUNDS {
        let delivery = soon(sub.recv()).await.unwrap();
        assert_eq!(delivery.topic().as_str(), topic(n), "message {n}");
        assert_eq!(delivery.payload()[..], (n as u32).to_be_bytes(), "message {n}");
    }
    // Each side settles its counts after each read and write: every topic's own add up.
    let want = ROUNDS as u64;
    let counted = || {
        let topics = traffic.topics();
        topics.len() == TOPICS
            && topics.iter().all(|(_, flow)| flow.messages_in == want && flow.messages_out == want)
    };
    soon(async {
        while !counted() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let bytes =
        traffic.topics().iter().map(|(_, flow)| flow.bytes_in + flow.bytes_out).sum::<u64>();
    assert_eq!(bytes, (2 * 4 * TOPICS * ROUNDS) as u64);
}
