//! MQTT sessions across connections, one registry per server: which connection holds each
//! client id (a second connection with the id takes the session over and the first is
//! closed), and, for a persistent session (3.1.1 without clean session, MQTT 5 with a session
//! expiry), its subscriptions after the connection ends, so a client that comes back resumes
//! them. A persistent subscription is a native QoS 1 queue group of its own
//! (`mqtt-session:<client id>`): while the client is away the group lingers (the broker's
//! `delivery.group_linger`) and keeps what arrives, with what was delivered and not
//! acknowledged; the client gets it on its return.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Most sessions remembered; past it the longest-ended ones go first.
const MAX_SESSIONS: usize = 100_000;

/// A subscription a persistent session keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredSub {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    pub(crate) id: Option<usize>,
}

#[derive(Debug)]
struct Stored {
    subs: Vec<StoredSub>,
    /// The connection holding the session now.
    owner: u64,
    /// The holder's stop, and the mark that says why it stops.
    live: Option<(CancellationToken, CancellationToken)>,
    /// How long the session outlives its connection (zero: not at all).
    expiry: Duration,
    ended: Option<Instant>,
}

/// The server's MQTT sessions.
#[derive(Debug, Default)]
pub(crate) struct MqttSessions {
    sessions: Mutex<HashMap<String, Stored>>,
    next: AtomicU64,
}

impl MqttSessions {
    /// A number for a new connection.
    pub(crate) fn connection(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connection `connection` (ended by `stop`) takes `client_id`: a live holder is closed
    /// (its `taken` cancelled first, so it says why); with `clean`, a stored session is
    /// dropped. Gives the subscriptions to resume, when a session was there to resume.
    pub(crate) fn attach(
        &self,
        client_id: &str,
        connection: u64,
        (stop, taken): (CancellationToken, CancellationToken),
        clean: bool,
        expiry: Duration,
    ) -> Option<Vec<StoredSub>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.ended.is_none_or(|ended| now.duration_since(ended) < s.expiry));
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .filter_map(|(id, s)| s.ended.map(|ended| (ended, id.clone())))
                .min()
                .map(|(_, id)| id)
        {
            sessions.remove(&oldest);
        }
        let previous = sessions.remove(client_id);
        if let Some((live, marked)) = previous.as_ref().and_then(|p| p.live.as_ref()) {
            tracing::debug!(client = client_id, "mqtt session taken over");
            marked.cancel();
            live.cancel();
        }
        let resumed = previous.filter(|_| !clean).map(|p| p.subs);
        let subs = resumed.clone().unwrap_or_default();
        let live = Some((stop, taken));
        let stored = Stored { subs, owner: connection, live, expiry, ended: None };
        sessions.insert(client_id.to_string(), stored);
        resumed
    }

    fn with(&self, client_id: &str, connection: u64, f: impl FnOnce(&mut Stored)) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stored) = sessions.get_mut(client_id).filter(|s| s.owner == connection) {
            f(stored);
        }
    }

    /// Remembers (or replaces) a subscription of the session.
    pub(crate) fn subscribed(&self, client_id: &str, connection: u64, sub: StoredSub) {
        self.with(client_id, connection, |stored| {
            stored.subs.retain(|s| s.filter != sub.filter);
            stored.subs.push(sub);
        });
    }

    /// Forgets a subscription of the session.
    pub(crate) fn unsubscribed(&self, client_id: &str, connection: u64, filter: &str) {
        self.with(client_id, connection, |stored| stored.subs.retain(|s| s.filter != filter));
    }

    /// The connection ended: a session that does not outlive it goes; a persistent one waits
    /// for its client until it expires.
    pub(crate) fn detach(&self, client_id: &str, connection: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stored) = sessions.get_mut(client_id).filter(|s| s.owner == connection) else {
            return;
        };
        if stored.expiry.is_zero() {
            sessions.remove(client_id);
        } else {
            stored.live = None;
            stored.ended = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persistent_session_is_resumed_a_clean_one_is_not_and_a_takeover_closes_the_holder() {
        let sessions = MqttSessions::default();
        let day = Duration::from_secs(86_400);
        let tokens = || (CancellationToken::new(), CancellationToken::new());
        let first = tokens();
        assert_eq!(sessions.attach("dev", 1, first.clone(), false, day), None);
        let sub = StoredSub { filter: "a/#".into(), qos: 1, id: None };
        sessions.subscribed("dev", 1, sub.clone());
        // The same client id again, while the first connection lives: it is closed.
        assert_eq!(sessions.attach("dev", 2, tokens(), false, day), Some(vec![sub.clone()]));
        assert!(first.0.is_cancelled() && first.1.is_cancelled(), "closed, marked taken over");
        // The first connection's end changes nothing now; the second's keeps the session.
        sessions.detach("dev", 1);
        sessions.detach("dev", 2);
        assert_eq!(sessions.attach("dev", 3, tokens(), false, day), Some(vec![sub]));
        sessions.detach("dev", 3);
        // A clean start drops it; a session with no expiry goes with its connection.
        assert_eq!(sessions.attach("dev", 4, tokens(), true, Duration::ZERO), None);
        sessions.detach("dev", 4);
        assert_eq!(sessions.attach("dev", 5, tokens(), false, day), None);
    }
}
