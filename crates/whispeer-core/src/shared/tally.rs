//! What one fan-out did, counted as it goes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::queue::{Pushed, Queue};
use crate::room;
use crate::stats::{BrokerCounters, bump};

/// Outcomes of one fan-out.
#[derive(Default)]
pub(super) struct Tally {
    /// Publishes to count with the deliveries (1 where routing let the publish through and
    /// counting it was left to the fan-out; 0 where the caller counts it).
    pub(super) published: u64,
    pub(super) delivered: usize,
    pub(super) full: usize,
}

impl Tally {
    /// Records one push to `queue`, noting it if it now holds its publisher back; returns
    /// whether the subscriber must now be disconnected.
    #[inline(always)]
    pub(super) fn record_push(
        &mut self,
        queue: &Arc<Queue>,
        pushed: Pushed,
        counters: &Arc<BrokerCounters>,
    ) -> bool {
        if pushed == Pushed::Held {
            room::note(queue, counters);
        }
        self.record(pushed, counters)
    }

    /// Records one push; returns whether the subscriber must now be disconnected.
    fn record(&mut self, pushed: Pushed, counters: &BrokerCounters) -> bool {
        match pushed {
            Pushed::Queued | Pushed::Held => self.delivered += 1,
            Pushed::DroppedOldest(evicted) => {
                self.delivered += 1;
                counters.dropped_oldest.fetch_add(evicted, Ordering::Relaxed);
            }
            Pushed::DroppedNewest => bump(&counters.dropped_newest),
            Pushed::Full => {
                self.full += 1;
                bump(&counters.rejected_full);
            }
            Pushed::Disconnected => {
                bump(&counters.disconnected);
                return true;
            }
            Pushed::Closed => {}
        }
        false
    }
}
