//! The consuming side of a subscription: the [`Consumer`] that takes messages off its
//! registration's queue (see `shared::register`), under QoS 0 or QoS 1.
//!
//! ```text
//! Registration ── owns ──▶ route (solo) or group membership; dropping it leaves
//! Consumer ── QoS 0 ──▶ Queue::poll_pop, skipping expired messages
//!          └─ QoS 1 ──▶ Tracker::next (credit, redeliveries first, timeouts) + a timer for the
//!                       earliest timeout
//! Acker ──▶ Tracker::ack / nack, dead letters published by the broker
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};
use whispeer_proto::MessageId;

use super::cooperation::Cooperation;
use crate::delivery::Commits;
use crate::delivery::{GiveUp, Settled, Step, Tracker};
use crate::dispatch::Drained;
use crate::message::Message;
use crate::queue::{Credit, Queue, Unreleased};
use crate::retention::Replay;
use crate::shared::{Registration, Shared};
use crate::stats::bump;

/// A message taken for delivery and its attempt number (1 for a first delivery).
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) message: Message,
    pub(crate) attempt: u32,
}

struct Qos1 {
    tracker: Arc<Tracker>,
    member: u64,
    /// Fires when the earliest in-flight message times out.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Takes a registration's messages off its queue.
pub(crate) struct Consumer {
    shared: Arc<Shared>,
    pub(crate) queue: Arc<Queue>,
    left: Arc<AtomicBool>,
    /// QoS 0: retained messages to deliver before the queue's.
    replay: Replay,
    commits: Option<Arc<Commits>>,
    qos1: Option<Qos1>,
    /// A QoS 0 group member's share of what its queue deals (`queue/waiting.rs`).
    credit: Option<Arc<Credit>>,
    cooperation: Cooperation,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("filter", &self.queue.filter)
            .field("qos1", &self.qos1.is_some())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// The consumer of this registration's messages.
    pub(crate) fn of(registration: &Registration) -> Self {
        let replay = std::mem::take(
            &mut *registration.replay.lock().unwrap_or_else(PoisonError::into_inner),
        );
        Self {
            shared: Arc::clone(&registration.shared),
            queue: Arc::clone(&registration.queue),
            left: Arc::clone(&registration.left),
            replay,
            commits: registration.commits.clone(),
            qos1: registration.tracker.as_ref().map(|tracker| Qos1 {
                tracker: Arc::clone(tracker),
                member: registration.member,
                timer: None,
            }),
            credit: registration.queue.deals().then(|| {
                let credit = Arc::new(Credit::default());
                registration.queue.join_member(&credit);
                credit
            }),
            cooperation: Cooperation::default(),
        }
    }

    /// The next message off the queue (as this member, in a dealing group), its room given
    /// back at once.
    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let Some(credit) = &self.credit else { return self.queue.poll_pop(cx) };
        let mut taken = Unreleased::default();
        let popped = self.queue.poll_pop_member(cx, &mut taken, credit);
        self.queue.give_back(&mut taken);
        popped
    }

    /// [`Consumer::poll_pop`] without waiting.
    fn try_pop(&self) -> Option<Message> {
        let Some(credit) = &self.credit else { return self.queue.try_pop() };
        let mut taken = Unreleased::default();
        let popped = self.queue.try_pop_member(&mut taken, credit);
        self.queue.give_back(&mut taken);
        popped
    }

    /// A handle to settle this consumer's QoS 1 messages; `None` under QoS 0.
    pub(crate) fn acker(&self) -> Option<Acker> {
        self.qos1.as_ref().map(|q| Acker {
            shared: Arc::clone(&self.shared),
            queue: Arc::clone(&self.queue),
            tracker: Arc::clone(&q.tracker),
            commits: self.commits.clone(),
        })
    }

    fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    /// Waits for the next message: `Ready(None)` once the subscription has ended.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Taken>> {
        // A poll that finds nothing counts too: it only brings a yield a little nearer.
        std::task::ready!(self.cooperation.spend(cx));
        loop {
            if self.has_left() {
                return Poll::Ready(None);
            }
            if let Some(message) = self.replay.pop() {
                if message.has_expired() {
                    self.count_expired(1);
                    continue;
                }
                return Poll::Ready(Some(Taken { message, attempt: 1 }));
            }
            let Some(qos1) = &mut self.qos1 else {
                return match self.poll_pop(cx) {
                    Poll::Ready(Some(message)) if message.has_expired() => {
                        self.count_expired(1);
                        continue;
                    }
                    other => other.map(|m| m.map(|message| Taken { message, attempt: 1 })),
                };
            };
            let step = qos1.tracker.next(qos1.member, &self.queue, Instant::now(), Some(cx));
            let next_due = step.next_due;
            if let Some(taken) = self.account(step) {
                return Poll::Ready(taken);
            }
            let Some(qos1) = &mut self.qos1 else { return Poll::Pending };
            let Some(at) = next_due else { return Poll::Pending };
            if tokio::runtime::Handle::try_current().is_err() {
                // No timer outside a runtime: timeouts are noticed at the next poll.
                return Poll::Pending;
            }
            let timer = qos1.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Takes the next message if one is ready, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Taken> {
        loop {
            if self.has_left() {
                return None;
            }
            let Some(qos1) = &self.qos1 else {
                let message = match self.replay.pop() {
                    Some(message) => message,
                    None => self.try_pop()?,
                };
                if message.has_expired() {
                    self.count_expired(1);
                    continue;
                }
                return Some(Taken { message, attempt: 1 });
            };
            let step = qos1.tracker.next(qos1.member, &self.queue, Instant::now(), None);
            return self.account(step).flatten();
        }
    }

    /// Hands the messages ready now to `each`, in order, while it returns `true`: for a caller
    /// that takes many in a row (a dispatcher's turn, a connection's writer). Under QoS 0 their
    /// room in the queue's bounds is given back once, when it returns, rather than message by
    /// message. With `cx`, running out registers its waker, as [`Consumer::poll_next`] does;
    /// without, an ended subscription reads as empty, as in [`Consumer::try_next`].
    pub(crate) fn drain(
        &mut self,
        mut cx: Option<&mut Context<'_>>,
        mut each: impl FnMut(&Queue, Taken) -> bool,
    ) -> Drained {
        if self.qos1.is_some() || !self.replay.is_empty() {
            // Message by message: the tracker, or the replay before the queue, decides.
            loop {
                let next = match cx.as_deref_mut() {
                    Some(cx) => self.poll_next(cx),
                    None => self.try_next().map_or(Poll::Pending, |taken| Poll::Ready(Some(taken))),
                };
                match next {
                    Poll::Ready(Some(taken)) => {
                        if !each(&self.queue, taken) {
                            return Drained::More;
                        }
                    }
                    Poll::Ready(None) => return Drained::Ended,
                    Poll::Pending => return Drained::Empty,
                }
            }
        }
        let queue = &*self.queue;
        // Given back when this returns, or if `each` panics.
        let mut unreleased = GiveBack { queue, taken: Unreleased::default() };
        if queue.group.is_none() {
            return self.drain_one_consumer(cx, &mut unreleased.taken, each);
        }
        loop {
            if self.has_left() {
                return if cx.is_some() { Drained::Ended } else { Drained::Empty };
            }
            let taken = &mut unreleased.taken;
            let next = match (cx.as_deref_mut(), &self.credit) {
                (Some(cx), Some(credit)) => queue.poll_pop_member(cx, taken, credit),
                (Some(cx), None) => queue.poll_pop_taking(cx, taken),
                (None, Some(credit)) => queue
                    .try_pop_member(taken, credit)
                    .map_or(Poll::Pending, |m| Poll::Ready(Some(m))),
                (None, None) => {
                    queue.try_pop_taking(taken).map_or(Poll::Pending, |m| Poll::Ready(Some(m)))
                }
            };
            match next {
                Poll::Ready(Some(message)) if message.has_expired() => self.count_expired(1),
                Poll::Ready(Some(message)) => {
                    if !each(queue, Taken { message, attempt: 1 }) {
                        return Drained::More;
                    }
                }
                Poll::Ready(None) => return Drained::Ended,
                Poll::Pending => return Drained::Empty,
            }
        }
    }

    /// [`Consumer::drain`] of a queue with one consumer under QoS 0: the messages handed out
    /// under one take of the queue's batch (see [`Queue::pop_each`]).
    fn drain_one_consumer(
        &self,
        mut cx: Option<&mut Context<'_>>,
        taken: &mut Unreleased,
        mut each: impl FnMut(&Queue, Taken) -> bool,
    ) -> Drained {
        let queue = &*self.queue;
        if self.has_left() || queue.is_closed() {
            return if cx.is_some() { Drained::Ended } else { Drained::Empty };
        }
        let mut expired = 0;
        let park = cx.as_deref_mut().map(|cx| cx.waker());
        let stopped = queue.pop_each(
            taken,
            park,
            || self.has_left(),
            |message| {
                if message.has_expired() {
                    expired += 1;
                    return true;
                }
                each(queue, Taken { message, attempt: 1 })
            },
        );
        if expired > 0 {
            self.count_expired(expired);
        }
        match (stopped, self.has_left()) {
            (_, true) if cx.is_some() => Drained::Ended,
            (_, true) => Drained::Empty,
            (true, false) => Drained::More,
            // Parked under the inbox's lock, as `poll_pop_taking` does: a close before it is
            // seen here, one after it wakes the waker.
            (false, false) if cx.is_some() && queue.is_closed() => Drained::Ended,
            (false, false) => Drained::Empty,
        }
    }

    /// Counts what a QoS 1 step dropped and publishes its dead letters. `Some` is the result to
    /// return: a message, or `None` for the end.
    fn account(&self, step: Step) -> Option<Option<Taken>> {
        let counters = &self.shared.counters;
        if step.expired > 0 {
            self.count_expired(step.expired);
        }
        if step.duplicates > 0 {
            counters.duplicates.fetch_add(step.duplicates, Ordering::Relaxed);
        }
        for letter in step.dead {
            if let Some(commits) = &self.commits {
                self.shared.committed(commits, std::slice::from_ref(&letter.message));
            }
            self.shared.dead_letter(letter, &self.queue.counters);
        }
        match step.next {
            Some((message, attempt)) => {
                if attempt > 1 {
                    bump(&self.queue.counters.redelivered);
                    bump(&counters.redelivered);
                }
                Some(Some(Taken { message, attempt }))
            }
            None if step.closed => Some(None),
            None => None,
        }
    }

    fn count_expired(&self, count: u64) {
        self.queue.counters.expired.fetch_add(count, Ordering::Relaxed);
        self.shared.counters.expired.fetch_add(count, Ordering::Relaxed);
    }
}

/// Gives back the room of the messages a drain took when it goes, however it goes.
struct GiveBack<'q> {
    queue: &'q Queue,
    taken: Unreleased,
}

