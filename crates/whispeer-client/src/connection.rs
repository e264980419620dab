//! The connection task: one owner for the socket, fed by a closed set of commands.
//!
//! ```text
//! Client handles ──Command──▶ Actor ──frames──▶ socket
//!                                   ◀─frames── socket ──Deliver──▶ subscription channels
//! ```
//!
//! Publishes skip the command queue: publishing tasks encode them into a shared outbox
//! ([`outbox`]), which the actor takes whole before a write. Other writes are batched too: the
//! actor drains every waiting command into the same buffer before writing, and before writing
//! publishes or acks it lets the other ready tasks run once while tasks it woke have not been
//! heard from, so that publishers woken together share one write (`Actor::gather`, [`woken`]).
//! Replies are matched to requests by correlation id. When the socket fails, pending requests
//! fail with `Disconnected`; with reconnection on, the actor connects again with exponential
//! backoff and re-subscribes every live subscription under its old id (and group). With
//! failover nodes, the first retry goes to the same node and each next one to the next node in
//! turn; the backoff grows after each round of them all.
//!
//! QoS 1: acks and nacks come from deliveries through their own channel (unbounded, but holding
//! at most what the server let this client have unacknowledged: its prefetch per
//! subscription). Each subscription remembers the ids it acked lately; a redelivery of one of
//! them (its ack was lost with a connection) is acked again and not handed over.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until};
use whispeer_proto::{Body, Frame, OutBuf, ReadPool, StartAt, TopicAliases, TopicCache};

use handshake::handshake;
pub(crate) use handshake::{Established, connect_any};
pub(crate) use outbox::{AckWaiter, Outbox};
use requests::Requests;
use subs::Sub;
pub(crate) use subs::{Buffer, Run, Settle, SubSpec};
use woken::Woken;

use crate::transport::Writer;
use crate::{ClientError, ClientOptions};

/// Maps keyed by the ids this client chose (subscriptions, correlations), looked up for every
/// delivery and reply: foldhash rather than SipHash.
type Map<V> = HashMap<u32, V, foldhash::fast::RandomState>;

/// Bytes buffered for writing before the actor stops taking commands.
const HIGH_WATER: usize = 256 * 1024;
/// Commands taken per wake-up before writing.
const BATCH: usize = 256;

/// What a client handle asks of the connection task.
pub(crate) enum Command {
    Subscribe {
        spec: SubSpec,
        buffer: Arc<Buffer>,
        reply: oneshot::Sender<Result<u32, ClientError>>,
    },
    Unsubscribe {
        sub: u32,
    },
    Flush {
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Close,
}

/// A request waiting for its reply.
enum Pending {
    Ack(AckWaiter),
    Subscribed { sub: u32, reply: oneshot::Sender<Result<u32, ClientError>> },
    Resubscribed { sub: u32 },
    Flush(oneshot::Sender<Result<(), ClientError>>),
}

/// Writes what is buffered and flushes; `unflushed` says whether a write awaits its flush, so a
/// cancelled flush is retried even when nothing new is buffered.
async fn write_and_flush(
    writer: &mut Writer,
    out: &mut OutBuf,
    unflushed: &mut bool,
) -> std::io::Result<usize> {
    *unflushed = true;
    let written = if out.is_empty() { 1 } else { writer.write_buf(out).await? };
    writer.flush().await?;
    *unflushed = false;
    Ok(written)
}

fn encode(frame: &Frame, out: &mut BytesMut, max: usize) -> Result<(), ClientError> {
    frame.encode(out, max).map_err(|err| ClientError::Protocol(err.to_string()))
}

/// What the connection task counts, read through `Client::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Connections established after the first.
    pub(crate) reconnects: AtomicU64,
    /// QoS 0 publishes the server answered with an error (nothing waits for their answer).
    pub(crate) refused_publishes: AtomicU64,
}

/// Why serving one connection stopped.
enum Ended {
    /// Every handle is gone, or `close` was called.
    Closed,
    /// The connection failed.
    Lost(ClientError),
}

