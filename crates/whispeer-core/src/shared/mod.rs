//! The state every broker handle shares, and what acts on it: the publish path (accept,
//! route, fan out), subscriptions' registrations, groups, commits, dead letters, and the
//! restore of durable history.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use whispeer_engines::{Engines, Sealing};
use whispeer_proto::{Envelope, Filter, Flags, Headers, MessageId, Topic, header};

pub(crate) use crate::bridge::Origin;
use crate::bridge::{Bridge, Forwarded, Interest};
use crate::delivery::{CommitStore, Commits, Dedup, GroupKey, Groups, Seen};
use crate::dispatch::Dispatchers;
use crate::error::PublishError;
use crate::message::{Message, kept_buffer, now_ms};
use crate::options::BrokerOptions;
use crate::plugin::Plugin;
use crate::publish::{PublishOptions, PublishReceipt};
use crate::queue::Queue;
use crate::retention::{self, History};
use crate::router::{Matches, Route, Router, SubId};
use crate::runtime::Spawner;
use crate::stats::{BrokerCounters, bump};
use crate::store::Store;

mod dead_letter;
mod register;
mod restore;
mod route;
mod services;
mod tally;

pub(crate) use register::Registration;
pub(crate) use restore::sweep_forever;
pub(crate) use route::{Check, Scope, known_valid};
pub use services::Running;
pub(crate) use services::Services;
use tally::Tally;

/// Room above `max_message_bytes` for what sealing adds to a payload (key id, nonce, tag).
pub(crate) const SEAL_OVERHEAD: usize = 64;

/// Largest queue capacity, in messages, a subscription may ask for (slots are allocated as
/// messages arrive, not up front).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// A topic's bound type; see [`Broker::topic`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binding {
    pub(crate) type_id: TypeId,
    pub(crate) type_name: &'static str,
}

/// Stands for "raw bytes" in type checks against bound topics.
pub(crate) struct RawBytes;

/// The state every handle shares.
pub(crate) struct Shared {
    pub(crate) options: BrokerOptions,
    /// Compression and encryption; `None` when neither is configured.
    pub(crate) engines: Option<Arc<Engines>>,
    pub(crate) router: Router,
    pub(crate) plugins: Box<[Arc<dyn Plugin>]>,
    pub(crate) bindings: RwLock<HashMap<Box<str>, Binding>>,
    pub(crate) has_bindings: AtomicBool,
    pub(crate) id_prefix: u64,
    pub(crate) next_id: AtomicU64,
    pub(crate) next_sub: AtomicU64,
    pub(crate) groups: Groups,
    pub(crate) history: History,
    /// Durable subscriptions' committed offsets.
    pub(crate) commits: CommitStore,
    /// The write-ahead log of durable topics.
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) dedup: Dedup,
    /// The tasks that run sync callback subscribers (before the spawner, whose runtime they
    /// may run on).
    pub(crate) dispatchers: Dispatchers,
    pub(crate) spawner: Spawner,
    pub(crate) counters: Arc<BrokerCounters>,
    /// Services started with the broker (network listeners, an admin port).
    pub(crate) services: Services,
    /// The cluster, for a broker that is one node of one.
    pub(crate) bridge: Option<Arc<dyn Bridge>>,
}

