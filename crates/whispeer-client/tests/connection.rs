//! The SDK's connection task when a connection ends: what is published while the client
//! reconnects waits (bounded) in the outbox and goes out on the next connection, QoS 0 and
//! QoS 1 alike, each task's publishes in order; deliveries read before a bad frame still reach
//! their subscription.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use whispeer::server::{ServerConfig, serve};
use whispeer::{Broker, BrokerOptions, Message, Subscription};
use whispeer_client::proto::{Body, ContentType, Envelope, Flags, Frame, Limits, MessageId, Topic};
use whispeer_client::{Client, ClientOptions};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(20), f).await.expect("timed out")
}

/// A server on `addr` until `stop` is sent, with an embedded subscription to `t` made before
/// it accepts anyone.
async fn server(
    addr: &str,
) -> (SocketAddr, Subscription<Message>, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::builder(BrokerOptions::default()).build();
    let seen = broker.messages("t").unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut config = ServerConfig::default();
    config.shutdown_grace = Duration::from_millis(200);
    let task = tokio::spawn(async move {
        serve(listener, broker, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, seen, stop, task)
}

#[tokio::test]
async fn what_is_published_while_disconnected_goes_out_on_the_next_connection() {
    let (addr, _first_seen, stop, task) = server("127.0.0.1:0").await;
    let mut options = ClientOptions::new(addr.to_string());
    options.backoff = (Duration::from_millis(50), Duration::from_millis(50));
    let client = Client::connect_with(options).await.unwrap();
    client.flush().await.unwrap();
    let _ = stop.send(());
    soon(task).await.unwrap();
    // The client sees the connection go, and tries again every 50 ms against a closed port.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.publish_bytes("t", &b"one"[..]).await.unwrap();
    let acked = tokio::spawn({
        let client = client.clone();
        async move { client.publish_acked_bytes("t", &b"two"[..]).await }
    });
    client.publish_bytes("t", &b"three"[..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!acked.is_finished(), "no PUBACK without a server");

    let (_, mut seen, stop, task) = server(&addr.to_string()).await;
    soon(acked).await.unwrap().unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(soon(seen.recv()).await.unwrap().payload().to_vec());
    }
    // One task's publishes keep their order; the other task's may come anywhere among them.
    let at = |text: &[u8]| got.iter().position(|p| p == text).unwrap();
    assert!(at(b"one") < at(b"three"), "{got:?}");
    assert_eq!(at(b"two") + at(b"one") + at(b"three"), 3, "each once: {got:?}");
    let _ = stop.send(());
    soon(task).await.unwrap();
}

/// The next frame from `stream`.
async fn frame(stream: &mut tokio::net::TcpStream, buf: &mut BytesMut) -> Frame {
    loop {
        if let Some(frame) = Frame::decode(buf, &Limits::default()).unwrap() {
            return frame;
        }
        assert!(stream.read_buf(buf).await.unwrap() > 0, "the client hung up");
    }
}

#[tokio::test]
async fn deliveries_read_before_a_bad_frame_still_reach_their_subscription() {
    // A server written here: it greets, accepts the subscription, then sends two deliveries
    // and a frame of an unknown type in one write.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let hello = frame(&mut stream, &mut buf).await;
        let welcome = Body::Welcome {
            version: 1,
            capabilities: 0,
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 16,
            heartbeat_ms: 10_000,
            name: "fake".into(),
        };
        let mut out = BytesMut::new();
        Frame::new(hello.correlation, welcome).encode(&mut out, usize::MAX).unwrap();
        stream.write_all(&out).await.unwrap();
        let subscribe = frame(&mut stream, &mut buf).await;
        let Body::Subscribe { sub, .. } = subscribe.body else { panic!("{subscribe:?}") };
        out.clear();
        Frame::new(subscribe.correlation, Body::Ok).encode(&mut out, usize::MAX).unwrap();
        for (id, payload) in [(1, "first"), (2, "second")] {
            let topic = Topic::parse("t").unwrap();
            let flags = Flags::with_content(ContentType::Raw);
            let envelope = Envelope::new(MessageId(id), topic, 0, flags, Bytes::from(payload));
            let deliver = Body::Deliver { sub, attempt: 1, offset: 0, envelope };
            Frame::new(0, deliver).encode(&mut out, usize::MAX).unwrap();
        }
        out.extend_from_slice(&[0, 0, 0, 5, 0x7e, 0, 0, 0, 0]);
        stream.write_all(&out).await.unwrap();
        let _ = stream.read(&mut [0u8; 64]).await;
    });
    let client =
        Client::connect_with(ClientOptions::new(addr.to_string()).reconnect(false)).await.unwrap();
    let mut deliveries = client.messages("t").await.unwrap();
    for expected in [&b"first"[..], b"second"] {
        let delivery = soon(deliveries.recv()).await.expect("read before the bad frame");
        assert_eq!(&delivery.payload()[..], expected);
    }
    assert!(soon(deliveries.recv()).await.is_none(), "then the subscription ends");
    server.abort();
}
