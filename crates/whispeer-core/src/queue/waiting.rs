//! Who waits for a queue's next message, and how a push wakes them.
//!
//! A queue with one consumer wakes it. A QoS 1 group wakes every member that waits, and its
//! tracker holds each member to its share (`delivery/tracker.rs`). A QoS 0 group **deals**:
//! each push hands its messages out over the members in turn (the next push starting where
//! this one stopped), as a [`Credit`] of messages each member may take before the others, and
//! wakes only the waiting members it dealt to. A member takes its credit first, then what is
//! no one's (a message past every credit); when only the others' credit is left, it waits for
//! the next push. A member's credit is at most [`MOST_CREDIT`] messages: what would go past it
//! is no one's, so a member that stops taking holds up at most that many (until it takes
//! them, or leaves and they go to whoever asks), and the others take the rest. So members that
//! keep up get even shares of a burst, and nobody is woken for nothing. Without dealing, every
//! waiting member was woken and the first to run took a whole write's worth: in `whispeer
//! bench`'s work queue the smallest of 8 members' shares was 0.0–0.6 of an even one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

/// Most messages a member of a dealing queue may be owed ([`Credit`]).
pub(super) const MOST_CREDIT: usize = 8192;

/// The messages a QoS 0 group member may take before the others.
#[derive(Debug, Default)]
pub(crate) struct Credit(AtomicUsize);

impl Credit {
    /// Takes one message of the credit, if there is one.
    pub(super) fn take_one(&self) -> bool {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    /// Gives up the credit; returns how much it was.
    pub(super) fn give_up(&self) -> usize {
        self.0.swap(0, Ordering::AcqRel)
    }

    /// Adds up to `count`, short of [`MOST_CREDIT`]; returns what it added.
    fn add(&self, count: usize) -> usize {
        let before = self.0.load(Ordering::Acquire);
        let added = count.min(MOST_CREDIT.saturating_sub(before));
        self.0.fetch_add(added, Ordering::AcqRel);
        added
    }

    pub(super) fn is_owed(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// The credit every member of a dealing queue holds together, read without its lock.
#[derive(Debug, Default)]
pub(super) struct Dealt {
    pub(super) assigned: AtomicUsize,
}

impl Dealt {
    /// `count` messages of credit were taken or given up.
    pub(super) fn unassign(&self, count: usize) {
        if count > 0 {
            let _ = self.assigned.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(count))
            });
        }
    }
}

/// A QoS 0 group's members, in the order pushes deal to them, and those waiting.
#[derive(Debug, Default)]
pub(super) struct Dealing {
    members: Vec<Arc<Credit>>,
    /// Where the next push starts dealing.
    next: usize,
    /// Members waiting for a message, each with its credit.
    parked: Vec<(Arc<Credit>, Waker)>,
    /// Others waiting (not members: a watcher), woken by every push.
    others: Vec<Waker>,
}

/// Who waits for the next message.
#[derive(Debug)]
pub(super) enum Waiting {
    /// The queue's one consumer, once it parked.
    One(Option<Waker>),
    /// The members of a QoS 1 group that parked: all are woken, and the first to poll takes
    /// the message (up to its share).
    Many(Vec<Waker>),
    /// A QoS 0 group's members: see the module's documentation.
    Dealing(Box<Dealing>),
}

impl Waiting {
    pub(super) fn register(&mut self, waker: &Waker) {
        let many = match self {
            Self::One(one) => {
                match one {
                    Some(parked) if parked.will_wake(waker) => {}
                    _ => *one = Some(waker.clone()),
                }
                return;
            }
            Self::Many(many) => many,
            Self::Dealing(dealing) => &mut dealing.others,
        };
        if !many.iter().any(|w| w.will_wake(waker)) {
            many.push(waker.clone());
        }
    }

    /// Leaves a dealing queue's member `credit` waiting with `waker`.
    pub(super) fn park(&mut self, credit: &Arc<Credit>, waker: &Waker) {
        let Self::Dealing(dealing) = self else { return self.register(waker) };
        match dealing.parked.iter_mut().find(|(c, _)| Arc::ptr_eq(c, credit)) {
            Some((_, parked)) if parked.will_wake(waker) => {}
            Some((_, parked)) => *parked = waker.clone(),
            None => dealing.parked.push((Arc::clone(credit), waker.clone())),
        }
    }

    /// Adds member `credit` to a dealing queue's members.
    pub(super) fn join(&mut self, credit: &Arc<Credit>) {
        if let Self::Dealing(dealing) = self {
            dealing.members.push(Arc::clone(credit));
        }
    }

    /// Takes member `credit` out of a dealing queue's members, and every waiter out to wake:
    /// what it was dealt may now go to them.
    pub(super) fn leave(&mut self, credit: &Arc<Credit>) -> Woken {
        if let Self::Dealing(dealing) = self {
            dealing.members.retain(|c| !Arc::ptr_eq(c, credit));
            dealing.parked.retain(|(c, _)| !Arc::ptr_eq(c, credit));
            dealing.next = dealing.next.min(dealing.members.len().saturating_sub(1));
        }
        self.take()
    }

    /// Takes every parked consumer out, to wake once the lock is let go.
    pub(super) fn take(&mut self) -> Woken {
        match self {
            Self::One(one) => one.take().map_or(Woken::None, Woken::One),
            Self::Many(many) if many.is_empty() => Woken::None,
            Self::Many(many) => Woken::Many(std::mem::take(many)),
            Self::Dealing(dealing) => {
                let mut woken = std::mem::take(&mut dealing.others);
                woken.extend(dealing.parked.drain(..).map(|(_, waker)| waker));
                if woken.is_empty() { Woken::None } else { Woken::Many(woken) }
            }
        }
    }

    /// Takes out whom a push of `count` messages wakes, the queue holding `queued` with them:
    /// for a dealing queue, deals them over the members (in `dealt`) and takes out the waiting
    /// members it dealt to — or every waiting member when some of what is queued is no one's.
    pub(super) fn pushed(&mut self, count: usize, queued: usize, dealt: Option<&Dealt>) -> Woken {
        let (Self::Dealing(dealing), Some(dealt)) = (&mut *self, dealt) else {
            return self.take();
        };
        let members = dealing.members.len();
        if members == 0 || count == 0 {
            return self.take();
        }
        let (each, extra) = (count / members, count % members);
        let mut added = 0;
        for j in 0..count.min(members) {
            let share = each + usize::from(j < extra);
            added += dealing.members[(dealing.next + j) % members].add(share);
        }
        dealing.next = (dealing.next + count) % members;
        let assigned = dealt.assigned.fetch_add(added, Ordering::AcqRel) + added;
        if queued > assigned {
            return self.take();
        }
        let mut woken = std::mem::take(&mut dealing.others);
        let mut at = 0;
        while at < dealing.parked.len() {
            if dealing.parked[at].0.is_owed() {
                woken.push(dealing.parked.swap_remove(at).1);
            } else {
                at += 1;
            }
        }
        if woken.is_empty() { Woken::None } else { Woken::Many(woken) }
    }
}

/// Consumers taken out of [`Waiting`], woken outside the queue's lock.
#[must_use = "a consumer taken out of the queue's waiting list must be woken"]
pub(super) enum Woken {
    None,
    One(Waker),
    Many(Vec<Waker>),
}

impl Woken {
    pub(super) fn wake(self) {
        match self {
            Self::None => {}
            Self::One(one) => crate::wakeups::wake(one),
            Self::Many(many) => many.into_iter().for_each(crate::wakeups::wake),
        }
    }
}
