//! The consuming side of a subscription: its registration (a route of its own, or membership of
//! a queue group) and the [`Consumer`] that takes messages off its queue, under QoS 0 or QoS 1.
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
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use std::any::TypeId;
use std::sync::atomic::Ordering as AtomicOrdering;

use tokio::time::{Instant, Sleep};
use whispeer_proto::{Filter, MessageId, Qos, StartAt, Topic};

use crate::broker::{MAX_QUEUE_CAPACITY, Shared};
use crate::commit::Commits;
use crate::delivery::{GiveUp, Settled, Step, Tracker};
use crate::error::SubscribeError;
use crate::group::{Group, GroupKey, Left, MAX_GROUP_NAME};
use crate::message::Message;
use crate::queue::{Queue, SlowConsumer};
use crate::replay::{Replay, StoredRange};
use crate::router::{Route, SubId};
use crate::stats::{SubscriptionStats, bump};
use crate::subscription::SubscribeOptions;

/// What a registration owns in the router.
#[derive(Debug)]
enum Owns {
    /// A route of its own.
    Route(SubId),
    /// Membership of a group.
    Member(GroupKey),
}

/// A subscription's hold on the broker; dropping it unsubscribes (or leaves the group).
pub(crate) struct Registration {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Arc<Queue>,
    tracker: Option<Arc<Tracker>>,
    member: u64,
    owns: Owns,
    /// Set when this registration ends, for its consumer (the queue may live on in a group).
    left: Arc<AtomicBool>,
    /// QoS 0: retained messages its consumer delivers before the queue's.
    replay: Mutex<Replay>,
    /// A durable subscription's committed offsets (its group's).
    commits: Option<Arc<Commits>>,
}

impl Registration {
    pub(crate) fn solo(
        shared: Arc<Shared>,
        id: SubId,
        queue: Arc<Queue>,
        tracker: Option<Arc<Tracker>>,
        prefetch: usize,
    ) -> Self {
        let member = tracker.as_ref().map_or(0, |t| t.join(prefetch));
        let (left, replay) = (Arc::default(), Mutex::default());
        let owns = Owns::Route(id);
        Self { shared, queue, tracker, member, owns, left, replay, commits: None }
    }

    /// This registration delivering `history` before its queue: QoS 1 through its tracker (as
    /// messages not yet delivered), QoS 0 through its consumer.
    fn replaying(self, history: Replay) -> Self {
        match &self.tracker {
            Some(tracker) => tracker.preload(history),
            None => *self.replay.lock().unwrap_or_else(PoisonError::into_inner) = history,
        }
        self
    }

    pub(crate) fn member(
        shared: Arc<Shared>,
        key: GroupKey,
        group: &Group,
        prefetch: usize,
    ) -> Self {
        let tracker = group.tracker.clone();
        let member = tracker.as_ref().map_or(0, |t| t.join(prefetch));
        let queue = Arc::clone(&group.queue);
        let (left, replay, commits) = (Arc::default(), Mutex::default(), group.commits.clone());
        let owns = Owns::Member(key);
        Self { shared, queue, tracker, member, owns, left, replay, commits }
    }

    /// The consumer of this registration's messages.
    pub(crate) fn consumer(&self) -> Consumer {
        let replay =
            std::mem::take(&mut *self.replay.lock().unwrap_or_else(PoisonError::into_inner));
        Consumer {
            shared: Arc::clone(&self.shared),
            queue: Arc::clone(&self.queue),
            left: Arc::clone(&self.left),
            replay,
            commits: self.commits.clone(),
            qos1: self.tracker.as_ref().map(|tracker| Qos1 {
                tracker: Arc::clone(tracker),
                member: self.member,
                timer: None,
            }),
        }
    }

