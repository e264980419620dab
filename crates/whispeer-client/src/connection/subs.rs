//! What the connection task keeps per subscription: what to send again on reconnect, the ids
//! acknowledged lately, and the shapes of deliveries and acks on their way.
//!
//! Deliveries reach their subscription through its [`Buffer`]: the connection task stages the
//! deliveries of one read and adds them under one lock with one wake-up, and the subscription
//! takes everything waiting under one lock too, rather than a channel operation and a wake-up
//! per message. They move in [`Run`]s: consecutive deliveries to one subscription, cut off the
//! read buffer in one piece, which the subscription takes apart one by one.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use whispeer_proto::{Body, Filter, MessageId, Qos, RawDeliver, StartAt, TopicAliases};

/// What a subscription asks the server for; sent again on every reconnect.
#[derive(Clone, Debug)]
pub(crate) struct SubSpec {
    pub(crate) filter: Filter,
    pub(crate) qos: Qos,
    pub(crate) prefetch: u32,
    pub(crate) group: Option<String>,
    pub(crate) start: StartAt,
}

impl SubSpec {
    pub(super) fn frame(&self, sub: u32) -> Body {
        Body::Subscribe {
            sub,
            qos: self.qos,
            filter: self.filter.clone(),
            prefetch: self.prefetch,
            group: self.group.clone(),
            start: self.start,
        }
    }

    /// Where a re-subscription starts: after the last offset received on an exact topic, so
    /// nothing retained is missed or repeated; otherwise with new messages only (replaying
    /// from the original start again would repeat what was delivered).
    pub(super) fn resume(&mut self, last_offset: Option<u64>) {
        self.start = match last_offset {
            Some(offset) if self.filter.is_exact() => StartAt::Offset(offset + 1),
            _ => StartAt::Latest,
        };
    }
}

/// Consecutive deliveries to one subscription, whole DELIVER (or DELIVER_COMPACT) frames as
/// they were read; each one's envelope is decoded by the subscription.
#[derive(Debug)]
pub(crate) struct Run {
    frames: Bytes,
    /// How many.
    count: usize,
    /// The connection's topic numbers when the run was cut: every number its compact
    /// deliveries name.
    pub(crate) aliases: TopicAliases,
}

impl Run {
    pub(super) fn new(frames: Bytes, count: usize, aliases: TopicAliases) -> Self {
        Self { frames, count, aliases }
    }

    /// The next delivery of the run; `None` once it is empty. The connection task checked each
    /// frame against the client's limits when it read its head: the run is not held to them
    /// again, so a delivery it admitted is never refused here.
    #[inline]
    pub(crate) fn next(&mut self) -> Option<RawDeliver> {
        let next = RawDeliver::take_from(&mut self.frames);
        self.count = if next.is_some() { self.count.saturating_sub(1) } else { 0 };
        next
    }

