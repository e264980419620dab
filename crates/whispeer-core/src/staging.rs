//! Pushes held back while a thread publishes a batch, then made queue by queue.
//!
//! A server connection's reader publishes every message one read brought in, one after the
//! other, before it waits for the socket again. Each publish offered its message to each
//! matching queue at once: one take of that queue's lock, one charge of its bounds and one
//! look for a parked consumer a message and a queue. While a [`PushBatch`] lives on the
//! thread, a fan-out leaves the message with the batch instead (for a queue under
//! `DropOldest`, where a push always queues), and the batch pushes each queue's messages
//! together when it ends: in the order they were published, under one lock, with one charge
//! when they fit, and one wake-up. So a consumer also finds them together.
//!
//! The batch is bounded: past [`MOST_MESSAGES`] messages it pushes what it holds and starts
//! again; past [`MOST_QUEUES`] queues it pushes what it holds and holds nothing more until it
//! ends (a fan-out that wide gains nothing from it, and would only search). A message's queue
//! is looked for first after the last one found, where a topic's next publish finds it. The
//! batch cannot outlive an `.await` in a task that may move between threads (it is not
//! `Send`), so held-back messages never wait on anything but the publishes of the same
//! synchronous stretch.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Message;
use crate::queue::Queue;
use crate::room;
use crate::router::recent;
use crate::stats::BrokerCounters;
use crate::wakeups;

/// Most messages a batch holds back before it pushes them.
pub(crate) const MOST_MESSAGES: usize = 4096;
/// Most queues a batch holds messages for before it pushes them.
pub(crate) const MOST_QUEUES: usize = 64;

thread_local! {
    static STAGED: RefCell<Staged> = const { RefCell::new(Staged::new()) };
}

/// One queue's held-back messages, and the broker counters its evictions count in.
struct Held {
    queue: Arc<Queue>,
    counters: Arc<BrokerCounters>,
    messages: Vec<Message>,
}

/// The thread's batch.
struct Staged {
    /// Batches begun and not ended on this thread (the outermost ends it).
    depth: usize,
    held: Vec<Held>,
    messages: usize,
    /// Where in `held` the next message's queue is looked for first: the queue after the last
    /// one found (publishes to one topic reach its queues in the same order each time).
    next: usize,
    /// The batch met [`MOST_QUEUES`] queues: a wide fan-out, whose pushes it no longer holds
    /// (it would only search) until it ends.
    wide: bool,
    /// Emptied message lists kept for the next queues.
    spare: Vec<Vec<Message>>,
    /// Publishes and deliveries counted for a broker and not yet added to its counters.
    counts: Option<Counts>,
}

/// A broker's publishes and deliveries counted in a batch, added to its counters at its end.
struct Counts {
    counters: Arc<BrokerCounters>,
    published: u64,
    deliveries: u64,
}

impl Counts {
    fn add_up(self) {
        let Self { counters, published, deliveries } = self;
        counters.published.fetch_add(published, Ordering::Relaxed);
        counters.deliveries.fetch_add(deliveries, Ordering::Relaxed);
    }
}

impl Staged {
    const fn new() -> Self {
        Self {
            depth: 0,
            held: Vec::new(),
            messages: 0,
            next: 0,
            wide: false,
            spare: Vec::new(),
            counts: None,
        }
    }

    fn hold(&mut self, queue: &Arc<Queue>, counters: &Arc<BrokerCounters>, message: Message) {
        self.messages += 1;
        let at = match self.held.get(self.next) {
            Some(held) if Arc::ptr_eq(&held.queue, queue) => Some(self.next),
            _ => self.held.iter().position(|held| Arc::ptr_eq(&held.queue, queue)),
        };
        if let Some(at) = at {
            self.held[at].messages.push(message);
            self.next = if at + 1 == self.held.len() { 0 } else { at + 1 };
            return;
        }
        let mut messages = self.spare.pop().unwrap_or_default();
        messages.push(message);
        let (queue, counters) = (Arc::clone(queue), Arc::clone(counters));
        self.held.push(Held { queue, counters, messages });
        self.next = 0;
    }

    /// Whether to push what it holds now; past [`MOST_QUEUES`], the batch turns wide.
    fn full(&mut self) -> bool {
        self.wide = self.held.len() >= MOST_QUEUES;
        self.wide || self.messages >= MOST_MESSAGES
    }
}

/// Leaves `message` for `queue` with the thread's batch, if one is begun and the queue takes
/// batches; otherwise hands it back to be pushed now.
pub(crate) fn hold(
    queue: &Arc<Queue>,
    counters: &Arc<BrokerCounters>,
    message: Message,
) -> Result<(), Message> {
    if !queue.takes_batches() {
        return Err(message);
    }
    let full = STAGED.with(|staged| {
        let Ok(mut staged) = staged.try_borrow_mut() else { return Err(message) };
        if staged.depth == 0 || staged.wide {
            return Err(message);
        }
        staged.hold(queue, counters, message);
        Ok(staged.full())
    })?;
    if full {
        push_held();
    }
    Ok(())
}

