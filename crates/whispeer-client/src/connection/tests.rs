//! The connection task's QoS 1 bookkeeping, without a socket.

use bytes::Bytes;
use tokio::task::JoinHandle;
use whispeer_proto::{
    ContentType, Envelope, Filter, Flags, Limits, MessageId, PlainHead, Qos, RawDeliver, Topic,
    TopicCache, TopicRef,
};

use super::subs::RecentIds;
use super::*;

fn actor_with_sub(qos: Qos, max_count: usize) -> (Actor, Arc<Buffer>) {
    let (_commands, rx) = mpsc::channel(1);
    let (_settles, settled) = mpsc::unbounded_channel();
    let outbox = Arc::new(Outbox::new(1 << 20, usize::MAX));
    let options = ClientOptions::new("127.0.0.1:1");
    let mut actor = Actor::new(options, rx, settled, outbox, Arc::default());
    let buffer = Arc::new(Buffer::new(1 << 20, max_count));
    let filter = Filter::parse("t").unwrap();
    let spec = SubSpec { filter, qos, prefetch: 0, group: None, start: StartAt::Latest };
    actor.subscriptions.insert(1, Sub::new(spec, Arc::clone(&buffer)));
    (actor, buffer)
}

/// What the subscription can take now, run by run: `Some` ids, or `None` once nothing more
/// will come.
fn take_runs(buffer: &Buffer) -> Option<Vec<Vec<u128>>> {
    let mut taken = std::collections::VecDeque::new();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match buffer.poll_take(&mut taken, &mut cx) {
        std::task::Poll::Ready(false) => None,
        _ => Some(
            taken
                .iter_mut()
                .map(|run| std::iter::from_fn(|| run.next()).map(|d| d.id.0).collect())
                .collect(),
        ),
    }
}

/// What the subscription can take now: `Some` ids, or `None` once nothing more will come.
fn take(buffer: &Buffer) -> Option<Vec<u128>> {
    take_runs(buffer).map(|runs| runs.concat())
}

/// A DELIVER of message `id` to subscription `sub`, as the server sends it.
fn deliver_to(sub: u32, id: u128) -> BytesMut {
    let topic = Topic::parse("t").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let envelope = Envelope::new(MessageId(id), topic, 0, flags, Bytes::from_static(b"x"));
    let frame = Frame::new(0, Body::Deliver { sub, attempt: 2, offset: 0, envelope });
    let mut bytes = BytesMut::new();
    frame.encode(&mut bytes, usize::MAX).unwrap();
    bytes
}

/// A DELIVER of message `id` to subscription 1.
fn deliver(id: u128) -> BytesMut {
    deliver_to(1, id)
}

/// What one delivery of [`deliver`] weighs in a buffer.
fn weight() -> usize {
    let mut frames = deliver(0).freeze();
    Buffer::weight(RawDeliver::take_from(&mut frames).unwrap().envelope_len())
}

/// One read of DELIVERs, each `(subscription, message id)`.
fn read_of(deliveries: &[(u32, u128)]) -> BytesMut {
    let mut read = BytesMut::new();
    for &(sub, id) in deliveries {
        read.extend_from_slice(&deliver_to(sub, id));
    }
    read
}

impl Actor {
    /// Acks message `id` of subscription 1, remembering it; the connection is then lost before
    /// the ack is sent. Returns the emptied outgoing buffer.
    fn acked_then_lost(&mut self, id: u128) -> OutBuf {
        let mut out = OutBuf::default();
        self.settle(Settle { sub: 1, id: MessageId(id), requeue: None }, &mut out, usize::MAX)
            .unwrap();
        out.frames().clear();
        out
    }

    /// Reads `frames` as from the socket, every one of them a delivery.
    fn deliver(
        &mut self,
        mut frames: BytesMut,
        out: &mut OutBuf,
        max: usize,
    ) -> Result<(), ClientError> {
        self.take_deliveries(&mut frames, &Limits::default(), out, max)?;
        assert!(frames.is_empty(), "every delivery was read");
        Ok(())
    }
}

