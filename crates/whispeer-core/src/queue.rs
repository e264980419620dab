//! The bounded per-subscriber delivery queue and its slow-consumer policy.
//!
//! Many publishers push, one consumer pops. The queue is bounded twice: by message count
//! (`capacity`) and by bytes (`max_bytes`, payload bytes plus a fixed overhead per message). When
//! either bound would be exceeded, the subscriber's [`SlowConsumer`] policy decides what gives
//! way, and every such event is counted. A single message larger than `max_bytes` is still
//! accepted into an empty queue, so it can be delivered at all. Concurrent publishers can
//! overshoot the byte bound by at most one message each. Several queues may also share a
//! [`ByteBudget`] (the server gives each connection one), which bounds their bytes together.
//! Pushing never blocks and never awaits, so it is safe under the router's read lock.
//!
//! A queue has one consumer, or, for a queue group, several: then every waiting member is woken
//! by a push and the first to poll takes the message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

use whispeer_proto::{Filter, Topic};

use crate::Message;

/// What happens when a message arrives for a subscriber whose queue is full.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Drop the oldest queued message to make room; counted in `dropped_oldest`.
    #[default]
    DropOldest,
    /// Drop the new message; counted in `dropped_newest`.
    DropNewest,
    /// Refuse the new message and make `publish` return `PublishError::QueueFull`; counted in
    /// `rejected_full`. Other subscribers still get the message.
    FailPublish,
    /// Close the subscription: its stream ends and its callback task stops; counted in
    /// `disconnected`.
    Disconnect,
}

/// Where a queue's message count starts in its `load` word; the bytes below can reach 1 TiB,
/// far past any byte bound, and the count above up to 2^24, past `MAX_QUEUE_CAPACITY`.
const COUNT_SHIFT: u32 = 40;
const COUNT_ONE: u64 = 1 << COUNT_SHIFT;
const BYTES_MASK: u64 = COUNT_ONE - 1;
/// Where a budget's count of queues holding bytes starts in its `load` word (the bytes below, as
/// in a queue's, up to 1 TiB held); up to 2^24 queues.
const HOLDER_SHIFT: u32 = COUNT_SHIFT;
const HOLDER_ONE: u64 = 1 << HOLDER_SHIFT;

/// What a queued message counts against the byte bound: its payload and a fixed allowance for
/// the envelope and bookkeeping.
fn weight(message: &Message) -> usize {
    message.payload().len() + 256
}

/// A byte budget shared by several queues: together they hold at most `max` bytes (payloads plus
/// 256 per message), each queue still bounded by its own limits too. Cloning shares the budget.
/// It is shared fairly: a queue holding more than its share (`max` over the queues holding
/// bytes) meets its policy once the budget is seven-eighths full, so queues that are read keep
/// the last eighth.
///
/// ```
/// use whispeer_core::{ByteBudget, SubscribeOptions};
/// let connection = ByteBudget::new(8 << 20);
/// let a = SubscribeOptions::new("a/#").budget(connection.clone());
/// let b = SubscribeOptions::new("b/#").budget(connection);
/// # let _ = (a, b);
/// ```
#[derive(Clone, Debug)]
pub struct ByteBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    /// The bytes charged to it (below `HOLDER_SHIFT`) and the queues holding some of them
    /// (from `HOLDER_SHIFT` up; directly or through a budget within it): one atomic operation
    /// a push or a pop.
    load: AtomicU64,
    max: usize,
    /// A larger budget this one draws on too (a server's, for each connection's).
    parent: Option<ByteBudget>,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self::with_parent(max, None)
    }

    /// A budget of `max` bytes that also draws on `parent`: what its queues hold counts in
    /// both, and a message that would pass either bound meets the queue's policy. A server
    /// gives each connection one within the budget of all its connections.
    pub fn within(max: usize, parent: &Self) -> Self {
        Self::with_parent(max, Some(parent.clone()))
    }

    fn with_parent(max: usize, parent: Option<Self>) -> Self {
        Self { inner: Arc::new(BudgetInner { load: AtomicU64::new(0), max, parent }) }
    }

    /// Charges `weight` bytes of a queue that held none before when `first`.
    fn add(&self, weight: usize, first: bool) {
        let holder = if first { HOLDER_ONE } else { 0 };
        self.inner.load.fetch_add(weight as u64 + holder, Ordering::AcqRel);
        if let Some(parent) = &self.inner.parent {
            parent.add(weight, first);
        }
    }

    /// Gives back `weight` bytes of a queue that holds none after when `last`.
    fn sub(&self, weight: usize, last: bool) {
        let holder = if last { HOLDER_ONE } else { 0 };
        self.inner.load.fetch_sub(weight as u64 + holder, Ordering::AcqRel);
        if let Some(parent) = &self.inner.parent {
            parent.sub(weight, last);
        }
    }

    /// Bytes held now by the queues sharing it.
    pub fn used(&self) -> usize {
        (self.inner.load.load(Ordering::Acquire) & BYTES_MASK) as usize
    }

    #[cfg(test)]
    fn holders(&self) -> usize {
        (self.inner.load.load(Ordering::Acquire) >> HOLDER_SHIFT) as usize
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Whether a queue holding `queued` bytes may not take `weight` more. Shared fairly: a
    /// queue past its share (the bound over the queues holding bytes) may fill the budget to
    /// seven eighths only, so the last eighth stays for queues under their share — subscribers
    /// that read keep getting messages while stalled ones hold the rest.
    fn would_exceed(&self, queued: usize, weight: usize) -> bool {
        let inner = &self.inner;
        // One read of the word gives both the bytes and the holders.
        let load = inner.load.load(Ordering::Acquire);
        let (used, holders) = ((load & BYTES_MASK) as usize, (load >> HOLDER_SHIFT) as usize);
        let share = inner.max / holders.max(1);
        let bound = if queued + weight > share { inner.max - inner.max / 8 } else { inner.max };
        used + weight > bound
            || inner.parent.as_ref().is_some_and(|parent| parent.would_exceed(queued, weight))
    }
}

