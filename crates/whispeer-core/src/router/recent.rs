//! The topic a thread's batch routed last, with its routes, so that the batch's next publish to
//! the same topic routes without the table.
//!
//! A server connection's reader publishes a read's messages inside one
//! [`PushBatch`](crate::PushBatch), and most reads carry one topic many times over. Looking it
//! up for each took the table's read lock (two atomic operations on a word every publisher
//! shares) and hashed the topic: about a tenth of the server's time in a 1 → 1 stream. Within
//! a batch, once a topic has been looked up twice in a row, its routes are kept here and
//! reused while the table is unchanged: each change of the table
//! ([`Router::insert`](super::Router::insert), [`Router::remove`](super::Router::remove))
//! moves the router's generation, read under the table's lock when the routes are kept and
//! again at each reuse.
//!
//! What is kept is let go when the outermost batch ends (the queues of subscriptions that end
//! are not held past the read), and kept only while a batch is begun: a publish outside one
//! looks the table up as before. A queue removed from the table during a batch can still be
//! offered a message of that batch, as before: it is closed first, and a closed queue takes
//! nothing.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use whispeer_proto::Topic;

use super::Route;

thread_local! {
    /// Batches begun and not ended on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// The last look-up in a table.
    static SEEN: Cell<Seen> = const { Cell::new(Seen { generation: 0, at: 0 }) };
    /// Whether [`KEPT`] holds routes. It and the two above have nothing to drop, so reading
    /// them costs no more than a field: a publish that keeps nothing (a batch of many topics)
    /// touches nothing else.
    static HOLDS: Cell<bool> = const { Cell::new(false) };
    /// The routes of the topic of [`SEEN`], once it was looked up twice in a row.
    static KEPT: RefCell<Option<Rc<Kept>>> = const { RefCell::new(None) };
}

/// One look-up in a table: its router's generation then (generations are unique in the
/// process, so one names one state of one router's table, whichever broker a thread publishes
/// to), and where the router held the topic (the address of its `Topic` in the exact map or
/// the wildcard cache). Compared, never dereferenced, so a look-up that keeps nothing clones
/// nothing (a long topic's text is shared, and a clone would write its count). The address
/// only tells a repeat: the wildcard cache may move or drop its entries without the generation
/// moving, so another topic may be found where the last one was; then that look-up keeps its
/// own topic and routes a look-up early, and [`kept`] still compares the text.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    generation: u64,
    at: usize,
}

/// A topic and its routes (exact, then wildcard) as the table had them.
pub(crate) struct Kept {
    pub(crate) topic: Topic,
    pub(crate) routes: Vec<Route>,
}

/// A batch begins on this thread ([`PushBatch::begin`](crate::PushBatch::begin)).
pub(crate) fn hold() {
    DEPTH.set(DEPTH.get() + 1);
}

/// A batch ends; the outermost lets go of what was kept.
pub(crate) fn release() {
    let depth = DEPTH.get().saturating_sub(1);
    DEPTH.set(depth);
    if depth == 0 {
        SEEN.set(Seen { generation: 0, at: 0 });
        forget();
    }
}

/// Lets go of the kept routes, if any; dropped outside the borrow (a queue's last reference
/// may go with them).
fn forget() {
    if HOLDS.replace(false) {
        let kept =
            KEPT.try_with(|kept| kept.try_borrow_mut().ok().and_then(|mut kept| kept.take()));
        drop(kept);
    }
}

/// Whether a batch is begun on this thread: only then is anything kept or reused.
#[inline]
pub(crate) fn batching() -> bool {
    DEPTH.get() > 0
}

/// Whether routes are kept on this thread (then [`kept`] may find them).
#[inline]
pub(crate) fn holds() -> bool {
    HOLDS.get()
}

/// The routes kept for the topic `text` in the table at `generation`, if any.
pub(crate) fn kept(generation: u64, text: &str) -> Option<Rc<Kept>> {
    if SEEN.get().generation != generation {
        return None;
    }
    KEPT.try_with(|kept| {
        let kept = kept.try_borrow().ok()?;
        let kept = kept.as_ref()?;
        (kept.topic.as_str() == text).then(|| Rc::clone(kept))
    })
    .ok()
    .flatten()
}

