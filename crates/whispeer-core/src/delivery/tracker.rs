//! QoS 1 bookkeeping: what is delivered but not yet acknowledged, when to deliver it again, and
//! when to give it up.
//!
//! One [`Tracker`] serves one QoS 1 subscription, or one queue group whose members share it.
//! Messages come off the subscription's [`Queue`] into the tracker's in-flight table, each
//! charged to the member it went to; an ack removes it, a timeout or a nack with requeue moves it
//! to the `ready` list, from which the next polling member takes it again (before anything new),
//! with its attempt count raised. A member that leaves hands its in-flight messages back the same
//! way. A message that has been delivered `max_attempts` times, or is nacked without requeue,
//! becomes a dead letter for the caller to publish.
//!
//! ```text
//! Queue ──take (credit left)──▶ in flight ──ack──▶ gone
//!   ▲                              │ timeout / nack(requeue) / member left
//!   └── ready (taken first) ◀──────┘           └── attempts used up / nack ──▶ dead letter
//! ```
//!
//! The state sits behind one mutex, taken once per delivery, ack or timeout and never across an
//! `.await`; publishers never touch it. Times come from `tokio::time`, so tests can pause the
//! clock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;
use whispeer_proto::MessageId;

use super::flight::Flight;
use crate::hash::FastMap;
use crate::message::Message;
use crate::queue::Queue;
use crate::retention::Replay;

/// When to deliver an unacknowledged QoS 1 message again, and when to give it up.
///
/// After delivery number `n` (1 for the first), the broker waits
/// `min(ack_timeout × backoff_factor^(n−1), max_delay)`, shortened by a random fraction of up
/// to `jitter`, for an ack; without one it delivers the message again, marked with attempt
/// `n + 1`. After `max_attempts` deliveries without an ack the message goes to the dead-letter
/// topic `$dlq/<topic>`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Redelivery {
    /// How long the first delivery waits for its ack. Default: 30 s.
    pub ack_timeout: Duration,
    /// How much longer each further delivery waits than the one before. Default: 2.
    pub backoff_factor: f64,
    /// The longest wait. Default: 10 minutes.
    pub max_delay: Duration,
    /// Up to this fraction of each wait is taken off at random, so that messages delivered
    /// together are not all redelivered together (0 to 1). Default: 0.1.
    pub jitter: f64,
    /// Deliveries before a message is dead-lettered (at least 1). Default: 5.
    pub max_attempts: u32,
}

impl Default for Redelivery {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(30),
            backoff_factor: 2.0,
            max_delay: Duration::from_secs(600),
            jitter: 0.1,
            max_attempts: 5,
        }
    }
}

impl Redelivery {
    /// A policy with this first ack timeout and the other defaults.
    pub fn new(ack_timeout: Duration) -> Self {
        Self { ack_timeout, ..Self::default() }
    }

    /// This policy with the given backoff: each wait `factor` times the one before, at most
    /// `max_delay`.
    pub fn backoff(mut self, factor: f64, max_delay: Duration) -> Self {
        self.backoff_factor = factor;
        self.max_delay = max_delay;
        self
    }

    /// This policy with the given jitter fraction (clamped to 0..=1).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// This policy with the given number of deliveries before dead-lettering (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The longest wait for an ack after delivery number `attempt` (1 for the first), before
    /// jitter.
    pub fn wait(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.backoff_factor.max(1.0).powi(exponent);
        let cap = self.max_delay.max(self.ack_timeout);
        Duration::try_from_secs_f64(self.ack_timeout.as_secs_f64() * factor)
            .map_or(cap, |wait| wait.min(cap))
    }

    /// The wait after delivery `attempt`, with part of the jitter taken off. `noise` is any
    /// well-mixed number (the tracker's sequence number, scrambled): jitter only has to spread
    /// redeliveries out, not be unpredictable, and a system call per delivery would cost more
    /// than the delivery.
    fn jittered_wait(&self, attempt: u32, noise: u64) -> Duration {
        let wait = self.wait(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return wait;
        }
        let fraction = (splitmix64(noise) >> 11) as f64 / (1u64 << 53) as f64;
        wait.mul_f64(1.0 - jitter * fraction)
    }

    fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }
}

/// SplitMix64's finaliser: spreads consecutive numbers over all 64 bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Why a message was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Delivered `max_attempts` times without an ack.
    MaxAttempts,
    /// Nacked without requeue.
    Rejected,
    /// The subscriber could not decode it.
    Undecodable,
}

impl GiveUp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max-attempts",
            Self::Rejected => "rejected",
            Self::Undecodable => "undecodable",
        }
    }
}

/// A message to publish to the dead-letter topic.
#[derive(Debug)]
pub(crate) struct GivenUp {
    pub(crate) message: Message,
    pub(crate) attempts: u32,
    pub(crate) reason: GiveUp,
}

/// What one poll of the tracker found.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// The message to deliver and its attempt number (1 for the first delivery).
    pub(crate) next: Option<(Message, u32)>,
    /// The queue is closed: nothing will come.
    pub(crate) closed: bool,
    /// Messages given up meanwhile.
    pub(crate) dead: Vec<GivenUp>,
    /// Messages dropped because their time to live ran out.
    pub(crate) expired: u64,
    /// Messages dropped because the same id was already in flight.
    pub(crate) duplicates: u64,
    /// When the earliest in-flight message times out.
    pub(crate) next_due: Option<Instant>,
}

/// The result of an ack or nack.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Removed from the in-flight table (or the ready list).
    Done(Message),
    /// Nacked with requeue: ready for the next member.
    Requeued,
    /// Given up: publish this dead letter.
    Dead(GivenUp),
    /// No such message in flight: acked already, or never delivered here.
    Unknown,
}

struct Entry {
    message: Message,
    attempt: u32,
    member: u64,
    due: (Instant, u64),
}

struct Ready {
    message: Message,
    /// Deliveries so far.
    attempt: u32,
}

struct Member {
    prefetch: usize,
    in_flight: usize,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    in_flight: Flight<Entry>,
    due: BTreeMap<(Instant, u64), MessageId>,
    ready: VecDeque<Ready>,
    /// Retained history still to deliver, after `ready` and before the queue.
    replay: Option<Replay>,
    members: FastMap<u64, Member>,
    next_seq: u64,
    next_member: u64,
}

impl State {
    fn wake_all(&mut self) {
        for member in self.members.values_mut() {
            if let Some(waker) = member.waker.take() {
                waker.wake();
            }
        }
    }

    /// Whether `member` may take another message: a group's member holds at most its share
    /// (rounded up) of everything there is, in flight and waiting (`queued` in the queue), so
    /// that a burst is spread over the members rather than taken whole by the first to poll. A
    /// member alone, or one whose fellows hold more, takes up to its prefetch; a fellow that
    /// does not come for its share only holds the others to theirs, taken as their own
    /// messages settle.
    fn within_share(&self, member: u64, queued: usize) -> bool {
        let members = self.members.len();
        // Retained history first: each takes what its credit allows.
        if members < 2 || self.replay.is_some() {
            return true;
        }
        let there_is = self.in_flight.len() + self.ready.len() + queued;
        // A member with nothing in flight may always take one: a refused member has
        // something to settle, whose settling wakes it.
        let share = there_is.div_ceil(members).max(1);
        self.members.get(&member).is_some_and(|m| m.in_flight < share)
    }

    /// Takes `id` out of flight, giving its member the credit back.
    fn take(&mut self, id: MessageId) -> Option<Entry> {
        let entry = self.in_flight.remove(id)?;
        self.due.remove(&entry.due);
        if let Some(member) = self.members.get_mut(&entry.member) {
            member.in_flight -= 1;
            if let Some(waker) = member.waker.take() {
                waker.wake();
            }
        }
        Some(entry)
    }

    /// Puts a message that was not acknowledged back for redelivery, or gives it up.
    fn retry(&mut self, message: Message, attempt: u32, max: u32, dead: &mut Vec<GivenUp>) {
        if attempt >= max {
            dead.push(GivenUp { message, attempts: attempt, reason: GiveUp::MaxAttempts });
        } else {
            self.ready.push_back(Ready { message, attempt });
        }
    }
}

