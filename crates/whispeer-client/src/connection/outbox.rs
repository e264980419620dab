//! Publishes on their way to the connection task: each publishing task encodes its frame
//! straight into one shared buffer, and the connection task takes the whole buffer before a
//! write. No channel hop and no wake-up per message: the task is woken when the buffer stops
//! being empty.
//!
//! A large payload is not copied into the buffer on a transport that writes vectored: see
//! [`OutBuf`].
//!
//! Bounded by bytes ([`ClientOptions::publish_buffer_bytes`](crate::ClientOptions)): a publish
//! waits while the buffer holds more. A QoS 1 publish's acknowledgement waiter travels with its
//! frame: the outbox owns it while the frame is buffered, the connection task from the moment
//! it takes the buffer. What is buffered survives a lost connection and is sent on the next
//! one; when the connection task ends for good, the outbox closes and its waiters fail.
//!
//! Correlation ids of publishes have the top bit set; the connection task's own requests
//! (subscribe, flush) use ids below it, so the two never meet.

use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, oneshot};
use whispeer_proto::{EncodeError, Envelope, Frame, OutBuf, PlainHead, Qos};

use crate::ClientError;

/// Where a QoS 1 publish's acknowledgement goes.
pub(crate) enum AckWaiter {
    /// Told the answer, either way.
    Told(oneshot::Sender<Result<(), ClientError>>),
    /// Told only a refusal (a request's, whose task waits for its reply alone: an
    /// acknowledged request wakes nothing).
    Refusal(Box<dyn FnOnce(ClientError) + Send>),
}

impl AckWaiter {
    /// Tells the waiter the answer, or, for [`AckWaiter::Refusal`], only a refusal.
    pub(crate) fn send(self, answer: Result<(), ClientError>) {
        match (self, answer) {
            (Self::Told(waiter), answer) => drop(waiter.send(answer)),
            (Self::Refusal(tell), Err(err)) => tell(err),
            (Self::Refusal(_), Ok(())) => {}
        }
    }
}

impl std::fmt::Debug for AckWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Told(_) => "Told",
            Self::Refusal(_) => "Refusal",
        })
    }
}

/// The top bit marks a publish's correlation id.
pub(crate) const PUBLISH_BIT: u32 = 1 << 31;

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the connection task: the buffer is no longer empty.
    ready: Notify,
    /// Wakes publishers waiting for room.
    room: Notify,
    max_bytes: usize,
}