/// Who to wake when a message arrives.
#[derive(Debug)]
enum Wakers {
    /// The queue's one consumer.
    One(AtomicWaker),
    /// The members of a queue group: all are woken, the first to poll takes the message.
    Many(Mutex<Vec<Waker>>),
}

impl Wakers {
    fn register(&self, waker: &Waker) {
        match self {
            Self::One(one) => one.register(waker),
            Self::Many(many) => {
                let mut many = many.lock().unwrap_or_else(PoisonError::into_inner);
                if !many.iter().any(|w| w.will_wake(waker)) {
                    many.push(waker.clone());
                }
            }
        }
    }

    fn wake(&self) {
        match self {
            Self::One(one) => one.wake(),
            Self::Many(many) => {
                let woken =
                    std::mem::take(&mut *many.lock().unwrap_or_else(PoisonError::into_inner));
                woken.into_iter().for_each(Waker::wake);
            }
        }
    }
}

/// Messages a consumer took off a queue whose room in the queue's bounds it has not given back
/// yet ([`Queue::give_back`]): a consumer that takes many in a row gives their room back at
/// once, so the count that publishers add to moves between cores once a batch, not once a
/// message.
#[derive(Debug, Default)]
pub(crate) struct Unreleased {
    count: u64,
    weight: u64,
}

/// The result of offering one message to one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued without loss.
    Queued,
    /// Queued after dropping the oldest message.
    DroppedOldest(u64),
    /// Not queued; dropped by policy.
    DroppedNewest,
    /// Not queued; the publish must report it.
    Full,
    /// Not queued; the subscription has just been closed by policy.
    Disconnected,
    /// Not queued; the subscription was already closed.
    Closed,
}

/// Counters of one subscription. Relaxed atomics: they are statistics, not synchronisation.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) dropped_newest: AtomicU64,
    pub(crate) rejected_full: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) open_errors: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
}

