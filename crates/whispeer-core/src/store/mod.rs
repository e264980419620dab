//! The storage contract of durable topics, and where it can be kept: a write-ahead log (the
//! default), SQLite (feature `sqlite`), or memory (a reference for tests, durable only while the
//! process lives).
//!
//! Every store does the same four things: append a message record (returning a ticket), wait
//! until a ticket is durable, record a durable subscription's commit, and read back what it
//! holds — everything at start (`Stored`), or one topic from an offset. One conformance suite
//! (`store/conformance.rs`) runs against all of them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use whispeer_proto::{Envelope, Filter, Topic};

pub(crate) use wal::WalOptions;
use wal::{Recovered, Wal, encode_record};

/// Histogram of seconds per batch a store writes (its sync included, except the write-ahead
/// log's under fsync `always`, which runs beside the next write), labelled `store` =
/// `wal` or `sqlite`. The stores record through the `metrics` facade, a no-op unless the
/// program installs a recorder (`whispeer serve --admin-listen` installs Prometheus).
pub const STORE_WRITE_SECONDS: &str = "whispeer_store_write_seconds";
/// Histogram of seconds per fsync of the write-ahead log, or per SQLite commit (where SQLite
/// syncs), labelled `store`.
pub const STORE_FSYNC_SECONDS: &str = "whispeer_store_fsync_seconds";
/// Histogram of records per batch written (group commit at work), labelled `store`.
pub const STORE_BATCH_RECORDS: &str = "whispeer_store_batch_records";

/// Where durable topics are kept.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PersistenceType {
    /// A segmented write-ahead log in a directory.
    Wal(WalOptions),
    /// An SQLite database file (feature `sqlite`).
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf),
    /// Memory: durable only while the process lives; the reference the other stores are
    /// tested against.
    Memory,
}

impl PersistenceType {
    /// Where the store lives, for error messages.
    pub(crate) fn location(&self) -> PathBuf {
        match self {
            Self::Wal(options) => options.dir.clone(),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(path) => path.clone(),
            Self::Memory => PathBuf::from("(memory)"),
        }
    }

    /// Opens the store and reads back what it holds.
    pub(crate) fn open(&self) -> io::Result<(Arc<dyn Store>, Stored)> {
        match self {
            Self::Wal(options) => {
                let (wal, recovered) = Wal::open(options)?;
                let gap = recovered.offsets_maybe_lost();
                let Recovered { records, commits, marks, floor, .. } = recovered;
                let stored = Stored { records, commits, marks, gap, floor };
                Ok((wal, stored))
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite(path) => {
                let (store, stored) = crate::store::sqlite::SqliteStore::open(path)?;
                Ok((Arc::new(store), stored))
            }
            Self::Memory => Ok((Arc::new(MemoryStore::default()), Stored::default())),
        }
    }
}

/// Which topics are durable, and where they are kept.
///
/// ```no_run
/// use whispeer_core::{Broker, BrokerOptions, Durability, Filter, FsyncPolicy, WalOptions};
/// let mut options = BrokerOptions::default();
/// let wal = WalOptions::new("data/wal").fsync(FsyncPolicy::Always);
/// options.durability = Some(Durability::new(wal).topic(Filter::parse("orders/#")?));
/// let broker = Broker::builder(options).try_build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Durability {
    /// The store.
    pub store: PersistenceType,
    /// Topics matching any of these are stored before they are acknowledged.
    pub topics: Vec<Filter>,
}

impl Durability {
    /// Durability in a write-ahead log, for no topic yet.
    pub fn new(wal: WalOptions) -> Self {
        Self::in_store(PersistenceType::Wal(wal))
    }

    /// Durability in `store`, for no topic yet.
    pub fn in_store(store: PersistenceType) -> Self {
        Self { store, topics: Vec::new() }
    }

    /// Every topic durable in `store` (topics starting with `$` excepted).
    pub fn everything(store: PersistenceType) -> Self {
        Self::in_store(store).topic(Filter::parse("#").expect("`#` is a valid filter"))
    }

    /// Makes the topics matching `filter` durable.
    pub fn topic(mut self, filter: Filter) -> Self {
        self.topics.push(filter);
        self
    }
}

/// A group's identity: its filter and its name.
pub(crate) type GroupKey = (Box<str>, Box<str>);

/// One message as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) accepted_ms: u64,
    pub(crate) envelope: Envelope,
}

/// A durable subscription's commit read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) key: GroupKey,
    pub(crate) topic: Topic,
    pub(crate) offset: u64,
}

