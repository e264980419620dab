//! The node's half of the cluster: the core's [`Bridge`], the bounded queue of messages on
//! their way to the engine, the confirmations QoS 1 publishers wait for, and the de-duplication
//! of messages that reach this node through two overlapping subscriptions.
//!
//! A message crosses the engine as one byte (the format), the origin node's id (8 bytes,
//! little-endian), then the envelope in its wire layout — sealed, never opened here.
//!
//! A durable topic's message is appended to the engine's history (its confirmation waits for
//! the engine's acknowledgement, in order, on a ticket of its own); every node's ordinary
//! subscribers get it from the history, with the engine's offset, and queue groups from the
//! engine's group consumers, whose positions the engine keeps: a message handed to a local
//! QoS 1 group waits here until the group settles it, and is then acknowledged in the engine
//! (or given back, when the group goes away first).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Notify, mpsc, watch};
use whispeer_core::proto::{Envelope, Filter, Limits, MessageId, Topic, header};
use whispeer_core::{Bridge, BridgeFuture, Forwarded, Interest};

/// Messages queued for the engine at most; beyond it a local publish is not carried (policy:
/// refuse newest — QoS 0 counts the loss, QoS 1 publishers get an error).
pub(crate) const OUTBOUND_CAPACITY: usize = 65_536;
/// Message ids remembered to drop second copies from overlapping subscriptions.
const DEDUP_CAPACITY: usize = 65_536;
/// Failed ranges of tickets remembered for confirmations.
const FAILED_CAPACITY: usize = 4_096;

/// Appends to a queue of the latest `FAILED_CAPACITY` entries.
fn push_bounded<T>(queue: &Mutex<VecDeque<T>>, entry: T) {
    let mut queue = lock(queue);
    if queue.len() == FAILED_CAPACITY {
        queue.pop_front();
    }
    queue.push_back(entry);
}
/// The first byte of every message this version sends.
const FORMAT: u8 = 1;

/// A group's message waiting here: its filter, its group's name, its offset.
type PendingKey = (Box<str>, Box<str>, u64);

/// Marks a durable topic's ticket (confirmed by the engine's acknowledgement).
const DURABLE_TICKET: u64 = 1 << 63;

/// One message on its way to the engine.
pub(crate) struct Outgoing {
    pub(crate) topic: Topic,
    pub(crate) bytes: Bytes,
    /// Every live message queued before this one has a ticket up to this one.
    pub(crate) ticket: u64,
    pub(crate) kind: Kind,
}

/// Where an outgoing message goes.
pub(crate) enum Kind {
    /// To every interested node.
    Live,
    /// Into the history, with its durable ticket and the engine's de-duplication id.
    Append { ticket: u64, id: String },
}

/// Counters of the cluster, read by `/metrics` and `whispeer inspect nodes`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) forwarded: AtomicU64,
    pub(crate) received: AtomicU64,
    /// Local messages not carried: the engine was unreachable.
    pub(crate) lost_unreachable: AtomicU64,
    /// Local messages not carried: the outbound queue was full.
    pub(crate) lost_full: AtomicU64,
    /// Messages from other nodes that local queues refused.
    pub(crate) refused_here: AtomicU64,
    /// Second copies dropped (overlapping subscriptions).
    pub(crate) duplicates: AtomicU64,
    /// Messages from the engine that did not decode.
    pub(crate) malformed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The node's side of the cluster; see the module documentation.
