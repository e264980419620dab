//! A shared byte budget: its bound holds, and subscribers that read keep getting messages while
//! stalled ones hold the rest.

use std::time::Duration;

use bytes::Bytes;
use whispeer_proto::{ContentType, Envelope, Flags, MessageId};

use super::*;

fn message(n: u64, bytes: usize) -> Message {
    let topic = Topic::parse("t").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(vec![0u8; bytes]);
    let envelope = Envelope::new(MessageId(u128::from(n)), topic, 0, flags, payload);
    Message::new(envelope, 1, None, None)
}

fn queue(budget: &ByteBudget) -> Queue {
    let filter = Filter::parse("t").unwrap();
    Queue::new(filter, 1 << 20, usize::MAX, SlowConsumer::DropOldest)
        .with_budget(Some(budget.clone()))
}

#[test]
fn a_reader_keeps_its_messages_while_stalled_queues_hold_the_shared_budget() {
    // The server's budget: 64 messages of 1 KiB (and their 256-byte allowance); each
    // connection's budget could hold it all.
    let server = ByteBudget::new(64 * 1280);
    let stalled: Vec<Queue> =
        (0..8).map(|_| queue(&ByteBudget::within(64 * 1280, &server))).collect();
    let reader = queue(&ByteBudget::within(64 * 1280, &server));
    let mut read = 0;
    for n in 0..10_000 {
        for q in &stalled {
            q.push(message(n, 1024));
        }
        // The reader takes each message after the next one arrives: it always holds one or two.
        assert_eq!(reader.push(message(n, 1024)), Pushed::Queued, "message {n}");
        if n > 0 {
            read += usize::from(reader.try_pop().is_some());
        }
        assert!(server.used() <= server.max(), "{} > {}", server.used(), server.max());
    }
    assert_eq!(read, 9_999);
    assert_eq!(reader.counters.dropped_oldest.load(Ordering::Relaxed), 0);
    // The stalled queues hold seven eighths between them, evenly.
    let held: Vec<usize> = stalled.iter().map(Queue::len).collect();
    assert!(held.iter().all(|n| (5..=8).contains(n)), "{held:?}");
    drop(stalled);
    drop(reader);
    assert_eq!(server.used(), 0);
    assert_eq!(server.holders(), 0, "every holder gone");
}

#[test]
fn a_connections_budget_draws_on_the_servers_in_chunks_and_gives_all_back() {
    // A server's budget large enough for chunks: 4 MiB over one connection drawing on it is
    // 64 KiB ahead at most.
    let server = ByteBudget::new(4 << 20);
    let connection = ByteBudget::within(1 << 20, &server);
    let q = queue(&connection);
    let weight = 1024 + 256;
    let mut draws = 0;
    for n in 0..100 {
        let before = server.used();
        q.push(message(n, 1024));
        let (held, drawn) = (connection.used(), server.used());
        assert_eq!(held, (n as usize + 1) * weight);
        assert!(drawn >= held && drawn <= held + 2 * 64 * 1024, "{drawn} drawn for {held}");
        draws += usize::from(drawn != before);
    }
    // The server's word moved a few times for the hundred charges, not a hundred.
    assert!(draws <= 3, "{draws} draws");
    let mut taken = Unreleased::default();
    for _ in 0..60 {
        assert!(q.try_pop_taking(&mut taken).is_some());
    }
    q.give_back(&mut taken);
    let (held, drawn) = (connection.used(), server.used());
    assert_eq!(held, 40 * weight);
    assert!(drawn >= held && drawn <= held + 2 * 64 * 1024, "{drawn} drawn for {held}");
    while q.try_pop().is_some() {}
    assert_eq!((connection.used(), server.used(), server.holders()), (0, 0, 0), "all given back");
}

#[test]
fn budgets_drawing_in_chunks_from_many_threads_end_with_nothing_drawn() {
    // Room for all: nothing is dropped, so each consumer gets every message.
    let server = ByteBudget::new(1 << 30);
    let connections: Vec<ByteBudget> =
        (0..4).map(|_| ByteBudget::within(256 << 20, &server)).collect();
    let queues: Vec<Arc<Queue>> =
        connections.iter().flat_map(|c| [Arc::new(queue(c)), Arc::new(queue(c))]).collect();
    std::thread::scope(|scope| {
        for (i, q) in queues.iter().enumerate() {
            // A producer and a consumer a queue: charges and releases on one connection's
            // budget race from four threads.
            scope.spawn(move || {
                for n in 0..20_000 {
                    q.push(message(n, 16 * (i + 1)));
                }
            });
            scope.spawn(move || {
                let mut got = 0;
                while got < 20_000 {
                    match q.try_pop() {
                        Some(_) => got += 1,
                        None => std::thread::yield_now(),
                    }
                }
            });
        }
    });
    assert!(connections.iter().all(|c| c.used() == 0));
    // A race may leave a chunk drawn until the next charge; a budget gone gives it back.
    drop(queues);
    drop(connections);
    assert_eq!((server.used(), server.holders()), (0, 0));
}