/// Counts `published` publishes and `deliveries` deliveries of the broker of `counters` in
/// the thread's batch, if one is begun (`false`: count them now). Statistics: they reach the
/// broker's counters when the batch ends, an atomic operation a batch rather than a publish.
#[inline]
pub(crate) fn count(counters: &Arc<BrokerCounters>, published: u64, deliveries: u64) -> bool {
    let counted = STAGED.with(|staged| {
        let Ok(mut staged) = staged.try_borrow_mut() else { return None };
        if staged.depth == 0 {
            return None;
        }
        let mine = staged.counts.as_ref().is_some_and(|c| Arc::ptr_eq(&c.counters, counters));
        // Another broker's counts are added up now; this one's are counted from here.
        let earlier = if mine {
            None
        } else {
            let fresh = Counts { counters: Arc::clone(counters), published: 0, deliveries: 0 };
            staged.counts.replace(fresh)
        };
        if let Some(counts) = staged.counts.as_mut() {
            counts.published += published;
            counts.deliveries += deliveries;
        }
        Some(earlier)
    });
    match counted {
        None => false,
        Some(earlier) => {
            if let Some(earlier) = earlier {
                earlier.add_up();
            }
            true
        }
    }
}

/// Pushes everything the thread's batch holds, queue by queue. The lists are taken out first:
/// a wake-up runs outside the batch's borrow.
fn push_held() {
    let mut held = STAGED.with(|staged| {
        let mut staged = staged.borrow_mut();
        (staged.messages, staged.next) = (0, 0);
        std::mem::take(&mut staged.held)
    });
    if held.is_empty() {
        return;
    }
    for Held { queue, counters, mut messages } in held.drain(..) {
        let (dropped, held) = queue.push_all(&mut messages);
        if dropped > 0 {
            counters.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
        }
        if held {
            room::note(&queue, &counters);
        }
        // The emptied list is kept for the next queue, within bounds.
        STAGED.with(|staged| {
            let spare = &mut staged.borrow_mut().spare;
            if spare.len() < MOST_QUEUES && messages.capacity() <= MOST_MESSAGES {
                spare.push(messages);
            }
        });
    }
    STAGED.with(|staged| {
        let mut staged = staged.borrow_mut();
        // The list of queues keeps its room for the next batch.
        if staged.held.is_empty() {
            staged.held = held;
        }
    });
}

/// While it lives, publishes made on this thread leave their messages for queues under
/// `SlowConsumer::DropOldest` with it, and it pushes them when dropped, each queue's
/// together (see the module documentation). A publish's receipt counts such a message as
/// delivered, as a push to such a queue always is. Pushes to other queues are made at once,
/// and their consumers woken when it is dropped (`wakeups.rs`).
///
/// For a loop that publishes many messages before it waits: a server connection's reader
/// holds one for each read. Not `Send`: it ends before its task awaits. Batches nest (the
/// outermost pushes).
#[derive(Debug)]
pub struct PushBatch {
    _not_send: PhantomData<*const ()>,
}

impl PushBatch {
    /// Begins holding back this thread's pushes.
    #[must_use = "the batch pushes what it holds when it is dropped"]
    pub fn begin() -> Self {
        STAGED.with(|staged| staged.borrow_mut().depth += 1);
        wakeups::hold();
        recent::hold();
        Self { _not_send: PhantomData }
    }
}