pub(crate) struct Relay {
    /// This node's id on the engine.
    pub(crate) node: u64,
    /// Whether the engine is connected (set by the engine).
    pub(crate) up: Arc<AtomicBool>,
    /// The next ticket, and the queue: one lock, so tickets enter the queue in order.
    outbound: Mutex<(u64, mpsc::Sender<Outgoing>)>,
    /// Every ticket up to this one has been published and flushed, or has failed.
    settled: watch::Sender<u64>,
    failed: Mutex<VecDeque<(u64, u64)>>,
    /// The next durable ticket (taken under `outbound`'s lock).
    next_durable: AtomicU64,
    /// Every durable ticket up to this one has been acknowledged by the engine, or has failed.
    durable_settled: watch::Sender<u64>,
    durable_failed: Mutex<VecDeque<u64>>,
    /// The offsets of the latest durable tickets the engine took, for `confirm_offset`.
    durable_offsets: Mutex<VecDeque<(u64, u64)>>,
    /// Durable topics' messages handed to a local QoS 1 group, by (filter, group, offset),
    /// waiting for the group to settle them.
    pending: Mutex<HashMap<PendingKey, super::engine::Settle>>,
    /// Whether this node has read the history as far as it reached when the node started
    /// (until then replay here may miss the newest part).
    pub(crate) history_loaded: AtomicBool,
    /// Confirmations waiting; the sender flushes while there are any.
    pub(crate) waiting: AtomicUsize,
    pub(crate) flush_wanted: Notify,
    /// Interest counts: what local subscriptions need.
    interests: Mutex<HashMap<Interest, usize>>,
    pub(crate) interests_changed: Notify,
    /// The ordinary filters subscribed on the engine now, and whether two of them overlap.
    active: RwLock<Vec<Filter>>,
    overlapping: AtomicBool,
    seen: Mutex<Seen>,
    pub(crate) counters: Counters,
}

/// Ids of messages that will arrive again through another subscription, with how many more
/// copies are due.
#[derive(Default)]
struct Seen {
    due: HashMap<MessageId, usize>,
    order: VecDeque<MessageId>,
}

impl Relay {
    pub(crate) fn new(node: u64) -> (Arc<Self>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let relay = Self {
            node,
            up: Arc::default(),
            outbound: Mutex::new((1, tx)),
            settled: watch::Sender::new(0),
            failed: Mutex::default(),
            next_durable: AtomicU64::new(1),
            durable_settled: watch::Sender::new(0),
            durable_failed: Mutex::default(),
            durable_offsets: Mutex::default(),
            history_loaded: AtomicBool::new(true),
            pending: Mutex::default(),
            waiting: AtomicUsize::new(0),
            flush_wanted: Notify::new(),
            interests: Mutex::default(),
            interests_changed: Notify::new(),
            active: RwLock::default(),
            overlapping: AtomicBool::new(false),
            seen: Mutex::default(),
            counters: Counters::default(),
        };
        (Arc::new(relay), rx)
    }

    /// Every ticket up to `through` is settled; those from `failed` on (if any) failed.
    pub(crate) fn settle(&self, through: u64, failed: Option<u64>) {
        if let Some(from) = failed {
            push_bounded(&self.failed, (from, through));
        }
        self.settled.send_if_modified(|settled| {
            let advanced = through > *settled;
            *settled = (*settled).max(through);
            advanced
        });
    }

    /// Durable ticket `ticket` is settled: acknowledged by the engine at its offset, or not
    /// (`None`). Called in ticket order.
    pub(crate) fn settle_durable(&self, ticket: u64, offset: Option<u64>) {
        match offset {
            Some(offset) => push_bounded(&self.durable_offsets, (ticket, offset)),
            None => push_bounded(&self.durable_failed, ticket),
        }
        self.durable_settled.send_if_modified(|settled| {
            let advanced = ticket > *settled;
            *settled = (*settled).max(ticket);
            advanced
        });
    }

    /// A durable topic's message from the history, at its offset: routed to the ordinary
    /// subscribers here (this node's own messages too: the history is where they come from).
    pub(crate) fn deliver_sequenced(
        &self,
        broker: &whispeer_core::Broker,
        sequenced: super::engine::Sequenced,
        limits: &Limits,
    ) {
        let Some((_, envelope)) = decode(sequenced.bytes, limits) else {
            bump(&self.counters.malformed);
            tracing::debug!(offset = sequenced.offset, "cluster: a history message did not decode");
            return;
        };
        bump(&self.counters.received);
        if let Err(err) = broker.publish_sequenced(envelope, sequenced.offset, sequenced.stored_ms)
        {
            bump(&self.counters.refused_here);
            tracing::debug!(%err, "cluster: a history message was refused here");
        }
    }

