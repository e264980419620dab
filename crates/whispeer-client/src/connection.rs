//! The connection task: one owner for the socket, fed by a closed set of commands.
//!
//! ```text
//! Client handles ──Command──▶ Actor ──frames──▶ socket
//!                                   ◀─frames── socket ──Deliver──▶ subscription channels
//! ```
//!
//! Writes are batched: the actor drains every waiting command into one buffer before writing.
//! Replies are matched to requests by correlation id. When the socket fails, pending requests
//! fail with `Disconnected`; with reconnection on, the actor connects again with exponential
//! backoff and re-subscribes every live subscription under its old id (and group).
//!
//! QoS 1: acks and nacks come from deliveries through their own channel (unbounded, but holding
//! at most what the server let this client have unacknowledged: its prefetch per
//! subscription). Each subscription remembers the ids it acked lately; a redelivery of one of
//! them (its ack was lost with a connection) is acked again and not handed over.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use whispeer_proto::{
    Body, Envelope, ErrorCode, Frame, Limits, PROTOCOL_VERSION, Qos, StartAt, reserve_for_read,
};

pub(crate) use subs::{Buffer, Incoming, Settle, SubSpec};
use subs::{RecentIds, Sub};

use crate::transport::{self, Reader, Writer};
use crate::{ClientError, ClientOptions};

/// Bytes buffered for writing before the actor stops taking commands.
const HIGH_WATER: usize = 256 * 1024;
/// Commands taken per wake-up before writing.
const BATCH: usize = 256;

/// What a client handle asks of the connection task.
pub(crate) enum Command {
    Publish {
        qos: Qos,
        envelope: Envelope,
        ack: Option<oneshot::Sender<Result<(), ClientError>>>,
    },
    Subscribe {
        spec: SubSpec,
        deliver: mpsc::Sender<Incoming>,
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
    Ack(oneshot::Sender<Result<(), ClientError>>),
    Subscribed { sub: u32, reply: oneshot::Sender<Result<u32, ClientError>> },
    Resubscribed { sub: u32 },
    Flush(oneshot::Sender<Result<(), ClientError>>),
}

/// A connection after the handshake.
pub(crate) struct Established {
    reader: Reader,
    writer: Writer,
    leftover: BytesMut,
    heartbeat: Duration,
    max_frame_bytes: usize,
    pub(crate) max_message_bytes: usize,
}

/// Connects, sends `Hello` (and `Auth`), and waits for `Welcome` (and the auth reply).
pub(crate) async fn handshake(options: &ClientOptions) -> Result<Established, ClientError> {
    let limit = options.connect_timeout;
    timeout(limit, handshake_inner(options)).await.map_err(|_| ClientError::Timeout(limit))?
}

async fn handshake_inner(options: &ClientOptions) -> Result<Established, ClientError> {
    let connect_error = |source| ClientError::Connect { addr: options.addr.clone(), source };
    let (mut reader, mut writer) =
        transport::open(&options.addr, options.tls.as_ref()).await.map_err(connect_error)?;
    let mut out = BytesMut::new();
    let hello =
        Body::Hello { version: PROTOCOL_VERSION, capabilities: 0, name: options.name.clone() };
    encode(&Frame::new(1, hello), &mut out, usize::MAX)?;
    if let Some(key) = &options.api_key {
        encode(
            &Frame::new(2, Body::Auth { key: key.clone().into_bytes().into() }),
            &mut out,
            usize::MAX,
        )?;
    }
    writer.write_all(&out).await.map_err(connect_error)?;
    writer.flush().await.map_err(connect_error)?;

    let mut buf = BytesMut::new();
    let mut welcome = None;
    let mut authed = options.api_key.is_none();
    while welcome.is_none() || !authed {
        let frame = read_frame(&mut reader, &mut buf, &options.limits).await?;
        match (frame.correlation, frame.body) {
            (
                1,
                Body::Welcome {
                    version,
                    capabilities,
                    max_frame_bytes,
                    max_message_bytes,
                    heartbeat_ms,
                    ..
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(ClientError::Protocol(format!("server speaks version {version}")));
                }
                if capabilities & 1 != 0 && options.api_key.is_none() {
                    let message = "the server requires an API key".to_string();
                    return Err(ClientError::Server { code: ErrorCode::UNAUTHENTICATED, message });
                }
                welcome =
                    Some((max_frame_bytes as usize, max_message_bytes as usize, heartbeat_ms));
            }
            (2, Body::Ok) => authed = true,
            (_, Body::Error { code, message }) => {
                return Err(ClientError::Server { code, message });
            }
            (_, Body::Ping) => {}
            (_, other) => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame during handshake: {other:?}"
                )));
            }
        }
    }
    let (max_frame_bytes, max_message_bytes, heartbeat_ms) = welcome.unwrap_or((0, 0, 0));
    Ok(Established {
        reader,
        writer,
        leftover: buf,
        heartbeat: Duration::from_millis(u64::from(heartbeat_ms).max(100)),
        max_frame_bytes,
        max_message_bytes,
    })
}

