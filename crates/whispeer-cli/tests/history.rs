//! The shared history checker (`common/history.rs`) on histories whose verdicts are known.

mod common;

use common::history::History;

#[test]
fn each_kind_of_anomaly_is_counted_once_and_a_clean_history_is_clean() {
    let mut clean = History::default();
    for n in 0..5 {
        clean.sent(n);
        clean.acked(n);
        clean.read(n, false);
    }
    assert!(clean.verdict().is_clean(), "{}", clean.verdict().line());

    let mut messy = History::default();
    for n in 0..6 {
        messy.sent(n);
    }
    for n in [0, 1, 2, 3] {
        messy.acked(n);
    }
    // 0, then 2 before 1 (reordered), 1 again flagged, 2 again unflagged, 9 never sent, 5 sent
    // but not acknowledged (recovered); 3 acknowledged and never read (lost).
    for (value, redelivered) in [(0, false), (2, false), (1, false), (1, true), (2, false)] {
        messy.read(value, redelivered);
    }
    messy.read(9, false);
    messy.read(5, false);
    let verdict = messy.verdict();
    assert_eq!(verdict.lost, [3]);
    assert_eq!(verdict.unexpected, [9]);
    assert_eq!((verdict.duplicated_flagged, verdict.duplicated_unflagged), (1, 1));
    assert_eq!((verdict.reordered, verdict.recovered), (1, 1));
    assert!(!verdict.is_clean());
    assert_eq!(
        verdict.line(),
        "lost 1, recovered 1, unexpected 1, duplicated 1 flagged / 1 unflagged, reordered 1"
    );
}
