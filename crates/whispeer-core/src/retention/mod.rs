//! Retained history: per-topic logs bounded by count, bytes and age, with monotonic offsets, and
//! the snapshot a replaying subscription starts from.
//!
//! A topic keeps history when a retention rule's filter matches it (the first match wins).
//! Publishing to such a topic takes the topic's lock, gives the message the next offset (from 1),
//! routes it *while holding the lock*, and appends it. Holding the lock while routing is what
//! makes replay exact: a subscription inserts its route first, then reads each topic's next
//! offset under that topic's lock, so every message below that offset is in the history it
//! replays, and every message from it on reaches its queue (which drops the copies below it, see
//! `Queue::set_replay_from`). Nothing is delivered twice and nothing falls in between.
//!
//! Eviction: by count and bytes on every append; by age on append and by a background sweep that
//! evicts at most `SWEEP_BUDGET` messages per tick; and, across topics, the oldest first while
//! all history together is past `BrokerOptions::history_max_bytes` (`memory.rs`).

mod memory;
mod replay;

pub(crate) use memory::Memory;
pub(crate) use replay::{Replay, StoredRange};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use whispeer_proto::{Filter, Headers, StartAt, Topic};

use crate::error::SubscribeError;
use crate::hash::FastMap;
use crate::message::Message;
use crate::store::PageBound;

/// Messages the background sweep evicts per tick at most, across all topics.
pub(crate) const SWEEP_BUDGET: usize = 4096;
/// How often the sweep runs, at most.
pub(crate) const SWEEP_TICK: Duration = Duration::from_millis(250);

/// How much history a topic keeps: at most `max_messages`, at most `max_bytes` (payloads plus
/// 256 per message), and nothing older than `max_age`.
///
/// ```
/// # use std::time::Duration;
/// use whispeer_core::Retention;
/// let last_hour = Retention::messages(10_000).max_bytes(64 << 20).max_age(Duration::from_secs(3600));
/// # let _ = last_hour;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Most messages kept.
    pub max_messages: usize,
    /// Most bytes kept.
    pub max_bytes: usize,
    /// Oldest message kept; `None`: no age limit.
    pub max_age: Option<Duration>,
}

impl Retention {
    /// Keeps the last `count` messages, with no byte or age limit.
    pub fn messages(count: usize) -> Self {
        Self { max_messages: count, max_bytes: usize::MAX, max_age: None }
    }

    /// This retention, also bounded by bytes.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// This retention, also bounded by age.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }
}

fn weight(message: &Message) -> usize {
    message.payload().len() + 256
}

struct Entry {
    offset: u64,
    /// Broker-wide acceptance order, to merge topics in a wildcard replay.
    seq: u64,
    /// When the broker accepted it: wall clock for `StartAt::Time`, monotonic for the age bound.
    time_ms: u64,
    at: Instant,
    message: Message,
}

/// History a durable topic keeps in memory when no retention rule matches it.
pub(crate) const DURABLE_DEFAULT: Retention =
    Retention { max_messages: 10_000, max_bytes: 64 << 20, max_age: None };

/// One topic's history.
pub(crate) struct TopicLog {
    rule: Retention,
    /// Whether its messages go through the write-ahead log.
    pub(crate) durable: bool,
    /// Whether a cluster keeps it (offsets and group positions are the cluster's; see
    /// `Bridge::sequence`).
    pub(crate) sequenced: bool,
    /// The offset the next message gets; offsets start at 1.
    next: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// What all topics' history holds, which `bytes` is part of.
    memory: Arc<Memory>,
    /// Its number in `memory`.
    id: usize,
    /// Whether `memory`'s order holds an entry for it (see `memory.rs`).
    ordered: bool,
}

impl TopicLog {
    fn new(rule: Retention, durable: bool, memory: Arc<Memory>, id: usize) -> Self {
        let (next, entries, bytes) = (1, VecDeque::new(), 0);
        Self { rule, durable, sequenced: false, next, entries, bytes, memory, id, ordered: false }
    }

