//! P2P paths beside raw TCP on this machine, in one run: messages per second one way (128-byte
//! messages, sent as fast as the path takes them for 3 s), one-way latency p50 / p99 at 5,000
//! messages per second, and connection set-up (the second peer's `connect` → its first byte from
//! the first). Paths: a raw loopback TCP connection with length-prefixed frames (the machine's
//! limit for this framing), the DHT mode (a direct libp2p connection over TCP, Noise, yamux),
//! and the relay (two relay transports through a relay in this process, Noise end to end).
//!
//! `cargo bench -p whispeer-sync --bench p2p`. Prints a table; asserts nothing.
#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use whispeer::{Broker, BrokerOptions};
use whispeer_server::{Relay, RelayConfig, ServerConfig, WebSocket};
use whispeer_sync::dht::DhtTransport;
use whispeer_sync::{
    Connection, PeerKey, PeerOptions, Transport, TransportConfig, TransportMode,
    create_transport_with, derive_topic,
};

const SIZE: usize = 128;
const RUN: Duration = Duration::from_secs(3);
const RATE: u64 = 5_000;

/// A raw TCP connection with 4-byte length prefixes, as a `Connection`, at its best: a writer
/// task fills a 64 KiB buffer while messages wait and flushes when none does (as the P2P paths
/// do), and reads go through a 64 KiB buffer.
struct Tcp {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    out: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl Tcp {
    fn new(stream: TcpStream) -> Self {
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        let (out, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            let mut writer = tokio::io::BufWriter::with_capacity(64 << 10, writer);
            while let Some(frame) = rx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
                if rx.is_empty() && writer.flush().await.is_err() {
                    break;
                }
            }
        });
        Self { reader: tokio::io::BufReader::with_capacity(64 << 10, reader), out }
    }
}

#[async_trait]
impl Connection for Tcp {
    fn peer_id(&self) -> &str {
        "tcp"
    }
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(4 + data.len());
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        self.out.send(frame).await?;
        Ok(())
    }
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        if self.reader.read_exact(&mut len).await.is_err() {
            return Ok(None);
        }
        let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
        self.reader.read_exact(&mut data).await?;
        Ok(Some(data))
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn message(kind: u8) -> Vec<u8> {
    let mut m = vec![0u8; SIZE];
    m[0] = kind;
    m[1..9].copy_from_slice(&now_ns().to_be_bytes());
    m
}

/// Throughput then latency over one pair of connections; (msgs/s, p50 µs, p99 µs).
async fn measure(mut tx: Box<dyn Connection>, mut rx: Box<dyn Connection>) -> (f64, f64, f64) {
    let (drained, wait_drained) = tokio::sync::oneshot::channel();
    let receiver = tokio::spawn(async move {
        // Phase 1: count until its end marker; phase 2: latencies until the last marker.
        let mut drained = Some(drained);
        let (mut count, mut started, mut ended) = (0u64, None, Instant::now());
        let mut latencies = Vec::new();
        while let Ok(Some(m)) = rx.receive().await {
            match m[0] {
                0 => {
                    started.get_or_insert_with(Instant::now);
                    count += 1;
                    ended = Instant::now();
                }
                3 => {
                    if let Some(drained) = drained.take() {
                        let _ = drained.send(());
                    }
                }
                1 => {
                    let sent = u64::from_be_bytes(m[1..9].try_into().unwrap());
                    latencies.push(now_ns().saturating_sub(sent));
                }
                _ => break,
            }
        }
        let rate = count as f64 / ended.duration_since(started.unwrap()).as_secs_f64();
        latencies.sort_unstable();
        let at = |q: f64| {
            latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)] as f64 / 1e3
        };
        (rate, at(0.5), at(0.99))
    });
    let end = Instant::now() + RUN;
    while Instant::now() < end {
        for _ in 0..256 {
            tx.send(&message(0)).await.unwrap();
        }
    }
    // The latency phase starts once the receiver has taken everything of the first.
    tx.send(&[3u8; SIZE]).await.unwrap();
    wait_drained.await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / RATE));
    for _ in 0..(RATE * 2) {
        tick.tick().await;
        tx.send(&message(1)).await.unwrap();
    }
    tx.send(&[2u8; SIZE]).await.unwrap();
    receiver.await.unwrap()
}

fn row(name: &str, (rate, p50, p99): (f64, f64, f64), setup: Duration) {
    println!(
        "| {name} | {:.0} k | {p50:.0} | {p99:.0} | {:.1} |",
        rate / 1e3,
        setup.as_secs_f64() * 1e3
    );
}

async fn tcp() -> (Box<dyn Connection>, Box<dyn Connection>, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let started = Instant::now();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap().0 });
    let client = TcpStream::connect(addr).await.unwrap();
    let server = accept.await.unwrap();
    let (mut a, mut b) = (Tcp::new(server), Tcp::new(client));
    a.send(b"hello").await.unwrap();
    b.receive().await.unwrap();
    (Box::new(a), Box::new(b), started.elapsed())
}

/// Two transports on `topic`: the first waits, the second joins; (first's, second's, set-up).
async fn pair(
    mut first: Box<dyn Transport>,
    mut second: Box<dyn Transport>,
) -> (Box<dyn Connection>, Box<dyn Connection>, Duration) {
    let topic = derive_topic("bench");
    let mut first_in = first.connect(topic).await.unwrap();
    let started = Instant::now();
    let mut second_in = second.connect(topic).await.unwrap();
    let mut a = first_in.recv().await.unwrap();
    a.send(b"hello").await.unwrap();
    let mut b = second_in.recv().await.unwrap();
    b.receive().await.unwrap();
    let setup = started.elapsed();
    // Keep the transports alive with the connections.
    std::mem::forget(first);
    std::mem::forget(second);
    (a, b, setup)
}

#[tokio::main]
async fn main() {
    println!("| path (128 B, one way) | msgs/s | p50 µs at {RATE}/s | p99 µs | set-up ms |");
    println!("|---|---|---|---|---|");
    let (a, b, setup) = tcp().await;
    row("raw TCP (length-prefixed, loopback)", measure(a, b).await, setup);

    let options = |bootstrap: Vec<String>| PeerOptions {
        bootstrap,
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        ..PeerOptions::default()
    };
    let config = TransportConfig { mode: TransportMode::Hyperswarm, ..TransportConfig::default() };
    let first =
        DhtTransport::new(config.clone(), &PeerKey::generate(), &options(Vec::new())).unwrap();
    let addrs = first.listen_addrs().await.unwrap();
    let second = DhtTransport::new(config, &PeerKey::generate(), &options(addrs)).unwrap();
    let (a, b, setup) = pair(Box::new(first), Box::new(second)).await;
    row("DHT mode, direct (TCP + Noise + yamux)", measure(a, b).await, setup);

    let mut server = ServerConfig::default();
    server.relay = Some(Arc::new(Relay::new(RelayConfig {
        bytes_per_second: u64::MAX / 2,
        ..RelayConfig::default()
    })));
    let broker = Broker::builder(BrokerOptions::default())
        .with(WebSocket::new("127.0.0.1:0").config(server))
        .build();
    let url = format!("ws://{}", broker.local_addrs()[0]);
    let relay = |url: &str| {
        let config = TransportConfig {
            mode: TransportMode::Relay,
            relay_url: Some(url.into()),
            ..TransportConfig::default()
        };
        create_transport_with(config, PeerOptions::default()).unwrap()
    };
    let (a, b, setup) = pair(relay(&url), relay(&url)).await;
    row("relay (WebSocket + Noise end to end)", measure(a, b).await, setup);
}