/// The in-flight state of one QoS 1 subscription or queue group. See the module documentation.
pub(crate) struct Tracker {
    policy: Redelivery,
    /// Makes each tracker's jitter sequence different.
    salt: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Tracker")
            .field("policy", &self.policy)
            .field("in_flight", &state.in_flight.len())
            .field("ready", &state.ready.len())
            .field("members", &state.members.len())
            .finish()
    }
}

impl Tracker {
    pub(crate) fn new(policy: Redelivery) -> Self {
        let salt = getrandom::u64().unwrap_or(0);
        Self { policy, salt, state: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a member that may hold up to `prefetch` unacknowledged messages; returns its id.
    pub(crate) fn join(&self, prefetch: usize) -> u64 {
        let mut state = self.lock();
        let id = state.next_member;
        state.next_member += 1;
        state.members.insert(id, Member { prefetch: prefetch.max(1), in_flight: 0, waker: None });
        id
    }

    /// Removes a member; its unacknowledged messages become ready for the others (or dead
    /// letters, if their attempts are used up).
    pub(crate) fn leave(&self, member: u64) -> Vec<GivenUp> {
        let mut state = self.lock();
        state.members.remove(&member);
        let mut mine: Vec<(u64, MessageId)> = state
            .in_flight
            .iter()
            .filter(|(_, entry)| entry.member == member)
            .map(|(id, entry)| (entry.due.1, id))
            .collect();
        // In the order they were delivered.
        mine.sort_unstable();
        let mut dead = Vec::new();
        let max = self.policy.attempts();
        for (_, id) in mine {
            if let Some(entry) = state.take(id) {
                state.retry(entry.message, entry.attempt, max, &mut dead);
            }
        }
        state.wake_all();
        dead
    }

    /// Moves timed-out messages to the ready list (or gives them up).
    fn expire(&self, state: &mut State, now: Instant, dead: &mut Vec<GivenUp>) {
        let max = self.policy.attempts();
        let mut moved = false;
        while let Some((&(at, _), &id)) = state.due.first_key_value() {
            if at > now {
                break;
            }
            if let Some(entry) = state.take(id) {
                state.retry(entry.message, entry.attempt, max, dead);
                moved = true;
            }
        }
        if moved {
            state.wake_all();
        }
    }

    /// Finds the next message for `member`: first a redelivery, then a new message from
    /// `queue`, if the member has credit left. With `cx`, registers for a wake-up when there is
    /// nothing to take (the caller still has to wait for `next_due`).
    pub(crate) fn next(
        &self,
        member: u64,
        queue: &Queue,
        now: Instant,
        mut cx: Option<&mut Context<'_>>,
    ) -> Step {
        let mut step = Step::default();
        let mut state = self.lock();
        self.expire(&mut state, now, &mut step.dead);
        step.next_due = state.due.first_key_value().map(|(&(at, _), _)| at);
        if queue.is_closed() {
            step.closed = true;
            return step;
        }
        let has_credit = match state.members.get_mut(&member) {
            Some(m) if m.in_flight < m.prefetch => true,
            Some(m) => {
                if let Some(cx) = cx.as_deref_mut() {
                    m.waker = Some(cx.waker().clone());
                }
                false
            }
            None => {
                step.closed = true;
                return step;
            }
        };
        if !has_credit {
            return step;
        }
        // Only a group's members have shares: a lone subscription reads no queue length.
        let queued = if state.members.len() > 1 { queue.len() } else { 0 };
        if !state.within_share(member, queued) {
            // Left to the others. A fellow's share grows only with a push, which wakes those
            // parked on the queue or held to their share, or as its own messages settle, which
            // wakes it: so this one is woken by either too.
            if let (Some(cx), Some(m)) = (cx, state.members.get_mut(&member)) {
                m.waker = Some(cx.waker().clone());
                // And at the next push, which raises its share (one since the look: now).
                queue.watch(cx.waker());
                if queue.len() != queued {
                    cx.waker().wake_by_ref();
                }
            }
            return step;
        }
        loop {
            let fields = &mut *state;
            let replayed = match &mut fields.replay {
                Some(replay) if fields.ready.is_empty() => replay.pop(),
                _ => None,
            };
            if replayed.is_none() && fields.ready.is_empty() {
                fields.replay = None;
            }
            let (message, attempt) = if let Some(ready) = state.ready.pop_front() {
                (ready.message, ready.attempt + 1)
            } else if let Some(message) = replayed {
                (message, 1)
            } else {
                let popped = match cx.as_deref_mut() {
                    Some(cx) => queue.poll_pop(cx),
                    None => Poll::Ready(queue.try_pop()),
                };
                match popped {
                    Poll::Ready(Some(message)) => (message, 1),
                    Poll::Ready(None) if queue.is_closed() => {
                        step.closed = true;
                        break;
                    }
                    Poll::Ready(None) | Poll::Pending => {
                        if let (Some(cx), Some(m)) = (cx, state.members.get_mut(&member)) {
                            m.waker = Some(cx.waker().clone());
                        }
                        break;
                    }
                }
            };
            if message.is_expired(now) {
                step.expired += 1;
                continue;
            }
            let id = message.id();
            if state.in_flight.contains(id) {
                step.duplicates += 1;
                continue;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let due = (now + self.policy.jittered_wait(attempt, seq ^ self.salt), seq);
            state.due.insert(due, id);
            if step.next_due.is_none_or(|at| due.0 < at) {
                step.next_due = Some(due.0);
            }
            if let Some(m) = state.members.get_mut(&member) {
                m.in_flight += 1;
            }
            state.in_flight.insert(id, Entry { message: message.clone(), attempt, member, due });
            step.next = Some((message, attempt));
            break;
        }
        step
    }

    /// Settles `id` as processed.
    pub(crate) fn ack(&self, id: MessageId) -> Settled {
        Self::ack_locked(&mut self.lock(), id)
    }

    /// [`Tracker::ack`] of each of `ids` under one take of the lock (a read of acks from a
    /// connection: the deliverer, on another thread, meets the lock once for them all); the
    /// messages that were unacknowledged go to `settled`.
    pub(crate) fn ack_all(
        &self,
        ids: impl IntoIterator<Item = MessageId>,
        settled: &mut Vec<Message>,
    ) {
        let mut state = self.lock();
        for id in ids {
            if let Settled::Done(message) = Self::ack_locked(&mut state, id) {
                settled.push(message);
            }
        }
    }

    fn ack_locked(state: &mut State, id: MessageId) -> Settled {
        if let Some(entry) = state.take(id) {
            return Settled::Done(entry.message);
        }
        // Acked after its timeout, before anyone took it again.
        match state.ready.iter().position(|ready| ready.message.id() == id) {
            Some(at) => {
                state.ready.remove(at).map_or(Settled::Unknown, |r| Settled::Done(r.message))
            }
            None => Settled::Unknown,
        }
    }

    /// Settles `id` as not processed: ready again at once (counting an attempt), or given up
    /// with `reason`.
    pub(crate) fn nack(&self, id: MessageId, requeue: bool, reason: GiveUp) -> Settled {
        let mut state = self.lock();
        let Some(entry) = state.take(id) else { return Settled::Unknown };
        if requeue {
            let mut dead = Vec::new();
            state.retry(entry.message, entry.attempt, self.policy.attempts(), &mut dead);
            state.wake_all();
            return match dead.pop() {
                Some(letter) => Settled::Dead(letter),
                None => Settled::Requeued,
            };
        }
        Settled::Dead(GivenUp { message: entry.message, attempts: entry.attempt, reason })
    }

    /// Delivers retained messages before anything from the queue, as not yet delivered (their
    /// first delivery is attempt 1); they are taken from `history` as credit allows.
    pub(crate) fn preload(&self, history: Replay) {
        let mut state = self.lock();
        state.replay = (!history.is_empty()).then_some(history);
    }

    /// Unacknowledged messages: in flight and waiting for redelivery.
    pub(crate) fn unacked(&self) -> usize {
        let state = self.lock();
        state.in_flight.len() + state.ready.len()
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
