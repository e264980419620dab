//! MQTT sessions across connections, one registry per server: which connection holds each
//! client id, and for which principal (a second connection with the id and the same principal
//! takes the session over and the first is closed; another principal is refused), and, for a
//! persistent session (3.1.1 without clean session, MQTT 5 with a session expiry), its
//! subscriptions after the connection ends, so a client that comes back resumes them. A
//! persistent subscription is a native QoS 1 queue group of its own
//! (`mqtt-session:<client id>`): while the client is away the group lingers for the session's
//! expiry (at most `[mqtt] max_session_expiry_secs`) and keeps what arrives, with what was
//! delivered and not acknowledged; the client gets it on its return. Wills with a delay wait
//! here too: a client that comes back in time cancels its will.

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
    /// MQTT 5's no local and retain as published.
    pub(crate) no_local: bool,
    pub(crate) keep_retain: bool,
}

#[derive(Debug)]
struct Stored {
    subs: Vec<StoredSub>,
    /// Whose session it is: only connections of this principal may take it.
    principal: String,
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
    /// Delayed wills waiting to be published, by client id: cancelled when the client is back.
    wills: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next: AtomicU64,
}

/// What taking a client id gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The subscriptions to resume, when a stored session is resumed.
    pub(crate) resumed: Option<Vec<StoredSub>>,
    /// The subscriptions of a stored session that a clean start ends: their groups go.
    pub(crate) discarded: Vec<StoredSub>,
}

/// The client id belongs to a session of another principal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Foreign;

impl MqttSessions {
    /// A number for a new connection.
    pub(crate) fn connection(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connection `connection` (ended by `stop`) of `principal` takes `client_id`: a live
    /// holder is closed (its `taken` cancelled first, so it says why); with `clean`, a stored
    /// session is dropped; a will waiting for the client is cancelled. Gives the subscriptions
    /// to resume, when a session was there to resume.
    ///
    /// # Errors
    /// [`Foreign`]: the session belongs to another principal; nothing changed.
    pub(crate) fn attach(
        &self,
        client_id: &str,
        principal: &str,
        connection: u64,
        (stop, taken): (CancellationToken, CancellationToken),
        clean: bool,
        expiry: Duration,
    ) -> Result<Attached, Foreign> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.get(client_id).is_some_and(|s| s.principal != principal) {
            return Err(Foreign);
        }
        let mut wills = self.wills.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, will)) = wills.remove(client_id) {
            will.cancel();
        }
        drop(wills);
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
        let (resumed, discarded) = match previous {
            Some(p) if !clean => (Some(p.subs), Vec::new()),
            Some(p) => (None, p.subs),
            None => (None, Vec::new()),
        };
        let subs = resumed.clone().unwrap_or_default();
        let live = Some((stop, taken));
        let principal = principal.to_string();
        let stored = Stored { subs, principal, owner: connection, live, expiry, ended: None };
        sessions.insert(client_id.to_string(), stored);
        Ok(Attached { resumed, discarded })
    }

    /// How long the session of `client_id` outlives its connection, if it is one.
    pub(crate) fn expiry(&self, client_id: &str) -> Option<Duration> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.get(client_id).map(|s| s.expiry).filter(|e| !e.is_zero())
    }

    /// MQTT 5 DISCONNECT set a new expiry for the session.
    pub(crate) fn set_expiry(&self, client_id: &str, connection: u64, expiry: Duration) {
        self.with(client_id, connection, |stored| stored.expiry = expiry);
    }

    /// A will to publish after a delay: its number, and a token cancelled if `client_id`
    /// comes back first (it replaces a will waiting already).
    pub(crate) fn delay_will(&self, client_id: &str) -> (u64, CancellationToken) {
        let (number, token) = (self.connection(), CancellationToken::new());
        let mut wills = self.wills.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, old)) = wills.insert(client_id.to_string(), (number, token.clone())) {
            old.cancel();
        }
        (number, token)
    }

    /// Will `number` of `client_id` was published or cancelled: forgotten.
    pub(crate) fn will_done(&self, client_id: &str, number: u64) {
        let mut wills = self.wills.lock().unwrap_or_else(PoisonError::into_inner);
        if wills.get(client_id).is_some_and(|(n, _)| *n == number) {
            wills.remove(client_id);
        }
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

    /// The connection ended: a session that does not outlive it goes (and `true` says so: its
    /// groups are to be ended); a persistent one waits for its client until it expires.
    pub(crate) fn detach(&self, client_id: &str, connection: u64) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stored) = sessions.get_mut(client_id).filter(|s| s.owner == connection) else {
            return false;
        };
        if stored.expiry.is_zero() {
            sessions.remove(client_id);
            true
        } else {
            stored.live = None;
            stored.ended = Some(Instant::now());
            false
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
        let resumed =
            |subs: Vec<StoredSub>| Ok(Attached { resumed: Some(subs), discarded: vec![] });
        let first = tokens();
        assert_eq!(
            sessions.attach("dev", "ann", 1, first.clone(), false, day),
            Ok(Attached::default())
        );
        let (no_local, keep_retain) = (false, false);
        let sub = StoredSub { filter: "a/#".into(), qos: 1, id: None, no_local, keep_retain };
        sessions.subscribed("dev", 1, sub.clone());
        // Another principal may not take the id: nothing changes for the holder.
        assert_eq!(sessions.attach("dev", "bob", 9, tokens(), true, day), Err(Foreign));
        assert!(!first.0.is_cancelled());
        // The same client id again, while the first connection lives: it is closed.
        assert_eq!(
            sessions.attach("dev", "ann", 2, tokens(), false, day),
            resumed(vec![sub.clone()])
        );
        assert!(first.0.is_cancelled() && first.1.is_cancelled(), "closed, marked taken over");
        // The first connection's end changes nothing now; the second's keeps the session.
        assert!(!sessions.detach("dev", 1));
        assert!(!sessions.detach("dev", 2));
        assert_eq!(sessions.expiry("dev"), Some(day));
        assert_eq!(
            sessions.attach("dev", "ann", 3, tokens(), false, day),
            resumed(vec![sub.clone()])
        );
        assert!(!sessions.detach("dev", 3));
        // A clean start drops it, saying what it ends; a session whose expiry became zero
        // goes with its connection.
        let clean = sessions.attach("dev", "ann", 4, tokens(), true, day);
        assert_eq!(clean, Ok(Attached { resumed: None, discarded: vec![sub] }));
        sessions.set_expiry("dev", 4, Duration::ZERO);
        assert!(sessions.detach("dev", 4), "over: its groups are to be ended");
        assert_eq!(sessions.expiry("dev"), None);
        assert_eq!(sessions.attach("dev", "bob", 5, tokens(), false, day), Ok(Attached::default()));
    }

    #[test]
    fn a_delayed_will_is_cancelled_when_its_client_comes_back() {
        let sessions = MqttSessions::default();
        let tokens = || (CancellationToken::new(), CancellationToken::new());
        let (first, will) = sessions.delay_will("dev");
        let (second, again) = sessions.delay_will("dev");
        assert!(will.is_cancelled() && !again.is_cancelled(), "a newer will replaces it");
        sessions.will_done("dev", first);
        let _ = sessions.attach("dev", "ann", 1, tokens(), false, Duration::ZERO);
        assert!(again.is_cancelled(), "the client came back");
        sessions.will_done("dev", second);
        let (_, later) = sessions.delay_will("other");
        assert!(!later.is_cancelled());
    }
}
