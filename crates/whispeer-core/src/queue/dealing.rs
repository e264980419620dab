//! A dealing queue (a QoS 0 group's, see `waiting.rs`): its members joining and leaving, and
//! taking from it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Waker};

use super::{Credit, Queue, Unreleased, Waiting};
use crate::Message;

impl Queue {
    /// This group's queue dealing each push over its members (a QoS 0 group's).
    pub(crate) fn dealing(mut self) -> Self {
        self.inbox.get_mut().unwrap_or_else(PoisonError::into_inner).waiting =
            Waiting::Dealing(Box::default());
        self.dealt = Some(Box::default());
        self
    }

    /// Whether this queue deals each push over its members.
    pub(crate) fn deals(&self) -> bool {
        self.dealt.is_some()
    }

    /// Adds `credit`'s member to those a dealing queue deals to.
    pub(crate) fn join_member(&self, credit: &Arc<Credit>) {
        self.inbox().waiting.join(credit);
    }

    /// Takes `credit`'s member out of a dealing queue's members: what it was dealt and did not
    /// take goes to whoever asks, and every waiting member is woken to ask.
    pub(crate) fn leave_member(&self, credit: &Arc<Credit>) {
        let mut inbox = self.inbox();
        if let Some(dealt) = &self.dealt {
            dealt.unassign(credit.give_up());
        }
        let woken = inbox.waiting.leave(credit);
        drop(inbox);
        woken.wake();
    }

    /// For a dealing queue, [`Queue::len`]; 0 otherwise (never read).
    pub(super) fn dealt_len(&self) -> usize {
        if self.dealt.is_some() { self.len() } else { 0 }
    }

    /// [`Queue::poll_pop_taking`] for member `credit` of a dealing queue: its credit first,
    /// then what is no one's; finding only the others' credit, or nothing, it waits for the
    /// next push (or a member leaving).
    pub(crate) fn poll_pop_member(
        &self,
        cx: &mut Context<'_>,
        taken: &mut Unreleased,
        credit: &Arc<Credit>,
    ) -> Poll<Option<Message>> {
        if self.is_closed() {
            return Poll::Ready(None);
        }
        if let Some(message) = self.pop_member(taken, Some(cx.waker()), credit) {
            return Poll::Ready(Some(message));
        }
        // Parked under the inbox's lock, which `close` takes too (as `poll_pop_taking`).
        if self.is_closed() { Poll::Ready(None) } else { Poll::Pending }
    }

    /// [`Queue::try_pop_taking`] for member `credit` of a dealing queue, as
    /// [`Queue::poll_pop_member`] takes.
    pub(crate) fn try_pop_member(
        &self,
        taken: &mut Unreleased,
        credit: &Arc<Credit>,
    ) -> Option<Message> {
        if self.is_closed() {
            return None;
        }
        self.pop_member(taken, None, credit)
    }

    fn pop_member(
        &self,
        taken: &mut Unreleased,
        park: Option<&Waker>,
        credit: &Arc<Credit>,
    ) -> Option<Message> {
        let Some(dealt) = &self.dealt else { return self.pop_taking(taken, park, None) };
        // What is queued and not taken, leaving out what this member took and has not given
        // back yet (others' takes still count: they only make it take sooner).
        let queued = |taken: &Unreleased| {
            self.len().saturating_sub(usize::try_from(taken.count).unwrap_or(usize::MAX))
        };
        loop {
            if credit.take_one() {
                dealt.unassign(1);
            } else if queued(taken) <= dealt.assigned.load(Ordering::Acquire) {
                // Only the others' credit is here.
                let waker = park?;
                let mut inbox = self.inbox();
                inbox.waiting.park(credit, waker);
                // A push or a leave since the look may have changed that: look again (a push
                // after this wakes it when it deals to it or leaves something to no one).
                let changed =
                    credit.is_owed() || queued(taken) > dealt.assigned.load(Ordering::Acquire);
                drop(inbox);
                if changed {
                    continue;
                }
                return None;
            }
            if let Some(message) = self.pop_taking(taken, None, None) {
                return Some(message);
            }
            // Empty: the rest of its credit was taken by others. Parked under the inbox's
            // lock if it is still empty there.
            dealt.unassign(credit.give_up());
            return self.pop_taking(taken, park, Some(credit));
        }
    }
}