/// A bounded multi-producer queue of messages with wake-ups for its consumer(s).
#[derive(Debug)]
pub(crate) struct Queue {
    /// The subscription's filter, kept here so the queue alone can find its route.
    pub(crate) filter: Filter,
    /// The queue group's name, for a group's queue.
    pub(crate) group: Option<Box<str>>,
    /// Grows and shrinks in blocks as messages come and go, made at the first message: a queue
    /// that never held one holds no slots (and not the queue's two cache-line-padded ends).
    items: OnceLock<Box<SegQueue<Message>>>,
    /// Most messages queued at once.
    capacity: usize,
    /// The queued messages: their count in the bits from `COUNT_SHIFT` up, their bytes (see
    /// `weight`) below, so one atomic operation keeps both.
    load: AtomicU64,
    max_bytes: usize,
    budget: Option<ByteBudget>,
    /// For a replaying subscription: per retained topic, the first offset to take from the
    /// queue; earlier ones were replayed from history.
    #[expect(clippy::box_collection, reason = "one pointer where most queues have none")]
    replay_from: OnceLock<Box<HashMap<Topic, u64>>>,
    waker: Wakers,
    closed: AtomicBool,
    policy: SlowConsumer,
    pub(crate) counters: Counters,
    /// The broker's count of messages discarded with their queue (set once routed).
    discarded: OnceLock<Arc<AtomicU64>>,
}

impl Queue {
    /// Creates a queue; `capacity` has been checked to be at least one.
    pub(crate) fn new(
        filter: Filter,
        capacity: usize,
        max_bytes: usize,
        policy: SlowConsumer,
    ) -> Self {
        Self {
            filter,
            group: None,
            items: OnceLock::new(),
            capacity,
            load: AtomicU64::new(0),
            max_bytes,
            budget: None,
            replay_from: OnceLock::new(),
            waker: Wakers::One(AtomicWaker::new()),
            closed: AtomicBool::new(false),
            policy,
            counters: Counters::default(),
            discarded: OnceLock::new(),
        }
    }

    /// This queue sharing `budget` with others.
    pub(crate) fn with_budget(mut self, budget: Option<ByteBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Drops, from now on, queued messages of these topics below these offsets: the
    /// subscription replays them from history instead.
    pub(crate) fn set_replay_from(&self, live_from: HashMap<Topic, u64>) {
        let _ = self.replay_from.set(Box::new(live_from));
    }

    /// Whether `message` was replayed from history already.
    fn replayed(&self, message: &Message) -> bool {
        let (Some(live_from), Some(offset)) = (self.replay_from.get(), message.offset()) else {
            return false;
        };
        live_from.get(message.topic()).is_some_and(|&from| offset < from)
    }

    /// This queue as the group `name`'s, with several consumers (its members).
    pub(crate) fn for_group(mut self, name: &str) -> Self {
        self.waker = Wakers::Many(Mutex::default());
        self.group = Some(name.into());
        self
    }

    /// Offers a message, applying the slow-consumer policy when full.
    pub(crate) fn push(&self, message: Message) -> Pushed {
        if self.is_closed() {
            return Pushed::Closed;
        }
        let weight = weight(&message);
        let outcome = match self.policy {
            SlowConsumer::DropOldest => {
                let mut dropped = 0;
                while self.is_full(weight) {
                    let Some(oldest) = self.take() else { break };
                    self.release(&oldest);
                    dropped += 1;
                }
                if dropped > 0 {
                    self.counters.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
                }
                self.charge(weight);
                self.put(message);
                if dropped > 0 { Pushed::DroppedOldest(dropped) } else { Pushed::Queued }
            }
            policy => {
                let refused = self.is_full(weight);
                if !refused {
                    self.charge(weight);
                    self.put(message);
                }
                if refused {
                    return match policy {
                        SlowConsumer::DropNewest => {
                            self.counters.dropped_newest.fetch_add(1, Ordering::Relaxed);
                            Pushed::DroppedNewest
                        }
                        SlowConsumer::FailPublish => {
                            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                            Pushed::Full
                        }
                        _ => {
                            self.close();
                            Pushed::Disconnected
                        }
                    };
                }
                Pushed::Queued
            }
        };
        self.waker.wake();
        outcome
    }

    /// Whether one more message of `weight` bytes would pass the count bound, the byte bound or
    /// the shared budget (the byte bounds never refuse an empty queue).
    fn is_full(&self, weight: usize) -> bool {
        let load = self.load.load(Ordering::Acquire);
        let (count, queued) = (load >> COUNT_SHIFT, (load & BYTES_MASK) as usize);
        count >= self.capacity as u64
            || (queued > 0
                && (queued + weight > self.max_bytes
                    || self.budget.as_ref().is_some_and(|b| b.would_exceed(queued, weight))))
    }

    fn charge(&self, weight: usize) {
        let before = self.load.fetch_add(COUNT_ONE + weight as u64, Ordering::AcqRel);
        if let Some(budget) = &self.budget {
            budget.add(weight, before & BYTES_MASK == 0);
        }
    }

    fn uncharge(&self, weight: usize) {
        let before = self.load.fetch_sub(COUNT_ONE + weight as u64, Ordering::AcqRel);
        if let Some(budget) = &self.budget {
            budget.sub(weight, before & BYTES_MASK == weight as u64);
        }
    }

    fn release(&self, message: &Message) {
        self.uncharge(weight(message));
    }

    /// Takes the next message, or learns that there is none yet (`Pending`, with the waker
    /// registered) or ever again (`Ready(None)`, once closed). Messages queued before the
    /// close are discarded: closing means the subscriber is gone.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let mut taken = Unreleased::default();
        let popped = self.poll_pop_taking(cx, &mut taken);
        self.give_back(&mut taken);
        popped
    }

