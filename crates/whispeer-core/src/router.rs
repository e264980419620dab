//! Topic → subscribers: an exact-topic hash map, a wildcard trie, and a per-topic match cache.
//!
//! Exact filters route with one hash lookup (a `Topic` of up to 23 bytes holds its text in
//! place, so the table's entry holds it: among many topics the look-up compares it, and a
//! message copies it, without reading another allocation). Wildcard filters live in a trie
//! keyed by segment; the result of matching a topic against the trie is cached per topic, so a
//! topic seen before also routes in O(1). The cache holds at most `MAX_CACHED_TOPICS` entries
//! and is cleared whenever a wildcard subscription comes or goes.
//!
//! Locking: `table` is a std `RwLock`, read on every publish (but a batch's repeats of its last
//! topic: [`recent`]) and written on (un)subscribe, and never held across `.await`. The cache
//! has its own lock, always taken *after* `table`, so a cache insert (under a table read lock)
//! can never race a clear (under the table write lock).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use smallvec::SmallVec;
use whispeer_proto::{Envelope, Filter, FilterSegment, Topic, hidden_from_wildcards};

use crate::hash::FastMap;
use crate::queue::Queue;

pub(crate) mod recent;

/// Bound on the number of topics whose wildcard matches are cached.
const MAX_CACHED_TOPICS: usize = 64 * 1024;

/// Identifies one subscription for its lifetime in a broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SubId(pub(crate) u64);

/// One subscriber as the router knows it: where to push its messages.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) id: SubId,
    pub(crate) queue: Arc<Queue>,
}

/// The routes of one filter. The first is held in place (most filters have one subscriber):
/// a look-up finds it in the table's entry (or the trie's node) without following a pointer
/// to another allocation, and a filter with one subscriber allocates nothing for its list.
type Routes = SmallVec<[Route; 1]>;

#[derive(Debug, Default)]
struct Node {
    children: FastMap<Box<str>, Self>,
    /// Filters continuing with `+` / `*` here.
    one: Option<Box<Self>>,
    /// Filters ending in `#` here.
    rest: Routes,
    /// Filters ending exactly here.
    here: Routes,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.one.is_none()
            && self.rest.is_empty()
            && self.here.is_empty()
    }

    fn insert<'f>(&mut self, mut segments: impl Iterator<Item = FilterSegment<'f>>, route: Route) {
        match segments.next() {
            None => self.here.push(route),
            Some(FilterSegment::Rest) => self.rest.push(route),
            Some(FilterSegment::One) => self.one.get_or_insert_default().insert(segments, route),
            Some(FilterSegment::Literal(s)) => {
                self.children.entry(s.into()).or_default().insert(segments, route);
            }
        }
    }

    /// Removes `id` along the filter's path; prunes nodes left empty. Returns whether found.
    fn remove<'f>(
        &mut self,
        mut segments: impl Iterator<Item = FilterSegment<'f>>,
        id: SubId,
    ) -> bool {
        match segments.next() {
            None => remove_route(&mut self.here, id),
            Some(FilterSegment::Rest) => remove_route(&mut self.rest, id),
            Some(FilterSegment::One) => {
                let Some(child) = self.one.as_mut() else {
                    return false;
                };
                let found = child.remove(segments, id);
                if child.is_empty() {
                    self.one = None;
                }
                found
            }
            Some(FilterSegment::Literal(s)) => {
                let Some(child) = self.children.get_mut(s) else {
                    return false;
                };
                let found = child.remove(segments, id);
                if child.is_empty() {
                    self.children.remove(s);
                }
                found
            }
        }
    }

    /// Appends every route of this node and below.
    fn all(&self, out: &mut Vec<Route>) {
        out.extend_from_slice(&self.here);
        out.extend_from_slice(&self.rest);
        self.children.values().for_each(|child| child.all(out));
        if let Some(one) = &self.one {
            one.all(out);
        }
    }

    /// Appends the routes of every filter below this node that matches `segments[depth..]`.
    fn collect(&self, segments: &[&str], depth: usize, out: &mut Vec<Route>) {
        // A leading wildcard never matches a reserved (`$`) topic.
        let wildcards_allowed = depth > 0 || !hidden_from_wildcards(segments[0]);
        if wildcards_allowed {
            out.extend_from_slice(&self.rest);
        }
        let Some(segment) = segments.get(depth) else {
            out.extend_from_slice(&self.here);
            return;
        };
        if let Some(child) = self.children.get(*segment) {
            child.collect(segments, depth + 1, out);
        }
        if let (true, Some(one)) = (wildcards_allowed, &self.one) {
            one.collect(segments, depth + 1, out);
        }
    }
}

fn remove_route(routes: &mut Routes, id: SubId) -> bool {
    let before = routes.len();
    routes.retain(|r| r.id != id);
    routes.len() != before
}

