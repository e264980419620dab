//! SQLite persistence (feature `sqlite`): durable topics in one database file.
//!
//! ```text
//! messages (seq INTEGER PRIMARY KEY, topic TEXT, offset INTEGER, accepted_ms INTEGER,
//!           envelope BLOB, UNIQUE (topic, offset))       -- envelope: the wire layout
//! commits  (filter TEXT, grp TEXT, topic TEXT, offset INTEGER, PRIMARY KEY (filter, grp, topic))
//! state    (key TEXT PRIMARY KEY, value INTEGER)  -- `clean`: 1 after a clean stop;
//!                                                  -- `floor`: offsets of new topics start past it
//! ```
//!
//! One writer thread owns the writing connection: it takes every waiting append and commit,
//! runs them in one transaction (group commit; `synchronous = FULL` in WAL journal mode, so a
//! committed transaction survives a crash of the machine), then raises the durable watermark.
//! Reads use a second connection. Rows that do not decode are skipped and counted at start.
//!
//! Messages are delivered live before they are committed, so a crash may lose offsets a
//! subscriber saw. `clean` is set to 0 at start and to 1 by a clean stop; after a start that
//! finds 0, every topic's offsets continue past the writer's backlog bound, and the `floor` for
//! topics the store does not know is raised as far, so no offset is given twice (as the
//! write-ahead log does).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rusqlite::{Connection, params};
use tokio::sync::watch;
use whispeer_proto::{Envelope, Topic};

use crate::store::GroupKey;
// Topics stored were valid when written; limits may since have been lowered.
use crate::message::no_limits as unlimited;
use crate::store::backlog::{BACKLOG_RECORDS, Backlog, CloseOnDrop};
use crate::store::{Commit, Record};
use crate::store::{
    PageBound, STORE_BATCH_RECORDS as BATCH_RECORDS, STORE_FSYNC_SECONDS as FSYNC_SECONDS,
    STORE_WRITE_SECONDS as WRITE_SECONDS, Store, StoreFuture, Stored,
};

/// `synchronous = EXTRA` while the journal mode changes: a new database starts in rollback
/// mode, and EXTRA syncs the directory after that journal is deleted (under FULL a power cut
/// can bring the journal back, and SQLite would roll the switch to WAL back, and the WAL's
/// commits with it). Then FULL: in WAL mode every commit syncs the log.
const SCHEMA: &str = "
    PRAGMA synchronous = EXTRA;
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = FULL;
    CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        offset INTEGER NOT NULL,
        accepted_ms INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        UNIQUE (topic, offset)
    );
    CREATE TABLE IF NOT EXISTS commits (
        filter TEXT NOT NULL,
        grp TEXT NOT NULL,
        topic TEXT NOT NULL,
        offset INTEGER NOT NULL,
        PRIMARY KEY (filter, grp, topic)
    );
    CREATE TABLE IF NOT EXISTS state (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
";

fn state(conn: &Connection, key: &str) -> io::Result<Option<u64>> {
    let mut query = conn.prepare("SELECT value FROM state WHERE key = ?1").map_err(sql)?;
    let mut rows = query.query(params![key]).map_err(sql)?;
    let Some(row) = rows.next().map_err(sql)? else { return Ok(None) };
    let value: i64 = row.get(0).map_err(sql)?;
    Ok(u64::try_from(value).ok())
}

fn set_state(conn: &Connection, key: &str, value: u64) -> io::Result<()> {
    conn.execute(
        "INSERT INTO state (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, to_i64(value)?],
    )
    .map_err(sql)
    .map(drop)
}

/// After a stop that was not clean: each topic's offsets continue past its latest stored one
/// by the most records that can wait for the writer, and so does the floor of new topics.
/// Marks the store as in use (not clean) until the writer stops cleanly.
fn continue_offsets(conn: &Connection, stored: &mut Stored) -> io::Result<()> {
    let mut latest =
        conn.prepare("SELECT topic, MAX(offset) FROM messages GROUP BY topic").map_err(sql)?;
    let mut rows = latest.query([]).map_err(sql)?;
    while let Some(row) = rows.next().map_err(sql)? {
        let (topic, offset): (String, i64) = (row.get(0).map_err(sql)?, row.get(1).map_err(sql)?);
        if let (Ok(topic), Ok(offset)) =
            (Topic::parse_with(&topic, &unlimited()), u64::try_from(offset))
        {
            stored.marks.push((topic, offset));
        }
    }
    // A store without the row is new (clean), or from before the row existed (not known).
    let clean = state(conn, "clean")?.map_or(stored.marks.is_empty(), |value| value == 1);
    stored.gap = if clean { 0 } else { BACKLOG_RECORDS as u64 };
    stored.floor = state(conn, "floor")?.unwrap_or(0) + stored.gap;
    if !clean {
        tracing::warn!(
            gap = stored.gap,
            "SQLite store: the last stop was not clean; offsets continue past what may have been in flight"
        );
    }
    set_state(conn, "floor", stored.floor)?;
    set_state(conn, "clean", 0)
}

/// A fail point of the writer (feature `failpoints`, tests only): configured with `return` the
/// step fails with an I/O error, with `panic` the writer dies there, with `sleep(ms)` it is late.
macro_rules! fail_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err(io::Error::other(concat!("fail point ", $name))));
    };
}