fn plain(capacity: usize) -> Queue {
    Queue::new(Filter::parse("t").unwrap(), capacity, usize::MAX, SlowConsumer::DropOldest)
}

fn id(message: &Message) -> u128 {
    message.id().0
}

#[test]
fn messages_keep_their_order_across_a_consumers_batches() {
    let queue = plain(1024);
    (0..10).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
    let first: Vec<u128> = (0..3).filter_map(|_| queue.try_pop()).map(|m| id(&m)).collect();
    // Pushed while the consumer holds the rest of the first batch.
    (10..15).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
    let rest: Vec<u128> = std::iter::from_fn(|| queue.try_pop()).map(|m| id(&m)).collect();
    assert_eq!(first, vec![0, 1, 2]);
    assert_eq!(rest, (3..15).collect::<Vec<u128>>());
    assert_eq!(queue.len(), 0);
}

#[test]
fn dropping_the_oldest_takes_from_the_consumers_batch_before_the_inbox() {
    let queue = plain(4);
    (0..4).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
    // The consumer takes 0; 1, 2 and 3 wait in its batch, older than anything pushed next.
    assert_eq!(queue.try_pop().map(|m| id(&m)), Some(0));
    assert_eq!(queue.push(message(4, 8)), Pushed::Queued);
    assert_eq!(queue.push(message(5, 8)), Pushed::DroppedOldest(1));
    let left: Vec<u128> = std::iter::from_fn(|| queue.try_pop()).map(|m| id(&m)).collect();
    assert_eq!(left, vec![2, 3, 4, 5]);
    assert_eq!(queue.counters.dropped_oldest.load(Ordering::Relaxed), 1);
}

#[test]
fn a_queue_emptied_after_a_burst_keeps_no_slots() {
    let queue = plain(1 << 20);
    (0..10_000).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
    assert_eq!(std::iter::from_fn(|| queue.try_pop()).count(), 10_000);
    let batch = queue.batch.lock().unwrap().capacity();
    let inbox = queue.inbox().items.capacity();
    assert!(batch <= KEEP_SLOTS && inbox <= KEEP_SLOTS, "batch {batch}, inbox {inbox}");
}

#[test]
fn a_queue_emptied_after_a_small_burst_keeps_its_buffers_for_the_next() {
    let queue = plain(1 << 20);
    for round in 0..3 {
        (0..500).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
        assert_eq!(std::iter::from_fn(|| queue.try_pop()).count(), 500, "round {round}");
    }
    // Freed at every catch-up, the next burst would grow a buffer from nothing again.
    let batch = queue.batch.lock().unwrap().capacity();
    let inbox = queue.inbox().items.capacity();
    assert!(batch >= 500 && inbox >= 500, "batch {batch}, inbox {inbox}");
}

/// Producers on threads of their own and a consumer that parks whenever it runs dry: every
/// message arrives, each producer's in order — a push that slipped past a parking consumer
/// would leave it asleep and end the test at its deadline.
#[test]
fn a_parked_consumer_misses_no_push() {
    const PRODUCERS: u64 = 4;
    const EACH: u64 = 50_000;
    let queue = Arc::new(plain(1 << 24));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                for n in 0..EACH {
                    assert_eq!(queue.push(message(p << 32 | n, 8)), Pushed::Queued);
                    if n % 1000 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let next = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(30), drain(&queue, PRODUCERS * EACH))
            .await
    });
    producers.into_iter().for_each(|p| p.join().unwrap());
    assert_eq!(next.expect("every message arrived"), [EACH; PRODUCERS as usize]);
    assert_eq!(queue.len(), 0);
}

