//! A connection's writer: the one future that writes to the socket, driven by its task and run
//! by the readers whose publishes woke it when they wait (`inline.rs`).
//!
//! It owns the connection's subscriptions and takes their messages straight off their broker
//! queues, round robin, together with the replies the reader sends it through a bounded control
//! queue, and writes them in batches: many frames per `write_all`. A reply to SUBSCRIBE travels
//! on the same queue as the subscription itself, so OK always precedes the first DELIVER.
//!
//! A large payload is not copied into the batch: on a socket that writes vectored (TCP), the
//! batch is cut before it and the payload's shared bytes go out in the same `writev`.
//!
//! It sends a PING every heartbeat, also while it is busy: the client's answer is what the
//! reader's idle timeout hears from a client that only receives.
//!
//! When the client reads slowly, the writer waits on its socket, the subscriptions' queues fill
//! and meet their slow-consumer policy (counted by the broker); when the socket accepts nothing
//! for the stall timeout, the writer gives up and the connection closes.

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;
use whispeer_proto::{Body, ErrorCode, Frame, Limits, OutBuf, PlainHead, TopicRef};

use super::ServerConfig;
use super::registry::Entry;
use super::traffic::{FlowCache, Traffic};
use whispeer_core::{Drained, Message, Subscription};

mod aliases;
pub(super) mod inline;
mod ready;
use aliases::Aliases;
use ready::{Held, Slots};

/// Bytes of frames gathered before a write, so one syscall carries many frames.
const WRITE_BATCH: usize = 64 * 1024;
/// Most bytes gathered before a write with the large payloads that go by reference (not
/// copied into the batch): several of them to one `writev`, not one each.
const WRITE_MOST: usize = 512 * 1024;
/// Messages taken from one subscription before moving to the next, for fairness.
const PER_SUBSCRIPTION: usize = 64;

/// What the reader hands the writer.
pub(super) enum Outbound {
    /// A frame to send as it is.
    Frame(Frame),
    /// Frames to send as they are, in order (PUBACKs that one sync confirmed).
    Frames(Vec<Frame>),
    /// A new subscription: send `reply`, then the retained messages it matches, then its
    /// messages.
    Subscribed {
        sub: u32,
        subscription: Box<Subscription<Message>>,
        reply: Frame,
        retained: Vec<Frame>,
    },
    /// Stop delivering `sub` (dropping it unsubscribes), then send `reply`.
    Unsubscribed { sub: u32, reply: Frame },
    /// The client reads compact deliveries (it said so in its HELLO): sent before the
    /// WELCOME that says they are on, so every delivery after it may be one.
    Compact,
}

/// Why the writer woke up.
enum Wake {
    /// Something was added to the buffer or the subscriptions changed.
    Work,
    /// The reader is gone: flush and stop.
    Closed,
}

struct Writer {
    subscriptions: Slots,
    /// The batch: frames, and large payloads by reference.
    out: OutBuf,
    /// Whether the socket writes vectored (else every payload is copied into the batch).
    vectored: bool,
    limits: Limits,
    traffic: Arc<Traffic>,
    /// The last topic this writer counted.
    flows: FlowCache,
    /// The connection's registry entry, which counts its deliveries.
    entry: Arc<Entry>,
    /// Deliveries in the batch, not yet in the entry's count (added before the batch is
    /// written: one atomic operation a write, not one a delivery).
    delivered: u64,
    /// The topics compact deliveries number, once the client asked for them.
    compact: Option<Aliases>,
}

impl Writer {
    /// Bytes waiting to be written.
    fn pending(&self) -> usize {
        self.out.len()
    }

    /// Whether the batch is full: `WRITE_BATCH` bytes of frames, or `WRITE_MOST` with the
    /// payloads by reference.
    fn full(&self) -> bool {
        self.out.copied() >= WRITE_BATCH || self.out.len() >= WRITE_MOST
    }

    fn encode(&mut self, frame: &Frame) {
        if let Err(err) = frame.encode(self.out.frames(), self.limits.max_frame_bytes) {
            tracing::warn!(%err, "frame not sent");
        }
    }