/// Whether `bytes` start like a TLS record (a handshake or an alert, TLS 1.0 to 1.3): what a
/// TLS server answers a plain client with, read as a frame's length it is absurdly large.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

async fn read_frame(
    stream: &mut Reader,
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Frame, ClientError> {
    loop {
        match Frame::decode(buf, limits) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(_) if looks_like_tls(buf) => {
                return Err(ClientError::Protocol(
                    "this server speaks TLS: use tls:// (or wss:// for WebSocket)".into(),
                ));
            }
            Err(err) => return Err(ClientError::Protocol(err.to_string())),
        }
        reserve_for_read(buf);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(_) => {}
            Err(_) => return Err(ClientError::Disconnected),
        }
    }
}

/// Writes what is buffered and flushes; `unflushed` says whether a write awaits its flush, so a
/// cancelled flush is retried even when nothing new is buffered.
async fn write_and_flush(
    writer: &mut Writer,
    out: &mut BytesMut,
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
    subscriptions: HashMap<u32, Sub>,
    pending: HashMap<u32, Pending>,
    next_sub: u32,
    next_correlation: u32,
}

impl Actor {
    pub(crate) fn new(
        options: ClientOptions,
        commands: mpsc::Receiver<Command>,
        settles: mpsc::UnboundedReceiver<Settle>,
    ) -> Self {
        Self {
            options,
            commands,
            settles,
            subscriptions: HashMap::new(),
            pending: HashMap::new(),
            next_sub: 1,
            next_correlation: 100,
        }
    }

    fn correlation(&mut self) -> u32 {
        self.next_correlation = self.next_correlation.wrapping_add(1).max(100);
        self.next_correlation
    }

    pub(crate) async fn run(mut self, first: Established) {
        let mut connection = first;
        loop {
            let ended = self.serve(connection).await;
            for (_, pending) in self.pending.drain() {
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
                Some(established) => connection = established,
                None => return,
            }
        }
    }

    /// Tries to connect until it works or every handle is gone.
    async fn reconnect(&mut self) -> Option<Established> {
        let (mut delay, max) = self.options.backoff;
        loop {
            if self.commands.is_closed() {
                return None;
            }
            // Up to a quarter of jitter, so many clients do not reconnect in lockstep.
            let jitter = delay.mul_f64(f64::from(getrandom::u32().unwrap_or(0) % 256) / 1024.0);
            sleep(delay + jitter).await;
            match handshake(&self.options).await {
                Ok(established) => {
                    tracing::info!(addr = %self.options.addr, "reconnected");
                    return Some(established);
                }
                Err(err) => tracing::debug!(%err, "reconnect failed"),
            }
            delay = (delay * 2).min(max);
        }
    }

