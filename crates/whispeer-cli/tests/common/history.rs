//! A history checker the tests share: what a run sent, what the broker acknowledged and what
//! was read back (with the redelivery flag) in; one verdict out — lost (acknowledged, never
//! read), recovered (read though never acknowledged: sent before a crash), unexpected (read,
//! never sent), duplicated (flagged as redeliveries, or not), reordered (read before something
//! sent earlier).

use std::collections::{BTreeMap, BTreeSet};

/// One run's events.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// Values in the order they were sent.
    sent: Vec<u64>,
    acked: BTreeSet<u64>,
    /// Values in the order they were read, each with its redelivery flag.
    read: Vec<(u64, bool)>,
}

/// What a history shows.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) lost: Vec<u64>,
    pub(crate) recovered: usize,
    pub(crate) unexpected: Vec<u64>,
    pub(crate) duplicated_flagged: usize,
    pub(crate) duplicated_unflagged: usize,
    pub(crate) reordered: usize,
}

impl History {
    pub(crate) fn sent(&mut self, value: u64) {
        self.sent.push(value);
    }

    pub(crate) fn acked(&mut self, value: u64) {
        self.acked.insert(value);
    }

    pub(crate) fn read(&mut self, value: u64, redelivered: bool) {
        self.read.push((value, redelivered));
    }

    /// The verdict on everything recorded so far.
    pub(crate) fn verdict(&self) -> Verdict {
        let order: BTreeMap<u64, usize> =
            self.sent.iter().enumerate().map(|(at, &value)| (value, at)).collect();
        let mut verdict = Verdict::default();
        let mut seen = BTreeSet::new();
        let mut latest: Option<usize> = None;
        for &(value, redelivered) in &self.read {
            let Some(&at) = order.get(&value) else {
                verdict.unexpected.push(value);
                continue;
            };
            if !seen.insert(value) {
                if redelivered {
                    verdict.duplicated_flagged += 1;
                } else {
                    verdict.duplicated_unflagged += 1;
                }
                continue;
            }
            if latest.is_some_and(|latest| at < latest) {
                verdict.reordered += 1;
            }
            latest = latest.max(Some(at));
            if !self.acked.contains(&value) {
                verdict.recovered += 1;
            }
        }
        verdict.lost = self.acked.iter().copied().filter(|v| !seen.contains(v)).collect();
        verdict
    }
}

impl Verdict {
    /// Nothing acknowledged lost, nothing unexpected, no silent duplicate, no disorder.
    pub(crate) fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.duplicated_unflagged == 0
            && self.reordered == 0
    }

    /// One line for a person.
    pub(crate) fn line(&self) -> String {
        format!(
            "lost {}, recovered {}, unexpected {}, duplicated {} flagged / {} unflagged, reordered {}",
            self.lost.len(),
            self.recovered,
            self.unexpected.len(),
            self.duplicated_flagged,
            self.duplicated_unflagged,
            self.reordered
        )
    }
}