#[test]
fn a_redelivery_of_an_acked_message_is_acked_again_and_dropped() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtLeastOnce, 8);
    let mut out = actor.acked_then_lost(7);
    actor.deliver(deliver(7), &mut out, usize::MAX).unwrap();
    actor.deliver(deliver(8), &mut out, usize::MAX).unwrap();
    let frame = Frame::decode(out.frames(), &Limits::default()).unwrap().unwrap();
    assert_eq!(frame.body, Body::Ack { sub: 1, id: MessageId(7) });
    assert!(out.is_empty(), "nothing else was sent");
    assert_eq!(take(&buffer), Some(vec![]), "nothing is handed over before the read ends");
    actor.hand_over(&mut out, usize::MAX);
    assert_eq!(take(&buffer), Some(vec![8]), "7 was dropped");
    assert_eq!(buffer.duplicates.load(Ordering::Relaxed), 1);
}

#[test]
fn a_read_goes_to_each_subscription_in_runs_in_order_without_what_is_not_taken() {
    let (mut actor, first) = actor_with_sub(Qos::AtLeastOnce, 8);
    let second = Arc::new(Buffer::new(1 << 20, 8));
    let spec = actor.subscriptions[&1].spec.clone();
    actor.subscriptions.insert(2, Sub::new(spec, Arc::clone(&second)));
    let mut out = actor.acked_then_lost(3);
    let mut read = read_of(&[(1, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (9, 7), (1, 8)]);
    Frame::new(4, Body::Ping).encode(&mut read, usize::MAX).unwrap();
    read.extend_from_slice(&deliver(9));
    actor.take_deliveries(&mut read, &Limits::default(), &mut out, usize::MAX).unwrap();
    // It stops at the first other frame, which is left for the frame decoder.
    let ping = Frame::decode(&mut read, &Limits::default()).unwrap().unwrap();
    assert_eq!((ping.correlation, ping.body), (4, Body::Ping));
    assert_eq!(read, deliver(9));
    actor.hand_over(&mut out, usize::MAX);
    // 3 was acked already (acked again instead); 7 is for no subscription. Each ends a run.
    assert_eq!(take_runs(&first), Some(vec![vec![1, 2], vec![4], vec![8]]));
    assert_eq!(take_runs(&second), Some(vec![vec![5, 6]]));
    let ack = Frame::decode(out.frames(), &Limits::default()).unwrap().unwrap();
    assert_eq!(ack.body, Body::Ack { sub: 1, id: MessageId(3) });
    assert_eq!(first.duplicates.load(Ordering::Relaxed), 1);
}

/// A DELIVER_COMPACT of message `id` on `topic` to subscription `sub`, naming it as `named`.
fn compact_to(read: &mut BytesMut, sub: u32, id: u128, topic: &str, named: TopicRef) {
    let (topic, flags) = (Topic::parse(topic).unwrap(), Flags::with_content(ContentType::Raw));
    let envelope = Envelope::new(MessageId(id), topic, 0, flags, Bytes::from_static(b"x"));
    let head = PlainHead::of(&envelope);
    Frame::encode_compact_deliver_head(read, sub, &head, named, usize::MAX).unwrap();
    read.extend_from_slice(&envelope.payload);
}

/// The ids and topics the subscription can take now, each decoded as the subscription decodes
/// it (with the topic numbers its run carries); the room they took is given back.
fn take_topics(buffer: &Buffer) -> Vec<(u128, String)> {
    let mut taken = std::collections::VecDeque::new();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = buffer.poll_take(&mut taken, &mut cx);
    let mut out = Vec::new();
    for run in &mut taken {
        while let Some(delivery) = run.next() {
            let id = delivery.id.0;
            let limits = Limits::default();
            let envelope = delivery.decode(&limits, &mut TopicCache::default(), &run.aliases);
            out.push((id, envelope.unwrap().topic.as_str().to_owned()));
            buffer.release(0, 1);
        }
    }
    out
}

#[test]
fn a_topic_number_defined_by_a_delivery_dropped_still_names_the_later_ones() {
    // Room for one delivery at a time.
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 1);
    let mut out = OutBuf::default();
    let mut read = BytesMut::new();
    compact_to(&mut read, 1, 1, "t/1", TopicRef::Define(1));
    // Over the buffer: dropped.
    compact_to(&mut read, 1, 2, "t/2", TopicRef::Define(2));
    // For no subscription: dropped.
    compact_to(&mut read, 9, 3, "t/3", TopicRef::Define(3));
    actor.deliver(read, &mut out, usize::MAX).unwrap();
    actor.hand_over(&mut out, usize::MAX);
    assert_eq!(take_topics(&buffer), vec![(1, "t/1".to_owned())]);
    assert_eq!(buffer.dropped(), 1);
    for (id, alias, topic) in [(4, 3, "t/3"), (5, 2, "t/2"), (6, 1, "t/1")] {
        let mut read = BytesMut::new();
        compact_to(&mut read, 1, id, topic, TopicRef::Alias(alias));
        actor.deliver(read, &mut out, usize::MAX).unwrap();
        actor.hand_over(&mut out, usize::MAX);
        assert_eq!(take_topics(&buffer), vec![(id, topic.to_owned())]);
    }
    // A number defined out of order is the server's error: the connection is lost.
    let mut read = BytesMut::new();
    compact_to(&mut read, 1, 7, "t/7", TopicRef::Define(7));
    let err = actor.deliver(read, &mut out, usize::MAX).unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
}

