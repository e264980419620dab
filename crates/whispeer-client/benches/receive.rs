//! What the SDK's receiving costs, apart from any server: a scripted server on a thread of this
//! process answers the handshake and the subscription, then writes 128-byte DELIVER frames
//! (topic `bench/receive`, ids counting up) as fast as the socket takes them, at most 8 MiB of
//! payload ahead of what the receiver counted (as `whispeer bench` keeps in flight; the SDK's
//! default buffer holds it). Measured twice in turn, on the same runtime (tokio's
//! multi-threaded default):
//!
//! - `sdk`: `Client::messages` and `recv`, each payload taken out of its delivery, as the
//!   `whispeer bench` harness receives; the deliveries are DELIVER_COMPACT frames (the SDK
//!   asks for them, as a server gives them), or DELIVERs with `WHISPEER_BENCH_DELIVER=plain`;
//! - `floor`: one task that reads the same socket and cuts the frames off it, nothing more: what
//!   reading the bytes costs.
//!
//! And the other way, what publishing costs the SDK:
//!
//! - `publish`: `Client::publish_bytes` of 128-byte payloads to one topic from one task, as the
//!   `whispeer bench` harness publishes, while the scripted server reads the PUBLISH_COMPACT
//!   frames (its WELCOME says it reads them, as a server's does), or PUBLISHes with
//!   `WHISPEER_BENCH_PUBLISH=plain`, and counts them (the SDK's own outbox bounds what is in
//!   flight).
//!
//! For each it prints messages a second and the CPU each message cost the client's side (the
//! process's CPU less the scripted server's thread). Run with
//! `cargo bench -p whispeer-client --bench receive`; `WHISPEER_BENCH_MESSAGES` sets the count
//! (default 4,000,000), `WHISPEER_BENCH_ROUNDS` the rounds (default 3) and
//! `WHISPEER_BENCH_CASES` which cases run (default `sdk,floor,publish`).

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]
#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use whispeer_client::{Client, ClientOptions};
use whispeer_proto::{
    Body, CAP_COMPACT_ACCEPTED, CAP_COMPACT_DELIVER, CAP_COMPACT_PUBLISH, Envelope, Flags, Frame,
    Limits, MessageId, PROTOCOL_VERSION, PlainHead, ReadPool, Topic, TopicCache, TopicRef,
};

/// Frames written per write.
const BLOCK: u64 = 512;

/// Most deliveries written ahead of what the receiver counted: 8 MiB of 128-byte payloads.
const WINDOW: u64 = 65_536;

/// How often the receiver counts what it received.
const EVERY: u64 = 1_024;