impl Drop for PushBatch {
    fn drop(&mut self) {
        let outermost = STAGED.with(|staged| {
            let mut staged = staged.borrow_mut();
            staged.depth -= 1;
            if staged.depth > 0 {
                return None;
            }
            staged.wide = false;
            Some(staged.counts.take())
        });
        if let Some(counts) = outermost {
            push_held();
            if let Some(counts) = counts {
                counts.add_up();
            }
        }
        // After the held pushes: their consumers' wake-ups are held too, and all made now.
        wakeups::release();
        recent::release();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{Broker, BrokerOptions, SlowConsumer, SubscribeOptions};

    fn ids(sub: &mut crate::Subscription<Message>) -> Vec<u8> {
        std::iter::from_fn(|| sub.try_recv()).map(|m| m.payload()[0]).collect()
    }

    #[test]
    fn a_batch_holds_pushes_to_drop_oldest_queues_until_it_ends() {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let mut held = broker.messages(SubscribeOptions::new("t")).unwrap();
        let mut failing = broker
            .messages(SubscribeOptions::new("t").slow_consumer(SlowConsumer::FailPublish))
            .unwrap();
        let batch = PushBatch::begin();
        for n in 0..5u8 {
            let receipt = broker.publish_bytes("t", Bytes::from(vec![n])).unwrap();
            assert_eq!(receipt.subscribers, 2, "a held push counts as delivered");
        }
        // Nested: only the outermost batch pushes.
        drop(PushBatch::begin());
        assert_eq!(ids(&mut held), Vec::<u8>::new(), "held until the batch ends");
        // A queue whose policy must answer the publisher is pushed at once.
        assert_eq!(ids(&mut failing), vec![0, 1, 2, 3, 4]);
        drop(batch);
        assert_eq!(ids(&mut held), vec![0, 1, 2, 3, 4]);
        // Without a batch, pushes are made at once again.
        broker.publish_bytes("t", Bytes::from(vec![5])).unwrap();
        assert_eq!(ids(&mut held), vec![5]);
        let stats = broker.stats();
        assert_eq!((stats.published, stats.deliveries), (6, 12), "counted when the batch ended");
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn consumers_of_pushes_made_at_once_are_woken_when_the_batch_ends() {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let options = SubscribeOptions::new("t").slow_consumer(SlowConsumer::FailPublish);
        let mut sub = broker.messages(options).unwrap();
        let woken = std::sync::Arc::new(Woken::default());
        let waker = std::task::Waker::from(std::sync::Arc::clone(&woken));
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(sub.poll_recv_message(&mut cx).is_pending(), "parked");
        let batch = PushBatch::begin();
        broker.publish_bytes("t", Bytes::from(vec![1])).unwrap();
        assert_eq!(woken.0.load(Ordering::Relaxed), 0, "not woken while the batch lives");
        drop(batch);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "woken when it ends");
        assert_eq!(ids(&mut sub), vec![1]);
        // Without a batch, at once.
        assert!(sub.poll_recv_message(&mut cx).is_pending());
        broker.publish_bytes("t", Bytes::from(vec![2])).unwrap();
        assert_eq!(woken.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn two_brokers_publishing_in_one_batch_each_count_their_own() {
        let (one, two) = (Broker::build_default().build(), Broker::build_default().build());
        let _subs = [one.messages("t").unwrap(), two.messages("t").unwrap()];
        let batch = PushBatch::begin();
        for broker in [&one, &two, &one, &one, &two] {
            broker.publish_bytes("t", Bytes::from_static(b"x")).unwrap();
        }
        drop(batch);
        let (one, two) = (one.stats(), two.stats());
        assert_eq!((one.published, one.deliveries), (3, 3));
        assert_eq!((two.published, two.deliveries), (2, 2));
    }

    #[test]
    fn a_batch_that_meets_many_queues_pushes_and_holds_no_more_until_it_ends() {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let mut subs: Vec<_> = (0..MOST_QUEUES + 6)
            .map(|_| broker.messages(SubscribeOptions::new("t")).unwrap())
            .collect();
        let mut few = broker.messages(SubscribeOptions::new("u")).unwrap();
        let batch = PushBatch::begin();
        for n in 0..2u8 {
            broker.publish_bytes("t", Bytes::from(vec![n])).unwrap();
        }
        broker.publish_bytes("u", Bytes::from(vec![9])).unwrap();
        // Wide: every subscriber has both, in order, before the batch ends; so has one of
        // another topic published after.
        for sub in &mut subs {
            assert_eq!(ids(sub), vec![0, 1]);
        }
        assert_eq!(ids(&mut few), vec![9]);
        drop(batch);
        // The next batch holds again.
        let batch = PushBatch::begin();
        broker.publish_bytes("u", Bytes::from(vec![10])).unwrap();
        assert_eq!(ids(&mut few), Vec::<u8>::new());
        drop(batch);
        assert_eq!(ids(&mut few), vec![10]);
    }

    #[test]
    fn messages_held_for_a_subscription_gone_before_the_push_count_as_discarded() {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let gone = broker.messages(SubscribeOptions::new("t")).unwrap();
        let batch = PushBatch::begin();
        for n in 0..3u8 {
            broker.publish_bytes("t", Bytes::from(vec![n])).unwrap();
        }
        drop(gone);
        drop(batch);
        let stats = broker.stats();
        assert_eq!((stats.deliveries, stats.discarded), (3, 3), "every delivery accounted for");
    }

    #[test]
    fn a_full_batch_pushes_what_it_holds_and_counts_what_the_bound_drops() {
        let broker = Broker::builder(BrokerOptions::default()).build();
        let mut small = broker.messages(SubscribeOptions::new("t").capacity(2)).unwrap();
        let mut large =
            broker.messages(SubscribeOptions::new("t").capacity(2 * MOST_MESSAGES)).unwrap();
        let batch = PushBatch::begin();
        // Two queues: the batch is full after half as many publishes as it holds messages.
        for n in 0..MOST_MESSAGES / 2 {
            broker.publish_bytes("t", Bytes::from(vec![(n % 251) as u8])).unwrap();
        }
        assert_eq!(ids(&mut large).len(), MOST_MESSAGES / 2, "pushed once full");
        broker.publish_bytes("t", Bytes::from(vec![0xFE])).unwrap();
        assert_eq!(ids(&mut large), Vec::<u8>::new());
        drop(batch);
        assert_eq!(ids(&mut large), vec![0xFE]);
        // Its bound of two kept the latest, the oldest dropped and counted.
        let last = ((MOST_MESSAGES / 2 - 1) % 251) as u8;
        assert_eq!(ids(&mut small), vec![last, 0xFE]);
        let dropped = (MOST_MESSAGES / 2 + 1 - 2) as u64;
        assert_eq!(broker.stats().dropped_oldest, dropped);
        assert_eq!(small.stats().dropped_oldest, dropped);
    }
}