    /// Whether every delivery was taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A QoS 1 delivery's settlement: `requeue: None` acks, `Some(r)` nacks.
#[derive(Debug)]
pub(crate) struct Settle {
    pub(crate) sub: u32,
    pub(crate) id: MessageId,
    pub(crate) requeue: Option<bool>,
}

/// Ids a subscription acked lately, oldest forgotten first. Looked up for each delivery and
/// changed for each ack: foldhash rather than SipHash (the ids come from the server this
/// client chose, and the set is bounded).
#[derive(Debug, Default)]
pub(super) struct RecentIds {
    pub(super) order: VecDeque<MessageId>,
    pub(super) set: HashSet<MessageId, foldhash::fast::RandomState>,
}

impl RecentIds {
    pub(super) fn remember(&mut self, id: MessageId, capacity: usize) {
        if capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// A live subscription as the connection task knows it.
pub(super) struct Sub {
    pub(super) spec: SubSpec,
    pub(super) acked: RecentIds,
    pub(super) buffer: Arc<Buffer>,
    /// Deliveries of the current read, not yet handed over.
    pub(super) staged: Staged,
    /// The last history offset received, to resume after a reconnect.
    pub(super) last_offset: Option<u64>,
}

impl Sub {
    pub(super) fn new(spec: SubSpec, buffer: Arc<Buffer>) -> Self {
        let (acked, staged) = (RecentIds::default(), Staged::default());
        Self { spec, acked, buffer, staged, last_offset: None }
    }

    /// Whether deliveries handed over wait for the subscription to take them.
    pub(super) fn untaken(&self) -> bool {
        !self.buffer.waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}

impl Drop for Sub {
    /// The connection task lets go of the subscription: it ends once it has taken what waits.
    fn drop(&mut self) {
        self.buffer.sender_gone.store(true, Ordering::Release);
        self.buffer.waker.wake();
    }
}

/// One subscription's deliveries of the current read and the room they take. The buffer's
/// counts are read once a read and added to once at the hand-over, not touched per message by
/// both threads (each touch moves their cache line between the cores).
#[derive(Debug, Default)]
pub(crate) struct Staged {
    runs: VecDeque<Run>,
    /// What the deliveries admitted in this read weigh, and how many they are: those in `runs`
    /// and those of the run still being read.
    bytes: usize,
    count: usize,
    /// The buffer's counts (bytes, messages) when this read first looked.
    seen: Option<(usize, usize)>,
}

impl Staged {
    pub(super) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Adds a run of deliveries admitted one by one ([`Buffer::admit`]).
    pub(super) fn push(&mut self, run: Run) {
        self.runs.push_back(run);
    }
}

/// What the connection task and a subscription share: the deliveries waiting to be taken,
/// bounded by bytes (so a burst is held by bytes rather than by a small message count) and by
/// count, and its counters.
#[derive(Debug)]
pub(crate) struct Buffer {
    waiting: Mutex<VecDeque<Run>>,
    waker: AtomicWaker,
    /// The subscription was dropped: the connection task unsubscribes.
    pub(crate) receiver_gone: AtomicBool,
    /// The connection task let go of it: nothing more comes.
    sender_gone: AtomicBool,
    bytes: AtomicUsize,
    max_bytes: usize,
    count: AtomicUsize,
    max_count: usize,
    /// Messages always taken in, whatever the bounds: a QoS 1 subscription's prefetch.
    holds: usize,
    pub(crate) duplicates: AtomicU64,
    dropped: AtomicU64,
}

impl Buffer {
    pub(crate) fn new(max_bytes: usize, max_count: usize) -> Self {
        Self {
            waiting: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            receiver_gone: AtomicBool::new(false),
            sender_gone: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
            max_bytes,
            count: AtomicUsize::new(0),
            max_count: max_count.max(1),
            holds: 0,
            duplicates: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Always takes in `messages` (a QoS 1 subscription's prefetch: the server sends no more
    /// unacknowledged, and one dropped here would come again only after its ack timeout); the
    /// bounds apply beyond them (to redeliveries of messages still waiting here).
    pub(crate) fn holding(mut self, messages: usize) -> Self {
        self.holds = messages;
        self
    }

    /// Hands `staged` over (leaving it empty) and wakes the subscription. The room is counted
    /// before the deliveries can be taken, so it is never given back before it was counted.
    pub(super) fn put_all(&self, staged: &mut Staged) {
        staged.seen = None;
        if staged.runs.is_empty() {
            return;
        }
        self.bytes.fetch_add(std::mem::take(&mut staged.bytes), Ordering::AcqRel);
        self.count.fetch_add(std::mem::take(&mut staged.count), Ordering::AcqRel);
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.is_empty() {
            // The subscription took everything: trade queues rather than move each run.
            std::mem::swap(&mut *waiting, &mut staged.runs);
        } else {
            waiting.append(&mut staged.runs);
        }
        drop(waiting);
        self.waker.wake();
    }

    /// Admits a delivery whose envelope is `envelope_len` bytes for the next hand-over if the
    /// buffer has room for it (counting it as staged); `false` (counted as dropped) when it is
    /// full by bytes or by count. A message always fits an empty buffer. The buffer's counts
    /// are read once a read, and again before a message is refused (the subscription may have
    /// taken messages meanwhile).
    #[inline]
    pub(super) fn admit(&self, staged: &mut Staged, envelope_len: usize) -> bool {
        let weight = Self::weight(envelope_len);
        let looked = staged.seen.is_some();
        let fits = self.fits(staged, weight, false) || (looked && self.fits(staged, weight, true));
        if !fits {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        staged.bytes += weight;
        staged.count += 1;
        true
    }

    /// Whether a message of `weight` fits beside what is held and staged; `fresh` reads the
    /// buffer's counts again.
    fn fits(&self, staged: &mut Staged, weight: usize, fresh: bool) -> bool {
        let (bytes, count) = match staged.seen {
            Some(seen) if !fresh => seen,
            _ => {
                let seen = (self.bytes.load(Ordering::Acquire), self.count.load(Ordering::Acquire));
                staged.seen = Some(seen);
                seen
            }
        };
        let (held, count) = (bytes + staged.bytes, count + staged.count);
        count < self.holds
            || !((held > 0 && held + weight > self.max_bytes) || count >= self.max_count)
    }

    /// Moves everything waiting to `into` (which the caller has emptied), or learns that
    /// nothing is waiting (`Pending`, waker registered) or will ever come (`Ready(false)`).
    pub(crate) fn poll_take(&self, into: &mut VecDeque<Run>, cx: &mut Context<'_>) -> Poll<bool> {
        if self.take(into) {
            return Poll::Ready(true);
        }
        self.waker.register(cx.waker());
        // Something added (or the end) between the first look and the registration.
        if self.take(into) {
            return Poll::Ready(true);
        }
        if self.sender_gone.load(Ordering::Acquire) {
            // Added before the end was said.
            return Poll::Ready(self.take(into));
        }
        Poll::Pending
    }

    fn take(&self, into: &mut VecDeque<Run>) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        // Trading the two queues keeps each one's capacity and copies nothing.
        std::mem::swap(&mut *waiting, into);
        !into.is_empty()
    }

    /// What a buffered message weighs: its envelope as it came (payload, topic and headers),
    /// `envelope_len` bytes, and an allowance for the delivery around it.
    pub(crate) fn weight(envelope_len: usize) -> usize {
        envelope_len + 224
    }

    /// Messages dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Gives back the room of `count` messages weighing `bytes`, taken off the buffer.
    pub(crate) fn release(&self, bytes: usize, count: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.count.fetch_sub(count, Ordering::AcqRel);
    }
}