/// CPU seconds (user + system) of this process, or of the calling thread, from `/proc`.
fn cpu(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// `BLOCK` DELIVER frames for subscription `sub`, ids from `first`; DELIVER_COMPACT frames
/// naming the topic by number 1 when `compact` says how (the first of all defining it).
fn block(sub: u32, first: u64, compact: Option<TopicRef>) -> Bytes {
    let topic = Topic::parse("bench/receive").unwrap();
    let payload = Bytes::from(vec![b'x'; 128]);
    let mut out = BytesMut::new();
    for n in first..first + BLOCK {
        let id = MessageId(u128::from(n) << 64 | 7);
        let envelope =
            Envelope::new(id, topic.clone(), 1_764_000_000_000, Flags(0), payload.clone());
        match compact {
            Some(named) => {
                let named = if n == first { named } else { TopicRef::Alias(1) };
                let head = PlainHead::of(&envelope);
                Frame::encode_compact_deliver_head(&mut out, sub, &head, named, usize::MAX)
                    .unwrap();
                out.extend_from_slice(&envelope.payload);
            }
            None => Frame::encode_deliver(&mut out, sub, 1, 0, &envelope, usize::MAX).unwrap(),
        }
    }
    out.freeze()
}

/// Reads frames until `want` says one is the one waited for; returns it.
fn read_until(stream: &mut TcpStream, buf: &mut BytesMut, want: impl Fn(&Frame) -> bool) -> Frame {
    let limits = Limits::default();
    loop {
        while let Some(frame) = Frame::decode(buf, &limits).unwrap() {
            if want(&frame) {
                return frame;
            }
        }
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the client hung up");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// The SDK receiving.
    Sdk,
    /// Reading the bytes, nothing more.
    Floor,
    /// The SDK publishing.
    Publish,
}

/// The scripted server for one connection: the handshake, then (for `Case::Sdk`) the reply to
/// a SUBSCRIBE and `messages` deliveries to it; returns the CPU seconds its thread used while
/// writing them. For `Case::Publish`, reads `messages` PUBLISH frames instead.
fn serve(mut stream: TcpStream, messages: u64, case: Case, received: &AtomicU64) -> f64 {
    stream.set_nodelay(true).unwrap();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let hello = read_until(&mut stream, &mut buf, |f| matches!(f.body, Body::Hello { .. }));
    let asked = matches!(hello.body, Body::Hello { capabilities, .. }
        if capabilities & CAP_COMPACT_DELIVER != 0);
    let plain = std::env::var("WHISPEER_BENCH_DELIVER").is_ok_and(|v| v == "plain");
    let compact = asked && !plain;
    let plain_publishes = std::env::var("WHISPEER_BENCH_PUBLISH").is_ok_and(|v| v == "plain");
    let reads = if plain_publishes { 0 } else { CAP_COMPACT_PUBLISH };
    let welcome = Body::Welcome {
        version: PROTOCOL_VERSION,
        capabilities: if compact { CAP_COMPACT_ACCEPTED | reads } else { reads },
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
        heartbeat_ms: 30_000,
        name: "scripted".into(),
    };
    Frame::new(hello.correlation, welcome).encode(&mut out, usize::MAX).unwrap();
    if case == Case::Publish {
        stream.write_all(&out).unwrap();
        return count_publishes(&mut stream, buf, messages, received);
    }
    let mut sub = 1;
    if case == Case::Sdk {
        stream.write_all(&out).unwrap();
        out.clear();
        let frame = read_until(&mut stream, &mut buf, |f| matches!(f.body, Body::Subscribe { .. }));
        if let Body::Subscribe { sub: id, .. } = frame.body {
            sub = id;
        }
        Frame::new(frame.correlation, Body::Ok).encode(&mut out, usize::MAX).unwrap();
    }
    // The client's own frames (pings) are read on, so its writes never block.
    let mut drain = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut sink = [0; 4096];
        while drain.read(&mut sink).is_ok_and(|n| n > 0) {}
    });
    let alias = compact.then_some(TopicRef::Alias(1));
    let first = block(sub, 0, compact.then_some(TopicRef::Define(1)));
    let blocks = [block(sub, 0, alias), block(sub, BLOCK, alias)];
    let start = cpu("/proc/thread-self/stat");
    stream.write_all(&out).unwrap();
    let mut sent = 0;
    while sent < messages {
        while sent + BLOCK > received.load(Ordering::Acquire) + WINDOW {
            std::thread::sleep(Duration::from_micros(50));
        }
        let next = if sent == 0 { &first } else { &blocks[(sent / BLOCK % 2) as usize] };
        stream.write_all(next).unwrap();
        sent += BLOCK;
    }
    cpu("/proc/thread-self/stat") - start
}