    async fn serve(&mut self, established: Established) -> Ended {
        let Established {
            mut reader,
            mut writer,
            leftover: mut inbound,
            heartbeat,
            max_frame_bytes,
            ..
        } = established;
        let mut out = BytesMut::with_capacity(64 * 1024);
        let limits = self.options.limits.clone();
        let subs: Vec<(u32, Body)> = self
            .subscriptions
            .iter_mut()
            .map(|(s, sub)| {
                if sub.spec.start != StartAt::Latest || sub.last_offset.is_some() {
                    sub.spec.resume(sub.last_offset);
                }
                (*s, sub.spec.frame(*s))
            })
            .collect();
        for (sub, body) in subs {
            let correlation = self.correlation();
            self.pending.insert(correlation, Pending::Resubscribed { sub });
            let frame = Frame::new(correlation, body);
            if let Err(err) = encode(&frame, &mut out, max_frame_bytes) {
                return Ended::Lost(err);
            }
        }
        // The server pings every heartbeat: three silent periods mean the connection is dead.
        let silence = heartbeat * 3;
        let mut deadline = Instant::now() + silence;
        let mut unflushed = false;
        loop {
            while let Some(frame) = match Frame::decode(&mut inbound, &limits) {
                Ok(frame) => frame,
                Err(err) => return Ended::Lost(ClientError::Protocol(err.to_string())),
            } {
                if let Err(err) = self.dispatch(frame, &mut out, max_frame_bytes) {
                    return Ended::Lost(err);
                }
            }
            reserve_for_read(&mut inbound);
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
                    while let Ok(settle) = self.settles.try_recv() {
                        if let Err(err) = self.settle(settle, &mut out, max_frame_bytes) {
                            return Ended::Lost(err);
                        }
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
                }
                () = sleep_until(deadline) => {
                    return Ended::Lost(ClientError::Timeout(silence));
                }
            }
        }
    }

    /// Writes what is buffered, then closes.
    async fn finish(&mut self, mut writer: Writer, out: BytesMut) -> Ended {
        let _ = writer.write_all(&out).await;
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
        self.subscriptions.clear();
        Ended::Closed
    }

    /// Encodes a command; returns whether it asks to close.
    fn command(&mut self, command: Command, out: &mut BytesMut, max: usize) -> bool {
        match command {
            Command::Publish { qos, envelope, ack } => {
                let correlation = self.correlation();
                match encode(&Frame::new(correlation, Body::Publish { qos, envelope }), out, max) {
                    Ok(()) => {
                        if let Some(ack) = ack {
                            self.pending.insert(correlation, Pending::Ack(ack));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "publish not sent");
                        if let Some(ack) = ack {
                            let _ = ack.send(Err(err));
                        }
                    }
                }
            }
            Command::Subscribe { spec, deliver, buffer, reply } => {
                let sub = self.next_sub;
                self.next_sub = self.next_sub.wrapping_add(1);
                let correlation = self.correlation();
                let frame = Frame::new(correlation, spec.frame(sub));
                match encode(&frame, out, max) {
                    Ok(()) => {
                        let acked = RecentIds::default();
                        let last_offset = None;
                        let entry = Sub { spec, deliver, acked, buffer, last_offset };
                        self.subscriptions.insert(sub, entry);
                        self.pending.insert(correlation, Pending::Subscribed { sub, reply });
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Command::Unsubscribe { sub } => self.unsubscribe(sub, out, max),
            Command::Flush { reply } => {
                // Acks given before the flush travel before its ping.
                while let Ok(settle) = self.settles.try_recv() {
                    if let Err(err) = self.settle(settle, out, max) {
                        tracing::warn!(%err, "ack not sent");
                    }
                }
                let correlation = self.correlation();
                match encode(&Frame::new(correlation, Body::Ping), out, max) {
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

    fn unsubscribe(&mut self, sub: u32, out: &mut BytesMut, max: usize) {
        if self.subscriptions.remove(&sub).is_some() {
            let correlation = self.correlation();
            let _ = encode(&Frame::new(correlation, Body::Unsubscribe { sub }), out, max);
        }
    }

    /// Encodes an ack or nack; an ack is remembered so that a redelivery of the same message
    /// is recognised.
    fn settle(
        &mut self,
        settle: Settle,
        out: &mut BytesMut,
        max: usize,
    ) -> Result<(), ClientError> {
        let Settle { sub, id, requeue } = settle;
        let Some(subscription) = self.subscriptions.get_mut(&sub) else { return Ok(()) };
        let body = match requeue {
            None => {
                subscription.acked.remember(id, self.options.dedup_ids);
                Body::Ack { sub, id }
            }
            Some(requeue) => Body::Nack { sub, id, requeue },
        };
        encode(&Frame::new(0, body), out, max)
    }

    /// Acts on one frame from the server.
    fn dispatch(
        &mut self,
        frame: Frame,
        out: &mut BytesMut,
        max: usize,
    ) -> Result<(), ClientError> {
        let correlation = frame.correlation;
        match frame.body {
            Body::Deliver { sub, attempt, offset, envelope } => {
                let Some(subscription) = self.subscriptions.get_mut(&sub) else { return Ok(()) };
                if offset > 0 {
                    subscription.last_offset = Some(offset);
                }
                if subscription.acked.set.contains(&envelope.id) {
                    // Acked already; the ack was lost with a connection. Ack again, drop it.
                    subscription.buffer.duplicates.fetch_add(1, Ordering::Relaxed);
                    return encode(&Frame::new(0, Body::Ack { sub, id: envelope.id }), out, max);
                }
                let incoming = Incoming { envelope, attempt, offset };
                let weight = Buffer::weight(&incoming);
                // Under QoS 1 a dropped message stays unacknowledged and comes again after its
                // timeout.
                if !subscription.buffer.admit(weight) {
                    let id = incoming.envelope.id;
                    tracing::warn!(sub, %id, "subscription buffer full (bytes); message dropped");
                    return Ok(());
                }
                match subscription.deliver.try_send(incoming) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(incoming)) => {
                        subscription.buffer.release(weight);
                        subscription.buffer.count_drop();
                        let id = incoming.envelope.id;
                        tracing::warn!(sub, %id, "subscription buffer full; message dropped");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => self.unsubscribe(sub, out, max),
                }
            }
            Body::Ping => encode(&Frame::new(correlation, Body::Pong), out, max)?,
            Body::Ok | Body::PubAck | Body::Pong => match self.pending.remove(&correlation) {
                Some(Pending::Ack(ack)) | Some(Pending::Flush(ack)) => {
                    let _ = ack.send(Ok(()));
                }
                Some(Pending::Subscribed { sub, reply }) => {
                    let _ = reply.send(Ok(sub));
                }
                Some(Pending::Resubscribed { .. }) | None => {}
            },
            Body::Error { code, message } => match self.pending.remove(&correlation) {
                Some(Pending::Subscribed { sub, reply }) => {
                    self.subscriptions.remove(&sub);
                    let _ = reply.send(Err(ClientError::Server { code, message }));
                }
                Some(Pending::Resubscribed { sub }) => {
                    tracing::warn!(sub, %code, %message, "re-subscription refused");
                    self.subscriptions.remove(&sub);
                }
                Some(pending) => fail(pending, ClientError::Server { code, message }),
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
        Pending::Ack(reply) | Pending::Flush(reply) => {
            let _ = reply.send(Err(err));
        }
        Pending::Subscribed { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Pending::Resubscribed { .. } => {}
    }
}

mod subs;
#[cfg(test)]
mod tests;