    pub(crate) fn stats(&self) -> SubscriptionStats {
        let unacked = self.tracker.as_ref().map_or(0, |t| t.unacked());
        self.queue.counters.snapshot(self.queue.len(), unacked)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.queue.is_closed() || self.left.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("filter", &self.queue.filter)
            .field("owns", &self.owns)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.left.store(true, Ordering::Release);
        match &self.owns {
            Owns::Route(id) => self.shared.unsubscribe(*id, &self.queue),
            Owns::Member(key) => {
                if let Some(tracker) = &self.tracker {
                    for letter in tracker.leave(self.member) {
                        if let Some(commits) = &self.commits {
                            self.shared.committed(commits, &letter.message);
                        }
                        self.shared.dead_letter(letter, &self.queue.counters);
                    }
                }
                // Wake this member's consumer (and the others, harmlessly) to see it has left.
                self.queue.wake();
                Shared::leave_group(&self.shared, key);
            }
        }
    }
}

impl Shared {
    /// Creates a subscription after the checks every kind shares: routes a queue of its own,
    /// or joins (or creates) its group. `typed` is the subscriber's type, if it has one.
    pub(crate) fn register(
        this: &Arc<Self>,
        options: &SubscribeOptions,
        typed: Option<(TypeId, &'static str)>,
    ) -> Result<Registration, SubscribeError> {
        let filter = Filter::parse_with(options.filter(), &this.options.limits)?;
        if let (true, Some((type_id, found))) = (filter.is_exact(), typed)
            && let Some(bound) = this.binding(filter.as_str())
            && bound.type_id != type_id
        {
            let topic = Topic::parse_with(filter.as_str(), &this.options.limits)?;
            return Err(SubscribeError::WrongType { topic, expected: bound.type_name, found });
        }
        let capacity = options.queue_capacity().unwrap_or(this.options.queue_capacity);
        if !(1..=MAX_QUEUE_CAPACITY).contains(&capacity) {
            return Err(SubscribeError::InvalidCapacity { capacity, max: MAX_QUEUE_CAPACITY });
        }
        let prefetch = options.prefetch.unwrap_or(this.options.prefetch);
        if !(1..=MAX_QUEUE_CAPACITY).contains(&prefetch) {
            return Err(SubscribeError::InvalidPrefetch { prefetch, max: MAX_QUEUE_CAPACITY });
        }
        if let Some(name) = &options.group
            && (name.is_empty()
                || name.len() > MAX_GROUP_NAME
                || name.chars().any(char::is_control))
        {
            return Err(SubscribeError::InvalidGroup { name: name.clone() });
        }
        for plugin in this.plugins.iter() {
            plugin.on_subscribe(&filter).map_err(|rejection| SubscribeError::Rejected {
                plugin: plugin.name(),
                reason: rejection.reason,
            })?;
        }
        // A QoS 1 subscriber is not dropped messages silently: unless it chose otherwise, a full
        // queue refuses the publish, so the publisher hears of it instead of getting an ack.
        let default_policy = if is_qos1(options.qos) {
            SlowConsumer::FailPublish
        } else {
            this.options.slow_consumer
        };
        let policy = options.policy().unwrap_or(default_policy);
        let max_bytes = options.queue_max_bytes().unwrap_or(this.options.queue_max_bytes);
        let redelivery = options.redelivery.unwrap_or(this.options.redelivery);
        let tracker = || is_qos1(options.qos).then(|| Arc::new(Tracker::new(redelivery)));
        if matches!(options.start, StartAt::Offset(_)) && !filter.is_exact() {
            let reason = "an offset belongs to one topic: subscribe to an exact topic";
            return Err(SubscribeError::InvalidStart { reason });
        }
        let Some(name) = &options.group else {
            let queue = Queue::new(filter, capacity, max_bytes, policy);
            let queue = Arc::new(queue.with_budget(options.budget.clone()));
            let id = this.route_queue(&queue);
            // The route is in place before the history is read: see `retention`.
            let replay = match options.start {
                StartAt::Latest => Replay::default(),
                start => match this.history.snapshot(&queue.filter, start) {
                    Ok(snapshot) => {
                        queue.set_replay_from(snapshot.live_from);
                        this.replay(snapshot.stored, snapshot.messages)
                    }
                    Err(err) => {
                        this.unsubscribe(id, &queue);
                        return Err(err);
                    }
                },
            };
            let registration = Registration::solo(Arc::clone(this), id, queue, tracker(), prefetch);
            return Ok(registration.replaying(replay));
        };
        if options.start != StartAt::Latest && !is_qos1(options.qos) {
            let reason = "a QoS 0 queue group cannot replay history";
            return Err(SubscribeError::InvalidStart { reason });
        }
        let key: GroupKey = (filter.as_str().into(), name.as_str().into());
        let group = this.groups.join(key.clone(), options.qos, || {
            let queue = Arc::new(Queue::new(filter, capacity, max_bytes, policy).shared_by_many());
            let id = this.route_queue(&queue);
            let tracker = tracker();
            let mut commits = None;
            if tracker.is_some() && this.history.is_active() {
                // A durable subscription: resume after its commits, if it has any.
                let stored = this.commits.get(&key);
                let snapshot =
                    this.history.snapshot_resuming(&queue.filter, options.start, stored.as_ref());
                let snapshot = match snapshot {
                    Ok(snapshot) => snapshot,
                    Err(err) => {
                        this.unsubscribe(id, &queue);
                        return Err(err);
                    }
                };
                let committed = snapshot.starts.iter().map(|(t, from)| (t.clone(), from - 1));
                commits = Some(Arc::new(Commits::new(key.clone(), committed.collect())));
                queue.set_replay_from(snapshot.live_from);
                if let Some(tracker) = &tracker {
                    tracker.preload(this.replay(snapshot.stored, snapshot.messages));
                }
            }
            Ok(Arc::new(Group { id, queue, tracker, qos: options.qos, commits }))
        })?;
        Ok(Registration::member(Arc::clone(this), key, &group, prefetch))
    }

    /// A replay of `stored` ranges from this broker's store, then `memory`.
    fn replay(&self, stored: Vec<StoredRange>, memory: Vec<Message>) -> Replay {
        Replay::new(self.store.clone(), self.engines.clone(), stored, memory)
    }

    fn route_queue(&self, queue: &Arc<Queue>) -> SubId {
        let id = SubId(self.next_sub.fetch_add(1, AtomicOrdering::Relaxed));
        self.router.insert(&queue.filter, Route { id, queue: Arc::clone(queue) });
        id
    }

    /// A member left group `key`: removes the group when it was the last, at once or after the
    /// linger.
    pub(crate) fn leave_group(this: &Arc<Self>, key: &GroupKey) {
        let linger = this.options.group_linger;
        match this.groups.leave(key, !linger.is_zero()) {
            Left::Stays => {}
            Left::Remove(group) => this.unsubscribe(group.id, &group.queue),
            Left::Linger(generation) => {
                let shared = Arc::downgrade(this);
                let owned = key.clone();
                let expire = async move {
                    tokio::time::sleep(linger).await;
                    let Some(shared) = shared.upgrade() else { return };
                    if let Some(group) = shared.groups.expire(&owned, generation) {
                        tracing::debug!(filter = %owned.0, group = %owned.1, "idle group removed");
                        shared.unsubscribe(group.id, &group.queue);
                    }
                };
                if this.spawner.spawn(expire).is_err()
                    && let Some(group) = this.groups.expire(key, generation)
                {
                    this.unsubscribe(group.id, &group.queue);
                }
            }
        }
    }
}

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
                return match self.queue.poll_pop(cx) {
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
                    None => self.queue.try_pop()?,
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
                self.shared.committed(commits, &letter.message);
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
        bump(&self.queue.counters.acked);
        bump(&self.shared.counters.acked);
        if let Some(commits) = &self.commits {
            self.shared.committed(commits, &message);
        }
        true
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
                self.shared.committed(commits, &letter.message);
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

    /// Acknowledges the message and returns the value.
    pub(crate) fn acked_value(self) -> T {
        if let Some(acker) = &self.acker {
            acker.ack(self.message.id());
        }
        self.value
    }

    /// Splits the delivery into its value and a handle that acknowledges it later.
    pub fn into_parts(self) -> (T, Option<(Acker, MessageId)>) {
        let id = self.message.id();
        (self.value, self.acker.map(|a| (a, id)))
    }
}

/// Whether a subscription asks for QoS 1.
pub(crate) fn is_qos1(qos: Qos) -> bool {
    qos == Qos::AtLeastOnce
}