/// Pops `count` messages, parking whenever the queue runs dry; how many came from each
/// producer, checking that each one's arrive in order.
async fn drain(queue: &Queue, count: u64) -> [u64; 4] {
    let mut next = [0u64; 4];
    for _ in 0..count {
        let message = std::future::poll_fn(|cx| queue.poll_pop(cx)).await.unwrap();
        let (p, n) = ((id(&message) >> 32) as usize, id(&message) as u64 & 0xffff_ffff);
        assert_eq!(n, next[p], "producer {p}'s messages in order");
        next[p] += 1;
    }
    next
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct Count(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting() -> (Arc<Count>, Waker) {
    let count = Arc::new(Count::default());
    (Arc::clone(&count), Waker::from(count))
}

fn woken(count: &Count) -> usize {
    count.0.load(Ordering::SeqCst)
}

#[test]
fn a_push_wakes_the_consumer_once_it_parked_and_only_then() {
    let (queue, (count, waker)) = (plain(16), counting());
    let mut cx = Context::from_waker(&waker);
    assert_eq!(queue.push(message(0, 8)), Pushed::Queued);
    assert!(queue.poll_pop(&mut cx).is_ready());
    // It found a message: not parked, so the next push wakes no one.
    assert_eq!(queue.push(message(1, 8)), Pushed::Queued);
    assert_eq!(woken(&count), 0);
    assert!(queue.poll_pop(&mut cx).is_ready());
    assert!(queue.poll_pop(&mut cx).is_pending());
    // Parked: the first push wakes it, once; the next ones find no one waiting.
    (2..5).for_each(|n| assert_eq!(queue.push(message(n, 8)), Pushed::Queued));
    assert_eq!(woken(&count), 1);
}

#[test]
fn closing_wakes_a_parked_consumer() {
    let (queue, (count, waker)) = (plain(16), counting());
    let mut cx = Context::from_waker(&waker);
    assert!(queue.poll_pop(&mut cx).is_pending());
    queue.close();
    assert_eq!(woken(&count), 1);
    assert!(matches!(queue.poll_pop(&mut cx), Poll::Ready(None)));
}

#[test]
fn handing_out_in_one_take_keeps_order_stops_when_told_and_parks_when_dry() {
    let queue = plain(1024);
    for n in 0..10 {
        queue.push(message(n, 8));
    }
    let (mut taken, mut seen) = (Unreleased::default(), Vec::new());
    // Stopped by `each` after four: their room is still held until given back.
    let stopped = queue.pop_each(
        &mut taken,
        None,
        || false,
        |m| {
            seen.push(id(&m));
            seen.len() < 4
        },
    );
    assert!(stopped);
    assert_eq!((seen.as_slice(), queue.len()), (&[0, 1, 2, 3][..], 10));
    queue.give_back(&mut taken);
    assert_eq!(queue.len(), 6);
    // Stopped by `stop` before the next: nothing more taken.
    assert!(queue.pop_each(&mut taken, None, || true, |_| panic!("none to take")));
    assert_eq!(queue.len(), 6);
    // Run dry with a waker: everything in order, and the next push wakes it.
    let (count, waker) = counting();
    seen.clear();
    let stopped = queue.pop_each(
        &mut taken,
        Some(&waker),
        || false,
        |m| {
            seen.push(id(&m));
            true
        },
    );
    assert!(!stopped);
    assert_eq!((seen, taken.count), (vec![4, 5, 6, 7, 8, 9], 6));
    queue.give_back(&mut taken);
    assert_eq!(queue.len(), 0);
    assert_eq!(woken(&count), 0);
    queue.push(message(10, 8));
    assert_eq!(woken(&count), 1);
}

#[test]
fn a_pushed_batch_keeps_its_order_wakes_once_and_drops_the_oldest_past_the_bound() {
    let (queue, (count, waker)) = (plain(4), counting());
    let mut cx = Context::from_waker(&waker);
    assert!(queue.poll_pop(&mut cx).is_pending());
    // Fits: charged together, one wake-up.
    let mut batch: Vec<Message> = (0..3).map(|n| message(n, 8)).collect();
    assert_eq!(queue.push_all(&mut batch), (0, false));
    assert!(batch.is_empty());
    assert_eq!((queue.len(), woken(&count)), (3, 1));
    // Past the bound of 4: the oldest give way one by one, as single pushes would.
    let mut batch: Vec<Message> = (3..9).map(|n| message(n, 8)).collect();
    assert_eq!(queue.push_all(&mut batch), (5, false));
    let left: Vec<u128> = std::iter::from_fn(|| queue.try_pop()).map(|m| id(&m)).collect();
    assert_eq!(left, vec![5, 6, 7, 8]);
    assert_eq!(queue.counters.dropped_oldest.load(Ordering::Relaxed), 5);
    assert_eq!(queue.len(), 0);
    // A closed queue takes nothing.
    queue.close();
    let mut batch = vec![message(9, 8)];
    assert_eq!(queue.push_all(&mut batch), (0, false));
    assert!(batch.is_empty() && queue.try_pop().is_none());
}

#[test]
fn a_pushed_batch_within_a_shared_budget_charges_it_and_gives_it_back() {
    let budget = ByteBudget::new(1 << 20);
    let queue = queue(&budget);
    let mut batch: Vec<Message> = (0..10).map(|n| message(n, 100)).collect();
    assert_eq!(queue.push_all(&mut batch), (0, false));
    assert_eq!(budget.used(), 10 * (100 + 256));
    assert_eq!(std::iter::from_fn(|| queue.try_pop()).count(), 10);
    assert_eq!(budget.used(), 0);
}

#[test]
fn what_a_push_touches_comes_first_and_what_a_consumer_touches_lies_together() {
    use std::mem::offset_of;
    // A push: the inbox, the bounds, the policy (see `Queue`'s documentation).
    let push = [
        offset_of!(Queue, inbox) + size_of::<Mutex<Inbox>>(),
        offset_of!(Queue, load) + 8,
        offset_of!(Queue, capacity) + 8,
        offset_of!(Queue, max_bytes) + 8,
        offset_of!(Queue, budget) + size_of::<Option<ByteBudget>>(),
        offset_of!(Queue, dealt) + 8,
        offset_of!(Queue, closed) + 1,
        offset_of!(Queue, policy) + 1,
    ];
    assert!(push.iter().all(|&end| end <= 112), "a push's fields end at {push:?}");
    // A consumer's own: its batch, the replay offsets and the count received, 64 bytes.
    let start = offset_of!(Queue, batch);
    let end = offset_of!(Queue, counters) + offset_of!(Counters, received) + 8;
    assert!(offset_of!(Queue, replay_from) > start && end - start <= 64, "{start}..{end}");
}

fn pressing(capacity: usize) -> Arc<Queue> {
    let filter = Filter::parse("t").unwrap();
    Arc::new(Queue::new(filter, capacity, usize::MAX, SlowConsumer::BackPressure))
}

#[test]
fn under_back_pressure_a_full_queue_still_queues_holds_back_and_drops_only_past_its_hard_bound() {
    // The hard bound: 4 messages, and 65,536 more.
    const HARD: u64 = 4 + 65_536;
    let queue = pressing(4);
    let pushed: Vec<Pushed> = (0..8).map(|n| queue.push(message(n, 8))).collect();
    // The fourth fills it: from there each push queues and holds its publisher back.
    let held = [Pushed::Held; 5];
    assert_eq!(pushed, [&[Pushed::Queued; 3][..], &held].concat());
    for n in 8..HARD {
        assert_eq!(queue.push(message(n, 8)), Pushed::Held);
    }
    // Past the hard bound (a publisher that never waited), the oldest give way.
    assert_eq!(queue.push(message(HARD, 8)), Pushed::DroppedOldest(1));
    let mut batch: Vec<Message> = (HARD + 1..HARD + 3).map(|n| message(n, 8)).collect();
    assert_eq!(queue.push_all(&mut batch), (2, true));
    let left: Vec<u128> = std::iter::from_fn(|| queue.try_pop()).map(|m| id(&m)).collect();
    assert_eq!(left, (3..u128::from(HARD) + 3).collect::<Vec<_>>());
    assert_eq!(queue.counters.dropped_oldest.load(Ordering::Relaxed), 3);
    assert!(!queue.holds_back());
    // Within its bound, a batch holds nothing back.
    let mut batch: Vec<Message> = (11..13).map(|n| message(n, 8)).collect();
    assert_eq!(queue.push_all(&mut batch), (0, false));
}

#[tokio::test]
async fn a_publisher_waits_for_room_until_the_consumer_takes_and_no_longer() {
    let queue = pressing(4);
    for n in 0..6 {
        queue.push(message(n, 8));
    }
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    let waited = tokio::time::timeout(Duration::from_millis(50), queue.room(far)).await;
    assert!(waited.is_err(), "no room while six are queued against a bound of four");
    let waiter = tokio::spawn({
        let queue = Arc::clone(&queue);
        async move { queue.room(far).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    // Three taken: three left, within the bound.
    let mut taken = Unreleased::default();
    for _ in 0..3 {
        assert!(queue.try_pop_taking(&mut taken).is_some());
    }
    assert!(!waiter.is_finished(), "room given back only with the taken messages' release");
    queue.give_back(&mut taken);
    let found = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(found.unwrap().unwrap(), "room found");
}

#[tokio::test]
async fn a_wait_past_its_deadline_says_so_and_a_closed_queue_ends_every_wait() {
    let queue = pressing(2);
    for n in 0..3 {
        queue.push(message(n, 8));
    }
    let soon = tokio::time::Instant::now() + Duration::from_millis(30);
    assert!(!queue.room(soon).await, "no room before the deadline");
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    let waiter = tokio::spawn({
        let queue = Arc::clone(&queue);
        async move { queue.room(far).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    queue.close();
    let ended = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(ended.unwrap().unwrap(), "a closed queue holds nobody back");
}
