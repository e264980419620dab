//! The SQLite store's writer failing at each of its steps (fail points, feature `failpoints`):
//! an I/O error, a panic (the writer dies there, as in a crash) and a delay, at the first write
//! and at the fourth. Acknowledgements stop at a failure, publishes are refused after it, and
//! a store opened again holds every acknowledged message, as a clean prefix.

use super::*;
use crate::store::conformance::{Scratch, envelope};

/// Appends ten messages one by one, waiting for each; returns the offsets acknowledged.
fn append_ten(store: &SqliteStore, runtime: &tokio::runtime::Runtime) -> Vec<u64> {
    let mut acked = Vec::new();
    for offset in 1..=10 {
        let Ok(ticket) = store.append(offset, offset, &envelope("a", offset)) else { break };
        if !runtime.block_on(store.durable(ticket)) {
            break;
        }
        acked.push(offset);
    }
    acked
}

#[test]
fn a_failure_at_every_step_of_the_writer_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for point in FAIL_POINTS {
        for action in ["return", "panic", "sleep(20)"] {
            for after in [0, 3] {
                let what = format!("{point} {action} after {after} writes");
                let scratch = Scratch::new("sqlite-failpoints");
                let path = scratch.0.join("store.db");
                let (store, _) = SqliteStore::open(&path).unwrap();
                let config =
                    if after == 0 { action.to_string() } else { format!("{after}*off->{action}") };
                fail::cfg(point, &config).unwrap();
                let acked = append_ten(&store, &runtime);
                fail::remove(point);
                if action.starts_with("sleep") {
                    assert_eq!(acked.len(), 10, "{what}: late, not lost");
                } else {
                    assert_eq!(acked.len(), after, "{what}: acknowledgements stop there");
                    assert!(!store.healthy(), "{what}: the store says so");
                    assert!(store.append(11, 11, &envelope("a", 11)).is_err(), "{what}: refused");
                }
                drop(store);
                let (_, stored) = SqliteStore::open(&path).expect(&what);
                let offsets: Vec<u64> = stored.records.iter().map(|r| r.offset).collect();
                let prefix: Vec<u64> = (1..=offsets.len() as u64).collect();
                assert_eq!(offsets, prefix, "{what}: a clean prefix");
                assert!(offsets.len() >= acked.len(), "{what}: acknowledged and lost");
            }
        }
    }
    scenario.teardown();
}
