//! The writer's batches, seen from the socket: what each write carries; and a socket that
//! stops taking writes.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use whispeer_core::{Broker, BrokerOptions, SubscribeOptions};
use whispeer_proto::{BY_REFERENCE, Body, Frame, Limits};

use super::{Outbound, WRITE_BATCH, WRITE_MOST, write_loop};
use crate::ServerConfig;
use crate::registry::Connections;

/// A socket that takes every write whole, as TCP's `writev` does while there is room, and
/// records how many bytes each one carried.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<usize>>>);

impl Recorder {
    fn writes(&self) -> Vec<usize> {
        self.0.lock().map(|w| w.clone()).unwrap_or_default()
    }

    fn take(&self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        if let Ok(mut writes) = self.0.lock() {
            writes.push(n);
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.take(&[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.take(bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Queues `count` payloads of `size` bytes for one subscription, lets a writer deliver them
/// to a [`Recorder`], and gives the size of each write.
async fn writes_for(count: usize, size: usize) -> Vec<usize> {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let options = SubscribeOptions::new("batch").capacity(count).max_bytes(count * (size + 1024));
    let subscription = Box::new(broker.messages(options).expect("subscribe"));
    for _ in 0..count {
        broker.publish_bytes("batch", Bytes::from(vec![7; size])).expect("publish");
    }
    let (control, outbound) = mpsc::channel(4);
    let reply = Frame::new(1, Body::Ok);
    let subscribed = Outbound::Subscribed { sub: 1, subscription, reply, retained: Vec::new() };
    control.send(subscribed).await.expect("the writer listens");
    let config = Arc::new(ServerConfig::default());
    let connections = Arc::new(Connections::default());
    let registered = Connections::register(
        &connections,
        SocketAddr::from(([127, 0, 0, 1], 1)),
        &CancellationToken::new(),
    );
    let (socket, gone) = (Recorder::default(), CancellationToken::new());
    let entry = Arc::clone(&registered.entry);
    let writer =
        tokio::spawn(write_loop(socket.clone(), outbound, config, Limits::default(), gone, entry));
    let payloads = count * size;
    for _ in 0..500 {
        if socket.writes().iter().sum::<usize>() >= payloads {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The reader hangs up: the writer flushes and ends.
    drop(control);
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer ends")
        .expect("no panic");
    let writes = socket.writes();
    assert!(writes.iter().sum::<usize>() > payloads, "every payload written: {writes:?}");
    writes
}

#[tokio::test]
async fn large_payloads_go_out_several_to_a_write_up_to_the_batch_in_all() {
    let writes = writes_for(16, 64 * 1024).await;
    // 16 of 64 KiB are 1 MiB: two or three writes of up to `WRITE_MOST` and a frame.
    assert!(writes.len() <= 3, "{} writes: {writes:?}", writes.len());
    assert!(writes.iter().all(|&n| n < WRITE_MOST + 64 * 1024 + 100), "{writes:?}");
    let writes = writes_for(8, BY_REFERENCE).await;
    assert_eq!(writes.len(), 1, "8 of 16 KiB go out in one write: {writes:?}");
}

#[tokio::test]
async fn small_payloads_are_copied_into_batches_of_at_most_the_frames_bound() {
    let writes = writes_for(256, 1024).await;
    assert!(writes.len() >= 4, "256 KiB of copies in batches of 64 KiB: {writes:?}");
    assert!(writes.iter().all(|&n| n < WRITE_BATCH + 1200), "{writes:?}");
}

/// A client that stopped reading: the socket takes nothing and never says it has room.
struct Stalled;

impl AsyncWrite for Stalled {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_write_that_stalls_past_the_idle_timeout_ends_the_connection() {
    let heartbeat = Duration::from_millis(100);
    let config = Arc::new(ServerConfig { heartbeat, ..ServerConfig::default() });
    let connections = Arc::new(Connections::default());
    let registered = Connections::register(
        &connections,
        SocketAddr::from(([127, 0, 0, 1], 1)),
        &CancellationToken::new(),
    );
    let (control, outbound) = mpsc::channel(4);
    control.send(Outbound::Frame(Frame::new(1, Body::Ok))).await.expect("the writer listens");
    let gone = CancellationToken::new();
    let entry = Arc::clone(&registered.entry);
    let started = std::time::Instant::now();
    let writer =
        tokio::spawn(write_loop(Stalled, outbound, config, Limits::default(), gone.clone(), entry));
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer gives up on the stalled client")
        .expect("no panic");
    assert!(gone.is_cancelled(), "the reader is told");
    // The idle timeout is three heartbeats; the control queue is still open.
    assert!(started.elapsed() >= heartbeat * 3, "not before the idle timeout");
    drop(control);
}
