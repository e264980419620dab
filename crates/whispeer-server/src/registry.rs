//! The live connections of a server, for operators: who is connected, since when, with which
//! subscriptions, how much it published and received — and a way to disconnect one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// One connection as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The registry's id for it.
    pub id: u64,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Its principal, once authenticated.
    pub principal: Option<String>,
    /// Its live subscriptions.
    pub subscriptions: usize,
    /// Their filters, by subscription id.
    pub filters: Vec<String>,
    /// Publishes it made that the broker accepted.
    pub published: u64,
    /// Messages delivered to it.
    pub delivered: u64,
    /// When it connected.
    pub since: SystemTime,
}

/// A connection's entry, updated by the connection itself.
#[derive(Debug)]
pub(crate) struct Entry {
    peer: SocketAddr,
    since: SystemTime,
    principal: Mutex<Option<String>>,
    /// Filters by subscription id.
    filters: Mutex<BTreeMap<u32, String>>,
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    /// Cancelled to disconnect it.
    pub(crate) kick: CancellationToken,
}

impl Entry {
    pub(crate) fn set_principal(&self, name: &str) {
        *self.principal.lock().unwrap_or_else(PoisonError::into_inner) = Some(name.to_string());
    }

    pub(crate) fn subscribed(&self, sub: u32, filter: &str) {
        self.filters.lock().unwrap_or_else(PoisonError::into_inner).insert(sub, filter.into());
    }

    pub(crate) fn unsubscribed(&self, sub: u32) {
        self.filters.lock().unwrap_or_else(PoisonError::into_inner).remove(&sub);
    }
}

/// Every live connection of a server (shared by clones of its config).
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Entry>>>,
}

/// Removes the entry when the connection ends.
pub(crate) struct Registered {
    pub(crate) entry: Arc<Entry>,
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}

impl Connections {
    /// Registers a new connection whose `stop` token ends it.
    pub(crate) fn register(
        this: &Arc<Self>,
        peer: SocketAddr,
        stop: &CancellationToken,
    ) -> Registered {
        let id = this.next.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(Entry {
            peer,
            since: SystemTime::now(),
            principal: Mutex::new(None),
            filters: Mutex::default(),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            kick: stop.child_token(),
        });
        this.live.lock().unwrap_or_else(PoisonError::into_inner).insert(id, Arc::clone(&entry));
        Registered { entry, id, connections: Arc::clone(this) }
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.iter()
            .map(|(id, entry)| {
                let filters: Vec<String> = entry
                    .filters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect();
                ConnectionInfo {
                    id: *id,
                    peer: entry.peer,
                    principal: entry
                        .principal
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                    subscriptions: filters.len(),
                    filters,
                    published: entry.published.load(Ordering::Relaxed),
                    delivered: entry.delivered.load(Ordering::Relaxed),
                    since: entry.since,
                }
            })
            .collect()
    }

    /// The authenticated principals connected now, with how many connections each has.
    pub fn principals(&self) -> BTreeMap<String, u32> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut principals = BTreeMap::new();
        for entry in live.values() {
            if let Some(name) = &*entry.principal.lock().unwrap_or_else(PoisonError::into_inner) {
                *principals.entry(name.clone()).or_insert(0u32) += 1;
            }
        }
        principals
    }

    /// Disconnects connection `id` (it is told why); returns whether it was live.
    pub fn disconnect(&self, id: u64) -> bool {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(&id).map(|entry| entry.kick.cancel()).is_some()
    }
}
