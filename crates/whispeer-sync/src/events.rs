//! Sync events: a small broadcast hub for what happens to peers and replicated nodes.

use tokio::sync::broadcast;

/// Something that happened in sync.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncEvent {
    /// A peer connected (its end-to-end handshake finished).
    PeerConnected {
        /// The peer's id.
        peer_id: String,
    },
    /// A peer's connection ended.
    PeerDisconnected {
        /// The peer's id.
        peer_id: String,
    },
    /// A node (a record of the application) was created or changed.
    NodeUpsert {
        /// The node's id.
        id: String,
    },
    /// A node was deleted.
    NodeDelete {
        /// The node's id.
        id: String,
    },
    /// The node is reachable at these addresses (for the DHT mode: bootstrap addresses others
    /// can use).
    Listening {
        /// The addresses.
        addresses: Vec<String>,
    },
    /// Something went wrong that the application may want to show.
    Error {
        /// What.
        message: String,
    },
}

/// A hub of [`SyncEvent`]s: every subscriber gets every event published after it subscribed.
///
/// Bounded: a subscriber that falls more than `capacity` events behind loses the oldest, and
/// its next `recv` says how many (`RecvError::Lagged`) — events are never held without bound.
#[derive(Clone, Debug)]
pub struct SyncBroadcaster {
    sender: broadcast::Sender<SyncEvent>,
}

impl Default for SyncBroadcaster {
    /// A hub that keeps up to 1,024 events per subscriber.
    fn default() -> Self {
        Self::new(1024)
    }
}

impl SyncBroadcaster {
    /// A hub that keeps up to `capacity` events per subscriber.
    ///
    /// # Panics
    /// If `capacity` is 0.
    pub fn new(capacity: usize) -> Self {
        Self { sender: broadcast::channel(capacity).0 }
    }

    /// Subscribes: events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncEvent> {
        self.sender.subscribe()
    }

    /// Publishes `event` to every subscriber; how many there were.
    ///
    /// # Errors
    /// There is no subscriber (the event is dropped).
    pub fn publish(
        &self,
        event: SyncEvent,
    ) -> Result<usize, broadcast::error::SendError<SyncEvent>> {
        self.sender.send(event)
    }

    /// How many subscribers there are.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}