#[derive(Debug, Default)]
struct Table {
    exact: FastMap<Topic, Routes>,
    wild: Node,
    wild_count: usize,
    total: usize,
}

/// What a publish is routed by: a topic's text, or the envelope that carries it.
pub(crate) trait Routed {
    fn topic_text(&self) -> &str;
}

impl Routed for &str {
    fn topic_text(&self) -> &str {
        self
    }
}

impl Routed for Envelope {
    fn topic_text(&self) -> &str {
        self.topic.as_str()
    }
}

/// The routing table. See the module documentation for its locking.
#[derive(Debug)]
pub(crate) struct Router {
    table: RwLock<Table>,
    cache: RwLock<FastMap<Topic, Arc<[Route]>>>,
    /// Moved by every change of `table`, under its write lock: routes kept from it (see
    /// [`recent`]) are reused only while it has not moved. Taken from [`GENERATIONS`], so no
    /// two routers (even one made where another was freed) share one.
    generation: Generation,
}

/// A router's generation, on a cache line of its own: read by every batch's publish, it must
/// not share one with a lock word that every publish writes.
#[derive(Debug)]
#[repr(align(64))]
struct Generation(AtomicU64);

/// Generations for every router of the process.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, Ordering::Relaxed)
}

impl Default for Router {
    fn default() -> Self {
        Self {
            table: RwLock::default(),
            cache: RwLock::default(),
            generation: Generation(AtomicU64::new(next_generation())),
        }
    }
}

/// The subscriptions one topic matches, and the topic as the router holds it, so a publisher can
/// clone it instead of parsing its own (and, past 23 bytes, allocating it).
#[derive(Debug)]
pub(crate) struct Matches<'a> {
    pub(crate) topic: &'a Topic,
    pub(crate) exact: &'a [Route],
    pub(crate) wild: &'a [Route],
}

impl<'a> Matches<'a> {
    /// Matches, if there is any route at all.
    fn some(topic: &'a Topic, exact: &'a [Route], wild: &'a [Route]) -> Option<Self> {
        (!exact.is_empty() || !wild.is_empty()).then_some(Self { topic, exact, wild })
    }

    pub(crate) fn len(&self) -> usize {
        self.exact.len() + self.wild.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Route> {
        self.exact.iter().chain(self.wild)
    }
}

impl Router {
    /// Adds a subscription.
    pub(crate) fn insert(&self, filter: &Filter, route: Route) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.0.store(next_generation(), Ordering::Release);
        table.total += 1;
        if let Some(topic) = filter.as_topic() {
            table.exact.entry(topic).or_default().push(route);
        } else {
            table.wild.insert(filter.segments(), route);
            table.wild_count += 1;
            self.clear_cache();
        }
    }

    /// Removes a subscription; returns whether it was present.
    pub(crate) fn remove(&self, filter: &Filter, id: SubId) -> bool {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let found = if filter.is_exact() {
            let key = filter.as_str();
            let Some(routes) = table.exact.get_mut(key) else { return false };
            let found = remove_route(routes, id);
            if routes.is_empty() {
                table.exact.remove(key);
            }
            found
        } else {
            let found = table.wild.remove(filter.segments(), id);
            if found {
                table.wild_count -= 1;
                self.clear_cache();
            }
            found
        };
        if found {
            self.generation.0.store(next_generation(), Ordering::Release);
            table.total -= 1;
        }
        found
    }

