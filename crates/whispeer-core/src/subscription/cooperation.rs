//! Tokio's cooperative budget, spent by a subscriber as it takes messages.

use std::task::{Context, Poll};

/// How many messages a subscriber takes for one unit of tokio's cooperative budget: with
/// tokio's 128 units a task's turn, a subscriber that always finds a message waiting yields its
/// worker after 4,096 of them. Tokio's channels spend a unit a message; in process that made
/// a publisher and its subscriber run in parallel and slower (375–437 against 307–320 ns a
/// message), and over the network (the SDK's subscriptions, which spend a unit for 128) a
/// yield every 128 or 1,024 messages cost 13–17 % of a 1→8 receive.
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
    /// budget is spent, else counts the message against the unit spent last, or spends one.
    #[inline]
    pub(crate) fn spend(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.left == 0 {
            let unit = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            unit.made_progress();
            self.left = MESSAGES_PER_UNIT;
        }
        self.left -= 1;
        Poll::Ready(())
    }
}
