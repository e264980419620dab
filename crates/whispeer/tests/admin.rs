//! The admin port in an embedding program: `.with(Admin::new(addr))` beside a TCP listener
//! serves health, readiness and Prometheus metrics of that broker, and stops with it.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::io::{Read, Write};
use std::net::SocketAddr;

use whispeer::server::{Admin, ServerConfig};
use whispeer::{Broker, BrokerOptions, Tcp};

/// `GET path`: (status line, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: whispeer\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    Ok((head.lines().next().unwrap().to_string(), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_serves_its_admin_port() {
    let config = ServerConfig::default();
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config.clone()))
        .with(Admin::new("127.0.0.1:0").counters_of(&config).token("secret"))
        .build();
    let addrs = broker.local_addrs();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let admin = addrs[1];
    let _sub = broker.subscription::<u32>("counted").unwrap();
    for n in 0..7u32 {
        broker.publish("counted", &n).unwrap();
    }
    let (health, ready) = tokio::task::spawn_blocking(move || {
        (get(admin, "/healthz").unwrap(), get(admin, "/readyz").unwrap())
    })
    .await
    .unwrap();
    assert!(health.0.contains("200"), "{health:?}");
    assert!(ready.0.contains("200"), "{ready:?}");
    let metrics =
        tokio::task::spawn_blocking(move || get(admin, "/metrics").unwrap()).await.unwrap();
    assert!(metrics.1.contains("whispeer_messages_published_total 7"), "{}", metrics.1);
    let closed =
        tokio::task::spawn_blocking(move || get(admin, "/api/topics").unwrap()).await.unwrap();
    assert!(closed.0.contains("401"), "the API wants the token: {closed:?}");

    broker.close_transports();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let after = tokio::task::spawn_blocking(move || get(admin, "/healthz")).await.unwrap();
    assert!(after.is_err(), "the admin port stops with the broker's services: {after:?}");
}
