//! Tokio's cooperative budget, spent by a subscriber as it takes messages.

use std::task::{Context, Poll};

use tokio::task::coop::RestoreOnPending;

/// How many messages a subscriber takes for one unit of tokio's cooperative budget: with
/// tokio's 128 units a task's turn, a subscriber that always finds a message waiting yields its
/// worker after 4,096 of them. Tokio's channels spend a unit a message; over the network (the
/// SDK's subscriber, where this was tried first) a yield every 128 or 1,024 messages of a few
/// tens of nanoseconds each cost 13–17 % of a 1→8 receive.
pub(crate) const MESSAGES_PER_UNIT: u8 = 32;

/// A subscriber's share in tokio's cooperative scheduling: taking messages spends the task's
/// budget, so a subscriber that always finds one still lets the other tasks of its worker run.
/// Outside tokio, nothing is spent.
#[derive(Debug, Default)]
pub(crate) struct Cooperation {
    /// Messages still to take on the unit spent last.
    left: u8,
}

impl Cooperation {
    /// Before taking a message: `Pending` (with the task woken to run again) when the task's
    /// budget is spent.
    #[inline]
    pub(crate) fn proceed(&self, cx: &mut Context<'_>) -> Poll<Option<RestoreOnPending>> {
        if self.left > 0 {
            return Poll::Ready(None);
        }
        tokio::task::coop::poll_proceed(cx).map(Some)
    }

    /// After trying to take one: `unit` is what [`Cooperation::proceed`] gave, kept spent only
    /// if a message (or the end) was taken.
    #[inline]
    pub(crate) fn taken(&mut self, unit: Option<RestoreOnPending>, ready: bool) {
        if !ready {
            return;
        }
        match unit {
            Some(unit) => {
                unit.made_progress();
                self.left = MESSAGES_PER_UNIT - 1;
            }
            None => self.left -= 1,
        }
    }
}