    /// [`Queue::poll_pop`], leaving the message's room in the bounds to [`Queue::give_back`]
    /// with `taken`.
    pub(crate) fn poll_pop_taking(
        &self,
        cx: &mut Context<'_>,
        taken: &mut Unreleased,
    ) -> Poll<Option<Message>> {
        if self.is_closed() {
            return Poll::Ready(None);
        }
        if let Some(message) = self.pop_taking(taken) {
            return Poll::Ready(Some(message));
        }
        self.waker.register(cx.waker());
        // A push between the first pop and the registration would otherwise go unnoticed.
        if let Some(message) = self.pop_taking(taken) {
            return Poll::Ready(Some(message));
        }
        if self.is_closed() { Poll::Ready(None) } else { Poll::Pending }
    }

    /// Takes the next message without waiting.
    pub(crate) fn try_pop(&self) -> Option<Message> {
        let mut taken = Unreleased::default();
        let popped = self.try_pop_taking(&mut taken);
        self.give_back(&mut taken);
        popped
    }

    /// [`Queue::try_pop`], leaving the message's room in the bounds to [`Queue::give_back`]
    /// with `taken`.
    pub(crate) fn try_pop_taking(&self, taken: &mut Unreleased) -> Option<Message> {
        if self.is_closed() {
            return None;
        }
        self.pop_taking(taken)
    }

    /// Pops the next message not replayed already, counting what it takes in `taken`.
    fn pop_taking(&self, taken: &mut Unreleased) -> Option<Message> {
        while let Some(message) = self.take() {
            taken.count += 1;
            taken.weight += weight(&message) as u64;
            if !self.replayed(&message) {
                return Some(message);
            }
        }
        None
    }

    /// Gives back the room in the bounds of the messages counted in `taken`, and counts them
    /// received: one atomic operation on each bound for all of them.
    pub(crate) fn give_back(&self, taken: &mut Unreleased) {
        let Unreleased { count, weight } = std::mem::take(taken);
        if count == 0 {
            return;
        }
        let before = self.load.fetch_sub(count * COUNT_ONE + weight, Ordering::AcqRel);
        if let Some(budget) = &self.budget {
            budget.sub(weight as usize, before & BYTES_MASK == weight);
        }
        self.counters.received.fetch_add(count, Ordering::Relaxed);
    }

    fn put(&self, message: Message) {
        self.items.get_or_init(|| Box::new(SegQueue::new())).push(message);
    }

    fn take(&self) -> Option<Message> {
        self.items.get()?.pop()
    }

    /// Closes the queue and wakes the consumer so it can see the end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Counts the messages this queue still holds when it is dropped into `discarded`.
    pub(crate) fn count_discarded_in(&self, discarded: &Arc<AtomicU64>) {
        let _ = self.discarded.set(Arc::clone(discarded));
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wakes the consumer(s), so they look at their state again (a group member that left).
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }

    pub(crate) fn len(&self) -> usize {
        usize::try_from(self.load.load(Ordering::Acquire) >> COUNT_SHIFT).unwrap_or(usize::MAX)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // What it still holds is never taken: counted once, here, when nothing can push more.
        if let Some(discarded) = self.discarded.get() {
            discarded.fetch_add(*self.load.get_mut() >> COUNT_SHIFT, Ordering::Relaxed);
        }
        // Messages still queued give their share of a shared budget back.
        if let Some(budget) = &self.budget {
            let bytes = (*self.load.get_mut() & BYTES_MASK) as usize;
            budget.sub(bytes, bytes > 0);
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