#[test]
fn what_was_admitted_before_a_read_fails_is_still_staged() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtLeastOnce, 8);
    let mut out = actor.acked_then_lost(3);
    let mut read = read_of(&[(1, 1), (1, 2), (1, 3), (1, 4)]);
    // The ack owed for 3, a duplicate, does not fit a frame limit of 4 bytes: the read fails.
    assert!(actor.take_deliveries(&mut read, &Limits::default(), &mut out, 4).is_err());
    actor.hand_over(&mut out, usize::MAX);
    assert_eq!(take(&buffer), Some(vec![1, 2]));
}

#[test]
fn a_resubscription_resumes_after_the_last_offset_of_an_exact_topic_only() {
    let spec = |filter: &str, start| SubSpec {
        filter: Filter::parse(filter).unwrap(),
        qos: Qos::AtMostOnce,
        prefetch: 0,
        group: None,
        start,
    };
    let mut exact = spec("log", StartAt::Earliest);
    exact.resume(Some(41));
    assert_eq!(exact.start, StartAt::Offset(42));
    let mut nothing_yet = spec("log", StartAt::Earliest);
    nothing_yet.resume(None);
    assert_eq!(nothing_yet.start, StartAt::Latest, "replaying again would repeat");
    let mut wildcard = spec("log/#", StartAt::Earliest);
    wildcard.resume(Some(7));
    assert_eq!(wildcard.start, StartAt::Latest);
}

#[test]
fn recent_ids_forget_the_oldest_beyond_their_capacity() {
    let mut recent = RecentIds::default();
    for id in 0..5 {
        recent.remember(MessageId(id), 3);
    }
    recent.remember(MessageId(4), 3);
    let kept: Vec<u128> = recent.order.iter().map(|id| id.0).collect();
    assert_eq!(kept, [2, 3, 4]);
    assert!(!recent.set.contains(&MessageId(1)) && recent.set.len() == 3);
}