    /// A durable topic's message for the local queue group `filter` / `name`: handed to it at
    /// its offset; a QoS 1 group's is settled in the engine once the group settled it here.
    /// One that is not for this node (no such group now, a full queue) is given back, so the
    /// engine hands it to another node.
    pub(crate) fn deliver_to_group(
        &self,
        broker: &whispeer_core::Broker,
        filter: &Filter,
        name: &str,
        delivery: super::engine::GroupDelivery,
        limits: &Limits,
    ) {
        let super::engine::GroupDelivery { sequenced, settle } = delivery;
        let offset = sequenced.offset;
        let Some((_, envelope)) = decode(sequenced.bytes, limits) else {
            bump(&self.counters.malformed);
            spawn_settle(settle(true));
            return;
        };
        if !filter.matches(&envelope.topic) {
            // The engine's filter was wider than the group's.
            spawn_settle(settle(true));
            return;
        }
        bump(&self.counters.received);
        let key: PendingKey = (filter.as_str().into(), name.into(), offset);
        // Waiting before the group has it: its member may settle it at once.
        lock(&self.pending).insert(key.clone(), settle);
        let handed =
            broker.publish_sequenced_to_group(envelope, offset, sequenced.stored_ms, filter, name);
        let done = match handed {
            Ok(Some(true)) => return,
            Ok(Some(false)) => true,
            Ok(None) | Err(_) => {
                bump(&self.counters.refused_here);
                false
            }
        };
        if let Some(settle) = lock(&self.pending).remove(&key) {
            spawn_settle(settle(done));
        }
    }

    /// The local group `filter` / `name` is gone: what it had not settled goes back to the
    /// engine, for another node.
    pub(crate) fn release_group(&self, filter: &Filter, name: &str) {
        let mut pending = lock(&self.pending);
        let keys: Vec<_> = pending
            .keys()
            .filter(|(f, n, _)| **f == *filter.as_str() && **n == *name)
            .cloned()
            .collect();
        for key in keys {
            if let Some(settle) = pending.remove(&key) {
                spawn_settle(settle(false));
            }
        }
    }

    /// What the engine should be subscribed to: every group, and the ordinary filters that no
    /// other ordinary filter covers.
    pub(crate) fn wanted(&self) -> HashSet<Interest> {
        let interests = lock(&self.interests);
        let topics: Vec<&Filter> = interests
            .keys()
            .filter_map(|interest| match interest {
                Interest::Topics(filter) => Some(filter),
                Interest::Group { .. } => None,
            })
            .collect();
        interests
            .keys()
            .filter(|interest| match interest {
                Interest::Topics(filter) => !topics
                    .iter()
                    .any(|other| *other != filter && other.covers(filter) && !filter.covers(other)),
                Interest::Group { .. } => true,
            })
            .cloned()
            .collect()
    }

    /// Messages waiting in the outbound queue.
    pub(crate) fn backlog(&self) -> usize {
        OUTBOUND_CAPACITY - lock(&self.outbound).1.capacity()
    }

    /// Records the ordinary filters now subscribed on the engine.
    pub(crate) fn set_active(&self, filters: Vec<Filter>) {
        let overlapping = filters
            .iter()
            .enumerate()
            .any(|(i, a)| filters.iter().skip(i + 1).any(|b| a.overlaps(b)));
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = filters;
        self.overlapping.store(overlapping, Ordering::Release);
    }

    /// Routes `envelope`, which arrived through one ordinary subscription, unless it is a copy
    /// of one that arrived (or will arrive) through another: the first copy is routed, under
    /// the lock, so a later message on the same topic can never overtake it through the other
    /// subscription. `false` for a copy.
    fn route_first_copy(&self, envelope: Envelope, route: impl FnOnce(Envelope)) -> bool {
        let copies = if self.overlapping.load(Ordering::Acquire) {
            let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
            active.iter().filter(|filter| filter.matches(&envelope.topic)).count()
        } else {
            1
        };
        if copies < 2 {
            route(envelope);
            return true;
        }
        let mut seen = lock(&self.seen);
        let id = envelope.id;
        if let Some(due) = seen.due.get_mut(&id) {
            *due -= 1;
            if *due == 0 {
                seen.due.remove(&id);
            }
            return false;
        }
        if seen.order.len() >= DEDUP_CAPACITY
            && let Some(oldest) = seen.order.pop_front()
        {
            seen.due.remove(&oldest);
        }
        seen.due.insert(id, copies - 1);
        seen.order.push_back(id);
        route(envelope);
        true
    }