    /// The offset the next message will get.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next
    }

    /// The first offset a reader starting at `start` gets.
    pub(crate) fn start_offset(&self, start: StartAt) -> Result<u64, SubscribeError> {
        let first = self.first_offset();
        Ok(match start {
            StartAt::Latest => self.next,
            StartAt::Earliest => first,
            StartAt::Offset(offset) if offset < first => {
                return Err(SubscribeError::OffsetEvicted { requested: offset, first });
            }
            StartAt::Offset(offset) => offset,
            StartAt::Time(ms) => {
                self.entries.iter().find(|e| e.time_ms >= ms).map_or(self.next, |e| e.offset)
            }
            _ => self.next,
        })
    }

    /// Where a subscription starting at `start` begins. For a durable topic that may be before
    /// memory's first offset, since its store keeps what memory evicted: `Earliest` is the
    /// store's oldest record, and an older offset is read from the store.
    pub(crate) fn replay_offset(&self, start: StartAt) -> Result<u64, SubscribeError> {
        match (start, self.durable) {
            (StartAt::Earliest, true) => Ok(1),
            (StartAt::Offset(offset), true) => Ok(offset.min(self.next)),
            _ => self.start_offset(start),
        }
    }

    /// The retained messages from offset `from` on, within `bound`.
    pub(crate) fn read(&self, from: u64, mut bound: PageBound) -> Vec<Message> {
        let entries = self.entries.iter().skip(self.before(from));
        let page = entries.take_while(|e| bound.admit_len(e.message.payload().len()));
        page.map(|e| e.message.clone()).collect()
    }

    /// Moves the next offset up to `next` (never down): offsets the cluster gave skip those of
    /// other topics.
    pub(crate) fn advance_to(&mut self, next: u64) {
        self.next = self.next.max(next);
    }

    /// How many retained entries come before offset `from` (offsets may have gaps).
    fn before(&self, from: u64) -> usize {
        self.entries.partition_point(|e| e.offset < from)
    }

    /// Takes the next offset; the caller routes the message and then `append`s it.
    pub(crate) fn reserve(&mut self) -> u64 {
        let offset = self.next;
        self.next += 1;
        offset
    }

    pub(crate) fn append(&mut self, offset: u64, seq: u64, time_ms: u64, message: Message) {
        // Never earlier than the message before, so sorting by time keeps a topic's order even
        // if the wall clock steps back.
        let time_ms = time_ms.max(self.entries.back().map_or(0, |e| e.time_ms));
        let weight = weight(&message);
        self.bytes += weight;
        self.memory.add(weight);
        self.entries.push_back(Entry { offset, seq, time_ms, at: Instant::now(), message });
        if !self.ordered {
            // Its first message since it was last empty: the bound on all history finds it.
            self.memory.ordered(self.id, self.entries.front().map_or(seq, |e| e.seq));
            self.ordered = true;
        }
        while self.entries.len() > self.rule.max_messages
            || (self.bytes > self.rule.max_bytes && self.entries.len() > 1)
        {
            self.evict_one();
        }
        self.evict_aged(Instant::now(), usize::MAX);
    }

    fn evict_one(&mut self) {
        if let Some(old) = self.entries.pop_front() {
            let weight = weight(&old.message);
            self.bytes -= weight;
            self.memory.sub(weight);
        }
    }

    /// Gives back most of the room of a log a trim emptied, or mostly: a chat server's many
    /// inboxes would otherwise each keep room for the most they ever held.
    fn shrink(&mut self) {
        if self.entries.capacity() > 16 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    /// The broker's acceptance number of the oldest message held, if any.
    fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|e| e.seq)
    }

    /// Evicts messages older than the age bound, at most `budget`; returns how many.
    fn evict_aged(&mut self, now: Instant, budget: usize) -> usize {
        let Some(age) = self.rule.max_age else { return 0 };
        let mut evicted = 0;
        while evicted < budget && self.entries.front().is_some_and(|e| e.at + age <= now) {
            self.evict_one();
            evicted += 1;
        }
        evicted
    }

    /// The first offset still retained (the next offset when empty).
    pub(crate) fn first_offset(&self) -> u64 {
        self.entries.front().map_or(self.next, |e| e.offset)
    }

    /// Whether no message has an offset in `from..to`, as far as memory knows: only offsets
    /// from the first one held in memory on are known (below it, the store's, they may exist).
    pub(crate) fn holds_none(&self, from: u64, to: u64) -> bool {
        from >= self.first_offset()
            && to <= self.next
            && self.entries.get(self.before(from)).is_none_or(|e| e.offset >= to)
    }
}

impl Drop for TopicLog {
    fn drop(&mut self) {
        // What it held no longer counts against the bound on all history.
        self.memory.sub(self.bytes);
    }
}

/// What a replaying subscription starts from.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Retained messages to deliver first, oldest first (by acceptance time across topics).
    pub(crate) messages: Vec<Message>,
    /// Per retained topic, the first offset the live queue delivers.
    pub(crate) live_from: HashMap<Topic, u64>,
    /// Per retained topic, the first offset this subscription delivers (replayed or live).
    pub(crate) starts: HashMap<Topic, u64>,
    /// Durable topics' history older than memory, to read from the store before `messages`.
    pub(crate) stored: Vec<StoredRange>,
}