/// Every fail point, in the order a write passes them.
#[cfg(all(test, feature = "failpoints"))]
const FAIL_POINTS: [&str; 4] =
    ["sqlite::begin", "sqlite::insert", "sqlite::commit", "sqlite::committed"];

fn sql(err: rusqlite::Error) -> io::Error {
    io::Error::other(err)
}

fn to_i64(n: u64) -> io::Result<i64> {
    i64::try_from(n).map_err(io::Error::other)
}

enum Write {
    Message { offset: u64, accepted_ms: u64, topic: String, envelope: Bytes },
    Commit { key: GroupKey, topic: String, offset: u64 },
}

impl Write {
    /// What it weighs in the writer's backlog.
    fn len(&self) -> usize {
        match self {
            Self::Message { topic, envelope, .. } => topic.len() + envelope.len() + 16,
            Self::Commit { key, topic, .. } => key.0.len() + key.1.len() + topic.len() + 8,
        }
    }
}

/// The SQLite store.
pub(crate) struct SqliteStore {
    path: PathBuf,
    tx: Mutex<Option<Sender<Write>>>,
    /// The writer, joined on drop so a reopened store sees everything written.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<Connection>,
    durable: watch::Receiver<u64>,
    next: Mutex<u64>,
    /// What waits for the writer, bounded (back-pressure to publishers).
    backlog: Arc<Backlog>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn decode_row(topic: &str, offset: i64, accepted_ms: i64, blob: Vec<u8>) -> Option<Record> {
    let envelope = Envelope::decode(Bytes::from(blob), &unlimited()).ok()?;
    (envelope.topic.as_str() == topic).then_some(())?;
    let offset = u64::try_from(offset).ok()?;
    let accepted_ms = u64::try_from(accepted_ms).ok()?;
    Some(Record { offset, accepted_ms, envelope })
}

fn load(conn: &Connection) -> io::Result<Stored> {
    let mut stored = Stored::default();
    let mut skipped = 0usize;
    let mut rows = conn
        .prepare("SELECT topic, offset, accepted_ms, envelope FROM messages ORDER BY seq")
        .map_err(sql)?;
    let mut rows = rows.query([]).map_err(sql)?;
    while let Some(row) = rows.next().map_err(sql)? {
        let topic: String = row.get(0).map_err(sql)?;
        let record = decode_row(
            &topic,
            row.get(1).map_err(sql)?,
            row.get(2).map_err(sql)?,
            row.get(3).map_err(sql)?,
        );
        match record {
            Some(record) => stored.records.push(record),
            None => skipped += 1,
        }
    }
    let mut commits =
        conn.prepare("SELECT filter, grp, topic, offset FROM commits").map_err(sql)?;
    let mut rows = commits.query([]).map_err(sql)?;
    while let Some(row) = rows.next().map_err(sql)? {
        let (filter, group, topic): (String, String, String) =
            (row.get(0).map_err(sql)?, row.get(1).map_err(sql)?, row.get(2).map_err(sql)?);
        let offset: i64 = row.get(3).map_err(sql)?;
        match (Topic::parse_with(&topic, &unlimited()), u64::try_from(offset)) {
            (Ok(topic), Ok(offset)) => {
                stored.commits.push(Commit { key: (filter.into(), group.into()), topic, offset });
            }
            _ => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, "SQLite store: rows that do not decode were skipped");
    }
    Ok(stored)
}

/// A connection to `path`; in tests, through the power-cut VFS where its directory is watched.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    #[cfg(test)]
    if powercut::is_watched(path) {
        let flags = rusqlite::OpenFlags::default();
        return Connection::open_with_flags_and_vfs(path, flags, powercut::NAME);
    }
    Connection::open(path)
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, reads back what it holds, and starts the
    /// writer.
    pub(crate) fn open(path: &Path) -> io::Result<(Self, Stored)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let writer = connect(path).map_err(sql)?;
        writer.execute_batch(SCHEMA).map_err(sql)?;
        let mut stored = load(&writer)?;
        continue_offsets(&writer, &mut stored)?;
        let reader = connect(path).map_err(sql)?;
        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable) = watch::channel(0);
        let backlog = Arc::new(Backlog::default());
        let writer_backlog = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("whispeer-sqlite".into())
            .spawn(move || write_loop(writer, &rx, &durable_tx, &writer_backlog))?;
        let store = Self {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Mutex::new(reader),
            durable,
            next: Mutex::new(1),
            backlog,
        };
        Ok((store, stored))
    }

    /// Queues `write` for the writer (waiting while its backlog is full); returns its ticket.
    fn send(&self, write: Write) -> io::Result<u64> {
        self.backlog.admit(write.len());
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let stopped = || io::Error::other("the SQLite writer has stopped");
        tx.as_ref().ok_or_else(stopped)?.send(write).map_err(|_| stopped())?;
        let ticket = *next;
        *next += 1;
        Ok(ticket)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and stop.
        drop(self.tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Writes every waiting request in one transaction, then raises the watermark.
fn write_loop(
    mut conn: Connection,
    rx: &Receiver<Write>,
    durable: &watch::Sender<u64>,
    backlog: &Backlog,
) {
    let _close = CloseOnDrop(backlog);
    let mut written = 0u64;
    while let Ok(first) = rx.recv() {
        let batch: Vec<Write> = std::iter::once(first).chain(rx.try_iter()).collect();
        let count = batch.len() as u64;
        let bytes = batch.iter().map(Write::len).sum();
        let started = Instant::now();
        let result = write_batch(&mut conn, batch);
        metrics::histogram!(WRITE_SECONDS, "store" => "sqlite").record(started.elapsed());
        metrics::histogram!(BATCH_RECORDS, "store" => "sqlite").record(count as f64);
        if let Err(err) = result {
            tracing::error!(%err, "SQLite store write failed; durable publishing stops");
            return;
        }
        backlog.release(batch_len(count), bytes);
        written += count;
        durable.send_replace(written);
    }
    // Everything queued is written: the next start knows nothing was in flight.
    if let Err(err) = set_state(&conn, "clean", 1) {
        tracing::warn!(%err, "SQLite store: the clean stop was not recorded");
    }
}

fn batch_len(count: u64) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX)
}

