//! The chat's shared state, one per listener: the broker, the settings, `chat.db`, the groups,
//! who is online on which devices, each device's cursor, and per-user send budgets. Sessions
//! ask it to act; sending, group changes and history are in `messaging.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;
use whispeer_core::{Broker, PublishOptions};

use super::ChatConfig;
use super::groups::{GroupLimits, Groups};
use super::shared::{Entry, Shared};
use super::store::{ChatStore, StoredDevice};
use super::wire::ChatError;

/// How long another node's presence entry counts before that node is in the membership.
const FRESH: Duration = Duration::from_secs(10);

/// How often device cursors and last-seen times go to `chat.db`.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A user's inbox: every message for it, in order.
pub(crate) fn inbox(user: &str) -> String {
    format!("@chat/inbox/{user}")
}

/// A user's live events (presence, typing): never stored.
pub(crate) fn live(user: &str) -> String {
    format!("@chat/live/{user}")
}

/// A broadcast topic's broker topic.
pub(crate) fn broadcast(topic: &str) -> String {
    format!("@chat/topic/{topic}")
}

/// A device's place in its user's inbox: the last offset written to it.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    pub(crate) offset: AtomicU64,
    pub(crate) saved: AtomicU64,
    /// Whether the device was seen since the last flush (its last-seen time moves).
    seen: AtomicU64,
}

impl Cursor {
    /// Records that everything up to `offset` was written to the device.
    pub(crate) fn advance(&self, offset: u64) {
        self.offset.fetch_max(offset, Ordering::AcqRel);
    }
}

/// A user's live connections, by device.
#[derive(Debug, Default)]
struct Online {
    devices: BTreeMap<String, u32>,
    /// Send budget: tokens and when they were last topped up.
    tokens: f64,
    topped: Option<Instant>,
}

/// The chat's state.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) broker: Broker,
    pub(crate) config: ChatConfig,
    pub(crate) store: Arc<ChatStore>,
    pub(crate) groups: RwLock<Groups>,
    /// Group changes, one at a time: planned, stored, then applied.
    pub(crate) changes: tokio::sync::Mutex<()>,
    cursors: Mutex<HashMap<(String, String), Arc<Cursor>>>,
    pub(crate) last_seen: Mutex<HashMap<String, u64>>,
    online: Mutex<HashMap<String, Online>>,
    pub(crate) contacts: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Numbers each session, so a sender's own devices skip the copy it sent.
    sessions: AtomicU64,
    /// Locks by hash of a conversation's log: its seq is read and its entry written under one.
    stripes: Vec<Mutex<()>>,
    /// How far each user has read each conversation (its log's topic): a seq.
    pub(crate) reads: Mutex<HashMap<(String, String), u64>>,
    /// The key directory's entries read lately, by user (`chat.db` is the truth): at most
    /// `DIRECTORY_CACHE` users, emptied when full; an entry goes when its user's keys change,
    /// and the generation (first) moves on, so a read begun before is not kept.
    pub(crate) directory: Mutex<(u64, HashMap<String, Devices>)>,
    /// Group messages waiting to reach every member, for their senders' receipts.
    pub(crate) group_receipts: Mutex<super::receipts::GroupReceipts>,
    /// On a node of a cluster: the state the engine keeps for every node (`chat.db` is then
    /// this node's copy, in memory).
    pub(crate) shared: Option<Arc<Shared>>,
    /// On a node of a cluster: each user's devices online on the other nodes, by node, and
    /// when this node learned it.
    pub(crate) remote_online: Mutex<HashMap<String, RemoteDevices>>,
}

/// The first session number: random, so that sessions of different nodes of a cluster (whose
/// copies of a message reach each other) do not share numbers.
fn first_session() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1;
    }
    // Half the range: the counter never wraps.
    u64::from_le_bytes(bytes) >> 1
}

