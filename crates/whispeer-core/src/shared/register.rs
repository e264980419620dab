//! Registering subscriptions: the checks every subscription shares, routes, group membership,
//! replay, and the `Registration` that holds a subscription's place until dropped.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::any::TypeId;

use whispeer_proto::{Filter, StartAt, Topic};

use super::{MAX_QUEUE_CAPACITY, Shared};
use crate::delivery::{Commits, Group, GroupKey, Left, MAX_GROUP_NAME, Tracker};
use crate::error::SubscribeError;
use crate::message::Message;
use crate::options::SubscribeOptions;
use crate::options::is_qos1;
use crate::queue::{Queue, SlowConsumer};
use crate::retention::{Replay, StoredRange};
use crate::router::SubId;
use crate::stats::SubscriptionStats;

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
    pub(crate) tracker: Option<Arc<Tracker>>,
    pub(crate) member: u64,
    owns: Owns,
    /// Set when this registration ends, for its consumer (the queue may live on in a group).
    pub(crate) left: Arc<AtomicBool>,
    /// QoS 0: retained messages its consumer delivers before the queue's.
    pub(crate) replay: Mutex<Replay>,
    /// A durable subscription's committed offsets (its group's).
    pub(crate) commits: Option<Arc<Commits>>,
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
                            self.shared.committed(commits, std::slice::from_ref(&letter.message));
                        }
                        self.shared.dead_letter(letter, &self.queue.counters);
                    }
                }
                // Wake this member's consumer (and the others, harmlessly) to see it has left.
                self.queue.wake();
                Shared::leave_group(&self.shared, key, &self.queue);
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
        // queue refuses the publish, so the publisher hears of it instead of getting an ack
        // (back-pressure, which drops nothing, stays as it is).
        let default_policy =
            if is_qos1(options.qos) && this.options.slow_consumer != SlowConsumer::BackPressure {
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
        let joined = this.groups.join(key.clone(), options.qos, || {
            let mut queue = Queue::new(filter, capacity, max_bytes, policy).for_group(name);
            if !is_qos1(options.qos) {
                queue = queue.dealing();
            }
            let queue = Arc::new(queue.with_budget(options.budget.clone()));
            let id = this.route_queue(&queue);
            let tracker = tracker();
            let mut commits = None;
            if tracker.is_some() && this.history.is_active() {
                // A durable subscription: resume after its commits, if it has any.
                let stored = this.commits.get(&key);
                let snapshot = this.history.snapshot_resuming(
                    &queue.filter,
                    options.start,
                    stored.as_ref(),
                    true,
                );
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
            let linger = options.linger.unwrap_or(this.options.group_linger);
            Ok(Arc::new(Group { id, queue, tracker, qos: options.qos, commits, linger }))
        })?;
        if let Some(old) = joined.replaced {
            // Closed by its policy with no member left: its route goes now.
            this.unsubscribe(old.id, &old.queue);
        }
        Ok(Registration::member(Arc::clone(this), key, &joined.group, prefetch))
    }

    /// A replay of `stored` ranges from this broker's store, then `memory`.
    fn replay(&self, stored: Vec<StoredRange>, memory: Vec<Message>) -> Replay {
        Replay::new(self.store.clone(), self.engines.clone(), stored, memory)
    }

    /// A member left group `key`: removes the group when it was the last, at once or after the
    /// linger.
    pub(crate) fn leave_group(this: &Arc<Self>, key: &GroupKey, queue: &Arc<Queue>) {
        match this.groups.leave(key, queue) {
            Left::Stays => {}
            Left::Remove(group) => this.unsubscribe(group.id, &group.queue),
            Left::Linger(generation, linger) => {
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