#[derive(Debug)]
struct State {
    buf: OutBuf,
    /// QoS 1 publishes in `buf`, by correlation id.
    acks: Vec<(u32, AckWaiter)>,
    next_correlation: u32,
    /// The peer's frame limit, from the current (or last) connection.
    max_frame_bytes: usize,
    /// Whether the connection writes vectored: large payloads then travel by reference.
    vectored: bool,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize, max_frame_bytes: usize) -> Self {
        let state = State {
            buf: OutBuf::default(),
            acks: Vec::new(),
            next_correlation: 0,
            max_frame_bytes,
            vectored: false,
            closed: false,
        };
        // At least one frame at a time, whatever the option says.
        let max_bytes = max_bytes.max(1);
        Self { state: Mutex::new(state), ready: Notify::new(), room: Notify::new(), max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes a publish into the buffer, waiting while it is full.
    ///
    /// # Errors
    /// [`ClientError::Closed`] once the connection task has ended; an envelope the peer's
    /// frame limit refuses.
    pub(crate) async fn publish(
        &self,
        qos: Qos,
        envelope: Envelope,
        mut ack: Option<AckWaiter>,
    ) -> Result<(), ClientError> {
        loop {
            if self.try_put(qos, &envelope, &mut ack)? {
                return Ok(());
            }
            // Full: wait for room, registered before looking again so no wake-up is missed
            // (and only here: registering costs more than encoding a small frame).
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let full = {
                let state = self.lock();
                !state.closed && state.buf.len() >= self.max_bytes
            };
            if full {
                room.await;
            }
        }
    }

    /// Encodes a QoS 0 publish into the buffer if it has room, without waiting: `Ok(false)`
    /// when it is full (then [`Outbox::publish`] waits for room).
    ///
    /// # Errors
    /// As [`Outbox::publish`].
    pub(crate) fn try_publish(&self, envelope: &Envelope) -> Result<bool, ClientError> {
        self.try_put(Qos::AtMostOnce, envelope, &mut None)
    }

    /// [`Outbox::try_publish`] of a message without headers given by its parts, where the
    /// publisher built no envelope (nothing seals its payload).
    ///
    /// # Errors
    /// As [`Outbox::publish`].
    pub(crate) fn try_publish_plain(
        &self,
        head: &PlainHead<'_>,
        payload: &Bytes,
    ) -> Result<bool, ClientError> {
        let encode = |buf: &mut BytesMut, correlation, max| {
            Frame::encode_plain_publish_head(buf, correlation, head, max)
        };
        self.try_encode(encode, payload, &mut None)
    }

    /// Encodes the publish if the buffer has room (taking `ack` along), straight from the
    /// envelope: its head, then its payload (see `OutBuf::put_payload`).
    fn try_put(
        &self,
        qos: Qos,
        envelope: &Envelope,
        ack: &mut Option<AckWaiter>,
    ) -> Result<bool, ClientError> {
        let encode = |buf: &mut BytesMut, correlation, max| {
            Frame::encode_publish_head(buf, correlation, qos, envelope, max)
        };
        self.try_encode(encode, &envelope.payload, ack)
    }

    /// Encodes a publish's head with `encode` (given the buffer, the correlation id and the
    /// peer's frame limit), then its payload, if the buffer has room.
    fn try_encode(
        &self,
        encode: impl FnOnce(&mut BytesMut, u32, usize) -> Result<(), EncodeError>,
        payload: &Bytes,
        ack: &mut Option<AckWaiter>,
    ) -> Result<bool, ClientError> {
        let mut state = self.lock();
        if state.closed {
            return Err(ClientError::Closed);
        }
        if state.buf.len() >= self.max_bytes {
            return Ok(false);
        }
        let was_empty = state.buf.is_empty();
        let correlation = PUBLISH_BIT | state.next_correlation;
        let State { buf, max_frame_bytes, vectored, .. } = &mut *state;
        encode(buf.frames(), correlation, *max_frame_bytes)
            .map_err(|err| ClientError::Protocol(err.to_string()))?;
        buf.put_payload(payload, *vectored);
        state.next_correlation = (state.next_correlation + 1) & !PUBLISH_BIT;
        if let Some(ack) = ack.take() {
            state.acks.push((correlation, ack));
        }
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(true)
    }

    /// Waits until the buffer may hold something (a spurious wake finds it empty).
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves what is buffered to the end of `out`, and its acknowledgement waiters to
    /// `pending`.
    pub(crate) fn take_into(&self, out: &mut OutBuf, mut pending: impl FnMut(u32, AckWaiter)) {
        let mut state = self.lock();
        if state.buf.is_empty() {
            return;
        }
        out.append(&mut state.buf);
        for (correlation, ack) in state.acks.drain(..) {
            pending(correlation, ack);
        }
        drop(state);
        self.room.notify_waiters();
    }

    /// A new connection's frame limit, and whether it writes vectored.
    pub(crate) fn set_connection(&self, max_frame_bytes: usize, vectored: bool) {
        let mut state = self.lock();
        (state.max_frame_bytes, state.vectored) = (max_frame_bytes, vectored);
    }

    /// The connection task has ended: what is buffered is never sent; waiters fail.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.buf = OutBuf::default();
        for (_, ack) in state.acks.drain(..) {
            ack.send(Err(ClientError::Closed));
        }
        drop(state);
        self.room.notify_waiters();
    }
}

