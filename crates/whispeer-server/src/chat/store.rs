//! `chat.db`: what chat keeps beside the broker's topics — groups and their members, each
//! device's cursor in its user's inbox and when it was last seen, and who talks to whom (for
//! presence). One SQLite file (WAL journal) in the configured directory, or an in-memory
//! database without one; the hub reads it whole at start and writes each change through.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OptionalExtension as _, params};

use super::groups::Role;

/// A group as stored.
#[derive(Clone, Debug)]
pub(crate) struct StoredGroup {
    pub(crate) name: String,
    pub(crate) open: bool,
    pub(crate) members: Vec<(String, Role)>,
}

/// A device as stored: its user, its name, the inbox offset it has read up to, when it was
/// last seen (milliseconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredDevice {
    pub(crate) user: String,
    pub(crate) device: String,
    pub(crate) cursor: u64,
    pub(crate) last_seen_ms: u64,
}

/// The chat database. Calls block on SQLite; the hub makes them off the async threads.
#[derive(Debug)]
pub(crate) struct ChatStore {
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS groups (
        name TEXT PRIMARY KEY, open INTEGER NOT NULL, created_ms INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS members (
        grp TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (grp, user));
    CREATE TABLE IF NOT EXISTS devices (
        user TEXT NOT NULL, device TEXT NOT NULL, cursor INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL, PRIMARY KEY (user, device));
    CREATE TABLE IF NOT EXISTS contacts (
        user TEXT NOT NULL, peer TEXT NOT NULL, PRIMARY KEY (user, peer));
    CREATE TABLE IF NOT EXISTS keys (
        user TEXT NOT NULL, device TEXT NOT NULL, identity TEXT NOT NULL,
        updated_ms INTEGER NOT NULL, PRIMARY KEY (user, device));
    CREATE TABLE IF NOT EXISTS reads (
        user TEXT NOT NULL, log TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (user, log));
";

fn to_io(err: rusqlite::Error) -> std::io::Error {
    std::io::Error::other(format!("chat.db: {err}"))
}

impl ChatStore {
    /// Opens (or creates) `dir/chat.db`, or an in-memory database without a directory.
    pub(crate) fn open(dir: Option<&Path>) -> std::io::Result<Self> {
        let db = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let db = Connection::open(dir.join("chat.db")).map_err(to_io)?;
                // EXTRA while a new file switches to WAL: the rollback journal's deletion is
                // synced, so a power cut cannot roll the switch (and the WAL's commits) back.
                db.pragma_update(None, "synchronous", "EXTRA").map_err(to_io)?;
                db.pragma_update(None, "journal_mode", "WAL").map_err(to_io)?;
                db.pragma_update(None, "synchronous", "FULL").map_err(to_io)?;
                db
            }
            None => Connection::open_in_memory().map_err(to_io)?,
        };
        db.execute_batch(SCHEMA).map_err(to_io)?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every group with its members.
    pub(crate) fn groups(&self) -> rusqlite::Result<Vec<StoredGroup>> {
        let db = self.db();
        let mut groups: Vec<StoredGroup> = db
            .prepare("SELECT name, open FROM groups ORDER BY name")?
            .query_map([], |row| {
                Ok(StoredGroup { name: row.get(0)?, open: row.get(1)?, members: Vec::new() })
            })?
            .collect::<Result<_, _>>()?;
        let mut members = db.prepare("SELECT user, role FROM members WHERE grp = ?1")?;
        for group in &mut groups {
            group.members = members
                .query_map([&group.name], |row| {
                    let role: String = row.get(1)?;
                    Ok((row.get(0)?, Role::parse(&role)))
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(groups)
    }

    /// Creates a group owned by `owner`.
    pub(crate) fn create_group(
        &self,
        name: &str,
        owner: &str,
        open: bool,
        now_ms: u64,
    ) -> rusqlite::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO groups (name, open, created_ms) VALUES (?1, ?2, ?3)",
            params![name, open, now_ms as i64],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO members (grp, user, role) VALUES (?1, ?2, ?3)",
            params![name, owner, Role::Owner.name()],
        )?;
        tx.commit()
    }

    /// Sets `user`'s role in `group` (a member, an admin, or invited).
    pub(crate) fn set_member(&self, group: &str, user: &str, role: Role) -> rusqlite::Result<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO members (grp, user, role) VALUES (?1, ?2, ?3)",
            params![group, user, role.name()],
        )?;
        Ok(())
    }

