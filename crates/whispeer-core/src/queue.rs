//! The bounded per-subscriber delivery queue and its slow-consumer policy.
//!
//! Many publishers push, one consumer pops. The queue is bounded twice: by message count
//! (`capacity`) and by bytes (`max_bytes`, payload bytes plus a fixed overhead per message). When
//! either bound would be exceeded, the subscriber's [`SlowConsumer`] policy decides what gives
//! way, and every such event is counted. A single message larger than `max_bytes` is still
//! accepted into an empty queue, so it can be delivered at all. The queue's own bounds are
//! checked and charged under its lock; a message whose room a consumer has taken but not given
//! back yet still counts (see [`Queue::give_back`]). Several queues may also share a
//! [`ByteBudget`] (the server gives each connection one), which bounds their bytes together;
//! concurrent publishers to different queues can overshoot it by at most one message each.
//! Pushing never awaits and holds the queue's lock only to append, so it is safe under the
//! router's read lock.
//!
//! Two lists, each behind its own lock: producers append to the inbox; a consumer that runs out
//! of its batch swaps the whole inbox for it (its empty buffer going back as the new inbox) and
//! hands the batch out one by one. So a message costs a producer one uncontended lock and the
//! consumer none of the producers' cache lines but the batch's, where a lock-free list costs
//! both sides atomic operations on shared slots per message. A consumer parks by leaving its
//! waker in the inbox under the same lock, so no push can slip between its last look and its
//! registration, and a push wakes only a consumer that parked.
//!
//! A queue has one consumer, or, for a queue group, several: a QoS 1 group's waiting members
//! are all woken by a push and the first to poll takes the message (up to its share:
//! `delivery/tracker.rs`); a QoS 0 group deals each push over its members (`waiting.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use whispeer_proto::{Filter, Topic};

use crate::Message;
use crate::budget::ByteBudget;

mod dealing;
mod policy;
mod pressure;
mod waiting;

pub use policy::SlowConsumer;
use pressure::Pressure;
pub(crate) use waiting::Credit;
use waiting::{Dealt, Waiting};

/// Where a queue's message count starts in its `load` word; the bytes below can reach 1 TiB,
/// far past any byte bound, and the count above up to 2^24, past `MAX_QUEUE_CAPACITY`.
const COUNT_SHIFT: u32 = 40;
const COUNT_ONE: u64 = 1 << COUNT_SHIFT;
const BYTES_MASK: u64 = COUNT_ONE - 1;

/// What a queued message counts against the byte bound: its payload and a fixed allowance for
/// the envelope and bookkeeping.
fn weight(message: &Message) -> usize {
    message.payload().len() + 256
}

/// What producers share with the consumer(s), behind the queue's lock.
#[derive(Debug)]
struct Inbox {
    /// Messages pushed since a consumer last took the list, oldest first.
    items: VecDeque<Message>,
    waiting: Waiting,
}

/// Past this many slots (8 KiB), an emptied buffer is freed rather than kept for the next batch,
/// unless batches that large still arrive (see `Queue::refill`); a queue has two. Smaller, a
/// stream's buffers were freed and grown at every catch-up, and the allocator handed the
/// memory back each time (thousands of `madvise` calls a second: ARCHITECTURE.md).
const KEEP_SLOTS: usize = 1024;

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
    /// Queued past the queue's bounds (`BackPressure`): its publisher is to wait for room.
    Held,
}