/// A user's devices on other nodes: by node, the devices and when this node learned them.
pub(crate) type RemoteDevices = HashMap<String, (Vec<String>, Instant)>;

/// A user's devices' public identities, as the directory holds them.
pub(crate) type Devices = Arc<Vec<String>>;

impl Hub {
    /// Opens `chat.db`, loads it, and starts the task that saves cursors; on a node of a
    /// cluster (`shared`), the one that follows the engine's entries too.
    pub(crate) fn start(
        broker: Broker,
        config: ChatConfig,
        shared: Option<Arc<Shared>>,
    ) -> std::io::Result<Arc<Self>> {
        let dir = if shared.is_some() { None } else { config.dir.as_deref() };
        let store = ChatStore::open(dir)?;
        let io = |err: rusqlite::Error| std::io::Error::other(format!("chat.db: {err}"));
        let groups = Groups::load(store.groups().map_err(io)?);
        let mut cursors = HashMap::new();
        let mut last_seen: HashMap<String, u64> = HashMap::new();
        for device in store.devices().map_err(io)? {
            let seen = last_seen.entry(device.user.clone()).or_default();
            *seen = (*seen).max(device.last_seen_ms);
            let cursor = Cursor {
                offset: device.cursor.into(),
                saved: device.cursor.into(),
                seen: 0.into(),
            };
            cursors.insert((device.user, device.device), Arc::new(cursor));
        }
        let reads: HashMap<(String, String), u64> = store
            .reads()
            .map_err(io)?
            .into_iter()
            .map(|(user, log, seq)| ((user, log), seq))
            .collect();
        let mut contacts: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (user, peer) in store.contacts().map_err(io)? {
            contacts.entry(user).or_default().insert(peer);
        }
        let hub = Arc::new(Self {
            broker: broker.clone(),
            config,
            store: Arc::new(store),
            groups: RwLock::new(groups),
            changes: tokio::sync::Mutex::new(()),
            cursors: Mutex::new(cursors),
            last_seen: Mutex::new(last_seen),
            online: Mutex::new(HashMap::new()),
            contacts: Mutex::new(contacts),
            sessions: AtomicU64::new(first_session()),
            stripes: (0..super::messaging::STRIPES).map(|_| Mutex::new(())).collect(),
            reads: Mutex::new(reads),
            directory: Mutex::new((0, HashMap::new())),
            group_receipts: Mutex::default(),
            shared,
            remote_online: Mutex::default(),
        });
        hub.follow_cluster()?;
        let weak = Arc::downgrade(&hub);
        broker.spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tick.tick().await;
                let Some(hub) = weak.upgrade() else { return };
                hub.flush().await;
            }
        })?;
        Ok(hub)
    }

    pub(crate) fn limits(&self) -> GroupLimits {
        GroupLimits {
            groups_per_user: self.config.max_groups_per_user,
            members_per_group: self.config.max_members_per_group,
        }
    }

    pub(crate) fn groups(&self) -> std::sync::RwLockReadGuard<'_, Groups> {
        self.groups.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock that orders `log`'s entries.
    pub(crate) fn stripe(&self, log: &str) -> &Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(log);
        &self.stripes[(hash as usize) % self.stripes.len()]
    }

    /// A new session's number.
    pub(crate) fn session_id(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// Saves the cursors and last-seen times that moved since the last flush.
    pub(crate) async fn flush(&self) {
        let now = now_ms();
        let moved: Vec<(Arc<Cursor>, StoredDevice)> = lock(&self.cursors)
            .iter()
            .filter_map(|((user, device), cursor)| {
                let offset = cursor.offset.load(Ordering::Acquire);
                let seen = cursor.seen.swap(0, Ordering::AcqRel);
                let moved = offset != cursor.saved.load(Ordering::Acquire) || seen != 0;
                moved.then(|| {
                    let last_seen_ms = if seen != 0 { seen.max(now) } else { now };
                    let stored = StoredDevice {
                        user: user.clone(),
                        device: device.clone(),
                        cursor: offset,
                        last_seen_ms,
                    };
                    (Arc::clone(cursor), stored)
                })
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        if let Some(shared) = &self.shared {
            let entries: Vec<Entry> = moved
                .iter()
                .map(|(_, d)| Entry::Device {
                    user: d.user.clone(),
                    device: d.device.clone(),
                    cursor: d.cursor,
                    last_seen_ms: d.last_seen_ms,
                })
                .collect();
            match shared.put(&entries).await {
                Ok(()) => moved.iter().for_each(|(c, d)| {
                    c.saved.fetch_max(d.cursor, Ordering::AcqRel);
                }),
                Err(err) => tracing::warn!(err = err.message, "chat: cursors not shared; retrying"),
            }
            return;
        }
        let store = Arc::clone(&self.store);
        let rows: Vec<StoredDevice> = moved.iter().map(|(_, d)| d.clone()).collect();
        let saved = tokio::task::spawn_blocking(move || store.save_devices(&rows)).await;
        match saved {
            Ok(Ok(())) => {
                for (cursor, stored) in moved {
                    cursor.saved.fetch_max(stored.cursor, Ordering::AcqRel);
                }
            }
            Ok(Err(err)) => tracing::warn!(%err, "chat.db: cursors not saved; retrying"),
            Err(err) => tracing::warn!(%err, "chat.db: cursor flush failed"),
        }
    }

    /// A device's cursor (created for a device seen the first time), and whether it is new.
    pub(crate) fn cursor(&self, user: &str, device: &str) -> (Arc<Cursor>, bool) {
        let mut cursors = lock(&self.cursors);
        let key = (user.to_string(), device.to_string());
        match cursors.get(&key) {
            Some(cursor) => (Arc::clone(cursor), false),
            None => {
                let cursor = Arc::new(Cursor::default());
                cursors.insert(key, Arc::clone(&cursor));
                (cursor, true)
            }
        }
    }

    /// A connection of `user` on `device` begins: refused past the per-user limit; the first
    /// one tells the user's contacts it is online.
    pub(crate) fn enter(&self, user: &str, device: &str) -> Result<(), ChatError> {
        let first = {
            let mut online = lock(&self.online);
            let entry = online.entry(user.to_string()).or_default();
            let connections: u32 = entry.devices.values().sum();
            if connections as usize >= self.config.max_connections_per_user {
                let message = format!(
                    "{user} has {connections} connections, the most allowed \
                     (max_connections_per_user)"
                );
                return Err(ChatError::new("too_many_connections", message));
            }
            *entry.devices.entry(device.to_string()).or_default() += 1;
            connections == 0
        };
        self.share_online(user);
        if first && !self.online_elsewhere(user) {
            self.announce(user, true, None);
        }
        Ok(())
    }

    /// `user`'s devices connected here, by name.
    pub(crate) fn local_devices(&self, user: &str) -> Vec<String> {
        lock(&self.online)
            .get(user)
            .map(|o| o.devices.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// `user`'s devices connected to other nodes alive now (on a node of a cluster).
    fn remote_devices(&self, user: &str) -> Vec<String> {
        let Some(shared) = &self.shared else { return Vec::new() };
        let remote = lock(&self.remote_online);
        let Some(nodes) = remote.get(user) else { return Vec::new() };
        // A node's entry counts while the node is in the membership, or was written lately (a
        // node that just started may not be in this node's view of the membership yet); a
        // dead node's entry stays behind, and is left out.
        let alive = shared.alive();
        let mut devices: Vec<String> = nodes
            .iter()
            .filter(|(node, (_, learned))| alive.contains(node) || learned.elapsed() < FRESH)
            .flat_map(|(_, (devices, _))| devices.iter().cloned())
            .collect();
        devices.sort();
        devices.dedup();
        devices
    }

    pub(crate) fn online_elsewhere(&self, user: &str) -> bool {
        !self.remote_devices(user).is_empty()
    }

    /// Tells the other nodes which of `user`'s devices are connected here (on a cluster).
    fn share_online(&self, user: &str) {
        let Some(shared) = &self.shared else { return };
        let entry = Entry::Online {
            user: user.to_string(),
            node: shared.node().to_string(),
            devices: self.local_devices(user),
        };
        let shared = Arc::clone(shared);
        let spawned = self.broker.spawn(async move {
            if let Err(err) = shared.put(&[entry]).await {
                tracing::debug!(err = err.message, "chat: presence not shared");
            }
        });
        if let Err(err) = spawned {
            tracing::debug!(%err, "chat: presence not shared");
        }
    }

    /// A connection ends; the last one tells the contacts the user is offline.
    pub(crate) fn leave(&self, user: &str, device: &str, cursor: &Cursor) {
        let now = now_ms();
        cursor.seen.store(now, Ordering::Release);
        lock(&self.last_seen).insert(user.to_string(), now);
        let last = {
            let mut online = lock(&self.online);
            let Some(entry) = online.get_mut(user) else { return };
            if let Some(count) = entry.devices.get_mut(device) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    entry.devices.remove(device);
                }
            }
            let last = entry.devices.is_empty();
            if last {
                online.remove(user);
            }
            last
        };
        self.share_online(user);
        if last && !self.online_elsewhere(user) {
            self.announce(user, false, Some(now));
        }
    }

    /// Takes one send from `user`'s budget (`max_messages_per_sec`, bursts of a second's).
    pub(crate) fn admit(&self, user: &str) -> Result<(), ChatError> {
        let rate = f64::from(self.config.max_messages_per_sec.max(1));
        let mut online = lock(&self.online);
        let entry = online.entry(user.to_string()).or_default();
        let now = Instant::now();
        let elapsed = entry.topped.map_or(rate, |t| now.duration_since(t).as_secs_f64() * rate);
        entry.tokens = (entry.tokens + elapsed).min(rate);
        entry.topped = Some(now);
        if entry.tokens < 1.0 {
            let message = format!("more than {rate} messages a second (max_messages_per_sec)");
            return Err(ChatError::new("rate_limited", message));
        }
        entry.tokens -= 1.0;
        Ok(())
    }

    /// Everyone whose presence `user` follows: its contacts and the members of its groups.
    pub(crate) fn watched(&self, user: &str) -> BTreeSet<String> {
        let mut watched = lock(&self.contacts).get(user).cloned().unwrap_or_default();
        watched.extend(self.groups().peers(user));
        watched
    }

    /// `user`'s presence: online devices, or when it was last seen.
    pub(crate) fn presence(&self, user: &str) -> serde_json::Value {
        let mut devices = self.local_devices(user);
        devices.extend(self.remote_devices(user));
        devices.sort();
        devices.dedup();
        let last_seen = lock(&self.last_seen).get(user).copied();
        json!({
            "user": user,
            "online": !devices.is_empty(),
            "devices": devices,
            "last_seen": last_seen,
        })
    }

    /// Tells everyone who follows `user` that it came online or went offline.
    pub(crate) fn announce(&self, user: &str, online: bool, last_seen: Option<u64>) {
        let event = json!({
            "type": "presence",
            "user": user,
            "status": if online { "online" } else { "offline" },
            "last_seen": last_seen,
        });
        let event = Bytes::from(event.to_string());
        for peer in self.watched(user) {
            self.tell(&peer, event.clone());
        }
    }

    /// Sends `event` to `user`'s live connections; nobody keeps it.
    pub(crate) fn tell(&self, user: &str, event: Bytes) {
        if let Err(err) = self.broker.publish_bytes_with(&live(user), event, &PublishOptions::new())
        {
            tracing::debug!(%err, user, "live event not sent");
        }
    }
}