/// Whether a correlation id is a publish's.
pub(crate) fn is_publish(correlation: u32) -> bool {
    correlation & PUBLISH_BIT != 0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::{Buf, Bytes, BytesMut};
    use whispeer_proto::{BY_REFERENCE, Body, ContentType, Flags, Limits, MessageId, Topic};

    use super::*;

    fn envelope(n: u128, size: usize) -> Envelope {
        let topic = Topic::parse("t").unwrap();
        let flags = Flags::with_content(ContentType::Raw);
        Envelope::new(MessageId(n), topic, 0, flags, Bytes::from(vec![b'x'; size]))
    }

    fn ids(out: &mut OutBuf) -> Vec<u128> {
        let mut bytes = BytesMut::from(&out.copy_to_bytes(out.remaining())[..]);
        std::iter::from_fn(|| Frame::decode(&mut bytes, &Limits::default()).unwrap())
            .map(|frame| match frame.body {
                Body::Publish { envelope, .. } => envelope.id.0,
                other => panic!("not a publish: {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn publishes_are_taken_in_order_with_their_waiters() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        outbox.publish(Qos::AtMostOnce, envelope(1, 8), None).await.unwrap();
        let (ack, _acked) = oneshot::channel();
        outbox.publish(Qos::AtLeastOnce, envelope(2, 8), Some(AckWaiter::Told(ack))).await.unwrap();
        let mut out = OutBuf::default();
        let mut waiters = Vec::new();
        outbox.take_into(&mut out, |correlation, _| waiters.push(correlation));
        // Appended after what `out` holds already.
        outbox.publish(Qos::AtMostOnce, envelope(3, 8), None).await.unwrap();
        outbox.take_into(&mut out, |_, _| panic!("no waiter"));
        assert_eq!(ids(&mut out), [1, 2, 3]);
        assert_eq!(waiters.len(), 1);
        assert!(is_publish(waiters[0]));
    }

    #[tokio::test]
    async fn a_full_outbox_makes_publishers_wait_until_it_is_taken() {
        let outbox = Arc::new(Outbox::new(1000, usize::MAX));
        outbox.publish(Qos::AtMostOnce, envelope(1, 2000), None).await.unwrap();
        let waiting = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            async move { outbox.publish(Qos::AtMostOnce, envelope(2, 8), None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "over the bound, a publish waits");
        let mut out = OutBuf::default();
        outbox.take_into(&mut out, |_, _| {});
        waiting.await.unwrap().unwrap();
        outbox.take_into(&mut out, |_, _| {});
        assert_eq!(ids(&mut out), [1, 2]);
    }

    #[tokio::test]
    async fn a_zero_bound_still_takes_one_frame_at_a_time() {
        let outbox = Outbox::new(0, usize::MAX);
        outbox.publish(Qos::AtMostOnce, envelope(1, 8), None).await.unwrap();
        let second = outbox.publish(Qos::AtMostOnce, envelope(2, 8), None);
        let waited = tokio::time::timeout(Duration::from_millis(50), second).await;
        assert!(waited.is_err(), "the second waits for the first to be taken");
        let mut out = OutBuf::default();
        outbox.take_into(&mut out, |_, _| {});
        assert_eq!(ids(&mut out), [1]);
    }

    #[tokio::test]
    async fn closing_fails_waiters_and_later_publishes() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        let (ack, acked) = oneshot::channel();
        outbox.publish(Qos::AtLeastOnce, envelope(1, 8), Some(AckWaiter::Told(ack))).await.unwrap();
        outbox.close();
        assert!(matches!(acked.await.unwrap(), Err(ClientError::Closed)));
        let refused = outbox.publish(Qos::AtMostOnce, envelope(2, 8), None).await;
        assert!(matches!(refused, Err(ClientError::Closed)));
    }

    #[tokio::test]
    async fn a_frame_over_the_peer_limit_is_refused_to_its_publisher() {
        let outbox = Outbox::new(1 << 20, 100);
        let refused = outbox.publish(Qos::AtMostOnce, envelope(1, 200), None).await;
        assert!(matches!(refused, Err(ClientError::Protocol(_))), "{refused:?}");
        outbox.publish(Qos::AtMostOnce, envelope(2, 8), None).await.unwrap();
        let mut out = OutBuf::default();
        outbox.take_into(&mut out, |_, _| {});
        assert_eq!(ids(&mut out), [2], "nothing of the refused frame is left");
    }

    /// Whether a chunk `out` would write starts where `payload`'s bytes are.
    fn shares(out: &OutBuf, payload: &Bytes) -> bool {
        let mut slices = [std::io::IoSlice::new(&[]); 8];
        let n = out.chunks_vectored(&mut slices);
        slices[..n].iter().any(|s| s.as_ptr() == payload.as_ptr())
    }

    #[tokio::test]
    async fn large_payloads_travel_by_reference_on_a_vectored_connection_only() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        let (small, large) = (envelope(1, 8), envelope(2, BY_REFERENCE));
        let payload = large.payload.clone();
        for vectored in [false, true] {
            outbox.set_connection(usize::MAX, vectored);
            outbox.publish(Qos::AtMostOnce, small.clone(), None).await.unwrap();
            outbox.publish(Qos::AtMostOnce, large.clone(), None).await.unwrap();
            outbox.publish(Qos::AtMostOnce, envelope(3, 8), None).await.unwrap();
            let mut out = OutBuf::default();
            outbox.take_into(&mut out, |_, _| {});
            assert_eq!(shares(&out, &payload), vectored, "by reference when vectored");
            assert_eq!(ids(&mut out), [1, 2, 3]);
        }
    }
}