/// Counters of one subscription. Relaxed atomics: they are statistics, not synchronisation.
/// `received`, counted as a consumer takes messages, comes first: it sits beside the consumer's
/// part of the queue (see [`Queue`]).
#[derive(Debug, Default)]
#[repr(C)]
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
///
/// Its fields are laid out in the order written (`repr(C)`), by who touches them a message:
/// first what a push reads and writes (the inbox, the bounds, the policy: 106 bytes), then
/// what a consumer does (the batch, replays, the count received), then the rest. With many
/// subscriptions each message meets a queue whose lines left the cache. Left to the compiler,
/// a push's fields lay in three places of the struct and a consumer's in four; laid out so, a
/// message misses 7.0 lines in all instead of 8.4 (`cargo bench -p whispeer --bench
/// subscriptions -- 100000 stepped` under cachegrind: ARCHITECTURE.md).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Queue {
    /// Messages pushed and not yet taken over by a consumer, and who waits for them. A queue
    /// that never held a message holds no slots.
    inbox: Mutex<Inbox>,
    /// The queued messages: their count in the bits from `COUNT_SHIFT` up, their bytes (see
    /// `weight`) below, so one atomic operation keeps both.
    load: AtomicU64,
    /// Most messages queued at once.
    capacity: usize,
    max_bytes: usize,
    budget: Option<ByteBudget>,
    /// A QoS 0 group's latest deal (see `waiting.rs`).
    dealt: Option<Box<Dealt>>,
    closed: AtomicBool,
    policy: SlowConsumer,
    /// The queue group's name, for a group's queue.
    pub(crate) group: Option<Box<str>>,
    /// The messages a consumer took over from the inbox in one go, oldest first (all older than
    /// the inbox's), handed out one by one. Locked by consumers, and by a producer dropping the
    /// oldest message only if it is free (`try_lock`): the inbox's lock is never held while
    /// waiting for this one.
    batch: Mutex<VecDeque<Message>>,
    /// For a replaying subscription: per retained topic, the first offset to take from the
    /// queue; earlier ones were replayed from history.
    #[expect(clippy::box_collection, reason = "one pointer where most queues have none")]
    replay_from: OnceLock<Box<HashMap<Topic, u64>>>,
    pub(crate) counters: Counters,
    /// The subscription's filter, kept here so the queue alone can find its route.
    pub(crate) filter: Filter,
    /// The broker's count of messages discarded with their queue (set once routed).
    discarded: OnceLock<Arc<AtomicU64>>,
    /// Under `BackPressure`: who waits for room.
    pressure: Option<Box<Pressure>>,
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
            inbox: Mutex::new(Inbox { items: VecDeque::new(), waiting: Waiting::One(None) }),
            batch: Mutex::new(VecDeque::new()),
            capacity,
            load: AtomicU64::new(0),
            max_bytes,
            budget: None,
            replay_from: OnceLock::new(),
            closed: AtomicBool::new(false),
            policy,
            counters: Counters::default(),
            discarded: OnceLock::new(),
            dealt: None,
            pressure: (policy == SlowConsumer::BackPressure).then(Box::default),
        }
    }

    /// This queue sharing `budget` with others.
    pub(crate) fn with_budget(mut self, budget: Option<ByteBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// The byte budget it shares with other queues, if any.
    pub(crate) fn budget(&self) -> Option<&ByteBudget> {
        self.budget.as_ref()
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
        self.inbox.get_mut().unwrap_or_else(PoisonError::into_inner).waiting =
            Waiting::Many(Vec::new());
        self.group = Some(name.into());
        self
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offers a message, applying the slow-consumer policy when full.
    pub(crate) fn push(&self, message: Message) -> Pushed {
        if self.is_closed() {
            return Pushed::Closed;
        }
        let weight = weight(&message);
        let mut inbox = self.inbox();
        let mut dropped = 0;
        if self.takes_batches() {
            while self.must_drop(weight) {
                let Some(oldest) = self.take_oldest(&mut inbox) else { break };
                self.release(&oldest);
                dropped += 1;
            }
            if dropped > 0 {
                self.counters.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
            }
        } else if self.is_full(weight) {
            drop(inbox);
            return self.refuse();
        }
        self.charge(weight);
        inbox.items.push_back(message);
        let woken = inbox.waiting.pushed(1, self.dealt_len(), self.dealt.as_deref());
        drop(inbox);
        woken.wake();
        if dropped > 0 {
            Pushed::DroppedOldest(dropped)
        } else if self.holds_back() {
            Pushed::Held
        } else {
            Pushed::Queued
        }
    }

    /// [`Queue::push`] of each of `messages` in order (leaving it empty), for a queue that
    /// [takes batches](Self::takes_batches), under one take of the inbox's lock and with one
    /// wake-up; when they all fit, charged at once. Returns how many messages were dropped to
    /// make room (counted in the queue's own counters too), and whether the queue now holds
    /// its publishers back. The fan-out counted them as delivered: a queue closed meanwhile
    /// counts them as discarded with it.
    pub(crate) fn push_all(&self, messages: &mut Vec<Message>) -> (u64, bool) {
        if self.is_closed() {
            if let Some(discarded) = self.discarded.get() {
                discarded.fetch_add(messages.len() as u64, Ordering::Relaxed);
            }
            messages.clear();
            return (0, false);
        }
        let weights: usize = messages.iter().map(weight).sum();
        let count = messages.len();
        let mut inbox = self.inbox();
        let mut dropped = 0;
        if self.fit(messages.len(), weights) {
            self.charge_all(messages.len() as u64, weights);
            inbox.items.extend(messages.drain(..));
        } else {
            for message in messages.drain(..) {
                let weight = weight(&message);
                while self.must_drop(weight) {
                    let Some(oldest) = self.take_oldest(&mut inbox) else { break };
                    self.release(&oldest);
                    dropped += 1;
                }
                self.charge(weight);
                inbox.items.push_back(message);
            }
        }
        if dropped > 0 {
            self.counters.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
        }
        let woken = inbox.waiting.pushed(count, self.dealt_len(), self.dealt.as_deref());
        drop(inbox);
        woken.wake();
        (dropped, self.holds_back())
    }

    /// Whether `count` more messages weighing `weights` together pass every bound as they are.
    fn fit(&self, count: usize, weights: usize) -> bool {
        let load = self.load.load(Ordering::Acquire);
        let (queued, held) = (load >> COUNT_SHIFT, (load & BYTES_MASK) as usize);
        queued + count as u64 <= self.capacity as u64
            && held + weights <= self.max_bytes
            && !self.budget.as_ref().is_some_and(|b| b.would_exceed(held, weights))
    }

    /// The oldest message, for a push that must make room: the consumer's batch's first if no
    /// consumer is taking from it this moment, else the inbox's.
    fn take_oldest(&self, inbox: &mut Inbox) -> Option<Message> {
        let from_batch = match self.batch.try_lock() {
            Ok(mut batch) => batch.pop_front(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().pop_front(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        from_batch.or_else(|| inbox.items.pop_front())
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
        self.charge_all(1, weight);
    }

    /// Charges `count` messages weighing `weights` together.
    fn charge_all(&self, count: u64, weights: usize) {
        let before = self.load.fetch_add(count * COUNT_ONE + weights as u64, Ordering::AcqRel);
        if let Some(budget) = &self.budget {
            budget.add(weights, before & BYTES_MASK == 0);
        }
    }

    fn release(&self, message: &Message) {
        self.uncharge(1, weight(message) as u64);
    }

    /// Gives back the room of `count` messages of `weight` bytes in all.
    #[inline]
    fn uncharge(&self, count: u64, weight: u64) {
        let before = self.load.fetch_sub(count * COUNT_ONE + weight, Ordering::AcqRel);
        if let Some(budget) = &self.budget {
            budget.sub(weight as usize, before & BYTES_MASK == weight);
        }
        self.room_made();
    }

    /// Takes the next message, or learns that there is none yet (`Pending`, with the waker
    /// registered) or ever again (`Ready(None)`, once closed). Messages queued before the
    /// close are discarded: closing means the subscriber is gone.
    #[inline]
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
        if let Some(message) = self.pop_taking(taken, Some(cx.waker()), None) {
            return Poll::Ready(Some(message));
        }
        // Parked under the inbox's lock, which `close` takes too: a close before it is seen
        // here, one after it wakes the waker.
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
        self.pop_taking(taken, None, None)
    }

    /// Pops the next message not replayed already, counting what it takes in `taken`; with
    /// `park`, finding none leaves that waker for the next push (as `member`'s, if given).
    fn pop_taking(
        &self,
        taken: &mut Unreleased,
        park: Option<&Waker>,
        member: Option<&Arc<Credit>>,
    ) -> Option<Message> {
        let mut batch = self.batch.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while let Some(message) = batch.pop_front() {
                taken.count += 1;
                taken.weight += weight(&message) as u64;
                if !self.replayed(&message) {
                    return Some(message);
                }
            }
            if !self.refill(&mut batch, park, member) {
                return None;
            }
        }
    }

    /// Hands `each` the messages there are, in order and not replayed already, until it
    /// returns `false` or `stop` says so before the next (then `true`) or there are none (then
    /// `false`, with `park` left to be woken), counting what it takes in `taken`: under one
    /// take of the batch's lock, where [`Queue::try_pop_taking`] takes it for every message.
    /// Only for a queue of one consumer (a group's members would wait on each other's `each`);
    /// while `each` runs, a push that must drop the oldest message drops the inbox's oldest
    /// instead (see `take_oldest`).
    pub(crate) fn pop_each(
        &self,
        taken: &mut Unreleased,
        park: Option<&Waker>,
        stop: impl Fn() -> bool,
        mut each: impl FnMut(Message) -> bool,
    ) -> bool {
        let mut batch = self.batch.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while !batch.is_empty() {
                if stop() {
                    return true;
                }
                let Some(message) = batch.pop_front() else { break };
                taken.count += 1;
                taken.weight += weight(&message) as u64;
                if !self.replayed(&message) && !each(message) {
                    return true;
                }
            }
            if !self.refill(&mut batch, park, None) {
                return false;
            }
        }
    }

    /// Takes the inbox's messages over into the (empty) `batch`, whose buffer becomes the
    /// inbox's; `false`, with `park` left to be woken, when there are none. A buffer grown by a
    /// burst past `KEEP_SLOTS` is freed once batches are small again, so an idle queue holds at
    /// most two buffers of `KEEP_SLOTS` (none before its first message).
    fn refill(
        &self,
        batch: &mut VecDeque<Message>,
        park: Option<&Waker>,
        member: Option<&Arc<Credit>>,
    ) -> bool {
        let mut inbox = self.inbox();
        if inbox.items.is_empty() {
            match (park, member) {
                (Some(waker), Some(member)) => inbox.waiting.park(member, waker),
                (Some(waker), None) => inbox.waiting.register(waker),
                (None, _) => {}
            }
            drop(inbox);
            if batch.capacity() > KEEP_SLOTS {
                *batch = VecDeque::new();
            }
            return false;
        }
        std::mem::swap(batch, &mut inbox.items);
        let spare = if inbox.items.capacity() > KEEP_SLOTS.max(4 * batch.len()) {
            std::mem::take(&mut inbox.items)
        } else {
            VecDeque::new()
        };
        drop(inbox);
        drop(spare);
        true
    }

    /// Gives back the room in the bounds of the messages counted in `taken`, and counts them
    /// received: one atomic operation on each bound for all of them.
    pub(crate) fn give_back(&self, taken: &mut Unreleased) {
        let Unreleased { count, weight } = std::mem::take(taken);
        if count == 0 {
            return;
        }
        self.uncharge(count, weight);
        self.counters.received.fetch_add(count, Ordering::Relaxed);
    }

    /// Closes the queue and wakes the consumer so it can see the end.
    pub(crate) fn close(&self) {
        let mut inbox = self.inbox();
        self.closed.store(true, Ordering::Release);
        let woken = inbox.waiting.take();
        drop(inbox);
        woken.wake();
        if let Some(pressure) = &self.pressure {
            pressure.wake_all();
        }
    }

    /// Counts the messages this queue still holds when it is dropped into `discarded`.
    pub(crate) fn count_discarded_in(&self, discarded: &Arc<AtomicU64>) {
        let _ = self.discarded.set(Arc::clone(discarded));
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Leaves `waker` to be woken by the next push (or the close), without taking anything.
    pub(crate) fn watch(&self, waker: &Waker) {
        self.inbox().waiting.register(waker);
    }

    /// Wakes the consumer(s), so they look at their state again (a group member that left).
    pub(crate) fn wake(&self) {
        let woken = self.inbox().waiting.take();
        woken.wake();
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