#[test]
fn a_subscription_buffer_is_bounded_by_bytes_and_counts_what_it_drops() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, usize::MAX);
    // Room for 1 MiB: each message (a 36-byte envelope) weighs 260, so 4032 fit and the rest
    // are dropped. The bytes stay counted until the subscription takes a message off the
    // buffer.
    let weight = weight();
    assert_eq!((weight, (1 << 20) / weight), (260, 4032));
    let mut out = OutBuf::default();
    for id in 0..4100 {
        actor.deliver(deliver(id), &mut out, usize::MAX).unwrap();
        actor.hand_over(&mut out, usize::MAX);
    }
    assert_eq!(buffer.dropped(), 68);
    buffer.release(weight, 1);
    actor.deliver(deliver(5000), &mut out, usize::MAX).unwrap();
    assert_eq!(buffer.dropped(), 68, "room given back is used again");
}

#[test]
fn a_subscription_buffer_is_bounded_by_count_too() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 3);
    let mut out = OutBuf::default();
    for id in 0..5 {
        actor.deliver(deliver(id), &mut out, usize::MAX).unwrap();
    }
    actor.hand_over(&mut out, usize::MAX);
    assert_eq!((take(&buffer), buffer.dropped()), (Some(vec![0, 1, 2]), 2));
}

#[test]
fn a_qos1_buffer_holds_its_prefetch_past_its_bounds_and_bounds_what_comes_beyond() {
    let (mut actor, _) = actor_with_sub(Qos::AtLeastOnce, 2);
    // Bounds of 2 messages and 1 KiB (three 260-byte messages), holding a prefetch of 6.
    let buffer = Arc::new(Buffer::new(1024, 2).holding(6));
    if let Some(sub) = actor.subscriptions.get_mut(&1) {
        sub.buffer = Arc::clone(&buffer);
    }
    let mut out = OutBuf::default();
    for id in 0..8 {
        actor.deliver(deliver(id), &mut out, usize::MAX).unwrap();
    }
    actor.hand_over(&mut out, usize::MAX);
    // Past the prefetch (redeliveries of what still waits here), the bounds apply again.
    assert_eq!((take(&buffer), buffer.dropped()), (Some((0..6).collect()), 2));
}

#[test]
fn room_given_back_during_a_read_is_seen_before_a_message_is_dropped() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 3);
    let mut out = OutBuf::default();
    for id in 0..3 {
        actor.deliver(deliver(id), &mut out, usize::MAX).unwrap();
    }
    actor.hand_over(&mut out, usize::MAX);
    // Full: the next read looks at the buffer's counts once and refuses message 3.
    actor.deliver(deliver(3), &mut out, usize::MAX).unwrap();
    assert_eq!(buffer.dropped(), 1);
    // The subscription takes all three and gives their room back in the same read.
    assert_eq!(take(&buffer), Some(vec![0, 1, 2]));
    buffer.release(3 * weight(), 3);
    actor.deliver(deliver(4), &mut out, usize::MAX).unwrap();
    actor.hand_over(&mut out, usize::MAX);
    assert_eq!(
        (take(&buffer), buffer.dropped()),
        (Some(vec![4]), 1),
        "not refused on stale counts"
    );
}

#[test]
fn a_dropped_subscription_is_unsubscribed_and_a_dropped_connection_ends_the_subscription() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 8);
    let mut out = OutBuf::default();
    actor.deliver(deliver(1), &mut out, usize::MAX).unwrap();
    actor.hand_over(&mut out, usize::MAX);
    actor.deliver(deliver(2), &mut out, usize::MAX).unwrap();
    // The connection task lets go (the client closed): what was handed over is still taken,
    // then the subscription ends.
    drop(actor);
    assert_eq!(take(&buffer), Some(vec![1]));
    assert_eq!(take(&buffer), None);

    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 8);
    buffer.receiver_gone.store(true, Ordering::Release);
    actor.deliver(deliver(3), &mut out, usize::MAX).unwrap();
    actor.hand_over(&mut out, usize::MAX);
    assert!(actor.subscriptions.is_empty());
    let frame = Frame::decode(out.frames(), &Limits::default()).unwrap().unwrap();
    assert_eq!(frame.body, Body::Unsubscribe { sub: 1 });
}

