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

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use whispeer_proto::{BY_REFERENCE, Envelope, Frame, OutBuf, PlainHead, Qos};

use self::compact::Names;
use crate::ClientError;

mod compact;

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

/// A publish on its way into the buffer: given by its parts (QoS 0, no headers; its topic
/// not checked yet, and what checks it), or as an envelope.
#[derive(Clone, Copy)]
enum Publish<'a> {
    Plain(&'a PlainHead<'a>, TopicCheck),
    Envelope(Qos, &'a Envelope),
}

/// Checks that a text is a topic.
pub(crate) type TopicCheck = fn(&str) -> Result<(), ClientError>;

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
    /// Whether the connection's server reads compact publishes ([`compact`]).
    compact: bool,
    /// The topics numbered in `buf`.
    names: Names,
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
            compact: false,
            names: Names::default(),
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
    /// publisher built no envelope (nothing seals its payload). Its topic is checked with
    /// `check` unless it is the one a compact publish named last or numbered on this
    /// connection (checked then).
    ///
    /// # Errors
    /// As [`Outbox::publish`]; `check`'s refusal.
    pub(crate) fn try_publish_plain(
        &self,
        head: &PlainHead<'_>,
        payload: &Bytes,
        check: TopicCheck,
    ) -> Result<bool, ClientError> {
        self.try_encode(Publish::Plain(head, check), payload, &mut None)
    }

    /// Encodes the publish if the buffer has room (taking `ack` along), straight from the
    /// envelope: its head, then its payload (see `OutBuf::put_payload`).
    fn try_put(
        &self,
        qos: Qos,
        envelope: &Envelope,
        ack: &mut Option<AckWaiter>,
    ) -> Result<bool, ClientError> {
        self.try_encode(Publish::Envelope(qos, envelope), &envelope.payload, ack)
    }

    /// Encodes a publish's head, then its payload, if the buffer has room: a PUBLISH_COMPACT
    /// where the server reads them and the publish has no headers and a payload copied into
    /// the buffer, else a PUBLISH.
    fn try_encode(
        &self,
        publish: Publish<'_>,
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
        let State { buf, max_frame_bytes, vectored, compact, names, .. } = &mut *state;
        let compact = *compact && !(*vectored && payload.len() >= BY_REFERENCE);
        let (dst, max) = (buf.frames(), *max_frame_bytes);
        let encoded = match publish {
            Publish::Plain(head, check) if compact => {
                let topic = names.name(head.topic, check)?;
                Frame::encode_compact_publish_head(
                    dst,
                    correlation,
                    Qos::AtMostOnce,
                    head,
                    topic,
                    max,
                )
            }
            Publish::Envelope(qos, envelope) if compact && envelope.headers.is_empty() => {
                let head = PlainHead::of(envelope);
                // A topic already.
                let topic = names.name(head.topic, |_| Ok(()))?;
                Frame::encode_compact_publish_head(dst, correlation, qos, &head, topic, max)
            }
            Publish::Plain(head, check) => {
                check(head.topic)?;
                Frame::encode_plain_publish_head(dst, correlation, head, max)
            }
            Publish::Envelope(qos, envelope) => {
                Frame::encode_publish_head(dst, correlation, qos, envelope, max)
            }
        };
        if let Err(err) = encoded {
            // A number it may have defined was not sent: the next publishes define theirs again.
            names.forget();
            return Err(ClientError::Protocol(err.to_string()));
        }
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
        state.names.taken();
        for (correlation, ack) in state.acks.drain(..) {
            pending(correlation, ack);
        }
        drop(state);
        self.room.notify_waiters();
    }

    /// A new connection's frame limit, whether it writes vectored, and whether its server
    /// reads compact publishes. Compact publishes buffered for the last connection name
    /// numbers this one does not know: they are written back as PUBLISHes.
    pub(crate) fn set_connection(&self, max_frame_bytes: usize, vectored: bool, compact: bool) {
        let mut state = self.lock();
        let buffered = std::mem::take(&mut state.buf);
        state.buf = state.names.connected(buffered, vectored);
        (state.max_frame_bytes, state.vectored, state.compact) =
            (max_frame_bytes, vectored, compact);
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::{Buf, Bytes, BytesMut};
    use whispeer_proto::{
        BY_REFERENCE, Body, ContentType, Flags, Limits, MessageId, Topic, TopicCache,
    };

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

    fn envelope_to(topic: &str, n: u128) -> Envelope {
        let flags = Flags::with_content(ContentType::Raw);
        let payload = Bytes::from(vec![b'x'; 128]);
        Envelope::new(MessageId(n), Topic::parse(topic).unwrap(), 7, flags, payload)
    }

    /// Reads `out` as a server reads a connection (`topics` its numbers): each frame's type
    /// byte and correlation, and the publish it decodes to.
    fn read_as_a_server(out: &mut OutBuf, topics: &mut TopicCache) -> Vec<(u8, u32, Envelope)> {
        let mut bytes = BytesMut::from(&out.copy_to_bytes(out.remaining())[..]);
        let mut read = Vec::new();
        while let Some(raw) = Frame::split(&mut bytes, &Limits::default()).unwrap() {
            let (kind, correlation) = (raw.frame_type(), raw.correlation());
            let (_, envelope) = raw.publish(&Limits::default(), topics).unwrap().unwrap();
            read.push((kind, correlation, envelope));
        }
        read
    }

    /// Takes what the outbox holds.
    fn take(outbox: &Outbox) -> OutBuf {
        let mut out = OutBuf::default();
        outbox.take_into(&mut out, |_, _| {});
        out
    }

    #[tokio::test]
    async fn compact_publishes_name_the_numbers_their_connection_defined_and_no_other() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        outbox.set_connection(usize::MAX, true, true);
        // More topics than a connection numbers, each twice, and a plain publish among them.
        let topics: Vec<String> = (0..=compact::SLOTS).map(|i| format!("t/{i}")).collect();
        let mut sent = Vec::new();
        for (n, topic) in topics.iter().chain(&topics).enumerate() {
            let envelope = envelope_to(topic, n as u128);
            outbox.publish(Qos::AtMostOnce, envelope.clone(), None).await.unwrap();
            sent.push(envelope);
        }
        let head = PlainHead::of(&sent[0]);
        assert!(outbox.try_publish_plain(&head, &sent[0].payload, |_| Ok(())).unwrap());
        sent.push(sent[0].clone());
        let mut connection = TopicCache::default();
        let read = read_as_a_server(&mut take(&outbox), &mut connection);
        assert!(read.iter().all(|(kind, _, _)| *kind == 0x22), "all compact");
        assert_eq!(read.into_iter().map(|(_, _, e)| e).collect::<Vec<_>>(), sent);
        // A later batch on the same connection names the number defined before: 9 + 1 + 28
        // bytes and the payload.
        outbox.publish(Qos::AtMostOnce, sent[0].clone(), None).await.unwrap();
        let mut out = take(&outbox);
        assert_eq!(out.remaining(), 38 + 128);
        let read = read_as_a_server(&mut out, &mut connection);
        assert_eq!(read[0].2, sent[0]);
        // A new connection knows no number: the next publish defines it again.
        outbox.set_connection(usize::MAX, true, true);
        outbox.publish(Qos::AtMostOnce, sent[0].clone(), None).await.unwrap();
        let read = read_as_a_server(&mut take(&outbox), &mut TopicCache::default());
        assert_eq!(read[0].2, sent[0]);
    }

    #[tokio::test]
    async fn a_topic_is_checked_once_a_connection_and_a_refused_one_defines_nothing() {
        static CHECKED: AtomicUsize = AtomicUsize::new(0);
        fn check(topic: &str) -> Result<(), ClientError> {
            CHECKED.fetch_add(1, Ordering::Relaxed);
            crate::check_topic(topic)
        }
        let outbox = Outbox::new(1 << 20, usize::MAX);
        outbox.set_connection(usize::MAX, false, true);
        let sent = envelope_to("a/b", 1);
        let head = PlainHead::of(&sent);
        let bad = PlainHead { topic: "a/+", ..head };
        let refused = outbox.try_publish_plain(&bad, &sent.payload, check);
        assert!(matches!(refused, Err(ClientError::InvalidTopic(_))), "{refused:?}");
        for _ in 0..3 {
            assert!(outbox.try_publish_plain(&head, &sent.payload, check).unwrap());
        }
        // The refused topic and the first of the three.
        assert_eq!(CHECKED.load(Ordering::Relaxed), 2);
        let read = read_as_a_server(&mut take(&outbox), &mut TopicCache::default());
        assert_eq!(
            read.into_iter().map(|(_, _, e)| e).collect::<Vec<_>>(),
            [&sent; 3].map(Clone::clone)
        );
        // Without compact publishes, each is checked.
        outbox.set_connection(usize::MAX, false, false);
        assert!(outbox.try_publish_plain(&head, &sent.payload, check).unwrap());
        assert_eq!(CHECKED.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn headers_and_payloads_sent_by_reference_go_as_publishes() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        outbox.set_connection(usize::MAX, true, true);
        let mut with_header = envelope_to("a", 1);
        with_header.headers.insert("h", Bytes::from_static(b"v"));
        let large = envelope(2, BY_REFERENCE);
        let small = envelope_to("a", 3);
        for envelope in [&with_header, &large, &small] {
            outbox.publish(Qos::AtMostOnce, envelope.clone(), None).await.unwrap();
        }
        let mut out = OutBuf::default();
        outbox.take_into(&mut out, |_, _| {});
        let read = read_as_a_server(&mut out, &mut TopicCache::default());
        let kinds: Vec<u8> = read.iter().map(|(kind, _, _)| *kind).collect();
        assert_eq!(kinds, [0x20, 0x20, 0x22]);
        let ids: Vec<u128> = read.iter().map(|(_, _, e)| e.id.0).collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[tokio::test]
    async fn compact_publishes_buffered_when_a_connection_is_lost_go_to_the_next_as_publishes() {
        let outbox = Outbox::new(1 << 20, usize::MAX);
        outbox.set_connection(usize::MAX, false, true);
        // "a/b" numbered in a batch the last connection sent, "c" in the one buffered.
        outbox.publish(Qos::AtMostOnce, envelope_to("a/b", 0), None).await.unwrap();
        let _sent = take(&outbox);
        outbox.publish(Qos::AtMostOnce, envelope_to("a/b", 1), None).await.unwrap();
        let (ack, _acked) = oneshot::channel();
        let acked = Some(AckWaiter::Told(ack));
        outbox.publish(Qos::AtLeastOnce, envelope_to("a/b", 2), acked).await.unwrap();
        outbox.publish(Qos::AtMostOnce, envelope_to("c", 3), None).await.unwrap();
        outbox.publish(Qos::AtMostOnce, envelope_to("c", 5), None).await.unwrap();
        // The connection is lost before the batch is taken; the next server is older.
        outbox.set_connection(usize::MAX, false, false);
        outbox.publish(Qos::AtMostOnce, envelope_to("a/b", 4), None).await.unwrap();
        let mut out = OutBuf::default();
        let mut waiters = Vec::new();
        outbox.take_into(&mut out, |correlation, _| waiters.push(correlation));
        let mut bytes = BytesMut::from(&out.copy_to_bytes(out.remaining())[..]);
        let frames: Vec<Frame> =
            std::iter::from_fn(|| Frame::decode(&mut bytes, &Limits::default()).unwrap()).collect();
        let published: Vec<(u32, Qos, u128, String)> = frames
            .into_iter()
            .map(|frame| match frame.body {
                Body::Publish { qos, envelope } => {
                    (frame.correlation, qos, envelope.id.0, envelope.topic.as_str().to_string())
                }
                other => panic!("not a publish: {other:?}"),
            })
            .collect();
        let topics: Vec<&str> = published.iter().map(|p| p.3.as_str()).collect();
        assert_eq!(topics, ["a/b", "a/b", "c", "c", "a/b"]);
        assert_eq!(published.iter().map(|p| p.2).collect::<Vec<_>>(), [1, 2, 3, 5, 4]);
        // The QoS 1 publish keeps its correlation, which its waiter is known by.
        assert_eq!((published[1].0, published[1].1), (waiters[0], Qos::AtLeastOnce));
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
            outbox.set_connection(usize::MAX, vectored, false);
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