/// Every topic's history, and the rules that say which topics keep one.
pub(crate) struct History {
    rules: Vec<(Filter, Retention)>,
    /// Topics written to the write-ahead log.
    durable: Vec<Filter>,
    logs: RwLock<FastMap<Topic, Arc<Mutex<TopicLog>>>>,
    /// The next acceptance sequence number (taken under a topic's lock).
    seq: AtomicU64,
    /// Offsets of durable topics new to this process start after this (see `continue_after`).
    floor: AtomicU64,
    /// What all topics' history holds together, and its bound.
    pub(crate) memory: Arc<Memory>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("rules", &self.rules).finish_non_exhaustive()
    }
}

pub(crate) fn lock(log: &Mutex<TopicLog>) -> MutexGuard<'_, TopicLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

impl History {
    /// History by `rules` and for the `durable` topics, all of it together within `max_bytes`.
    pub(crate) fn new(
        rules: Vec<(Filter, Retention)>,
        durable: Vec<Filter>,
        max_bytes: usize,
    ) -> Self {
        let (logs, seq, floor) = (RwLock::default(), AtomicU64::new(0), AtomicU64::new(0));
        let memory = Arc::new(Memory::new(max_bytes));
        Self { rules, durable, logs, seq, floor, memory }
    }

    /// Once all history together holds more than its bound, evicts the oldest messages
    /// across topics (see `memory.rs`); returns how many. Call it with no log's lock held.
    pub(crate) fn trim(&self) -> u64 {
        if !self.memory.is_over() {
            return 0;
        }
        let evicted = self.memory.trim();
        tracing::trace!(evicted, held = self.memory.held(), "history trimmed to its bound");
        evicted
    }

    /// Puts messages read back from the write-ahead log into their topics' history, and
    /// continues each topic's offsets after them.
    pub(crate) fn restore(&self, messages: impl IntoIterator<Item = (u64, u64, Message)>) {
        for (offset, accepted_ms, message) in messages {
            let Some(log) = self.log(message.topic()) else { continue };
            let mut log = lock(&log);
            log.next = log.next.max(offset + 1);
            log.append(offset, self.next_seq(), accepted_ms, message);
            drop(log);
            self.trim();
        }
    }

    /// Continues the offsets of each marked durable topic after its mark and `gap` more, also
    /// when its messages are gone, and starts those of every other durable topic after
    /// `floor`: offsets given before a restart are never given again.
    pub(crate) fn continue_after(&self, marks: Vec<(Topic, u64)>, gap: u64, floor: u64) {
        self.floor.store(floor, Ordering::Relaxed);
        for (topic, last) in marks {
            let Some(log) = self.log(&topic) else { continue };
            let mut log = lock(&log);
            log.next = log.next.max(last.saturating_add(1).saturating_add(gap));
        }
    }

    /// The next acceptance sequence number; take it under the topic's lock, with the offset.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether any topic keeps history.
    pub(crate) fn is_active(&self) -> bool {
        !self.rules.is_empty() || !self.durable.is_empty()
    }

    /// Whether any rule bounds by age (the sweep is needed).
    pub(crate) fn has_age_bounds(&self) -> bool {
        self.rules.iter().any(|(_, rule)| rule.max_age.is_some())
    }

    /// The log of `topic`, created on first use, if a rule matches it.
    pub(crate) fn log(&self, topic: &Topic) -> Option<Arc<Mutex<TopicLog>>> {
        if let Some(log) = self.logs.read().unwrap_or_else(PoisonError::into_inner).get(topic) {
            return Some(Arc::clone(log));
        }
        let durable = self.durable.iter().any(|filter| filter.matches(topic));
        let rule = self.rules.iter().find(|(filter, _)| filter.matches(topic)).map(|(_, r)| *r);
        let rule = rule.or(durable.then_some(DURABLE_DEFAULT))?;
        let mut logs = self.logs.write().unwrap_or_else(PoisonError::into_inner);
        let floor = if durable { self.floor.load(Ordering::Relaxed) } else { 0 };
        let log = logs.entry(topic.clone()).or_insert_with(|| {
            self.memory.register(|id| {
                let mut log = TopicLog::new(rule, durable, Arc::clone(&self.memory), id);
                log.next = floor + 1;
                Arc::new(Mutex::new(log))
            })
        });
        Some(Arc::clone(log))
    }

    /// The retained messages of the topics matching `filter` from `start`, and where live
    /// delivery takes over. Call it after the subscription's route is in place.
    pub(crate) fn snapshot(
        &self,
        filter: &Filter,
        start: StartAt,
    ) -> Result<Snapshot, SubscribeError> {
        self.snapshot_resuming(filter, start, None, false)
    }