    /// Encodes a delivery: compact when the client reads them and the delivery needs nothing
    /// more (a first delivery, not from a topic's history, without headers). A QoS 1 delivery
    /// stays unacknowledged until the client's ACK reaches the reader.
    /// `number`: the number of the subscription's one topic, when it has one (see
    /// [`ready::Held`]), kept here once known.
    fn deliver(&mut self, sub: u32, message: &Message, attempt: u32, number: Number<'_>) {
        let offset = message.offset().unwrap_or(0);
        let (envelope, max) = (message.envelope(), self.limits.max_frame_bytes);
        let compact = attempt == 1 && offset == 0 && envelope.headers.is_empty();
        let encoded = match &mut self.compact {
            Some(aliases) if compact => {
                compact_head(self.out.frames(), aliases, sub, message, max, number)
            }
            _ => Frame::encode_deliver_head(self.out.frames(), sub, attempt, offset, envelope, max),
        };
        let encoded = encoded.map(|()| self.out.put_payload(&envelope.payload, self.vectored));
        match encoded {
            Ok(()) => {
                let bytes = message.envelope().payload.len();
                self.traffic.outbound(&mut self.flows, message.topic(), bytes);
                self.delivered += 1;
            }
            Err(err) => tracing::warn!(%err, sub, id = %message.id(), "delivery not sent"),
        }
    }

    fn apply(&mut self, outbound: Outbound) {
        match outbound {
            Outbound::Frame(frame) => self.encode(&frame),
            Outbound::Frames(frames) => frames.iter().for_each(|frame| self.encode(frame)),
            Outbound::Subscribed { sub, subscription, reply, retained } => {
                self.encode(&reply);
                retained.iter().for_each(|frame| self.encode(frame));
                self.subscriptions.add(sub, *subscription);
            }
            Outbound::Unsubscribed { sub, reply } => {
                self.subscriptions.remove(sub);
                self.encode(&reply);
            }
            Outbound::Compact => self.compact = Some(Aliases::default()),
        }
    }

    /// Takes what the ready subscriptions have, in the order they became ready and at most
    /// `PER_SUBSCRIPTION` from one before the next, until the batch is full or none is ready;
    /// first arms the subscriptions the last pass drained (see `ready.rs`).
    fn gather(&mut self) {
        self.arm();
        while !self.full() {
            let Some((slot, held)) = self.subscriptions.next_ready() else { return };
            self.take_from(slot, held, false);
        }
    }

    /// Polls the subscriptions drained since the last pass (registering their wakers), taking
    /// what they have meanwhile.
    fn arm(&mut self) {
        // Arming never puts a subscription back as unarmed: this ends.
        while let Some((slot, held)) = self.subscriptions.next_unarmed() {
            self.take_from(slot, held, true);
        }
    }

    /// Takes up to `PER_SUBSCRIPTION` deliveries from the subscription in `slot`, then gives it
    /// back: on the ready list if it may have more; armed if `arm` (polled with its waker, which
    /// the poll that found it empty registered); else taken without a waker, to be armed at
    /// the next pass.
    fn take_from(&mut self, slot: usize, mut held: Held, arm: bool) {
        let waker = held.waker();
        let mut cx = Context::from_waker(&waker);
        let (sub, mut taken) = (held.sub, 0);
        let exact = held.subscription.filter().is_exact();
        let (subscription, number) = (&mut held.subscription, &mut held.number);
        // Taken in one drain: the queue's bounds are given back once for all of them.
        let drained = subscription.drain_unsettled(arm.then_some(&mut cx), |message, attempt| {
            self.deliver(sub, &message, attempt, exact.then_some(&mut *number));
            taken += 1;
            taken < PER_SUBSCRIPTION && !self.full()
        });
        match drained {
            Drained::More => {
                // More may wait: after the others that are ready.
                held.again();
                self.subscriptions.put(slot, held);
            }
            Drained::Ended => {
                // Closed by the broker's `Disconnect` policy: tell the client.
                let message = format!("subscription {} closed: its queue overflowed", held.sub);
                let error = Body::Error { code: ErrorCode::QUEUE_FULL, message };
                self.encode(&Frame::new(0, error));
                self.subscriptions.drop_slot(slot);
            }
            Drained::Empty if arm => self.subscriptions.put(slot, held),
            Drained::Empty => self.subscriptions.put_unarmed(slot, held),
        }
    }