impl Drop for Consumer {
    /// A member of a dealing group leaves its deals: what it was dealt goes to the others.
    fn drop(&mut self) {
        if let Some(credit) = &self.credit {
            self.queue.leave_member(credit);
        }
    }
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        self.queue.give_back(&mut self.taken);
    }
}

/// Settles QoS 1 messages of one subscription by id: what a [`Delivery`] does, for callers that
/// keep only the id (the server, whose acks arrive as frames).
#[derive(Clone)]
pub struct Acker {
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    tracker: Arc<Tracker>,
    commits: Option<Arc<Commits>>,
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acker").field("filter", &self.queue.filter).finish_non_exhaustive()
    }
}

impl Acker {
    /// Acknowledges message `id`: it will not be delivered again. Returns whether it was
    /// unacknowledged (a second ack, or one after the message went elsewhere, returns `false`).
    pub fn ack(&self, id: MessageId) -> bool {
        let Settled::Done(message) = self.tracker.ack(id) else { return false };
        self.acked(std::slice::from_ref(&message));
        true
    }

    /// [`Acker::ack`] of each of `ids`, in order, settled together: one take of the tracker's
    /// lock and one count for them all (a connection's read of acks). Returns how many were
    /// unacknowledged.
    pub fn ack_all(&self, ids: impl IntoIterator<Item = MessageId>) -> u64 {
        let mut settled = Vec::new();
        self.tracker.ack_all(ids, &mut settled);
        self.acked(&settled);
        settled.len() as u64
    }