    /// A message from the engine, for `interest`: decoded, checked, and routed here.
    pub(crate) fn deliver(
        &self,
        broker: &whispeer_core::Broker,
        interest: &Interest,
        bytes: Bytes,
        limits: &Limits,
    ) {
        let Some((origin, envelope)) = decode(bytes, limits) else {
            bump(&self.counters.malformed);
            tracing::debug!("cluster: a message from the engine did not decode; dropped");
            return;
        };
        if !interest.filter().matches(&envelope.topic) {
            // An engine whose patterns are wider than filters (Redis globs): not for this one.
            return;
        }
        if origin == self.node && matches!(interest, Interest::Topics(_)) {
            bump(&self.counters.duplicates);
            return;
        }
        let route = |envelope| {
            bump(&self.counters.received);
            if let Err(err) = broker.publish_bridged(envelope, interest) {
                bump(&self.counters.refused_here);
                tracing::debug!(%err, "cluster: a message from another node was refused here");
            }
        };
        match interest {
            Interest::Topics(_) => {
                if !self.route_first_copy(envelope, route) {
                    bump(&self.counters.duplicates);
                }
            }
            Interest::Group { .. } => route(envelope),
        }
    }
}

/// One waiting confirmation, for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a settlement on the current runtime (the core calls in from its tasks).
fn spawn_settle(settle: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(settle);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes that carry `envelope` from node `node`.
fn encode(node: u64, envelope: &Envelope) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(envelope.payload.len() + 96);
    out.put_u8(FORMAT);
    out.put_u64_le(node);
    envelope.encode(&mut out).ok()?;
    Some(out.freeze())
}

/// The origin and envelope of a message from the engine; `None` if it is not one.
pub(crate) fn decode(mut bytes: Bytes, limits: &Limits) -> Option<(u64, Envelope)> {
    if bytes.len() < 9 || bytes[0] != FORMAT {
        return None;
    }
    let origin = u64::from_le_bytes(bytes[1..9].try_into().ok()?);
    let envelope = Envelope::decode(bytes.split_off(9), limits).ok()?;
    Some((origin, envelope))
}

