//! One side of a connection's counts ([`FlowCache`]): what its reader published, or what its
//! writer delivered, added up per topic between settles.

use std::sync::Arc;

use whispeer_proto::Topic;

use super::{FastMap, TopicFlow};

/// Most topics one [`FlowCache`] counts at once. Policy past it: the cache settles and forgets
/// them all, and counts on from the next topic (a publisher cycling through more topics than
/// this takes the shared map's lock for each topic again, as every topic did before).
pub(crate) const CACHED_TOPICS: usize = 128;

/// A topic's counts since the last settle, with the shared entry they are added to.
#[derive(Debug)]
struct Counted {
    entry: Arc<TopicFlow>,
    inbound: bool,
    messages: u64,
    bytes: u64,
}

impl Counted {
    fn settle(&mut self) {
        if self.messages > 0 {
            self.entry.flow.add(self.inbound, self.messages, self.bytes);
            self.entry.class.add(self.inbound, self.messages, self.bytes);
        }
        (self.messages, self.bytes) = (0, 0);
    }
}

/// The topics one side of a connection (its reader or its writer) counted lately, with their
/// counts: a message to the topic counted last is added up in place (most messages repeat
/// their connection's last topic); one to another topic counted before (up to
/// [`CACHED_TOPICS`]) is found in a map of the connection's own; either skips the shared map's
/// lock and hash. Counts are added to the shared counters at [`FlowCache::settle`] (after each
/// read or write, on a flush, when dropped), once a batch per topic rather than once a message.
/// Topics are never removed from the shared map, so a cached entry stays the one the map holds.
#[derive(Debug, Default)]
pub(crate) struct FlowCache {
    /// The topic counted last, and where in `counted` it is.
    last: Option<(Topic, usize)>,
    /// The last topic's direction, and its counts not yet folded into `counted`.
    inbound: bool,
    messages: u64,
    bytes: u64,
    counted: Vec<Counted>,
    /// Where in `counted` each topic is.
    index: FastMap<Topic, usize>,
    /// Entries of `counted` holding counts not settled.
    pending: Vec<usize>,
}

impl FlowCache {
    /// Whether the cache counts `topic`'s traffic in this direction last: then
    /// [`FlowCache::add`] counts a message of it without the topic at hand.
    #[inline]
    pub(crate) fn holds(&self, topic: &Topic, inbound: bool) -> bool {
        matches!(&self.last, Some((last, _)) if last == topic) && self.inbound == inbound
    }

    /// Counts one more message of `bytes` to the topic and direction the cache holds (see
    /// [`FlowCache::holds`]).
    #[inline]
    pub(crate) fn add(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
    }

    /// Moves the last topic's counts into its entry, pending until settled.
    fn fold(&mut self) {
        if let Some((_, at)) = &self.last
            && self.messages > 0
            && let Some(counted) = self.counted.get_mut(*at)
        {
            if counted.inbound != self.inbound {
                counted.settle();
                counted.inbound = self.inbound;
            }
            if counted.messages == 0 {
                self.pending.push(*at);
            }
            counted.messages += self.messages;
            counted.bytes += self.bytes;
        }
        (self.messages, self.bytes) = (0, 0);
    }

    /// Makes `topic`, in this direction, the one counted last, with a message of `bytes`, if
    /// the cache has it; `false` if not, when the caller finds its shared entry for
    /// [`FlowCache::count_new`].
    pub(super) fn count_cached(&mut self, topic: &Topic, inbound: bool, bytes: usize) -> bool {
        let Some(&at) = self.index.get(topic) else { return false };
        self.fold();
        self.last = Some((topic.clone(), at));
        (self.inbound, self.messages, self.bytes) = (inbound, 1, bytes as u64);
        true
    }

    /// Starts counting `topic` (not cached: [`FlowCache::count_cached`] said so) into `entry`
    /// with a message of `bytes`; past [`CACHED_TOPICS`], settles and forgets the others first.
    pub(super) fn count_new(
        &mut self,
        topic: &Topic,
        entry: Arc<TopicFlow>,
        inbound: bool,
        bytes: usize,
    ) {
        self.fold();
        if self.counted.len() >= CACHED_TOPICS {
            self.settle();
            self.last = None;
            self.counted.clear();
            self.index.clear();
        }
        let at = self.counted.len();
        self.index.insert(topic.clone(), at);
        self.counted.push(Counted { entry, inbound, messages: 0, bytes: 0 });
        self.last = Some((topic.clone(), at));
        (self.inbound, self.messages, self.bytes) = (inbound, 1, bytes as u64);
    }

    /// Adds what was counted since the last settle to the shared counters.
    pub(crate) fn settle(&mut self) {
        self.fold();
        for at in self.pending.drain(..) {
            if let Some(counted) = self.counted.get_mut(at) {
                counted.settle();
            }
        }
    }
}

impl Drop for FlowCache {
    fn drop(&mut self) {
        self.settle();
    }
}