impl Shared {
    pub(crate) fn new(
        options: BrokerOptions,
        plugins: Box<[Arc<dyn Plugin>]>,
        engines: Option<Arc<Engines>>,
        spawner: Spawner,
        store: Option<Arc<dyn Store>>,
    ) -> Self {
        let mut prefix = [0u8; 8];
        // Only uniqueness across brokers depends on this; a fixed prefix still gives unique ids
        // within this broker, so a failing entropy source is not worth refusing to start.
        if getrandom::fill(&mut prefix).is_err() {
            tracing::warn!(
                "no entropy for message id prefix; ids are unique only within this broker"
            );
        }
        let dedup = Dedup::new(options.dedup_window, options.dedup_max_keys);
        let durable = options.durability.as_ref().map(|d| d.topics.clone()).unwrap_or_default();
        let history = History::new(options.retention.clone(), durable, options.history_max_bytes);
        Self {
            options,
            engines,
            groups: Groups::default(),
            history,
            commits: CommitStore::default(),
            store,
            dedup,
            router: Router::default(),
            plugins,
            bindings: RwLock::default(),
            has_bindings: AtomicBool::new(false),
            id_prefix: u64::from_le_bytes(prefix),
            next_id: AtomicU64::new(1),
            next_sub: AtomicU64::new(1),
            dispatchers: Dispatchers::default(),
            spawner,
            counters: Arc::default(),
            services: Services::default(),
            bridge: None,
        }
    }

    pub(crate) fn binding(&self, topic: &str) -> Option<Binding> {
        if !self.has_bindings.load(Ordering::Acquire) {
            return None;
        }
        self.bindings.read().unwrap_or_else(PoisonError::into_inner).get(topic).copied()
    }

    pub(crate) fn publish_payload(
        &self,
        topic: &str,
        type_id: TypeId,
        found: &'static str,
        options: &PublishOptions,
        payload: impl FnOnce() -> Result<(Flags, Bytes), PublishError>,
    ) -> Result<PublishReceipt, PublishError> {
        let limits = &self.options.limits;
        // The topic's text is checked at routing, and only if no exact subscription holds it
        // (see `Shared::admit`), or below when it is parsed for the longer way.
        if topic.starts_with('$') {
            return Err(PublishError::ReservedTopic(Topic::parse_with(topic, limits)?));
        }
        if let Some(bound) = self.binding(topic)
            && bound.type_id != type_id
        {
            let topic = Topic::parse_with(topic, limits)?;
            return Err(PublishError::WrongType { topic, expected: bound.type_name, found });
        }
        let (flags, payload) = payload()?;
        if payload.len() > limits.max_message_bytes {
            return Err(PublishError::TooLarge {
                len: payload.len(),
                max: limits.max_message_bytes,
            });
        }
        let id = self.next_message_id();
        let timestamp_ms = now_ms();
        let headers = options.headers();
        let (flags, payload) = match &self.engines {
            Some(engines) => {
                let meta = Sealing { topic, id, timestamp_ms, headers };
                engines.seal_in(&meta, flags, payload, kept_buffer)?
            }
            None => (flags, payload),
        };
        if self.routes_plainly(headers) {
            // The envelope shares the router's copy of the topic, and is only built if someone
            // subscribed.
            let admit =
                |topic: &str, subscribed| self.admit(topic, Check::UnlessSubscribed, subscribed);
            return self.fan_out(id, topic, Scope::All, admit, |_, matches| {
                let envelope =
                    Envelope::new(id, matches.topic.clone(), timestamp_ms, flags, payload);
                Message::from_spare(envelope, matches.len(), self.engines.clone(), None)
            });
        }
        let topic = Topic::parse_with(topic, limits)?;
        let mut envelope = Envelope::new(id, topic, timestamp_ms, flags, payload);
        envelope.headers = headers.clone();
        self.accept(envelope, Check::Done)
    }

    /// Whether a message with these headers needs nothing of [`Shared::accept`]'s beyond
    /// routing: no plugins, no headers (idempotency key, time to live), no cluster, no time to
    /// live by topic, no retention.
    pub(crate) fn routes_plainly(&self, headers: &Headers) -> bool {
        self.plugins.is_empty()
            && headers.is_empty()
            && self.bridge.is_none()
            && self.options.topic_ttl.is_empty()
            && !self.history.is_active()
    }

    pub(crate) fn next_message_id(&self) -> MessageId {
        MessageId(
            u128::from(self.id_prefix) << 64
                | u128::from(self.next_id.fetch_add(1, Ordering::Relaxed)),
        )
    }