impl Bridge for Relay {
    fn forward(&self, envelope: &Envelope) -> Forwarded {
        if !self.up.load(Ordering::Acquire) {
            bump(&self.counters.lost_unreachable);
            return Forwarded::Refused("the cluster engine is unreachable");
        }
        let Some(bytes) = encode(self.node, envelope) else {
            return Forwarded::Refused("the message cannot be encoded for the cluster");
        };
        let mut outbound = lock(&self.outbound);
        let ticket = outbound.0;
        let outgoing = Outgoing { topic: envelope.topic.clone(), bytes, ticket, kind: Kind::Live };
        match outbound.1.try_send(outgoing) {
            Ok(()) => {
                outbound.0 += 1;
                bump(&self.counters.forwarded);
                Forwarded::Queued(ticket)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.lost_full);
                Forwarded::Refused("the cluster's outbound queue is full")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bump(&self.counters.lost_unreachable);
                Forwarded::Refused("the cluster link has stopped")
            }
        }
    }

    fn interest(&self, interest: &Interest, present: bool) {
        let mut interests = lock(&self.interests);
        let changed = if present {
            let count = interests.entry(interest.clone()).or_insert(0);
            *count += 1;
            *count == 1
        } else {
            match interests.get_mut(interest) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => interests.remove(interest).is_some(),
                None => false,
            }
        };
        drop(interests);
        if changed {
            self.interests_changed.notify_one();
        }
    }

    fn sequence(&self, envelope: &Envelope) -> Option<Forwarded> {
        if !self.up.load(Ordering::Acquire) {
            bump(&self.counters.lost_unreachable);
            return Some(Forwarded::Refused("the cluster engine is unreachable"));
        }
        let Some(bytes) = encode(self.node, envelope) else {
            return Some(Forwarded::Refused("the message cannot be encoded for the cluster"));
        };
        // The engine drops a repeat of the same idempotency key (or id) in its window.
        let id = match envelope.headers.get(header::IDEMPOTENCY_KEY) {
            Some(key) => format!("k{}.{}", hex(envelope.topic.as_str().as_bytes()), hex(key)),
            None => format!("i{:032x}", envelope.id.0),
        };
        let outbound = lock(&self.outbound);
        if outbound.1.capacity() == 0 {
            bump(&self.counters.lost_full);
            return Some(Forwarded::Refused("the cluster's outbound queue is full"));
        }
        let durable = self.next_durable.fetch_add(1, Ordering::Relaxed);
        let (topic, last) = (envelope.topic.clone(), outbound.0.saturating_sub(1));
        let append = Kind::Append { ticket: durable, id };
        if outbound.1.try_send(Outgoing { topic, bytes, ticket: last, kind: append }).is_err() {
            bump(&self.counters.lost_unreachable);
            return Some(Forwarded::Refused("the cluster link has stopped"));
        }
        bump(&self.counters.forwarded);
        Some(Forwarded::Queued(durable | DURABLE_TICKET))
    }

    fn group_settled(&self, filter: &str, name: &str, offset: u64) {
        let key: PendingKey = (filter.into(), name.into(), offset);
        if let Some(settle) = lock(&self.pending).remove(&key) {
            spawn_settle(settle(true));
        }
    }

    fn confirm_offset(&self, ticket: u64) -> BridgeFuture<'_, Result<Option<u64>, String>> {
        Box::pin(async move {
            self.confirm(ticket).await?;
            if ticket & DURABLE_TICKET == 0 {
                return Ok(None);
            }
            let ticket = ticket & !DURABLE_TICKET;
            let offsets = lock(&self.durable_offsets);
            Ok(offsets.iter().rev().find(|(t, _)| *t == ticket).map(|(_, offset)| *offset))
        })
    }

    fn confirm(&self, ticket: u64) -> BridgeFuture<'_, Result<(), String>> {
        if ticket & DURABLE_TICKET != 0 {
            let ticket = ticket & !DURABLE_TICKET;
            return Box::pin(async move {
                let mut settled = self.durable_settled.subscribe();
                if settled.wait_for(|settled| *settled >= ticket).await.is_err() {
                    return Err("the cluster link has stopped".into());
                }
                if lock(&self.durable_failed).contains(&ticket) {
                    return Err("the cluster engine did not store it".into());
                }
                Ok(())
            });
        }
        Box::pin(async move {
            // Counted while it waits, also when the caller drops it: a count left behind would
            // make the sender flush after every batch for good.
            let _waiting = Waiting::new(&self.waiting);
            self.flush_wanted.notify_one();
            let mut settled = self.settled.subscribe();
            let reached = settled.wait_for(|settled| *settled >= ticket).await.is_ok();
            if !reached {
                return Err("the cluster link has stopped".into());
            }
            let failed =
                lock(&self.failed).iter().any(|(from, to)| (*from..=*to).contains(&ticket));
            if failed {
                return Err("the cluster engine did not take it (unreachable)".into());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whispeer_core::proto::{Flags, Topic};

    fn envelope() -> Envelope {
        let topic = Topic::parse("a/b").expect("valid topic");
        Envelope::new(MessageId(7), topic, 1, Flags::default(), Bytes::from_static(b"sealed"))
    }

    #[test]
    fn what_crosses_the_engine_decodes_back_and_anything_else_is_refused() {
        let limits = Limits::default();
        let bytes = encode(42, &envelope()).expect("encodes");
        assert_eq!(decode(bytes.clone(), &limits), Some((42, envelope())));
        assert_eq!(decode(Bytes::new(), &limits), None, "empty");
        assert_eq!(decode(bytes.slice(..8), &limits), None, "shorter than its header");
        assert_eq!(decode(bytes.slice(..bytes.len() - 1), &limits), None, "truncated envelope");
        let mut other = bytes.to_vec();
        other[0] = FORMAT + 1;
        assert_eq!(decode(Bytes::from(other), &limits), None, "another format");
    }

    #[test]
    fn a_dropped_confirmation_stops_counting_as_waiting() {
        let (relay, _outbound) = Relay::new(1);
        let pending = relay.confirm(6);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = runtime.expect("a runtime");
        runtime.block_on(async {
            let poll = tokio::time::timeout(std::time::Duration::from_millis(10), pending).await;
            assert!(poll.is_err(), "not settled yet: dropped while waiting");
        });
        assert_eq!(relay.waiting.load(Ordering::Acquire), 0);
    }
}
