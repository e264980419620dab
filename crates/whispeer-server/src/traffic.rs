//! What the server's clients publish and receive, counted per topic and per topic class, for
//! metrics and the admin API.
//!
//! A topic's class is its first segment (`sensor` for `sensor/7/temperature`, `$dlq` for a
//! dead letter): few enough to be a metrics label. Both maps are bounded: past `MAX_CLASSES`
//! new classes count as `other`, and past `max_topics` new topics count in their class only
//! (and in `untracked`). Counted at the edge — a message in when a client's publish is accepted,
//! a message out when a delivery is written to its connection — so embedded publishers and
//! subscribers are not counted here (the broker's own `BrokerStats` counts everyone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use whispeer_proto::Topic;

mod cache;

pub(crate) use cache::FlowCache;

/// Looked up per message: foldhash, a fraction of SipHash's cost on short keys, seeded per map.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Distinct classes counted; the rest count as `other`.
pub const MAX_CLASSES: usize = 64;

/// One flow's counters.
#[derive(Debug, Default)]
struct Flow {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

impl Flow {
    fn add(&self, inbound: bool, count: u64, bytes: u64) {
        let (messages, total) = if inbound {
            (&self.messages_in, &self.bytes_in)
        } else {
            (&self.messages_out, &self.bytes_out)
        };
        messages.fetch_add(count, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }

    fn snapshot(&self) -> FlowStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FlowStats {
            messages_in: get(&self.messages_in),
            bytes_in: get(&self.bytes_in),
            messages_out: get(&self.messages_out),
            bytes_out: get(&self.bytes_out),
        }
    }
}

/// Messages and payload bytes in (published by clients) and out (delivered to clients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowStats {
    /// Publishes accepted.
    pub messages_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// Deliveries written to connections.
    pub messages_out: u64,
    /// Their payload bytes.
    pub bytes_out: u64,
}

/// A counted topic's flow and its class's; or, for the topics past `max_topics`, a class's
/// flow of those (one per class, counting them together: [`Traffic::untracked`]).
#[derive(Debug)]
struct TopicFlow {
    flow: Flow,
    class: Arc<Flow>,
}

/// Traffic per topic and per topic class. Clones of a [`ServerConfig`](super::ServerConfig)
/// share one.
#[derive(Debug)]
pub struct Traffic {
    topics: RwLock<FastMap<Topic, Arc<TopicFlow>>>,
    classes: RwLock<FastMap<Box<str>, Arc<Class>>>,
    max_topics: usize,
    /// `max_topics` are counted: a topic not among them is counted by its class's `untracked`
    /// entry, without taking the topics' write lock for each of its messages.
    full: AtomicBool,
}

/// A class's traffic, and the entry that counts its topics not counted on their own.
#[derive(Debug)]
struct Class {
    flow: Arc<Flow>,
    untracked: Arc<TopicFlow>,
}

impl Default for Class {
    fn default() -> Self {
        let flow = Arc::new(Flow::default());
        let untracked = Arc::new(TopicFlow { flow: Flow::default(), class: Arc::clone(&flow) });
        Self { flow, untracked }
    }
}

impl Default for Traffic {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl Traffic {
    /// Counts at most `max_topics` distinct topics one by one.
    pub fn new(max_topics: usize) -> Self {
        Self {
            topics: RwLock::default(),
            classes: RwLock::default(),
            max_topics,
            full: AtomicBool::new(max_topics == 0),
        }
    }

    /// Counts a message a client published to `topic`.
    #[inline]
    pub(crate) fn inbound(&self, cache: &mut FlowCache, topic: &Topic, bytes: usize) {
        self.count(cache, topic, true, bytes);
    }

    /// Counts a message delivered to a client.
    #[inline]
    pub(crate) fn outbound(&self, cache: &mut FlowCache, topic: &Topic, bytes: usize) {
        self.count(cache, topic, false, bytes);
    }

    /// Counts in the cache when it holds `topic` and the direction (mostly: a connection's
    /// last topic), in place at the caller; otherwise out of line.
    #[inline]
    fn count(&self, cache: &mut FlowCache, topic: &Topic, inbound: bool, bytes: usize) {
        if cache.holds(topic, inbound) {
            cache.add(bytes);
        } else {
            self.count_anew(cache, topic, inbound, bytes);
        }
    }