pub(crate) struct Actor {
    options: ClientOptions,
    commands: mpsc::Receiver<Command>,
    settles: mpsc::UnboundedReceiver<Settle>,
    outbox: Arc<Outbox>,
    counters: Arc<Counters>,
    subscriptions: Map<Sub>,
    /// Subscriptions with deliveries staged in the current read.
    staged: Vec<u32>,
    pending: Requests,
    next_sub: u32,
    next_correlation: u32,
    /// The address index of the current (or last) connection.
    node: usize,
    /// Whom this task woke since its last write, and when that was: see `gather`.
    woken: Woken,
    /// The topics the current connection's compact deliveries numbered (each connection
    /// numbers its own, from none).
    aliases: TopicAliases,
}

impl Actor {
    pub(crate) fn new(
        options: ClientOptions,
        commands: mpsc::Receiver<Command>,
        settles: mpsc::UnboundedReceiver<Settle>,
        outbox: Arc<Outbox>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            options,
            commands,
            settles,
            outbox,
            counters,
            subscriptions: Map::default(),
            staged: Vec::new(),
            pending: Requests::default(),
            next_sub: 1,
            next_correlation: 100,
            node: 0,
            woken: Woken::default(),
            aliases: TopicAliases::default(),
        }
    }

    /// A correlation id for the actor's own requests: from 100 up, below the publishes' ids.
    fn correlation(&mut self) -> u32 {
        self.next_correlation = self.next_correlation.wrapping_add(1);
        if self.next_correlation < 100 || outbox::is_publish(self.next_correlation) {
            self.next_correlation = 100;
        }
        self.next_correlation
    }

    /// Moves the outbox's publishes to `out`, taking over their acknowledgement waiters.
    fn take_publishes(&mut self, out: &mut OutBuf) {
        let (pending, mut taken) = (&mut self.pending, 0);
        self.outbox.take_into(out, |correlation, ack| {
            pending.insert(correlation, Pending::Ack(ack));
            taken += 1;
        });
        self.woken.taken(taken);
    }

    pub(crate) async fn run(mut self, first: Established) {
        self.serve_all(first).await;
        self.outbox.close();
    }

    async fn serve_all(&mut self, first: Established) {
        self.node = first.node;
        let (mut connection, mut prepared) = (first, true);
        loop {
            let ended = self.serve(connection, prepared).await;
            prepared = false;
            // Deliveries read before the connection failed (a bad frame after them, say) still
            // reach their subscriptions; unsubscribes for gone ones have no connection to go to.
            self.hand_over(&mut OutBuf::default(), usize::MAX);
            for pending in self.pending.drain() {
                fail(pending, ClientError::Disconnected);
            }
            match ended {
                Ended::Closed => return,
                Ended::Lost(err) if !self.options.reconnect => {
                    tracing::warn!(%err, "connection lost");
                    return;
                }
                Ended::Lost(err) => tracing::warn!(%err, "connection lost; reconnecting"),
            }
            match self.reconnect().await {
                Some(established) => {
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    connection = established;
                }
                None => return,
            }
        }
    }

    /// Tries to connect until it works or every handle is gone: the same node first, then
    /// each next node in turn, the wait doubling after every round.
    async fn reconnect(&mut self) -> Option<Established> {
        let (mut delay, max) = self.options.backoff;
        let nodes = self.options.addresses().count().max(1);
        let mut attempt = 0;
        loop {
            if self.commands.is_closed() {
                return None;
            }
            // Up to a quarter of jitter, so many clients do not reconnect in lockstep.
            let jitter = delay.mul_f64(f64::from(getrandom::u32().unwrap_or(0) % 256) / 1024.0);
            sleep(delay + jitter).await;
            let node = (self.node + attempt) % nodes;
            match handshake(&self.options, node).await {
                Ok(established) => {
                    let addr = self.options.addresses().nth(node).unwrap_or_default();
                    tracing::info!(addr, "reconnected");
                    return Some(established);
                }
                Err(err) => tracing::debug!(%err, "reconnect failed"),
            }
            attempt += 1;
            if attempt % nodes == 0 {
                delay = (delay * 2).min(max);
            }
        }
    }

    /// Serves one connection; `prepared`, the outbox was set for it
    /// ([`Established::prepare`]) before anything was published on it.
    async fn serve(&mut self, established: Established, prepared: bool) -> Ended {
        // Offsets may be counted per node: after moving to another one, subscriptions start
        // with new messages rather than after an offset that means something else there —
        // unless the nodes share offsets.
        let same_node = established.node == self.node || self.options.shared_offsets;
        self.node = established.node;
        let Established {
            node: _,
            mut reader,
            mut writer,
            leftover: mut inbound,
            heartbeat,
            max_frame_bytes,
            compact_publish,
            ..
        } = established;
        if !prepared {
            self.outbox.set_connection(
                max_frame_bytes,
                writer.is_write_vectored(),
                compact_publish,
            );
        }
        let mut out = OutBuf::with_capacity(64 * 1024);
        let limits = self.options.limits.clone();
        let subs: Vec<(u32, Body)> = self
            .subscriptions
            .iter_mut()
            .map(|(s, sub)| {
                if sub.spec.start != StartAt::Latest || sub.last_offset.is_some() {
                    sub.spec.resume(sub.last_offset.filter(|_| same_node));
                    if !same_node {
                        sub.last_offset = None;
                    }
                }
                (*s, sub.spec.frame(*s))
            })
            .collect();
        for (sub, body) in subs {
            let correlation = self.correlation();
            self.pending.insert(correlation, Pending::Resubscribed { sub });
            let frame = Frame::new(correlation, body);
            if let Err(err) = encode(&frame, out.frames(), max_frame_bytes) {
                return Ended::Lost(err);
            }
        }
        // The server pings every heartbeat: three silent periods mean the connection is dead.
        let silence = heartbeat * 3;
        let mut deadline = Instant::now() + silence;
        // A PING of its own after a heartbeat without writing: a server that pings only while
        // its side is idle (whispeer's own did) hears from a client that only receives, and
        // does not cut it off after three heartbeats.
        let mut next_ping = Instant::now() + heartbeat;
        // One timer for both, armed at the earlier and moved only when it fires: a timer made
        // (or moved earlier) each turn makes tokio wake the thread that waits for I/O, to
        // learn when to wake, about once a round trip.
        let timer = sleep_until(deadline.min(next_ping));
        tokio::pin!(timer);
        let (mut unflushed, mut gathered) = (false, false);
        // Deliveries wait in their subscriptions' buffers before they are dropped: up to
        // eight read chunks of them can be in use while the reader goes on.
        let (mut topics, mut pool) = (TopicCache::default(), ReadPool::with_spares(8));
        self.aliases = TopicAliases::default();
        loop {
            loop {
                // Deliveries go to their subscriptions in runs, their envelopes decoded there;
                // any other frame is decoded here. (A DELIVER that `take_deliveries` left is
                // not whole yet, or not valid: decoding it says so.)
                if let Err(err) =
                    self.take_deliveries(&mut inbound, &limits, &mut out, max_frame_bytes)
                {
                    return Ended::Lost(err);
                }
                let raw = match Frame::split(&mut inbound, &limits) {
                    Ok(Some(raw)) => raw,
                    Ok(None) => break,
                    Err(err) => return Ended::Lost(ClientError::Protocol(err.to_string())),
                };
                let done = match raw.decode(&limits, &mut topics) {
                    Ok(frame) => self.dispatch(frame, &mut out, max_frame_bytes),
                    Err(err) => Err(ClientError::Protocol(err.to_string())),
                };
                if let Err(err) = done {
                    return Ended::Lost(err);
                }
            }
            self.hand_over(&mut out, max_frame_bytes);
            pool.reserve(&mut inbound);
            // Biased: take what is ready to read, then every queued command, and write only
            // when no command is waiting, so one write carries as many frames as possible.
            tokio::select! {
                biased;
                read = reader.read_buf(&mut inbound) => match read {
                    Ok(0) | Err(_) => return Ended::Lost(ClientError::Disconnected),
                    Ok(_) => deadline = Instant::now() + silence,
                },
                Some(settle) = self.settles.recv(), if out.len() < HIGH_WATER => {
                    if let Err(err) = self.settle(settle, &mut out, max_frame_bytes) {
                        return Ended::Lost(err);
                    }
                    if let Err(err) = self.drain_settles(&mut out, max_frame_bytes) {
                        return Ended::Lost(err);
                    }
                    if let Err(err) = self.gather(&mut gathered, &mut out, max_frame_bytes).await {
                        return Ended::Lost(err);
                    }
                }
                () = self.outbox.ready(), if out.len() < HIGH_WATER => {
                    self.take_publishes(&mut out);
                    if let Err(err) = self.gather(&mut gathered, &mut out, max_frame_bytes).await {
                        return Ended::Lost(err);
                    }
                }
                command = self.commands.recv(), if out.len() < HIGH_WATER => {
                    let Some(command) = command else { return self.finish(writer, out).await };
                    if self.command(command, &mut out, max_frame_bytes) {
                        return self.finish(writer, out).await;
                    }
                    for _ in 0..BATCH {
                        if out.len() >= HIGH_WATER {
                            break;
                        }
                        match self.commands.try_recv() {
                            Ok(command) => {
                                if self.command(command, &mut out, max_frame_bytes) {
                                    return self.finish(writer, out).await;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                // Flushing sends what a message-based transport (WebSocket) has queued; the
                // branch stays armed until a flush completes, even if one was cancelled.
                written = write_and_flush(&mut writer, &mut out, &mut unflushed), if !out.is_empty() || unflushed => {
                    if matches!(written, Ok(0) | Err(_)) {
                        return Ended::Lost(ClientError::Disconnected);
                    }
                    let now = Instant::now();
                    gathered = false;
                    self.woken.wrote(now);
                    next_ping = now + heartbeat;
                }
                // The server's silence, and this client's: each may have moved since the timer
                // was armed.
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ended::Lost(ClientError::Timeout(silence));
                    }
                    if now >= next_ping {
                        // Correlation 0: no request of this client's; the PONG is ignored.
                        if let Err(err) = encode(&Frame::new(0, Body::Ping), out.frames(), max_frame_bytes) {
                            return Ended::Lost(err);
                        }
                        next_ping = now + heartbeat;
                    }
                    timer.as_mut().reset(deadline.min(next_ping));
                }
            }
        }
    }

    /// Writes what is buffered, then closes.
    async fn finish(&mut self, mut writer: Writer, mut out: OutBuf) -> Ended {
        self.take_publishes(&mut out);
        let _ = writer.write_all_buf(&mut out).await;
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
        self.subscriptions.clear();
        Ended::Closed
    }

    /// Encodes a command; returns whether it asks to close.
    fn command(&mut self, command: Command, out: &mut OutBuf, max: usize) -> bool {
        match command {
            Command::Subscribe { spec, buffer, reply } => {
                let sub = self.next_sub;
                self.next_sub = self.next_sub.wrapping_add(1);
                let correlation = self.correlation();
                let frame = Frame::new(correlation, spec.frame(sub));
                match encode(&frame, out.frames(), max) {
                    Ok(()) => {
                        self.subscriptions.insert(sub, Sub::new(spec, buffer));
                        self.pending.insert(correlation, Pending::Subscribed { sub, reply });
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Command::Unsubscribe { sub } => self.unsubscribe(sub, out, max),
            Command::Flush { reply } => {
                // Publishes and acks given before the flush travel before its ping.
                self.take_publishes(out);
                while let Ok(settle) = self.settles.try_recv() {
                    if let Err(err) = self.settle(settle, out, max) {
                        tracing::warn!(%err, "ack not sent");
                    }
                }
                let correlation = self.correlation();
                match encode(&Frame::new(correlation, Body::Ping), out.frames(), max) {
                    Ok(()) => {
                        self.pending.insert(correlation, Pending::Flush(reply));
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Command::Close => return true,
        }
        false
    }

    /// Hands the deliveries of the last read to their subscriptions, one hand-over (and one
    /// wake-up) each; a subscription that was dropped is unsubscribed.
    fn hand_over(&mut self, out: &mut OutBuf, max: usize) {
        let mut gone = Vec::new();
        for sub in self.staged.drain(..) {
            let Some(subscription) = self.subscriptions.get_mut(&sub) else { continue };
            if subscription.buffer.receiver_gone.load(Ordering::Acquire) {
                gone.push(sub);
                continue;
            }
            subscription.buffer.put_all(&mut subscription.staged);
            self.woken.handed(sub);
        }
        for sub in gone {
            self.unsubscribe(sub, out, max);
        }
    }

    fn unsubscribe(&mut self, sub: u32, out: &mut OutBuf, max: usize) {
        if self.subscriptions.remove(&sub).is_some() {
            let correlation = self.correlation();
            let _ = encode(&Frame::new(correlation, Body::Unsubscribe { sub }), out.frames(), max);
        }
    }

    /// Encodes an ack or nack; an ack is remembered so that a redelivery of the same message
    /// is recognised.
    fn settle(&mut self, settle: Settle, out: &mut OutBuf, max: usize) -> Result<(), ClientError> {
        let Settle { sub, id, requeue } = settle;
        let Some(subscription) = self.subscriptions.get_mut(&sub) else { return Ok(()) };
        let body = match requeue {
            None => {
                subscription.acked.remember(id, self.options.dedup_ids);
                Body::Ack { sub, id }
            }
            Some(requeue) => Body::Nack { sub, id, requeue },
        };
        encode(&Frame::new(0, body), out.frames(), max)
    }

    /// Called after taking publishes or acks for the next write: once per write (`gathered`
    /// says whether it has since the last one), while tasks it woke have not been heard from
    /// ([`Woken::wait`]), it yields here, where no other branch can interrupt it, lets every
    /// other task ready on its worker run, and takes what they added: the write carries them
    /// all. Otherwise it writes at once.
    async fn gather(
        &mut self,
        gathered: &mut bool,
        out: &mut OutBuf,
        max: usize,
    ) -> Result<(), ClientError> {
        if std::mem::replace(gathered, true) || !self.woken.wait(&self.subscriptions) {
            return Ok(());
        }
        tokio::task::yield_now().await;
        self.drain_settles(out, max)?;
        self.take_publishes(out);
        Ok(())
    }

    /// Encodes every ack or nack waiting in the channel.
    fn drain_settles(&mut self, out: &mut OutBuf, max: usize) -> Result<(), ClientError> {
        while let Ok(settle) = self.settles.try_recv() {
            self.settle(settle, out, max)?;
        }
        Ok(())
    }

    /// Acts on one frame from the server other than a delivery.
    fn dispatch(&mut self, frame: Frame, out: &mut OutBuf, max: usize) -> Result<(), ClientError> {
        let correlation = frame.correlation;
        match frame.body {
            Body::Ping => encode(&Frame::new(correlation, Body::Pong), out.frames(), max)?,
            Body::Ok | Body::PubAck | Body::Pong => match self.pending.remove(correlation) {
                Some(Pending::Ack(ack)) => {
                    ack.send(Ok(()));
                    self.woken.answered();
                }
                Some(Pending::Flush(ack)) => {
                    let _ = ack.send(Ok(()));
                    self.woken.replied();
                }
                Some(Pending::Subscribed { sub, reply }) => {
                    let _ = reply.send(Ok(sub));
                    self.woken.replied();
                }
                Some(Pending::Resubscribed { .. }) | None => {}
            },
            Body::Error { code, message } => match self.pending.remove(correlation) {
                Some(Pending::Subscribed { sub, reply }) => {
                    self.subscriptions.remove(&sub);
                    let _ = reply.send(Err(ClientError::Server { code, message }));
                }
                Some(Pending::Resubscribed { sub }) => {
                    tracing::warn!(sub, %code, %message, "re-subscription refused");
                    self.subscriptions.remove(&sub);
                }
                Some(pending) => fail(pending, ClientError::Server { code, message }),
                // A QoS 0 publish's refusal: its publisher has moved on; counted.
                None if outbox::is_publish(correlation) => {
                    self.counters.refused_publishes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%code, %message, "publish refused");
                }
                None => tracing::warn!(%code, %message, "server reported an error"),
            },
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame from the server: {other:?}"
                )));
            }
        }
        Ok(())
    }
}

fn fail(pending: Pending, err: ClientError) {
    match pending {
        Pending::Ack(ack) => ack.send(Err(err)),
        Pending::Flush(reply) => drop(reply.send(Err(err))),
        Pending::Subscribed { reply, .. } => drop(reply.send(Err(err))),
        Pending::Resubscribed { .. } => {}
    }
}

mod deliveries;
mod handshake;
mod outbox;
mod requests;
mod subs;
#[cfg(test)]
mod tests;
mod woken;
