//! One contract, every store: the write-ahead log, SQLite (with feature `sqlite`) and memory
//! pass the same checks.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use whispeer_proto::{ContentType, Flags, MessageId};

use super::*;

/// A scratch directory, removed when dropped.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(kind: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("whispeer-store-{kind}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every store kind, with the scratch space it lives in.
fn stores() -> Vec<(&'static str, PersistenceType, Scratch)> {
    let wal = Scratch::new("wal");
    let mut kinds = vec![("wal", PersistenceType::Wal(WalOptions::new(&wal.0)), wal)];
    #[cfg(feature = "sqlite")]
    {
        let sqlite = Scratch::new("sqlite");
        let file = sqlite.0.join("whispeer.db");
        kinds.push(("sqlite", PersistenceType::Sqlite(file), sqlite));
    }
    kinds.push(("memory", PersistenceType::Memory, Scratch::new("memory")));
    kinds
}

pub(crate) fn envelope(topic: &str, n: u64) -> Envelope {
    let topic = Topic::parse(topic).unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let mut envelope =
        Envelope::new(MessageId(u128::from(n)), topic, n, flags, Bytes::from(n.to_string()));
    envelope.headers.insert("n", n.to_string());
    envelope
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// Appends offsets `range` of `topic`, waits until the last is durable.
fn append(store: &dyn Store, topic: &str, range: std::ops::RangeInclusive<u64>) {
    let mut last = 0;
    for offset in range {
        last = store.append(offset, 1000 + offset, &envelope(topic, offset)).unwrap();
    }
    assert!(block_on(store.durable(last)));
}

#[test]
fn every_store_reads_back_one_topic_from_an_offset_in_order() {
    for (kind, persistence, _scratch) in stores() {
        let (store, stored) = persistence.open().unwrap();
        assert!(stored.records.is_empty() && stored.commits.is_empty(), "{kind}: starts empty");
        append(&*store, "a", 1..=5);
        append(&*store, "b", 1..=3);
        append(&*store, "a", 6..=7);
        let topic = Topic::parse("a").unwrap();
        let read = store.read(&topic, 3, PageBound::new(3, usize::MAX)).unwrap();
        let offsets: Vec<u64> = read.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [3, 4, 5], "{kind}");
        assert_eq!(read[0].envelope, envelope("a", 3), "{kind}: the whole envelope");
        assert_eq!(read[0].accepted_ms, 1003, "{kind}");
        // Payloads are one byte each ("1" … "7"): a page ends once it holds `max_bytes`, and
        // holds one message even when that one alone is over.
        let by_bytes =
            |max_bytes| store.read(&topic, 1, PageBound::new(100, max_bytes)).unwrap().len();
        assert_eq!((by_bytes(2), by_bytes(0), by_bytes(100)), (2, 1, 7), "{kind}");
        let tail = store.read(&topic, 6, PageBound::new(100, usize::MAX)).unwrap();
        assert_eq!(tail.iter().map(|r| r.offset).collect::<Vec<_>>(), [6, 7], "{kind}");
        assert!(
            store
                .read(&Topic::parse("c").unwrap(), 1, PageBound::new(10, usize::MAX))
                .unwrap()
                .is_empty(),
            "{kind}"
        );
    }
}

#[test]
fn every_persistent_store_gives_back_messages_and_latest_commits_after_reopening() {
    for (kind, persistence, _scratch) in stores() {
        if matches!(persistence, PersistenceType::Memory) {
            continue;
        }
        {
            let (store, _) = persistence.open().unwrap();
            append(&*store, "a", 1..=4);
            append(&*store, "b", 1..=2);
            let key: GroupKey = ("#".into(), "g".into());
            let topic = Topic::parse("a").unwrap();
            store.commit(&key, &topic, 2).unwrap();
            store.commit(&key, &topic, 3).unwrap();
            let b = Topic::parse("b").unwrap();
            store.commit(&key, &b, 2).unwrap();
            store.commit(&key, &b, 1).unwrap(); // a rewind
            append(&*store, "a", 5..=5); // after the commits, so they are durable too
        }
        let (_, stored) = persistence.open().unwrap();
        let order: Vec<(String, u64)> =
            stored.records.iter().map(|r| (r.envelope.topic.to_string(), r.offset)).collect();
        let expected: Vec<(String, u64)> =
            [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("b", 2), ("a", 5)]
                .iter()
                .map(|(t, o)| ((*t).to_string(), *o))
                .collect();
        assert_eq!(order, expected, "{kind}: in the order stored");
        // Applied in the order given back, the last of each topic wins, even when lower.
        let last = |topic: &str| {
            stored
                .commits
                .iter()
                .filter(|c| c.topic.as_str() == topic)
                .map(|c| c.offset)
                .next_back()
        };
        assert_eq!(last("a"), Some(3), "{kind}: the latest commit wins");
        assert_eq!(last("b"), Some(1), "{kind}: a rewind is a commit too");
    }
}

#[test]
fn every_store_is_usable_by_a_broker_through_the_same_api() {
    use crate::{Broker, BrokerOptions, StartAt, SubscribeOptions};
    for (kind, persistence, _scratch) in stores() {
        let durable = Durability::in_store(persistence).topic(Filter::parse("d/#").unwrap());
        let options = BrokerOptions { durability: Some(durable), ..BrokerOptions::default() };
        let broker = Broker::builder(options).try_build().unwrap();
        let receipt = broker.publish("d/x", &7u32).unwrap();
        assert!(block_on(broker.durable(&receipt)), "{kind}");
        let mut sub = broker
            .subscription::<u32>(SubscribeOptions::new("d/x").start(StartAt::Earliest))
            .unwrap();
        assert_eq!(sub.try_recv(), Some(7), "{kind}");
    }
}