    /// The rest of every local publish but the fastest: plugins, idempotency, time to live,
    /// routing — or straight to routing when none of it applies (an envelope from a client).
    /// `check`: whether the envelope's topic is still to be checked against the broker's
    /// limits.
    pub(crate) fn accept(
        &self,
        envelope: Envelope,
        check: Check,
    ) -> Result<PublishReceipt, PublishError> {
        if self.routes_plainly(&envelope.headers) {
            // Routed by the envelope's own topic, which the message then takes along.
            let id = envelope.id;
            let admit = |topic: &str, subscribed| self.admit(topic, check, subscribed);
            return self.route(id, envelope, None, Scope::All, admit, |envelope, _| envelope);
        }
        if check == Check::UnlessSubscribed {
            Topic::validate(envelope.topic.as_str(), &self.options.limits)?;
        }
        self.accept_from(envelope, Origin::Local)
    }

    /// [`Shared::accept`] for a local publisher (`bridged` is `None`), or for a message another
    /// node of the cluster published: plugins ran there, and it is not forwarded again.
    pub(crate) fn accept_from(
        &self,
        mut envelope: Envelope,
        origin: Origin<'_>,
    ) -> Result<PublishReceipt, PublishError> {
        let bridged = match origin {
            Origin::Bridged(interest) => Some(interest),
            Origin::Local | Origin::Peer => None,
        };
        let local = matches!(origin, Origin::Local);
        if local {
            for plugin in self.plugins.iter() {
                if let Err(rejection) = plugin.on_publish(&mut envelope) {
                    bump(&self.counters.rejected_by_plugins);
                    let plugin = plugin.name();
                    return Err(PublishError::Rejected { plugin, reason: rejection.reason });
                }
            }
        }
        // The clock is read only where it is needed (idempotency keys, time to live): most
        // publishes have neither.
        // A plugin may have moved the message to another (valid) topic.
        let topic = envelope.topic.clone();
        let key = envelope.headers.get(header::IDEMPOTENCY_KEY).cloned();
        if let Some(key) = &key {
            let (seen, evicted) = self.dedup.check(topic.as_str(), key, Instant::now());
            if evicted > 0 {
                tracing::warn!(evicted, "de-duplication window full: oldest keys forgotten early");
            }
            if seen == Seen::Repeat {
                bump(&self.counters.duplicates);
                return Ok(PublishReceipt {
                    id: envelope.id,
                    subscribers: 0,
                    duplicate: true,
                    ticket: None,
                    bridged: None,
                    keyed: false,
                });
            }
        }
        let ttl = envelope.headers.ttl_ms().map(Duration::from_millis).or_else(|| {
            let rules = &self.options.topic_ttl;
            rules.iter().find(|(filter, _)| filter.matches(&topic)).map(|(_, ttl)| *ttl)
        });
        let expires_at = ttl.map(|ttl| Instant::now() + ttl);
        // Looked up once: whether the cluster keeps the topic, then where it is routed.
        let history = self.history.log(&topic);
        if let (true, Some(bridge)) = (local, &self.bridge)
            && history.as_ref().is_some_and(|log| retention::lock(log).durable)
            && let Some(bridged) = match bridge.sequence(&envelope) {
                Some(Forwarded::Queued(ticket)) => Some(Ok(ticket)),
                Some(Forwarded::Refused(why)) => Some(Err(why)),
                // Not kept by the bridge: stored and routed here as without one.
                Some(Forwarded::Alongside) | None => None,
            }
        {
            // Kept by the cluster, which hands it back with its offset to every node.
            bump(&self.counters.published);
            match (&bridged, &key) {
                (Err(_), Some(key)) => self.dedup.forget(topic.as_str(), key),
                (Ok(_), Some(key)) => {
                    self.dedup.pending(envelope.id, topic.as_str(), key, Instant::now());
                }
                _ => {}
            }
            let keyed = key.is_some() && bridged.is_ok();
            let (id, bridged) = (envelope.id, Some(bridged));
            return Ok(PublishReceipt {
                id,
                subscribers: 0,
                duplicate: false,
                ticket: None,
                bridged,
                keyed,
            });
        }
        bump(&self.counters.published);
        // A local message goes to the cluster first; while the cluster carries it, queue groups
        // get it from there (one member in the whole cluster).
        let (scope, forwarded) = match (bridged, &self.bridge) {
            (Some(Interest::Group { filter, name }), _) => {
                let routed = self.to_group(filter, name, envelope, expires_at);
                return self.forget_unless_routed(routed, &topic, key.as_ref());
            }
            (Some(Interest::Topics(_)), _) => (Scope::Solo, None),
            // A peer's message: every subscriber here, groups included; not forwarded again.
            (None, _) if !local => (Scope::All, None),
            (None, None) => (Scope::All, None),
            (None, Some(bridge)) => match bridge.forward(&envelope) {
                Forwarded::Queued(ticket) => (Scope::Solo, Some(Ok(ticket))),
                Forwarded::Refused(why) => (Scope::All, Some(Err(why))),
                Forwarded::Alongside => (Scope::All, None),
            },
        };
        let history_kept = history.is_some();
        let routed = match history {
            None => {
                let (id, topic) = (envelope.id, topic.as_str());
                self.route(id, topic, expires_at, scope, known_valid, |_, _| envelope)
            }
            Some(log) => (|| {
                // Routed under the topic's lock: see `retention` for why replay needs it. A
                // durable message goes to the log first, so the log's order is the offsets'.
                let mut log = retention::lock(&log);
                let accepted_ms = now_ms();
                let ticket = match (&self.store, log.durable) {
                    (Some(store), true) => Some(
                        store
                            .append(log.next_offset(), accepted_ms, &envelope)
                            .map_err(|err| PublishError::Storage(err.to_string()))?,
                    ),
                    _ => None,
                };
                let (offset, seq) = (log.reserve(), self.history.next_seq());
                let engines = self.engines.clone();
                let message = Message::retained(envelope, true, engines, expires_at, offset);
                let (id, make) = (message.id(), |_, _: &Matches<'_>| message.clone());
                let routed = self.fan_out(id, topic.as_str(), scope, known_valid, make);
                log.append(offset, seq, accepted_ms, message);
                routed.map(|receipt| PublishReceipt { ticket, ..receipt })
            })(),
        };
        if history_kept {
            self.history.trim();
        }
        let routed = routed.map(|receipt| PublishReceipt { bridged: forwarded, ..receipt });
        self.forget_unless_routed(routed, &topic, key.as_ref())
    }

    /// Routes a message of a durable topic the cluster keeps, at `offset` (see
    /// [`Bridge::sequence`]): to the ordinary subscriptions here, and into the topic's history.
    /// An offset this node has already passed is a repeat, and dropped.
    pub(crate) fn accept_sequenced(
        &self,
        envelope: Envelope,
        offset: u64,
        accepted_ms: u64,
    ) -> Result<PublishReceipt, PublishError> {
        let topic = envelope.topic.clone();
        let id = envelope.id;
        let nothing = PublishReceipt {
            id,
            subscribers: 0,
            duplicate: true,
            ticket: None,
            bridged: None,
            keyed: false,
        };
        let Some(log) = self.history.log(&topic).filter(|log| retention::lock(log).durable) else {
            // Durable on the node it came from, not here: an ordinary message.
            let interest = Interest::Topics(Filter::from(topic));
            return self.accept_from(envelope, Origin::Bridged(&interest));
        };
        let (now, now_wall) = (Instant::now(), now_ms());
        let Some(mut expires_at) =
            retention::expiry_of_stored(&envelope.headers, accepted_ms, now, now_wall)
        else {
            return Ok(nothing);
        };
        if envelope.headers.ttl_ms().is_none()
            && let Some((_, ttl)) = self.options.topic_ttl.iter().find(|(f, _)| f.matches(&topic))
        {
            let left = accepted_ms.saturating_add(ttl.as_millis() as u64).saturating_sub(now_wall);
            expires_at = Some(now + Duration::from_millis(left));
        }
        let mut log = retention::lock(&log);
        log.sequenced = true;
        if offset < log.next_offset() {
            bump(&self.counters.duplicates);
            return Ok(nothing);
        }
        log.advance_to(offset + 1);
        bump(&self.counters.published);
        let seq = self.history.next_seq();
        let message = Message::retained(envelope, true, self.engines.clone(), expires_at, offset);
        let make = |_, _: &Matches<'_>| message.clone();
        let routed = self.fan_out(id, topic.as_str(), Scope::Solo, known_valid, make);
        log.append(offset, seq, accepted_ms, message);
        drop(log);
        self.history.trim();
        routed
    }

    /// Offers a durable topic's message the cluster keeps, at `offset`, to the local queue
    /// group `filter` / `name` alone (the cluster chose this node for it). `None`: no such group
    /// here; `Some(true)`: a QoS 1 group, whose settling reaches `Bridge::group_settled`;
    /// `Some(false)`: delivered and done with (QoS 0).
    pub(crate) fn to_group_sequenced(
        &self,
        filter: &Filter,
        name: &str,
        envelope: Envelope,
        offset: u64,
        accepted_ms: u64,
    ) -> Result<Option<bool>, PublishError> {
        let key: GroupKey = (filter.as_str().into(), name.into());
        let Some(group) = self.groups.get(&key) else { return Ok(None) };
        if let Some(log) = self.history.log(&envelope.topic) {
            retention::lock(&log).sequenced = true;
        }
        let (now, now_wall) = (Instant::now(), now_ms());
        let Some(expires_at) =
            retention::expiry_of_stored(&envelope.headers, accepted_ms, now, now_wall)
        else {
            return Ok(Some(false));
        };
        let id = envelope.id;
        let message = Message::retained(envelope, true, self.engines.clone(), expires_at, offset);
        let mut tally = Tally::default();
        if tally.record_push(&group.queue, group.queue.push(message), &self.counters) {
            tracing::warn!(%filter, group = name, "group disconnected: queue full");
            self.unsubscribe(group.id, &group.queue);
        }
        bump(&self.counters.published);
        self.tallied(id, &tally)?;
        Ok(Some(group.tracker.is_some()))
    }

    /// Not accepted (a full queue, a failed store): a retry with the same key must go through.
    fn forget_unless_routed(
        &self,
        routed: Result<PublishReceipt, PublishError>,
        topic: &Topic,
        key: Option<&Bytes>,
    ) -> Result<PublishReceipt, PublishError> {
        match (routed, key) {
            (Err(err), Some(key)) => {
                self.dedup.forget(topic.as_str(), key);
                Err(err)
            }
            // To be confirmed (synced, or taken by the cluster): forgotten if it is not.
            (Ok(receipt), Some(key)) if receipt.is_durable_pending() => {
                self.dedup.pending(receipt.id, topic.as_str(), key, Instant::now());
                Ok(PublishReceipt { keyed: true, ..receipt })
            }
            (routed, _) => routed,
        }
    }

    /// Offers a message another node published to the local queue group `filter` / `name`
    /// alone (the cluster chose this node's group for it).
    fn to_group(
        &self,
        filter: &Filter,
        name: &str,
        envelope: Envelope,
        expires_at: Option<Instant>,
    ) -> Result<PublishReceipt, PublishError> {
        let id = envelope.id;
        let key: GroupKey = (filter.as_str().into(), name.into());
        let mut tally = Tally::default();
        if let Some(group) = self.groups.get(&key) {
            let message = Message::new(envelope, 1, self.engines.clone(), expires_at);
            if tally.record_push(&group.queue, group.queue.push(message), &self.counters) {
                tracing::warn!(%filter, group = name, "group disconnected: queue full");
                self.unsubscribe(group.id, &group.queue);
            }
        }
        self.tallied(id, &tally)
    }

    /// Records each of `settled` as settled by the durable subscription `commits`; an advance
    /// of its committed offset in a topic is remembered, and written to the log for a durable
    /// topic, once for them all.
    pub(crate) fn committed(&self, commits: &Commits, settled: &[Message]) {
        // Per topic (a batch has mostly one): durable, and sequenced by the cluster, which
        // keeps this group's position there (offsets there have gaps: no commits here).
        let mut kinds: Vec<(&Topic, bool, bool)> = Vec::new();
        for message in settled {
            let topic = message.topic();
            let sequenced = match kinds.iter().find(|(t, ..)| *t == topic) {
                Some(&(_, _, sequenced)) => sequenced,
                None => {
                    let (durable, sequenced) =
                        self.history.log(topic).map_or((false, false), |log| {
                            let log = retention::lock(&log);
                            (log.durable, log.sequenced)
                        });
                    kinds.push((topic, durable, sequenced));
                    sequenced
                }
            };
            if sequenced && let (Some(bridge), Some(offset)) = (&self.bridge, message.offset()) {
                bridge.group_settled(&commits.key.0, &commits.key.1, offset);
            }
        }
        if kinds.iter().all(|&(_, _, sequenced)| sequenced) {
            return;
        }
        let kind =
            |topic: &Topic| kinds.iter().find(|(t, ..)| *t == topic).map(|&(_, d, s)| (d, s));
        let empty = |topic: &Topic, from: u64, to: u64| {
            self.history.log(topic).is_some_and(|log| retention::lock(&log).holds_none(from, to))
        };
        let local =
            settled.iter().filter(|m| !kind(m.topic()).is_some_and(|(_, sequenced)| sequenced));
        commits.settled_then(local, empty, |topic, offset| {
            let durable = kind(topic).is_some_and(|(durable, _)| durable);
            self.record_commit(&commits.key, topic, offset, durable);
        });
    }

    /// Remembers a commit, and writes it to the store for a durable topic.
    pub(crate) fn record_commit(&self, key: &GroupKey, topic: &Topic, offset: u64, durable: bool) {
        if let (true, Some(store)) = (durable, &self.store)
            && let Err(err) = store.commit(key, topic, offset)
        {
            tracing::warn!(%err, "commit not stored");
        }
        self.commits.set(key, topic.clone(), offset);
    }

    /// Ends a subscription: closes its queue and removes its route. Idempotent; plugins hear
    /// of each subscription's end once.
    pub(crate) fn unsubscribe(&self, id: SubId, queue: &Queue) {
        queue.close();
        if self.router.remove(&queue.filter, id) {
            if let Some(bridge) = &self.bridge {
                bridge.interest(&interest_of(queue), false);
            }
            for plugin in self.plugins.iter() {
                plugin.on_unsubscribe(&queue.filter);
            }
        }
    }

    /// Routes `queue` under a new id, and tells the bridge of the interest.
    pub(crate) fn route_queue(&self, queue: &Arc<Queue>) -> SubId {
        let id = SubId(self.next_sub.fetch_add(1, Ordering::Relaxed));
        queue.count_discarded_in(&self.counters.discarded);
        self.router.insert(&queue.filter, Route { id, queue: Arc::clone(queue) });
        if let Some(bridge) = &self.bridge {
            bridge.interest(&interest_of(queue), true);
        }
        id
    }
}

/// What a queue needs from the rest of a cluster.
fn interest_of(queue: &Queue) -> Interest {
    match &queue.group {
        Some(name) => Interest::Group { filter: queue.filter.clone(), name: name.clone() },
        None => Interest::Topics(queue.filter.clone()),
    }
}