    /// Removes `user` from `group`; the group goes with its last member.
    pub(crate) fn remove_member(&self, group: &str, user: &str) -> rusqlite::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM members WHERE grp = ?1 AND user = ?2", params![group, user])?;
        let left: i64 =
            tx.query_row("SELECT COUNT(*) FROM members WHERE grp = ?1", [group], |r| r.get(0))?;
        if left == 0 {
            tx.execute("DELETE FROM groups WHERE name = ?1", [group])?;
        }
        tx.commit()
    }

    /// Every device.
    pub(crate) fn devices(&self) -> rusqlite::Result<Vec<StoredDevice>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT user, device, cursor, last_seen_ms FROM devices")?;
        let rows = statement.query_map([], |row| {
            Ok(StoredDevice {
                user: row.get(0)?,
                device: row.get(1)?,
                cursor: row.get::<_, i64>(2)?.max(0) as u64,
                last_seen_ms: row.get::<_, i64>(3)?.max(0) as u64,
            })
        })?;
        rows.collect()
    }

    /// Records devices' cursors and last-seen times, in one transaction.
    pub(crate) fn save_devices(&self, devices: &[StoredDevice]) -> rusqlite::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut upsert = tx.prepare(
                "INSERT INTO devices (user, device, cursor, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user, device) DO UPDATE SET
                   cursor = MAX(cursor, excluded.cursor), last_seen_ms = excluded.last_seen_ms",
            )?;
            for d in devices {
                upsert.execute(params![
                    d.user,
                    d.device,
                    d.cursor as i64,
                    d.last_seen_ms as i64
                ])?;
            }
        }
        tx.commit()
    }

    /// How far each user read each conversation: (user, log topic, seq).
    pub(crate) fn reads(&self) -> rusqlite::Result<Vec<(String, String, u64)>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT user, log, seq FROM reads")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)?.max(0) as u64))
        })?;
        rows.collect()
    }

    /// Records that `user` read `log` up to `seq` (never moving back).
    pub(crate) fn save_read(&self, user: &str, log: &str, seq: u64) -> rusqlite::Result<()> {
        self.db().execute(
            "INSERT INTO reads (user, log, seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (user, log) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            params![user, log, seq as i64],
        )?;
        Ok(())
    }

    /// Sets a device's public identity (a new one replaces the old: clients report the change).
    pub(crate) fn set_key(
        &self,
        user: &str,
        device: &str,
        identity: &str,
        now_ms: u64,
    ) -> rusqlite::Result<bool> {
        let db = self.db();
        let before: Option<String> = db
            .query_row(
                "SELECT identity FROM keys WHERE user = ?1 AND device = ?2",
                params![user, device],
                |row| row.get(0),
            )
            .optional()?;
        if before.as_deref() == Some(identity) {
            return Ok(false);
        }
        db.execute(
            "INSERT OR REPLACE INTO keys (user, device, identity, updated_ms) VALUES (?1, ?2, ?3, ?4)",
            params![user, device, identity, now_ms as i64],
        )?;
        Ok(true)
    }

    /// Removes a device's public identity; whether there was one.
    pub(crate) fn remove_key(&self, user: &str, device: &str) -> rusqlite::Result<bool> {
        let removed = self
            .db()
            .execute("DELETE FROM keys WHERE user = ?1 AND device = ?2", params![user, device])?;
        Ok(removed > 0)
    }

    /// A user's devices' public identities, by device name.
    pub(crate) fn keys(&self, user: &str) -> rusqlite::Result<Vec<String>> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT identity FROM keys WHERE user = ?1 ORDER BY device")?;
        let rows = statement.query_map([user], |row| row.get(0))?;
        rows.collect()
    }

    /// Every pair of users that exchanged a direct message.
    pub(crate) fn contacts(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT user, peer FROM contacts")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    }

    /// Records that `a` and `b` talk to each other.
    pub(crate) fn add_contact(&self, a: &str, b: &str) -> rusqlite::Result<()> {
        let db = self.db();
        let mut insert =
            db.prepare("INSERT OR IGNORE INTO contacts (user, peer) VALUES (?1, ?2)")?;
        insert.execute(params![a, b])?;
        insert.execute(params![b, a])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_devices_and_contacts_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("whispeer-chat-db-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = ChatStore::open(Some(&dir)).unwrap();
            store.create_group("team", "alice", false, 1).unwrap();
            store.set_member("team", "bob", Role::Member).unwrap();
            store.set_member("team", "carol", Role::Invited).unwrap();
            store.remove_member("team", "carol").unwrap();
            let device = |cursor| StoredDevice {
                user: "bob".into(),
                device: "phone".into(),
                cursor,
                last_seen_ms: 7,
            };
            store.save_devices(&[device(5)]).unwrap();
            // A cursor never moves back, whatever order the flushes land in.
            store.save_devices(&[device(3)]).unwrap();
            store.add_contact("alice", "bob").unwrap();
            store.save_read("bob", "@chat/log/d/alice/bob", 4).unwrap();
            store.save_read("bob", "@chat/log/d/alice/bob", 2).unwrap();
        }
        let store = ChatStore::open(Some(&dir)).unwrap();
        let groups = store.groups().unwrap();
        assert_eq!(groups.len(), 1);
        let mut members = groups[0].members.clone();
        members.sort();
        assert_eq!(
            members,
            vec![("alice".to_string(), Role::Owner), ("bob".to_string(), Role::Member)]
        );
        assert!(!groups[0].open);
        assert_eq!(store.devices().unwrap()[0].cursor, 5);
        assert_eq!(store.contacts().unwrap().len(), 2);
        let reads = store.reads().unwrap();
        assert_eq!(reads, vec![("bob".into(), "@chat/log/d/alice/bob".into(), 4)], "never back");
        store.remove_member("team", "alice").unwrap();
        store.remove_member("team", "bob").unwrap();
        assert!(store.groups().unwrap().is_empty(), "the last member took the group along");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