/// What a store holds, read back at start: messages in the order they were stored, and the
/// commits (the last one per group and topic wins).
#[derive(Debug, Default)]
pub(crate) struct Stored {
    pub(crate) records: Vec<Record>,
    pub(crate) commits: Vec<Commit>,
    /// Topics' latest offsets, also of messages no longer stored: offsets continue after them.
    pub(crate) marks: Vec<(Topic, u64)>,
    /// How many messages damage may have taken per topic: every topic's offsets continue this
    /// far past its latest, so no offset a subscriber may have seen is given again.
    pub(crate) gap: u64,
    /// Offsets of topics the store knows nothing of start after this: a topic whose every
    /// message was lost in flight may have given offsets up to it.
    pub(crate) floor: u64,
}

/// A future of a store.
pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage contract; see the module documentation.
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Stores the message at `offset` of its topic; returns a ticket for [`Store::durable`].
    /// Called in offset order per topic (under the topic's lock).
    fn append(&self, offset: u64, accepted_ms: u64, envelope: &Envelope) -> io::Result<u64>;

    /// Resolves once the ticket's record is durable under the store's policy; `false` if the
    /// store failed first.
    fn durable(&self, ticket: u64) -> StoreFuture<'_, bool>;

    /// Records that group `key` settled everything up to `offset` of `topic`. The latest
    /// commit of a group and topic wins, also when it is lower (a rewind).
    fn commit(&self, key: &GroupKey, topic: &Topic, offset: u64) -> io::Result<()>;

    /// The stored messages of `topic` from `from` on, in offset order, within `bound`.
    fn read(&self, topic: &Topic, from: u64, bound: PageBound) -> io::Result<Vec<Record>>;

    /// Whether the store still writes: `false` once its writer has failed (a disk error),
    /// after which nothing more becomes durable.
    fn healthy(&self) -> bool {
        true
    }
}

impl Store for Wal {
    fn append(&self, offset: u64, accepted_ms: u64, envelope: &Envelope) -> io::Result<u64> {
        self.check_writing()?;
        let record = encode_record(offset, accepted_ms, envelope)?;
        Ok(self.push_message(&envelope.topic, offset, record))
    }

    fn durable(&self, ticket: u64) -> StoreFuture<'_, bool> {
        Box::pin(self.wait_durable(ticket))
    }

    fn commit(&self, key: &GroupKey, topic: &Topic, offset: u64) -> io::Result<()> {
        self.push_commit(key, topic, offset)
    }

    fn read(&self, topic: &Topic, from: u64, bound: PageBound) -> io::Result<Vec<Record>> {
        self.read_topic(topic, from, bound)
    }

    fn healthy(&self) -> bool {
        self.writing()
    }
}

/// The bounds of one page of history: at most `max` messages, ending early once their payloads
/// reach `max_bytes` — but never empty for want of bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageBound {
    pub(crate) max: usize,
    pub(crate) max_bytes: usize,
    count: usize,
    bytes: usize,
}

impl PageBound {
    pub(crate) fn new(max: usize, max_bytes: usize) -> Self {
        Self { max, max_bytes, count: 0, bytes: 0 }
    }

    /// Takes a message of `len` payload bytes into the page, if it still fits.
    pub(crate) fn admit_len(&mut self, len: usize) -> bool {
        if self.count >= self.max || (self.count > 0 && self.bytes >= self.max_bytes) {
            return false;
        }
        self.count += 1;
        self.bytes = self.bytes.saturating_add(len);
        true
    }

    fn admit(&mut self, record: &Record) -> bool {
        self.admit_len(record.envelope.payload.len())
    }
}

/// Memory: everything is durable at once, for as long as the process lives.
#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    records: Mutex<Vec<Record>>,
    commits: Mutex<HashMap<(GroupKey, Topic), u64>>,
}

impl Store for MemoryStore {
    fn append(&self, offset: u64, accepted_ms: u64, envelope: &Envelope) -> io::Result<u64> {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records.push(Record { offset, accepted_ms, envelope: envelope.clone() });
        Ok(records.len() as u64)
    }

    fn durable(&self, _ticket: u64) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }

    fn commit(&self, key: &GroupKey, topic: &Topic, offset: u64) -> io::Result<()> {
        let mut commits = self.commits.lock().unwrap_or_else(PoisonError::into_inner);
        commits.insert((key.clone(), topic.clone()), offset);
        Ok(())
    }

    fn read(&self, topic: &Topic, from: u64, mut page: PageBound) -> io::Result<Vec<Record>> {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(records
            .iter()
            .filter(|r| r.envelope.topic == *topic && r.offset >= from)
            .take_while(|r| page.admit(r))
            .cloned()
            .collect())
    }
}

pub(crate) mod backlog;
#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod looking;
#[cfg(test)]
pub(crate) mod power_loss;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
pub(crate) mod wal;