    /// Like `snapshot`; with `resume` (a durable subscription's commits), each topic starts
    /// after its committed offset, and a topic without one from its earliest message (it came
    /// after the subscription did). A commit whose next message was evicted starts at the
    /// earliest retained one. For a queue `group`, topics a cluster keeps are left out: the
    /// cluster keeps the group's position.
    pub(crate) fn snapshot_resuming(
        &self,
        filter: &Filter,
        start: StartAt,
        resume: Option<&HashMap<Topic, u64>>,
        group: bool,
    ) -> Result<Snapshot, SubscribeError> {
        let logs = self.matching(filter);
        let mut snapshot = Snapshot::default();
        let mut picked: Vec<(u64, Message)> = Vec::new();
        for (topic, log) in logs {
            let log = lock(&log);
            if group && log.sequenced {
                // A queue group on a topic a cluster keeps: the cluster keeps its position
                // and hands it its messages, older ones included.
                continue;
            }
            snapshot.live_from.insert(topic.clone(), log.next);
            let first = log.first_offset();
            let from = match (resume, start) {
                (Some(commits), _) => {
                    let earliest = if log.durable { 1 } else { first };
                    let after = commits.get(&topic).map_or(earliest, |committed| committed + 1);
                    if after < first && !log.durable {
                        tracing::warn!(%topic, committed = after - 1, first, "durable subscription resumes after evicted messages");
                    }
                    if log.durable { after.min(log.next) } else { after.max(first) }
                }
                (None, start) => log.replay_offset(start)?,
            };
            snapshot.starts.insert(topic.clone(), from);
            if from < first {
                // Only a durable topic starts before memory: the store has the rest.
                snapshot.stored.push(StoredRange { topic, next: from, end: first });
            }
            picked.extend(
                log.entries.iter().skip(log.before(from)).map(|e| (e.seq, e.message.clone())),
            );
        }
        // In the order the broker accepted them, across topics (by offset within one).
        picked.sort_unstable_by_key(|(seq, _)| *seq);
        snapshot.messages = picked.into_iter().map(|(_, message)| message).collect();
        Ok(snapshot)
    }

    /// The retained topics matching `filter`, with their logs.
    pub(crate) fn matching(&self, filter: &Filter) -> Vec<(Topic, Arc<Mutex<TopicLog>>)> {
        let logs = self.logs.read().unwrap_or_else(PoisonError::into_inner);
        logs.iter()
            .filter(|(topic, _)| filter.matches(topic))
            .map(|(topic, log)| (topic.clone(), Arc::clone(log)))
            .collect()
    }

    /// Every retained topic: (topic, first offset, next offset, messages, bytes, durable).
    pub(crate) fn topics(&self) -> Vec<(Topic, u64, u64, usize, usize, bool)> {
        let logs: Vec<(Topic, Arc<Mutex<TopicLog>>)> = self
            .logs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(topic, log)| (topic.clone(), Arc::clone(log)))
            .collect();
        logs.into_iter()
            .map(|(topic, log)| {
                let log = lock(&log);
                (topic, log.first_offset(), log.next, log.entries.len(), log.bytes, log.durable)
            })
            .collect()
    }

    /// The next offset of `topic`, if it is retained.
    pub(crate) fn next_offset(&self, topic: &Topic) -> Option<u64> {
        let logs = self.logs.read().unwrap_or_else(PoisonError::into_inner);
        logs.get(topic).map(|log| lock(log).next)
    }

    /// Evicts aged messages, at most `budget` in all; returns how many.
    pub(crate) fn sweep(&self, now: Instant, budget: usize) -> usize {
        let logs: Vec<Arc<Mutex<TopicLog>>> =
            self.logs.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        let mut evicted = 0;
        for log in logs {
            if evicted >= budget {
                break;
            }
            evicted += lock(&log).evict_aged(now, budget - evicted);
        }
        evicted
    }
}

/// When a stored message accepted at `accepted_ms` expires (`Some(None)`: never), or `None`
/// when its time to live ran out already; it keeps what is left of its time to live.
pub(crate) fn expiry_of_stored(
    headers: &Headers,
    accepted_ms: u64,
    now: Instant,
    now_wall: u64,
) -> Option<Option<Instant>> {
    match headers.ttl_ms() {
        None => Some(None),
        Some(ttl) => {
            let left = accepted_ms.saturating_add(ttl).checked_sub(now_wall).filter(|&l| l > 0)?;
            Some(Some(now + Duration::from_millis(left)))
        }
    }
}