    fn clear_cache(&self) {
        self.cache.write().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Every route, for introspection (takes the table's read lock once).
    pub(crate) fn routes(&self) -> Vec<Route> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Route> = table.exact.values().flatten().cloned().collect();
        table.wild.all(&mut out);
        out
    }

    /// Number of subscriptions.
    pub(crate) fn len(&self) -> usize {
        self.table.read().unwrap_or_else(PoisonError::into_inner).total
    }

    /// Calls `deliver` with the subscriptions matching `topic` (a valid topic), or with `None`
    /// if there are none. The table is read-locked meanwhile, so `deliver` must not block or
    /// call back into the router.
    pub(crate) fn with_matches<R>(
        &self,
        topic: &str,
        deliver: impl FnOnce(Option<Matches<'_>>) -> R,
    ) -> R {
        let deliver = |_: &str, matches: Option<Matches<'_>>| deliver(matches);
        match self.with_matches_admitted(topic, |_, _| Ok::<(), Infallible>(()), deliver) {
            Ok(delivered) => delivered,
            Err(never) => match never {},
        }
    }

    /// [`Router::with_matches`] for a topic that may not be valid yet: `admit` is told first
    /// whether an exact subscription's filter is this very text — a filter the broker checked
    /// against the same limits when it was subscribed, so the topic needs no second check —
    /// and may refuse it, in which case nothing is matched or delivered. A topic refused
    /// never reaches the wildcard cache.
    ///
    /// `routed` (the topic's text, or the envelope that carries it) is handed on to `deliver`:
    /// an envelope is routed by its own topic, without a copy of it that the lookup would need
    /// while `deliver` takes the envelope (two atomic operations a publish).
    pub(crate) fn with_matches_admitted<T: Routed, R, E>(
        &self,
        routed: T,
        admit: impl FnOnce(&str, bool) -> Result<(), E>,
        deliver: impl FnOnce(T, Option<Matches<'_>>) -> R,
    ) -> Result<R, E> {
        // Within a batch, the topic its last publishes routed to routes again without the
        // table while the table is unchanged. It was let through then (checked, or the text
        // of an exact subscription's filter): `admit` is told it needs no check.
        let batching = recent::batching();
        if batching
            && recent::holds()
            && let Some(kept) =
                recent::kept(self.generation.0.load(Ordering::Acquire), routed.topic_text())
        {
            admit(kept.topic.as_str(), true)?;
            return Ok(deliver(routed, Matches::some(&kept.topic, &kept.routes, &[])));
        }
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let generation = self.generation.0.load(Ordering::Relaxed);
        let note = |topic: &Topic, exact: &[Route], wild: &[Route]| {
            if batching {
                recent::note(generation, topic, exact, wild);
            }
        };
        let exact = table.exact.get_key_value(routed.topic_text());
        admit(routed.topic_text(), exact.is_some())?;
        if table.wild_count == 0 {
            if let Some((topic, exact)) = exact {
                note(topic, exact, &[]);
            }
            let matches = exact.map(|(topic, exact)| Matches { topic, exact, wild: &[] });
            return Ok(deliver(routed, matches));
        }
        let exact_routes = exact.map_or(&[][..], |(_, routes)| routes.as_slice());
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((topic, wild)) = cache.get_key_value(routed.topic_text()) {
            note(topic, exact_routes, wild);
            return Ok(deliver(routed, Matches::some(topic, exact_routes, wild)));
        }
        drop(cache);
        Ok(match self.match_wildcards(&table, routed.topic_text()) {
            // Not noted: the topic is the trie's match, held in this frame, and the cache holds
            // it from now on (noting a frame's address would take every new topic for a repeat).
            Some((topic, wild)) => deliver(routed, Matches::some(&topic, exact_routes, &wild)),
            None => deliver(routed, None),
        })
    }

    /// Matches `topic` against the trie and caches the result (also when empty, so that
    /// unmatched topics stay O(1)). `None` only if `topic` is not valid.
    fn match_wildcards(&self, table: &Table, topic: &str) -> Option<(Topic, Arc<[Route]>)> {
        let key = Topic::parse_with(topic, &crate::message::no_limits()).ok()?;
        let segments: Vec<&str> = topic.split('/').collect();
        let mut found = Vec::new();
        table.wild.collect(&segments, 0, &mut found);
        let found: Arc<[Route]> = found.into();
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_TOPICS {
            cache.clear();
        }
        cache.insert(key.clone(), Arc::clone(&found));
        Some((key, found))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use whispeer_proto::Topic;

    use super::*;
    use crate::SlowConsumer;

    pub(super) fn route(id: u64) -> Route {
        Route {
            id: SubId(id),
            queue: Arc::new(Queue::new(
                Filter::parse("#").unwrap(),
                1,
                1024,
                SlowConsumer::DropOldest,
            )),
        }
    }

    pub(super) fn matched(router: &Router, topic: &str) -> BTreeSet<u64> {
        router.with_matches(topic, |m| {
            m.map(|m| m.iter().map(|r| r.id.0).collect()).unwrap_or_default()
        })
    }

    /// The reference matcher, written as plainly as possible.
    pub(super) fn naive(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if matches!(f[0], "+" | "*" | "#") && (t[0].starts_with('$') || t[0].starts_with('@')) {
            return false;
        }
        for (i, seg) in f.iter().enumerate() {
            match *seg {
                "#" => return true,
                "+" | "*" if i < t.len() => {}
                s if i < t.len() && s == t[i] => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    #[test]
    fn routes_exact_and_wildcard_and_forgets_removed() {
        let router = Router::default();
        let filters = ["a/b", "a/+", "a/#", "#", "+/b", "x/y"];
        for (i, f) in filters.iter().enumerate() {
            router.insert(&Filter::parse(f).unwrap(), route(i as u64));
        }
        assert_eq!(matched(&router, "a/b"), BTreeSet::from([0, 1, 2, 3, 4]));
        assert_eq!(matched(&router, "a"), BTreeSet::from([2, 3]));
        assert!(router.remove(&Filter::parse("a/+").unwrap(), SubId(1)));
        assert!(!router.remove(&Filter::parse("a/+").unwrap(), SubId(1)));
        assert_eq!(matched(&router, "a/b"), BTreeSet::from([0, 2, 3, 4]));
        assert!(router.remove(&Filter::parse("a/b").unwrap(), SubId(0)));
        assert_eq!(matched(&router, "a/b"), BTreeSet::from([2, 3, 4]));
        assert_eq!(router.len(), 4);
    }

    /// Exact topics alike in length and first bytes, held in place (up to 23 bytes) and shared
    /// (longer), route only to their own subscribers.
    #[test]
    fn exact_topics_alike_in_their_first_bytes_route_only_to_their_own() {
        let router = Router::default();
        let texts = [
            "a",
            "a/b",
            "abcdefghijklmnopqrstuv",
            "abcdefghijklmnopqrstuvw",
            "abcdefghijklmnopqrstuvx",
            "abcdefghijklmnopqrstuvwx",
            "abcdefghijklmnopqrstuvwx/y",
            "abcdefghijklmnopqrstuvwx/z",
        ];
        for (i, text) in texts.iter().enumerate() {
            router.insert(&Filter::parse(text).unwrap(), route(i as u64));
        }
        for (i, text) in texts.iter().enumerate() {
            let topic = router.with_matches(text, |m| m.map(|m| m.topic.as_str().to_owned()));
            assert_eq!(topic.as_deref(), Some(*text));
            assert_eq!(matched(&router, text), BTreeSet::from([i as u64]), "{text}");
        }
        for absent in ["b", "abcdefghijklmnopqrstu", "abcdefghijklmnopqrstuvwy", "a/bc"] {
            assert!(matched(&router, absent).is_empty(), "{absent}");
        }
        let gone = Filter::parse("abcdefghijklmnopqrstuvwx/y").unwrap();
        assert!(router.remove(&gone, SubId(6)));
        assert!(!router.remove(&gone, SubId(6)));
        assert!(matched(&router, gone.as_str()).is_empty());
        assert_eq!(matched(&router, "abcdefghijklmnopqrstuvwx/z"), BTreeSet::from([7]));
    }

    #[test]
    fn removing_everything_leaves_an_empty_trie() {
        let router = Router::default();
        let filters = ["a/+/c/#", "a/b", "+/+", "#"];
        for (i, f) in filters.iter().enumerate() {
            router.insert(&Filter::parse(f).unwrap(), route(i as u64));
        }
        for (i, f) in filters.iter().enumerate() {
            assert!(router.remove(&Filter::parse(f).unwrap(), SubId(i as u64)));
        }
        let table = router.table.read().unwrap();
        assert!(table.wild.is_empty() && table.exact.is_empty());
        assert_eq!((table.wild_count, table.total), (0, 0));
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$s".to_string()),
            Just("@i".to_string())
        ]
    }

    fn filter_segment() -> impl Strategy<Value = String> {
        prop_oneof![3 => segment(), 1 => Just("+".to_string()), 1 => Just("*".to_string())]
    }

    pub(super) fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(filter_segment(), 1..4), any::<bool>()).prop_map(|(mut s, hash)| {
            if hash {
                s.push("#".into());
            }
            s.join("/")
        })
    }

    pub(super) fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|s| s.join("/"))
    }

    proptest! {
        #[test]
        fn router_agrees_with_reference_matcher(
            filters in prop::collection::vec(filter(), 1..12),
            topics in prop::collection::vec(topic(), 1..12),
            removed in prop::collection::vec(any::<bool>(), 12),
        ) {
            let router = Router::default();
            for (i, f) in filters.iter().enumerate() {
                router.insert(&Filter::parse(f).unwrap(), route(i as u64));
            }
            // Warm the cache, then remove some subscriptions: the cache must not go stale.
            for t in &topics {
                matched(&router, t);
            }
            for (i, f) in filters.iter().enumerate() {
                if removed[i] {
                    router.remove(&Filter::parse(f).unwrap(), SubId(i as u64));
                }
            }
            for t in &topics {
                let expected: BTreeSet<u64> = filters.iter().enumerate()
                    .filter(|&(i, f)| !removed[i] && naive(f, t))
                    .map(|(i, _)| i as u64)
                    .collect();
                prop_assert_eq!(matched(&router, t), expected.clone(), "topic {}", t);
                let by_filter: BTreeSet<u64> = filters.iter().enumerate()
                    .filter(|&(i, f)| !removed[i] && Filter::parse(f).unwrap().matches(&Topic::parse(t).unwrap()))
                    .map(|(i, _)| i as u64)
                    .collect();
                prop_assert_eq!(by_filter, expected);
            }
        }
    }
}
