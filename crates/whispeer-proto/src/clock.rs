//! The wall clock in milliseconds, as every message is stamped with it, at the cost of a
//! counter read rather than a call into the system's clock.
//!
//! Every publish takes a time stamp. Through the system's clock (`SystemTime::now`) that was
//! 35–50 ns on a virtual machine, about a seventh of an in-process publish and delivery. Here
//! each thread keeps an anchor — the system's wall clock and the CPU's time-stamp counter read
//! together — and adds the counter's progress since ([`quanta`] calibrates it once a process,
//! and falls back to the system's monotonic clock where the counter is not invariant). An
//! anchor is taken again after [`ANCHOR_FOR_NS`], so a step of the system's clock shows within
//! that, and the counter's drift against it (parts per million) stays far under a millisecond.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// How long a thread's anchor is used before it is taken again from the system's clock.
pub const ANCHOR_FOR_NS: u64 = 100_000_000;

/// The counter, calibrated on first use (a busy loop of about a millisecond, 200 ms at most).
static COUNTER: OnceLock<quanta::Clock> = OnceLock::new();

fn counter() -> &'static quanta::Clock {
    COUNTER.get_or_init(quanta::Clock::new)
}

thread_local! {
    /// This thread's anchor: the counter's raw value and the wall clock in nanoseconds since
    /// the epoch, read together; `None` until the thread's first time stamp.
    static ANCHOR: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Calibrates the counter now, if it was not yet (once a process), so that the first time
/// stamp does not pay for it: brokers and clients call it when they are built.
pub fn calibrate() {
    counter();
}

/// The system's wall clock in nanoseconds since the epoch (0 before it).
fn system_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The wall clock in milliseconds since the epoch (0 before it), as the system's clock gives
/// it to within the counter's drift over [`ANCHOR_FOR_NS`].
pub fn now_ms() -> u64 {
    let counter = counter();
    let raw = counter.raw();
    let ns = ANCHOR.with(|anchor| {
        if let Some((at, wall)) = anchor.get() {
            // A counter read behind the anchor (another core's counter) counts as no time.
            let since = counter.delta_as_nanos(at, raw);
            if since < ANCHOR_FOR_NS {
                return wall + since;
            }
        }
        let wall = system_ns();
        anchor.set(Some((raw, wall)));
        wall
    });
    ns / 1_000_000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn system_ms() -> u64 {
        system_ns() / 1_000_000
    }

    /// `now_ms` read between two readings of the system's clock lies between them, allowing
    /// a millisecond for the counter's drift and the rounding.
    fn within_system_clock() {
        let before = system_ms();
        let now = now_ms();
        let after = system_ms();
        assert!(before <= now + 1 && now <= after + 1, "{before} <= {now} <= {after}");
    }

    #[test]
    fn calibrating_leaves_the_counter_ready_for_the_first_stamp() {
        calibrate();
        assert!(COUNTER.get().is_some(), "calibrated before any stamp");
        within_system_clock();
    }

    #[test]
    fn follows_the_system_clock_across_pauses_and_new_anchors() {
        within_system_clock();
        // Pauses shorter and longer than an anchor's life: the time stamp moves with the
        // system's clock, not stuck at the anchor.
        for pause_ms in [3, 20, 40, 60, 130] {
            std::thread::sleep(Duration::from_millis(pause_ms));
            within_system_clock();
        }
    }

    #[test]
    fn every_thread_keeps_its_own_anchor() {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        within_system_clock();
                        std::thread::sleep(Duration::from_millis(7 * (i + 1)));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("a thread's time stamps follow the system clock");
        }
    }

    #[test]
    fn a_busy_thread_stays_on_the_clock() {
        // Many stamps in a row, as a publisher takes them: none falls behind or ahead.
        let until = system_ms() + 250;
        while system_ms() < until {
            for _ in 0..1000 {
                std::hint::black_box(now_ms());
            }
            within_system_clock();
        }
    }
}