    /// Writes everything pending and flushes (which matters for message-based transports,
    /// WebSocket; on TCP it is free).
    async fn write(&mut self, socket: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        // Counted before the client can have it, so whoever it tells finds it counted.
        self.flows.settle();
        let delivered = std::mem::take(&mut self.delivered);
        if delivered > 0 {
            self.entry.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
        // Vectored where the socket is: the payloads by reference go in the same `writev`.
        socket.write_all_buf(&mut self.out).await?;
        socket.flush().await
    }

    /// Waits until the control queue or any subscription has something.
    fn poll_wake(
        &mut self,
        control: &mut mpsc::Receiver<Outbound>,
        cx: &mut Context<'_>,
    ) -> Poll<Wake> {
        match control.poll_recv(cx) {
            Poll::Ready(Some(outbound)) => {
                self.apply(outbound);
                return Poll::Ready(Wake::Work);
            }
            Poll::Ready(None) => return Poll::Ready(Wake::Closed),
            Poll::Pending => {}
        }
        let before = self.pending();
        self.arm();
        if self.pending() > before || self.subscriptions.poll_ready(cx) {
            return Poll::Ready(Wake::Work);
        }
        Poll::Pending
    }
}

/// Where a subscription to an exact topic keeps its topic's number (`None` for any other
/// subscription).
type Number<'a> = Option<&'a mut Option<u16>>;

/// Appends the head of a compact delivery of `message` to `sub`, its topic named as `aliases`
/// say (a number it defines counts once the head is appended), or by the number a subscription
/// to that one topic kept, which then needs no look at the topic. Out of the writer's loop, so
/// that the loop stays small enough for the compiler to copy the head's pieces in place.
#[inline(never)]
fn compact_head(
    frames: &mut bytes::BytesMut,
    aliases: &mut Aliases,
    sub: u32,
    message: &Message,
    max: usize,
    number: Number<'_>,
) -> Result<(), whispeer_proto::EncodeError> {
    let envelope = message.envelope();
    let kept = number.as_deref().copied().flatten();
    debug_assert!(kept.is_none_or(|n| aliases.names(&envelope.topic, n)), "{kept:?}");
    let named = match kept {
        Some(n) => TopicRef::Alias(n),
        None => aliases.name(&envelope.topic),
    };
    Frame::encode_compact_deliver_head(frames, sub, &PlainHead::of(envelope), named, max)?;
    aliases.sent(&envelope.topic, named);
    if let (Some(number), TopicRef::Alias(n) | TopicRef::Define(n)) = (number, named) {
        *number = Some(n);
    }
    Ok(())
}

/// Writes replies and deliveries until the reader hangs up (then flushes) or the socket fails
/// or stalls (then cancels `gone` so the reader stops too).
pub(super) async fn write_loop(
    mut socket: impl AsyncWrite + Unpin,
    mut control: mpsc::Receiver<Outbound>,
    config: Arc<ServerConfig>,
    limits: Limits,
    gone: CancellationToken,
    entry: Arc<Entry>,
) {
    let mut writer = Writer {
        subscriptions: Slots::default(),
        out: OutBuf::with_capacity(WRITE_BATCH),
        vectored: socket.is_write_vectored(),
        limits,
        traffic: Arc::clone(&config.traffic),
        flows: FlowCache::default(),
        entry,
        delivered: 0,
        compact: None,
    };
    let stall = config.idle_timeout();
    let mut open = true;
    // A PING every heartbeat, also while deliveries flow: a client that only receives answers
    // it, and its answer is what keeps the reader's idle timeout away.
    let mut next_ping = tokio::time::Instant::now() + config.heartbeat;
    // Armed once a heartbeat: a timer made each time the writer waits makes tokio wake the
    // thread that waits for I/O, to learn when to wake, most round trips.
    let ping_timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(ping_timer);
    loop {
        while open && !writer.full() {
            match control.try_recv() {
                Ok(outbound) => writer.apply(outbound),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if open {
            writer.gather();
        }
        if open && tokio::time::Instant::now() >= next_ping {
            writer.encode(&Frame::new(0, Body::Ping));
            next_ping = tokio::time::Instant::now() + config.heartbeat;
            ping_timer.as_mut().reset(next_ping);
        }
        if writer.pending() == 0 {
            if !open {
                break;
            }
            let woke = tokio::select! {
                biased;
                woke = poll_fn(|cx| writer.poll_wake(&mut control, cx)) => Some(woke),
                () = &mut ping_timer => None,
            };
            if let Some(Wake::Closed) = woke {
                open = false;
            }
            continue;
        }
        match tokio::time::timeout(stall, writer.write(&mut socket)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(%err, "write failed");
                break;
            }
            Err(_) => {
                tracing::warn!("client stopped reading; disconnecting");
                break;
            }
        }
    }
    gone.cancel();
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests;
