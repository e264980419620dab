//! Restoring durable history at start, and the background sweep of aged history.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;
use whispeer_proto::header;

use super::Shared;
use crate::message::{Message, now_ms};
use crate::retention::{SWEEP_BUDGET, SWEEP_TICK, expiry_of_stored};
use crate::store::Record;

impl Shared {
    /// Puts the records of the write-ahead log back into their topics' history. A message whose
    /// time to live ran out meanwhile is left out; others keep what is left of theirs. The
    /// idempotency keys of messages stored within the de-duplication window are remembered
    /// again, so a publisher retrying across the restart still publishes once.
    pub(crate) fn restore(&self, records: Vec<Record>) {
        let (now, now_wall) = (Instant::now(), now_ms());
        let restored = records.len();
        let messages = records.into_iter().filter_map(|record| {
            if let Some(key) = record.envelope.headers.get(header::IDEMPOTENCY_KEY) {
                let age = Duration::from_millis(now_wall.saturating_sub(record.accepted_ms));
                if let Some(at) = now.checked_sub(age) {
                    self.dedup.check(record.envelope.topic.as_str(), key, at);
                }
            }
            let expires_at =
                expiry_of_stored(&record.envelope.headers, record.accepted_ms, now, now_wall)?;
            let engines = self.engines.clone();
            let message =
                Message::retained(record.envelope, true, engines, expires_at, record.offset);
            Some((record.offset, record.accepted_ms, message))
        });
        self.history.restore(messages);
        tracing::info!(records = restored, "durable history restored from the write-ahead log");
    }
}

/// Runs the age sweep until the broker is gone.
pub(crate) async fn sweep_forever(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(SWEEP_TICK).await;
        let Some(shared) = shared.upgrade() else { return };
        let evicted = shared.history.sweep(Instant::now(), SWEEP_BUDGET);
        if evicted > 0 {
            tracing::trace!(evicted, "aged history evicted");
        }
    }
}