/// A writer that counts the writes that carried bytes.
struct CountingWriter {
    inner: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    writes: Arc<AtomicU64>,
}

impl tokio::io::AsyncWrite for CountingWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers every PUBLISH with its PUBACK, all those of one read in one write.
async fn acknowledge_all(mut server: tokio::io::DuplexStream) {
    let (mut buf, mut replies) = (BytesMut::new(), BytesMut::new());
    while server.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
        while let Ok(Some(frame)) = Frame::decode(&mut buf, &Limits::default()) {
            if let Body::Publish { .. } = frame.body {
                let puback = Frame::new(frame.correlation, Body::PubAck);
                puback.encode(&mut replies, usize::MAX).unwrap();
            }
        }
        if server.write_all_buf(&mut replies).await.is_err() {
            return;
        }
    }
}

/// Starts a connection task over an in-memory stream whose peer acknowledges every publish;
/// gives its outbox, the count of its writes and its command channel (the task ends when that
/// closes).
fn counted_connection() -> (Arc<Outbox>, Arc<AtomicU64>, mpsc::Sender<Command>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    tokio::spawn(acknowledge_all(server));
    let (reader, writer) = tokio::io::split(client);
    let writes = Arc::new(AtomicU64::new(0));
    let writer = CountingWriter { inner: writer, writes: Arc::clone(&writes) };
    let established = Established {
        node: 0,
        reader: Box::new(reader),
        writer: Box::new(writer),
        leftover: BytesMut::new(),
        heartbeat: std::time::Duration::from_secs(60),
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
        compact_publish: false,
    };
    let (commands, rx) = mpsc::channel(1);
    let (_settles, settled) = mpsc::unbounded_channel();
    let outbox = Arc::new(Outbox::new(1 << 20, 1 << 20));
    established.prepare(&outbox);
    let options = ClientOptions::new("127.0.0.1:1");
    let actor = Actor::new(options, rx, settled, Arc::clone(&outbox), Arc::default());
    tokio::spawn(actor.run(established));
    (outbox, writes, commands)
}

fn envelope() -> Envelope {
    let (topic, flags) = (Topic::parse("t").unwrap(), Flags::with_content(ContentType::Raw));
    Envelope::new(MessageId(1), topic, 0, flags, Bytes::from_static(b"x"))
}

const TASKS: usize = 64;
const ROUNDS: usize = 20;

/// Runs `TASKS` tasks, each publishing `ROUNDS` times with `publish`, and gives the count of
/// the connection's writes once all are done.
async fn writes_of_publishers<F>(publish: impl Fn(Arc<Outbox>) -> F) -> u64
where
    F: Future<Output = ()> + Send + 'static,
{
    let (outbox, writes, _commands) = counted_connection();
    let publishers: Vec<_> =
        (0..TASKS).map(|_| tokio::spawn(publish(Arc::clone(&outbox)))).collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    writes.load(Ordering::Relaxed)
}

/// Publishing tasks woken together by one read of acknowledgements publish again in one write,
/// not one write each (on one worker, where the runtime runs a task woken from it right after
/// the task that woke it).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn publishers_woken_together_share_a_write() {
    let writes = writes_of_publishers(|outbox| async move {
        for _ in 0..ROUNDS {
            let (ack, acked) = oneshot::channel();
            outbox.publish(Qos::AtLeastOnce, envelope(), Some(AckWaiter::Told(ack))).await.unwrap();
            acked.await.unwrap().unwrap();
        }
    })
    .await;
    // One write a publish without gathering; a few a round with it.
    assert!(writes <= (ROUNDS * 4) as u64, "{writes} writes for {ROUNDS} rounds of {TASKS}");
}