fn write_batch(conn: &mut Connection, batch: Vec<Write>) -> io::Result<()> {
    fail_point!("sqlite::begin");
    let tx = conn.transaction().map_err(sql)?;
    for write in batch {
        fail_point!("sqlite::insert");
        match write {
            Write::Message { offset, accepted_ms, topic, envelope } => {
                tx.prepare(
                    "INSERT OR REPLACE INTO messages (topic, offset, accepted_ms, envelope) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?
                .execute(params![topic, to_i64(offset)?, to_i64(accepted_ms)?, &envelope[..]])
                .map_err(sql)?;
            }
            Write::Commit { key, topic, offset } => {
                tx.prepare(
                    "INSERT INTO commits (filter, grp, topic, offset) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (filter, grp, topic) DO UPDATE SET offset = excluded.offset",
                )
                .map_err(sql)?
                .execute(params![&*key.0, &*key.1, topic, to_i64(offset)?])
                .map_err(sql)?;
            }
        }
    }
    // The commit is where SQLite syncs (`synchronous = FULL`).
    let started = Instant::now();
    fail_point!("sqlite::commit");
    tx.commit().map_err(sql)?;
    metrics::histogram!(FSYNC_SECONDS, "store" => "sqlite").record(started.elapsed());
    fail_point!("sqlite::committed");
    Ok(())
}

impl Store for SqliteStore {
    fn healthy(&self) -> bool {
        // The writer drops its end of the watermark when it stops.
        self.durable.has_changed().is_ok()
    }

    fn append(&self, offset: u64, accepted_ms: u64, envelope: &Envelope) -> io::Result<u64> {
        let mut blob = BytesMut::new();
        envelope.encode(&mut blob).map_err(io::Error::other)?;
        let topic = envelope.topic.as_str().to_string();
        self.send(Write::Message { offset, accepted_ms, topic, envelope: blob.freeze() })
    }

    fn durable(&self, ticket: u64) -> StoreFuture<'_, bool> {
        let mut durable = self.durable.clone();
        Box::pin(async move { durable.wait_for(|&done| done >= ticket).await.is_ok() })
    }

    fn commit(&self, key: &GroupKey, topic: &Topic, offset: u64) -> io::Result<()> {
        let topic = topic.as_str().to_string();
        self.send(Write::Commit { key: key.clone(), topic, offset }).map(drop)
    }

    fn read(&self, topic: &Topic, from: u64, mut bound: PageBound) -> io::Result<Vec<Record>> {
        let conn = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        let mut query = conn
            .prepare(
                "SELECT offset, accepted_ms, envelope FROM messages
                 WHERE topic = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
            )
            .map_err(sql)?;
        let limit = i64::try_from(bound.max).unwrap_or(i64::MAX);
        let mut rows = query.query(params![topic.as_str(), to_i64(from)?, limit]).map_err(sql)?;
        let mut records = Vec::new();
        while let Some(row) = rows.next().map_err(sql)? {
            let blob: Vec<u8> = row.get(2).map_err(sql)?;
            if let Some(record) =
                decode_row(topic.as_str(), row.get(0).map_err(sql)?, row.get(1).map_err(sql)?, blob)
            {
                if !bound.admit_len(record.envelope.payload.len()) {
                    break;
                }
                records.push(record);
            }
        }
        Ok(records)
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod failpoints;

#[cfg(test)]
mod power;
#[cfg(test)]
mod powercut;