/// Reads PUBLISH frames until `messages` came, counting them in `received`; returns the CPU
/// seconds this thread used.
fn count_publishes(
    stream: &mut TcpStream,
    mut buf: BytesMut,
    messages: u64,
    received: &AtomicU64,
) -> f64 {
    let start = cpu("/proc/thread-self/stat");
    let (limits, mut topics) = (Limits::default(), TopicCache::default());
    let mut seen = 0;
    let mut chunk = vec![0; 256 * 1024];
    while seen < messages {
        while let Some(raw) = Frame::split(&mut buf, &limits).unwrap() {
            if raw.publish(&limits, &mut topics).is_ok_and(|p| p.is_ok()) {
                seen += 1;
            }
        }
        received.store(seen, Ordering::Release);
        if seen >= messages {
            break;
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the client hung up after {seen} publishes");
        buf.extend_from_slice(&chunk[..n]);
    }
    cpu("/proc/thread-self/stat") - start
}

/// One measurement: (messages a second, the client's CPU µs a message).
fn measure(runtime: &tokio::runtime::Runtime, case: Case, messages: u64) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let received = Arc::new(AtomicU64::new(0));
    let server = std::thread::spawn({
        let received = Arc::clone(&received);
        move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream, messages, case, &received)
        }
    });
    let cpu_before = cpu("/proc/self/stat");
    let start = Instant::now();
    runtime.block_on(async move {
        if case == Case::Publish {
            let client = Client::connect_with(ClientOptions::new(addr)).await.unwrap();
            let payload = Bytes::from(vec![b'x'; 128]);
            for _ in 0..messages {
                client.publish_bytes("bench/publish", payload.clone()).await.unwrap();
            }
            let waited = Instant::now();
            while received.load(Ordering::Acquire) < messages {
                assert!(waited.elapsed() < Duration::from_secs(120), "stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(client);
        } else if case == Case::Sdk {
            let client = Client::connect_with(ClientOptions::new(addr)).await.unwrap();
            let mut sub = client.messages("bench/receive").await.unwrap();
            let reader = tokio::spawn(async move {
                let mut bytes = 0;
                for n in 1..=messages {
                    // No timer a message: the whole run has one.
                    bytes += sub.recv().await.unwrap().into_payload().len();
                    if n % EVERY == 0 {
                        received.store(n, Ordering::Release);
                    }
                }
                bytes
            });
            let done = tokio::time::timeout(Duration::from_secs(120), reader).await;
            assert_eq!(done.expect("stalled").unwrap(), messages as usize * 128);
            drop(client);
        } else {
            let reader = tokio::spawn(floor(addr, messages, received));
            reader.await.unwrap();
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let server_cpu = server.join().unwrap();
    let receiving = cpu("/proc/self/stat") - cpu_before - server_cpu;
    (messages as f64 / seconds, receiving * 1e6 / messages as f64)
}

/// Reads the socket and cuts the frames off it, as a connection's reader does, and nothing
/// more.
async fn floor(addr: String, messages: u64, received: Arc<AtomicU64>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let limits = Limits::default();
    let mut out = BytesMut::new();
    let hello = Body::Hello { version: PROTOCOL_VERSION, capabilities: 0, name: "floor".into() };
    Frame::new(1, hello).encode(&mut out, usize::MAX).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &out).await.unwrap();
    let (mut inbound, mut pool, mut seen) = (BytesMut::new(), ReadPool::with_spares(8), 0);
    loop {
        while let Some(raw) = Frame::split(&mut inbound, &limits).unwrap() {
            if raw.deliver().is_ok() {
                seen += 1;
                if seen % EVERY == 0 {
                    received.store(seen, Ordering::Release);
                }
            }
        }
        if seen >= messages {
            return;
        }
        pool.reserve(&mut inbound);
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut inbound));
        let Ok(Ok(1..)) = read.await else { panic!("stalled at {seen} of {messages}") };
    }
}

fn main() {
    let number = |name: &str, default: u64| {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let (messages, rounds) =
        (number("WHISPEER_BENCH_MESSAGES", 4_000_000), number("WHISPEER_BENCH_ROUNDS", 3));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "receive and publish, 128 B, {messages} a round: messages/s, the client's CPU µs each"
    );
    // `WHISPEER_BENCH_CASES=sdk` (or `floor`, `publish`) measures one alone, for a profiler.
    let cases =
        std::env::var("WHISPEER_BENCH_CASES").unwrap_or_else(|_| "sdk,floor,publish".into());
    for round in 1..=rounds {
        for (name, case) in [("sdk", Case::Sdk), ("floor", Case::Floor), ("publish", Case::Publish)]
        {
            if !cases.split(',').any(|case| case == name) {
                continue;
            }
            let (rate, cpu) = measure(&runtime, case, messages);
            println!("round {round} {name:>7}: {:>6.2} M/s {cpu:.3} µs", rate / 1e6);
        }
    }
}