/// QoS 0 publishers that take turns on one worker (each yielding between publishes) share
/// writes while the connection streams: nothing wakes them but the runtime, so only the
/// streaming gathers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn publishers_taking_turns_share_writes_while_the_connection_streams() {
    let writes = writes_of_publishers(|outbox| async move {
        for _ in 0..ROUNDS {
            outbox.publish(Qos::AtMostOnce, envelope(), None).await.unwrap();
            tokio::task::yield_now().await;
        }
    })
    .await;
    // One write a publish (1,280) without gathering; about 30 here with it, on a busy machine too.
    assert!(writes <= (ROUNDS * 16) as u64, "{writes} writes for {ROUNDS} rounds of {TASKS}");
}

/// A task that reads the count of writes once `go` is sent: it runs only when the runtime
/// gets to it, after the connection task if that was woken first and wrote at once.
fn writes_seen_later(writes: &Arc<AtomicU64>) -> (oneshot::Sender<()>, JoinHandle<u64>) {
    let (go, wait) = oneshot::channel::<()>();
    let writes = Arc::clone(writes);
    let seen = tokio::spawn(async move {
        let _ = wait.await;
        writes.load(Ordering::Relaxed)
    });
    (go, seen)
}

/// A publish on a connection whose task woke no other task since its last write, and wrote
/// nothing lately, goes out at once: before a task made ready after it runs (gathering would
/// let that task run first).
#[tokio::test(flavor = "current_thread")]
async fn a_lone_publish_is_written_before_tasks_ready_after_it_run() {
    let (outbox, writes, _commands) = counted_connection();
    // The connection task starts and waits.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let before = writes.load(Ordering::Relaxed);
    let (go, seen) = writes_seen_later(&writes);
    tokio::task::yield_now().await;
    // The connection task is woken by the publish, the other task after it.
    outbox.publish(Qos::AtMostOnce, envelope(), None).await.unwrap();
    go.send(()).unwrap();
    assert_eq!(seen.await.unwrap(), before + 1, "written before the other task ran");
}

/// The next write waits for tasks the connection task woke only while one of them has not
/// been heard from: an answered publisher that has not published again, a subscription that
/// has not taken the deliveries handed to it.
#[test]
fn a_write_waits_only_for_woken_tasks_not_heard_from() {
    let (mut actor, buffer) = actor_with_sub(Qos::AtMostOnce, 8);
    let wait = |actor: &Actor| actor.woken.wait(&actor.subscriptions);
    assert!(!wait(&actor), "nobody was woken");
    actor.woken.answered();
    actor.woken.answered();
    actor.woken.taken(1);
    assert!(wait(&actor), "one answered publisher has not published again");
    actor.woken.taken(1);
    assert!(!wait(&actor), "both published again");
    let mut out = OutBuf::default();
    actor.deliver(deliver(1), &mut out, usize::MAX).unwrap();
    actor.hand_over(&mut out, usize::MAX);
    assert!(wait(&actor), "the subscription has not taken its delivery");
    assert_eq!(take(&buffer), Some(vec![1]));
    assert!(!wait(&actor), "the subscription took it");
    actor.woken.replied();
    assert!(wait(&actor), "a flush answered a moment ago");
}

/// A publisher that publishes again once its acknowledgement came (one in flight, pipelined)
/// is not waited for: its publish is written before a task made ready after it runs.
#[tokio::test(flavor = "current_thread")]
async fn a_publish_after_its_own_acknowledgement_is_written_at_once() {
    let (outbox, writes, _commands) = counted_connection();
    let (ack, acked) = oneshot::channel();
    outbox.publish(Qos::AtLeastOnce, envelope(), Some(AckWaiter::Told(ack))).await.unwrap();
    acked.await.unwrap().unwrap();
    // Past the streaming rule's moment since the first write.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let before = writes.load(Ordering::Relaxed);
    let (go, seen) = writes_seen_later(&writes);
    tokio::task::yield_now().await;
    let (ack, _acked) = oneshot::channel();
    outbox.publish(Qos::AtLeastOnce, envelope(), Some(AckWaiter::Told(ack))).await.unwrap();
    go.send(()).unwrap();
    assert_eq!(seen.await.unwrap(), before + 1, "written before the other task ran");
}