    /// Counts a message to a topic other than the cache's last: in the cache if it has the
    /// topic, else in an entry found in (or added to) the shared map, which the cache keeps.
    #[inline(never)]
    fn count_anew(&self, cache: &mut FlowCache, topic: &Topic, inbound: bool, bytes: usize) {
        if cache.count_cached(topic, inbound, bytes) {
            return;
        }
        let known = self.topics.read().unwrap_or_else(PoisonError::into_inner).get(topic).cloned();
        let entry = known
            .or_else(|| if self.full.load(Ordering::Relaxed) { None } else { self.track(topic) })
            .unwrap_or_else(|| Arc::clone(&self.class(topic).untracked));
        cache.count_new(topic, entry, inbound, bytes);
    }

    /// Starts counting `topic`, unless `max_topics` are counted already.
    fn track(&self, topic: &Topic) -> Option<Arc<TopicFlow>> {
        let class = Arc::clone(&self.class(topic).flow);
        let mut topics = self.topics.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = topics.get(topic) {
            return Some(Arc::clone(entry));
        }
        if topics.len() >= self.max_topics {
            self.full.store(true, Ordering::Relaxed);
            return None;
        }
        let entry = Arc::new(TopicFlow { flow: Flow::default(), class });
        topics.insert(topic.clone(), Arc::clone(&entry));
        Some(entry)
    }

    fn class(&self, topic: &Topic) -> Arc<Class> {
        let name = class_of(topic);
        {
            let classes = self.classes.read().unwrap_or_else(PoisonError::into_inner);
            // Past the bound, a new class is `other`'s, found under the read lock too.
            let full = classes.len() >= MAX_CLASSES;
            let found = classes.get(name).or_else(|| classes.get("other").filter(|_| full));
            if let Some(class) = found {
                return Arc::clone(class);
            }
        }
        let mut classes = self.classes.write().unwrap_or_else(PoisonError::into_inner);
        let name = if classes.len() >= MAX_CLASSES && !classes.contains_key(name) {
            "other"
        } else {
            name
        };
        Arc::clone(classes.entry(name.into()).or_default())
    }

    /// Every counted topic's traffic.
    pub fn topics(&self) -> Vec<(Topic, FlowStats)> {
        let topics = self.topics.read().unwrap_or_else(PoisonError::into_inner);
        topics.iter().map(|(topic, entry)| (topic.clone(), entry.flow.snapshot())).collect()
    }

