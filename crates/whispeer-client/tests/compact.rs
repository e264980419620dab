//! Compact deliveries over a real socket: the server sends them only to a client that asked in
//! its HELLO, only where a DELIVER would carry nothing more (attempt 1, offset 0, no headers),
//! naming each topic in full once and by number after; the SDK asks for them and reads them,
//! also past the last number a connection has.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use whispeer::server::Tcp;
use whispeer::{Broker, BrokerOptions};
use whispeer_client::proto::{
    Body, CAP_COMPACT_ACCEPTED, CAP_COMPACT_DELIVER, Envelope, Filter, Frame, Limits,
    MAX_TOPIC_ALIASES, Qos, RawDeliver, StartAt, Topic, TopicAliases, TopicCache,
};
use whispeer_client::{Client, ClientOptions, PublishOptions, SubscribeOptions};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(30), f).await.expect("timed out")
}

fn server() -> (Broker, SocketAddr) {
    let broker = Broker::builder(BrokerOptions::default()).with(Tcp::new("127.0.0.1:0")).build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

/// A client of the protocol driven by hand, reading deliveries as bytes.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    aliases: TopicAliases,
}

/// A delivery as a raw client read it: its frame's type and length, and what it carried.
#[derive(Debug)]
struct Read {
    frame_type: u8,
    frame_len: usize,
    sub: u32,
    envelope: Envelope,
}

impl Raw {
    /// Connects, says HELLO with `capabilities` and subscribes (subscription 1, QoS 0) to
    /// `filter`; gives the WELCOME's capabilities.
    async fn subscribed(addr: SocketAddr, capabilities: u32, filter: &str) -> (Self, u32) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Self { stream, buf: BytesMut::new(), aliases: TopicAliases::default() };
        let name = "raw".to_owned();
        raw.send(Frame::new(1, Body::Hello { version: 1, capabilities, name })).await;
        let Body::Welcome { capabilities, .. } = raw.next_frame().await.body else {
            panic!("no WELCOME")
        };
        let filter = Filter::parse(filter).unwrap();
        let (group, start) = (None, StartAt::Latest);
        let subscribe =
            Body::Subscribe { sub: 1, qos: Qos::AtMostOnce, filter, prefetch: 0, group, start };
        raw.send(Frame::new(2, subscribe)).await;
        assert_eq!(raw.next_frame().await.body, Body::Ok);
        (raw, capabilities)
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn fill(&mut self) {
        assert!(self.stream.read_buf(&mut self.buf).await.unwrap() > 0, "closed");
    }

    /// The next frame other than a ping or a delivery.
    async fn next_frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, &Limits::default()).unwrap() {
                if frame.body != Body::Ping {
                    return frame;
                }
                continue;
            }
            self.fill().await;
        }
    }

    /// The next delivery, read as the SDK reads one: its head where it lies, a definition
    /// learnt, its envelope decoded with the numbers learnt.
    async fn next_delivery(&mut self) -> Read {
        let limits = Limits::default();
        loop {
            if let Some(head) = Frame::peek_deliver(&self.buf, &limits) {
                if head.defines {
                    self.aliases.learn(&self.buf[..head.frame_len], &limits).unwrap();
                }
                let frame_type = self.buf[4];
                let mut frame = self.buf.split_to(head.frame_len).freeze();
                let raw = RawDeliver::take_from(&mut frame).unwrap();
                assert_eq!((raw.attempt, raw.offset), (1, 0));
                let sub = raw.sub;
                let envelope =
                    raw.decode(&limits, &mut TopicCache::default(), &self.aliases).unwrap();
                return Read { frame_type, frame_len: head.frame_len, sub, envelope };
            }
            if Frame::split(&mut self.buf.clone(), &limits).unwrap().is_some() {
                // A ping or another whole frame before the delivery: stepped over.
                let frame = Frame::decode(&mut self.buf, &limits).unwrap().unwrap();
                assert_eq!(frame.body, Body::Ping, "only pings come between deliveries");
                continue;
            }
            self.fill().await;
        }
    }
}

async fn client(addr: SocketAddr) -> Client {
    Client::connect_with(ClientOptions::new(addr.to_string())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_gets_compact_deliveries_and_one_that_does_not_gets_delivers() {
    let (_broker, addr) = server();
    let (mut compact, accepted) = soon(Raw::subscribed(addr, CAP_COMPACT_DELIVER, "c/+")).await;
    assert_eq!(accepted & CAP_COMPACT_ACCEPTED, CAP_COMPACT_ACCEPTED);
    let (mut plain, accepted) = soon(Raw::subscribed(addr, 0, "c/+")).await;
    assert_eq!(accepted & CAP_COMPACT_ACCEPTED, 0);
    let publisher = client(addr).await;
    let payload = Bytes::from(vec![9u8; 128]);
    let mut sent = Vec::new();
    for (topic, header) in [("c/a", false), ("c/b", false), ("c/a", false), ("c/b", true)] {
        let options = if header {
            PublishOptions::new().header("trace", Bytes::from_static(b"t-1"))
        } else {
            PublishOptions::new()
        };
        publisher.publish_bytes_with(topic, payload.clone(), &options).await.unwrap();
        sent.push(topic);
    }
    publisher.flush().await.unwrap();
    let mut seen = Vec::new();
    for _ in &sent {
        let read = soon(compact.next_delivery()).await;
        let plain = soon(plain.next_delivery()).await;
        // The same message, whichever way it came.
        assert_eq!((read.sub, &read.envelope), (plain.sub, &plain.envelope));
        assert_eq!(plain.frame_type, 0x30);
        seen.push((read.frame_type, read.frame_len, read.envelope.topic.as_str().to_owned()));
    }
    // The first of each topic names it in full (and numbers it): 9 + 28 + 2 + 3 + 128 bytes;
    // the next by number: 9 + 28 + 128. With a header: a DELIVER.
    let header_len = 9 + 16 + 16 + 8 + 2 + 2 + 3 + 2 + (2 + 5 + 4 + 3) + 4 + 128;
    let expected = [
        (0x33, 170, "c/a".to_owned()),
        (0x33, 170, "c/b".to_owned()),
        (0x33, 165, "c/a".to_owned()),
        (0x30, header_len, "c/b".to_owned()),
    ];
    assert_eq!(seen, expected);
    assert_eq!(compact.aliases.get(2).map(Topic::as_str), Some("c/b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_reads_every_topic_past_the_last_number_of_its_connection() {
    let (_broker, addr) = server();
    let subscriber = client(addr).await;
    let mut subscription = subscriber.messages(SubscribeOptions::new("many/#")).await.unwrap();
    let publisher = client(addr).await;
    // More topics than a connection numbers, each twice (in full, then by number or in full
    // again), with the payload saying which.
    let topics = usize::from(MAX_TOPIC_ALIASES) + 100;
    for round in 0..2 {
        for n in 0..topics {
            let payload = Bytes::from(format!("{round}:{n}"));
            publisher.publish_bytes(&format!("many/{n}"), payload).await.unwrap();
        }
    }
    publisher.flush().await.unwrap();
    for round in 0..2 {
        for n in 0..topics {
            let delivery = soon(subscription.recv()).await.unwrap();
            assert_eq!(delivery.topic().as_str(), format!("many/{n}"));
            assert_eq!(&delivery.payload()[..], format!("{round}:{n}").as_bytes());
        }
    }
    assert_eq!(subscription.stats().decode_errors, 0);
}
