//! Compact publishes over a real socket: the server says in its WELCOME that it reads them,
//! reads the topic numbers a client chose (redefined at will), answers a refused definition
//! and every later use of its number with `INVALID_TOPIC` and keeps the connection, and closes
//! one that names a number it never defined; the SDK sends them, measured on the wire.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use whispeer::server::Tcp;
use whispeer::{Broker, BrokerOptions};
use whispeer_client::proto::{
    Body, CAP_COMPACT_PUBLISH, ContentType, ErrorCode, Flags, Frame, Limits, MessageId, PlainHead,
    Qos, TopicRef,
};
use whispeer_client::{Client, ClientOptions, SubscribeOptions};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out")
}

fn server() -> (Broker, SocketAddr) {
    let broker = Broker::builder(BrokerOptions::default()).with(Tcp::new("127.0.0.1:0")).build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

async fn client(addr: SocketAddr) -> Client {
    Client::connect_with(ClientOptions::new(addr.to_string())).await.unwrap()
}

/// A publisher of the protocol driven by hand.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and says HELLO; gives the WELCOME's capabilities.
    async fn connect(addr: SocketAddr) -> (Self, u32) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Self { stream, buf: BytesMut::new() };
        let mut hello = BytesMut::new();
        let body = Body::Hello { version: 1, capabilities: 0, name: "raw".into() };
        Frame::new(1, body).encode(&mut hello, usize::MAX).unwrap();
        raw.stream.write_all(&hello).await.unwrap();
        let Some(Body::Welcome { capabilities, .. }) = raw.next_frame().await.map(|f| f.body)
        else {
            panic!("no WELCOME")
        };
        (raw, capabilities)
    }

    /// Sends a PUBLISH_COMPACT to `topic` naming it as `named` says, with `payload`.
    async fn publish(
        &mut self,
        correlation: u32,
        qos: Qos,
        topic: &str,
        named: TopicRef,
        payload: &str,
    ) {
        let flags = Flags::with_content(ContentType::Raw);
        let id = MessageId(u128::from(correlation));
        let head = PlainHead { id, timestamp_ms: 1, flags, topic, payload_len: payload.len() };
        let mut out = BytesMut::new();
        Frame::encode_compact_publish_head(&mut out, correlation, qos, &head, named, usize::MAX)
            .unwrap();
        out.extend_from_slice(payload.as_bytes());
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next frame other than a ping; `None` once the server closed the connection.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, &Limits::default()).unwrap() {
                if frame.body != Body::Ping {
                    return Some(frame);
                }
                continue;
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    /// The next frame's correlation and body, or its error's correlation and code.
    async fn answer(&mut self) -> (u32, Result<Body, ErrorCode>) {
        let frame = soon(self.next_frame()).await.expect("an answer");
        match frame.body {
            Body::Error { code, .. } => (frame.correlation, Err(code)),
            body => (frame.correlation, Ok(body)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reads_compact_publishes_by_the_numbers_its_client_chose() {
    let (_broker, addr) = server();
    let subscriber = client(addr).await;
    let mut subscription = subscriber.messages(SubscribeOptions::new("p/#")).await.unwrap();
    subscriber.flush().await.unwrap();
    let (mut raw, capabilities) = soon(Raw::connect(addr)).await;
    assert_eq!(capabilities & CAP_COMPACT_PUBLISH, CAP_COMPACT_PUBLISH);
    raw.publish(10, Qos::AtMostOnce, "p/a", TopicRef::Define(3), "0").await;
    raw.publish(11, Qos::AtLeastOnce, "", TopicRef::Alias(3), "1").await;
    assert_eq!(raw.answer().await, (11, Ok(Body::PubAck)));
    raw.publish(12, Qos::AtMostOnce, "p/b", TopicRef::Given, "2").await;
    raw.publish(13, Qos::AtMostOnce, "p/c", TopicRef::Define(3), "3").await;
    raw.publish(14, Qos::AtLeastOnce, "", TopicRef::Alias(3), "4").await;
    assert_eq!(raw.answer().await, (14, Ok(Body::PubAck)));
    let mut read = Vec::new();
    for _ in 0..5 {
        let delivery = soon(subscription.recv()).await.unwrap();
        let payload = String::from_utf8(delivery.payload().to_vec()).unwrap();
        read.push((delivery.topic().as_str().to_owned(), payload));
    }
    let expected = [("p/a", "0"), ("p/a", "1"), ("p/b", "2"), ("p/c", "3"), ("p/c", "4")]
        .map(|(topic, payload)| (topic.to_owned(), payload.to_owned()));
    assert_eq!(read, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_definition_is_answered_and_a_number_never_defined_closes_the_connection() {
    let (_broker, addr) = server();
    let (mut raw, _) = soon(Raw::connect(addr)).await;
    // A wildcard is no topic: the definition and each use of its number are refused, each
    // under its own correlation, and the connection goes on.
    raw.publish(20, Qos::AtLeastOnce, "p/#", TopicRef::Define(1), "x").await;
    assert_eq!(raw.answer().await, (20, Err(ErrorCode::INVALID_TOPIC)));
    raw.publish(21, Qos::AtLeastOnce, "", TopicRef::Alias(1), "x").await;
    assert_eq!(raw.answer().await, (21, Err(ErrorCode::INVALID_TOPIC)));
    raw.publish(22, Qos::AtLeastOnce, "p/ok", TopicRef::Define(1), "x").await;
    assert_eq!(raw.answer().await, (22, Ok(Body::PubAck)));
    // A number never defined: the stream cannot be read on.
    raw.publish(23, Qos::AtLeastOnce, "", TopicRef::Alias(2), "x").await;
    assert_eq!(raw.answer().await, (0, Err(ErrorCode::MALFORMED)));
    assert!(soon(raw.next_frame()).await.is_none(), "closed");
}

/// Forwards one connection to `to`, counting the bytes the client sends.
async fn counting_proxy(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, sent) = (listener.local_addr().unwrap(), Arc::new(AtomicUsize::new(0)));
    let counted = Arc::clone(&sent);
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let ((mut client_in, mut client_out), (mut server_in, mut server_out)) =
            (client.into_split(), server.into_split());
        tokio::spawn(async move { tokio::io::copy(&mut server_in, &mut client_out).await });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_in.read(&mut buf).await {
            counted.fetch_add(n, Ordering::Relaxed);
            if server_out.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    (addr, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sends_compact_publishes_and_its_subscribers_read_what_was_sent() {
    let (_broker, addr) = server();
    let subscriber = client(addr).await;
    let mut subscription = subscriber.messages(SubscribeOptions::new("bench/#")).await.unwrap();
    subscriber.flush().await.unwrap();
    let (proxy, sent) = counting_proxy(addr).await;
    let publisher = client(proxy).await;
    let handshake = sent.load(Ordering::Relaxed);
    // 128-byte payloads to two 18-byte topics in turn, as `whispeer bench` sends: a PUBLISH
    // is 190 bytes, a PUBLISH_COMPACT naming a number 166, one defining it 186. Each publish
    // is awaited, so most batches hold one or two.
    const MESSAGES: usize = 2_000;
    for n in 0..MESSAGES {
        let topic = format!("bench/t1x128/abc{}", n % 2);
        let mut payload = format!("{n:08}").into_bytes();
        payload.resize(128, b'.');
        publisher.publish_bytes(&topic, Bytes::from(payload)).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for n in 0..MESSAGES {
        let delivery = soon(subscription.recv()).await.unwrap();
        assert_eq!(delivery.topic().as_str(), format!("bench/t1x128/abc{}", n % 2));
        assert_eq!(&delivery.payload()[..8], format!("{n:08}").as_bytes());
    }
    // Two definitions, the rest by number, and a few small frames of the connection's own
    // (the flush). As PUBLISHes: 380,000 bytes.
    let (publishes, compact) =
        (sent.load(Ordering::Relaxed) - handshake, 2 * 186 + (MESSAGES - 2) * 166);
    assert!((compact..compact + 200).contains(&publishes), "{publishes} bytes against {compact}");
}
