//! Whether the connection task's next write should first wait for tasks it woke
//! (`Actor::gather`).
//!
//! Tasks woken together — publishers whose acknowledgements one read brought, subscriptions
//! handed deliveries — each wake the connection task as they publish or ack, and the runtime
//! runs a task woken from a worker right after the task that woke it: without waiting, each of
//! them would get a write (a system call and a segment) of its own. Waiting (a yield: a turn of
//! the runtime) costs 60–80 µs of latency at a low rate here, and as much on every round trip of
//! a pipelined publisher, so the connection task waits only while someone it woke has not been
//! heard from yet: more publishes answered than publishes of that kind taken since, or a
//! subscription handed deliveries that it has not taken; also after a flush or subscribe was
//! answered a moment ago, and while it streams (wrote a moment ago), where a write is cheaper
//! shared.

use std::time::Duration;

use tokio::time::Instant;

use super::Map;
use super::subs::Sub;

/// A moment, for the rules above: tasks woken together run within microseconds of their wake,
/// and writes of a stream follow each other as closely.
const MOMENT: Duration = Duration::from_micros(100);
/// Subscriptions remembered as handed deliveries since the last write; past them, the next
/// write waits (many tasks woke).
const HANDED: usize = 16;

/// What the connection task woke since its last write, and when that write was.
#[derive(Debug, Default)]
pub(super) struct Woken {
    /// Acknowledged publishes answered since the last write.
    answered: u64,
    /// Acknowledged publishes taken from the outbox since the last write.
    taken: u64,
    /// Subscriptions handed deliveries since the last write (at most `HANDED`).
    handed: Vec<u32>,
    /// More than `HANDED` were.
    many: bool,
    /// When a flush or a subscribe was last answered.
    replied: Option<Instant>,
    last_write: Option<Instant>,
}

impl Woken {
    /// A publish's acknowledgement woke its publisher.
    pub(super) fn answered(&mut self) {
        self.answered += 1;
    }

    /// Acknowledged publishes taken for the next write.
    pub(super) fn taken(&mut self, publishes: u64) {
        self.taken += publishes;
    }

    /// Subscription `sub` was handed deliveries.
    pub(super) fn handed(&mut self, sub: u32) {
        if self.handed.len() < HANDED {
            self.handed.push(sub);
        } else {
            self.many = true;
        }
    }

    /// A flush or a subscribe was answered.
    pub(super) fn replied(&mut self) {
        self.replied = Some(Instant::now());
    }

    /// A write ended at `now`.
    pub(super) fn wrote(&mut self, now: Instant) {
        let mut handed = std::mem::take(&mut self.handed);
        handed.clear();
        *self = Self { handed, last_write: Some(now), ..Self::default() };
    }

    /// Whether the next write should first let the other ready tasks run.
    pub(super) fn wait(&self, subscriptions: &Map<Sub>) -> bool {
        let recent = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < MOMENT);
        self.answered > self.taken
            || self.many
            || self.handed.iter().any(|sub| subscriptions.get(sub).is_some_and(Sub::untaken))
            || recent(self.replied)
            || recent(self.last_write)
    }
}