/// Notes a look-up in the table at `generation` (made under the table's lock): the topic, and
/// its routes if the last look-up was of the same topic where the router holds it. For a
/// batch's publish ([`batching`]): what is noted is let go when the batch ends.
pub(crate) fn note(generation: u64, topic: &Topic, exact: &[Route], wild: &[Route]) {
    let now = Seen { generation, at: std::ptr::from_ref(topic) as usize };
    if SEEN.replace(now) != now {
        forget();
        return;
    }
    let mut routes = Vec::with_capacity(exact.len() + wild.len());
    routes.extend_from_slice(exact);
    routes.extend_from_slice(wild);
    let fresh = Rc::new(Kept { topic: topic.clone(), routes });
    let stale = KEPT.try_with(|kept| {
        let mut kept = kept.try_borrow_mut().ok()?;
        HOLDS.set(true);
        kept.replace(fresh)
    });
    drop(stale);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use whispeer_proto::Filter;

    use super::super::tests::{filter, matched, naive, route, topic};
    use super::super::{Router, SubId};
    use super::*;

    fn kept_for(router: &Router, text: &str) -> bool {
        let generation = router.generation.0.load(std::sync::atomic::Ordering::Acquire);
        holds() && kept(generation, text).is_some()
    }

    #[test]
    fn a_topic_looked_up_twice_in_a_batch_is_kept_until_the_table_changes_or_the_batch_ends() {
        let router = Router::default();
        router.insert(&Filter::parse("t").unwrap(), route(1));
        matched(&router, "t");
        matched(&router, "t");
        assert!(!kept_for(&router, "t"), "nothing is kept outside a batch");
        hold();
        assert_eq!(matched(&router, "t"), BTreeSet::from([1]));
        assert!(!kept_for(&router, "t"), "kept once looked up twice in a row");
        assert_eq!(matched(&router, "t"), BTreeSet::from([1]));
        assert!(kept_for(&router, "t"));
        assert!(!kept_for(&router, "u"), "kept for its own topic only");
        // A wildcard subscription comes: the table moved, the kept routes are not reused.
        router.insert(&Filter::parse("#").unwrap(), route(2));
        assert!(!kept_for(&router, "t"));
        // Matched in the trie first, then twice in the wildcard cache (where the router holds
        // the topic from then on).
        assert_eq!(matched(&router, "t"), BTreeSet::from([1, 2]));
        assert_eq!(matched(&router, "t"), BTreeSet::from([1, 2]));
        assert!(!kept_for(&router, "t"), "kept once looked up twice where the router holds it");
        assert_eq!(matched(&router, "t"), BTreeSet::from([1, 2]));
        assert!(kept_for(&router, "t"));
        assert_eq!(matched(&router, "t"), BTreeSet::from([1, 2]), "reused");
        assert!(router.remove(&Filter::parse("t").unwrap(), SubId(1)));
        assert_eq!(matched(&router, "t"), BTreeSet::from([2]));
        // Another topic between two look-ups of one: nothing kept for either yet.
        assert_eq!(matched(&router, "u"), BTreeSet::from([2]));
        assert!(!kept_for(&router, "t") && !kept_for(&router, "u"));
        // Nested batches: the outermost lets go. ("u" was matched in the trie; now twice in
        // the cache.)
        matched(&router, "u");
        matched(&router, "u");
        hold();
        release();
        assert!(kept_for(&router, "u"), "an inner batch's end keeps it");
        release();
        assert!(!kept_for(&router, "u"), "let go when the outermost batch ends");
    }

    #[test]
    fn topics_each_new_to_the_wildcard_cache_keep_nothing() {
        let router = Router::default();
        router.insert(&Filter::parse("d/+").unwrap(), route(1));
        hold();
        for device in 0..8 {
            assert_eq!(matched(&router, &format!("d/{device}")), BTreeSet::from([1]));
            assert!(!holds(), "d/{device}, matched once, taken for a repeat");
        }
        release();
    }

    #[test]
    fn the_queues_of_subscriptions_that_end_in_a_batch_are_let_go_when_it_ends() {
        use bytes::Bytes;

        use crate::{Broker, PushBatch, SlowConsumer, SubscribeOptions};
        let broker = Broker::build_default().build();
        let _stays = broker.messages("t").unwrap();
        // A subscription whose queue takes pushes at once (not held by the batch), and which
        // holds `n` messages when it ends inside a batch.
        let ends_holding = |n: u8| {
            let options = SubscribeOptions::new("t").slow_consumer(SlowConsumer::FailPublish);
            let leaves = broker.messages(options).unwrap();
            let batch = PushBatch::begin();
            for n in 0..n {
                broker.publish_bytes("t", Bytes::from(vec![n])).unwrap();
            }
            drop(leaves);
            batch
        };
        let batch = ends_holding(4);
        assert_eq!(broker.stats().discarded, 0, "held by the kept routes");
        drop(batch);
        assert_eq!(broker.stats().discarded, 4, "its queue freed with what it held");
        // A publish that finds the table changed lets go of what was kept at once.
        let _batch = ends_holding(3);
        assert_eq!(broker.stats().discarded, 4);
        broker.publish_bytes("t", Bytes::from(vec![3])).unwrap();
        assert_eq!(broker.stats().discarded, 7);
    }

    /// One step of [`look_ups_in_a_batch_agree_with_the_reference_matcher`].
    #[derive(Clone, Debug)]
    enum Step {
        Subscribe(usize),
        Unsubscribe(usize),
        LookUp(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            1 => (0..8usize).prop_map(Step::Subscribe),
            1 => (0..8usize).prop_map(Step::Unsubscribe),
            4 => (0..4usize, 1..4usize).prop_map(|(topic, times)| Step::LookUp(topic, times)),
        ]
    }

    proptest! {
        #[test]
        fn look_ups_in_a_batch_agree_with_the_reference_matcher(
            filters in prop::collection::vec(filter(), 8),
            topics in prop::collection::vec(topic(), 4),
            steps in prop::collection::vec(step(), 1..40),
        ) {
            let router = Router::default();
            let mut live = [false; 8];
            hold();
            for step in steps {
                match step {
                    Step::Subscribe(i) if !live[i] => {
                        router.insert(&Filter::parse(&filters[i]).unwrap(), route(i as u64));
                        live[i] = true;
                    }
                    Step::Unsubscribe(i) if live[i] => {
                        prop_assert!(router.remove(&Filter::parse(&filters[i]).unwrap(), SubId(i as u64)));
                        live[i] = false;
                    }
                    Step::Subscribe(_) | Step::Unsubscribe(_) => {}
                    Step::LookUp(t, times) => {
                        let text = &topics[t];
                        let expected: BTreeSet<u64> = (0..8)
                            .filter(|&i| live[i] && naive(&filters[i], text))
                            .map(|i| i as u64)
                            .collect();
                        for _ in 0..times {
                            prop_assert_eq!(matched(&router, text), expected.clone(), "topic {}", text);
                        }
                    }
                }
            }
            release();
        }
    }
}