    /// Counts `settled`, just acknowledged, and commits them for a durable subscription.
    fn acked(&self, settled: &[Message]) {
        if settled.is_empty() {
            return;
        }
        let count = settled.len() as u64;
        self.queue.counters.acked.fetch_add(count, Ordering::Relaxed);
        self.shared.counters.acked.fetch_add(count, Ordering::Relaxed);
        if let Some(commits) = &self.commits {
            self.shared.committed(commits, settled);
        }
    }

    /// Refuses message `id`: with `requeue`, it is delivered again at once (to this subscriber
    /// or another member of its group), counting an attempt; without, it goes to the
    /// dead-letter topic. Returns whether it was unacknowledged.
    pub fn nack(&self, id: MessageId, requeue: bool) -> bool {
        self.refuse(id, requeue, GiveUp::Rejected)
    }

    pub(crate) fn refuse(&self, id: MessageId, requeue: bool, reason: GiveUp) -> bool {
        let settled = self.tracker.nack(id, requeue, reason);
        if matches!(settled, Settled::Unknown) {
            return false;
        }
        bump(&self.queue.counters.nacked);
        bump(&self.shared.counters.nacked);
        if let Settled::Dead(letter) = settled {
            if let Some(commits) = &self.commits {
                self.shared.committed(commits, std::slice::from_ref(&letter.message));
            }
            self.shared.dead_letter(letter, &self.queue.counters);
        }
        true
    }
}

/// A message handed to a subscriber, with its QoS 1 handle: acknowledge it with
/// [`ack`](Self::ack) once processed, or refuse it with [`nack`](Self::nack). Dropping it
/// without either leaves it unacknowledged: it is delivered again after its ack timeout.
#[derive(Debug)]
pub struct Delivery<T> {
    value: T,
    message: Message,
    attempt: u32,
    acker: Option<Acker>,
}

impl<T> Delivery<T> {
    pub(crate) fn new(value: T, taken: Taken, acker: Option<Acker>) -> Self {
        Self { value, message: taken.message, attempt: taken.attempt, acker }
    }

    /// The decoded value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The decoded value, leaving the message unacknowledged.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The message: id, topic, headers, payload.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// 1 for a first delivery; more for a redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the message was delivered before (to this subscriber or another group member)
    /// and not acknowledged.
    pub fn is_redelivery(&self) -> bool {
        self.attempt > 1
    }

    /// Acknowledges the message. Returns whether it was still unacknowledged (`false` under
    /// QoS 0, or after its ack timeout handed it elsewhere and that copy was acknowledged).
    pub fn ack(self) -> bool {
        self.acker.as_ref().is_some_and(|a| a.ack(self.message.id()))
    }

    /// Refuses the message; see [`Acker::nack`].
    pub fn nack(self, requeue: bool) -> bool {
        self.acker.as_ref().is_some_and(|a| a.nack(self.message.id(), requeue))
    }

    /// Splits the delivery into its value and a handle that acknowledges it later.
    pub fn into_parts(self) -> (T, Option<(Acker, MessageId)>) {
        let id = self.message.id();
        (self.value, self.acker.map(|a| (a, id)))
    }
}