    /// Every class's traffic, sorted by name.
    pub fn classes(&self) -> Vec<(String, FlowStats)> {
        let classes = self.classes.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<(String, FlowStats)> =
            classes.iter().map(|(name, class)| (name.to_string(), class.flow.snapshot())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Messages whose topic was not counted on its own (`max_topics` reached), in and out.
    pub fn untracked(&self) -> u64 {
        let classes = self.classes.read().unwrap_or_else(PoisonError::into_inner);
        let each = classes.values().map(|class| class.untracked.flow.snapshot());
        each.map(|flow| flow.messages_in + flow.messages_out).sum()
    }
}

/// The class of `topic`: its first segment.
pub fn class_of(topic: &Topic) -> &str {
    topic.as_str().split('/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::parse(name).unwrap()
    }

    #[test]
    fn topics_and_classes_add_up() {
        let traffic = Traffic::new(2);
        let mut cache = FlowCache::default();
        traffic.inbound(&mut cache, &topic("sensor/1/t"), 10);
        traffic.inbound(&mut cache, &topic("sensor/2/t"), 20);
        traffic.outbound(&mut cache, &topic("sensor/1/t"), 10);
        traffic.outbound(&mut cache, &topic("sensor/1/t"), 10);
        traffic.inbound(&mut cache, &topic("chat/room"), 5);
        // Counts wait in the connection's cache until settled (after each read or write).
        cache.settle();

        let classes = traffic.classes();
        let names: Vec<&str> = classes.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["chat", "sensor"]);
        let sensor = classes[1].1;
        assert_eq!((sensor.messages_in, sensor.bytes_in), (2, 30));
        assert_eq!((sensor.messages_out, sensor.bytes_out), (2, 20));
        assert_eq!(classes[0].1.bytes_in, 5, "counted in its class though not on its own");

        let mut topics = traffic.topics();
        topics.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        assert_eq!(topics.len(), 2, "at most max_topics");
        assert_eq!(topics[0].0.as_str(), "sensor/1/t");
        assert_eq!((topics[0].1.messages_in, topics[0].1.messages_out), (1, 2));
        assert_eq!(traffic.untracked(), 1);
        // Each connection's cache counts its own; another connection's counts add up.
        let mut other = FlowCache::default();
        traffic.outbound(&mut other, &topic("sensor/1/t"), 1);
        traffic.outbound(&mut cache, &topic("sensor/2/t"), 1);
        // Counts wait in the cache until settled (or dropped).
        let out = |name: &str| {
            traffic.topics().iter().find(|t| t.0.as_str() == name).map(|t| t.1.messages_out)
        };
        assert_eq!(out("sensor/2/t"), Some(0));
        cache.settle();
        drop(other);
        let topics = traffic.topics();
        let flow = |name: &str| topics.iter().find(|t| t.0.as_str() == name).unwrap().1;
        assert_eq!((flow("sensor/1/t").messages_out, flow("sensor/2/t").messages_out), (3, 1));
    }

    /// A cache counts many topics between settles, in and out, and past its bound settles and
    /// forgets them: every message is counted once, to its topic and direction.
    #[test]
    fn a_cache_counts_many_topics_and_loses_no_count_past_its_bound() {
        let traffic = Traffic::new(10_000);
        let mut cache = FlowCache::default();
        let topics: Vec<Topic> =
            (0..cache::CACHED_TOPICS + 40).map(|n| topic(&format!("s/{n}"))).collect();
        let repeats = |n: usize| if n.is_multiple_of(7) { 2 } else { 1 };
        for round in 0..3 {
            for (n, t) in topics.iter().enumerate() {
                for _ in 0..repeats(n) {
                    traffic.inbound(&mut cache, t, n + 1);
                }
            }
            if round == 1 {
                cache.settle();
            }
        }
        traffic.outbound(&mut cache, &topics[3], 1000);
        traffic.outbound(&mut cache, &topics[3], 1000);
        traffic.inbound(&mut cache, &topics[3], 4);
        traffic.inbound(&mut cache, &topics[5], 6);
        cache.settle();
        traffic.inbound(&mut cache, &topics[5], 6);
        drop(cache);
        let counted = traffic.topics();
        for (n, t) in topics.iter().enumerate() {
            let flow = counted.iter().find(|(c, _)| c == t).map(|(_, flow)| *flow).unwrap();
            let (mut messages, mut bytes) =
                (3 * repeats(n) as u64, (3 * repeats(n) * (n + 1)) as u64);
            match n {
                3 => (messages, bytes) = (messages + 1, bytes + 4),
                5 => (messages, bytes) = (messages + 2, bytes + 12),
                _ => {}
            }
            assert_eq!((flow.messages_in, flow.bytes_in), (messages, bytes), "{t}");
            let out = if n == 3 { (2, 2000) } else { (0, 0) };
            assert_eq!((flow.messages_out, flow.bytes_out), out, "{t}");
        }
    }

    #[test]
    fn classes_past_the_bound_count_as_other() {
        let traffic = Traffic::new(0);
        let mut cache = FlowCache::default();
        for n in 0..MAX_CLASSES + 5 {
            traffic.inbound(&mut cache, &topic(&format!("c{n}/x")), 1);
        }
        traffic.inbound(&mut cache, &topic("c0/y"), 1);
        cache.settle();
        let classes = traffic.classes();
        assert_eq!(classes.len(), MAX_CLASSES + 1);
        let other = classes.iter().find(|(name, _)| name == "other").unwrap().1;
        assert_eq!(other.messages_in, 5);
        let c0 = classes.iter().find(|(name, _)| name == "c0").unwrap().1;
        assert_eq!(c0.messages_in, 2, "a known class keeps counting past the bound");
    }
}
