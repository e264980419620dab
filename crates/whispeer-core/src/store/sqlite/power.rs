//! Power loss under the SQLite store, simulated: the real broker on `whispeer.db` opened through
//! the power-cut VFS, the power lost at a random operation while publishers wait for their
//! acknowledgements (seeded rounds), then a broker started on what the disk kept. Nothing
//! acknowledged is lost, each publisher's messages read back are a run without holes, and no
//! offset is given twice. Every failure prints its seed.
//!
//! `WHISPEER_SQLITE_POWER_ROUNDS` sets the rounds (200 by default; `scripts/reliability` runs
//! 2,000).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whispeer_proto::Filter;

use super::powercut::PowerCut;
use crate::store::power_loss::{self, PUBLISHERS, TOPICS};
use crate::store::{Durability, PersistenceType};
use crate::{Broker, BrokerOptions};

const EACH: u32 = 25;

fn broker_on(dir: &Path) -> Broker {
    let store = PersistenceType::Sqlite(dir.join("whispeer.db"));
    let durability = Durability::in_store(store).topic(Filter::parse("t/#").unwrap());
    let options = BrokerOptions { durability: Some(durability), ..BrokerOptions::default() };
    Broker::builder(options).try_build().expect("the store opens")
}

/// The directory the broker runs in, and the one the disk's image after the cut goes to.
fn dirs(seed: u64) -> (PathBuf, PathBuf) {
    (base().join(format!("{seed}-live")), base().join(format!("{seed}-after")))
}

/// This run's directory, holding every round's (removed at the end).
fn base() -> PathBuf {
    std::env::temp_dir().join(format!("whispeer-sqlite-power-{}", std::process::id()))
}

fn rounds() -> u64 {
    let rounds = std::env::var("WHISPEER_SQLITE_POWER_ROUNDS").ok();
    rounds.and_then(|n| n.parse().ok()).unwrap_or(200)
}

#[test]
fn power_loss_under_sqlite_loses_no_acknowledged_message_and_reuses_no_offset() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // How many operations a whole run takes: the cuts fall anywhere in it.
    let whole = {
        let (live, _) = dirs(0);
        let disk = PowerCut::new(&live);
        let start = disk.ops();
        let round = power_loss::round(&runtime, 0, EACH, broker_on(&live), |broker| {
            (broker, Instant::now())
        });
        assert_eq!(round.acked.len(), (PUBLISHERS * EACH) as usize, "a run without a cut");
        disk.ops() - start
    };
    let (mut acked, mut mid_run) = (0, 0);
    for seed in 0x5a_0000..0x5a_0000 + rounds() {
        let (live, after) = dirs(seed);
        let disk = PowerCut::new(&live);
        let broker = broker_on(&live);
        disk.stop_at(disk.ops() + StdRng::seed_from_u64(seed).random_range(0..whole));
        let round = power_loss::round(&runtime, seed, EACH, broker, |broker| {
            disk.power_loss(seed, &after);
            drop(broker);
            (broker_on(&after), Instant::now())
        });
        round.check_order(seed);
        round.check_kept(seed);
        acked += round.acked.len();
        mid_run += usize::from(round.acked.len() < (PUBLISHERS * EACH) as usize);
        drop(round);
        let _ = std::fs::remove_dir_all(&after);
    }
    let _ = std::fs::remove_dir_all(base());
    println!(
        "power loss, SQLite: {} rounds, {mid_run} mid-run, {acked} acknowledged, 0 lost, no \
         offset given twice ({whole} disk operations in a whole run of {} messages on {} topics)",
        rounds(),
        PUBLISHERS * EACH,
        TOPICS.len(),
    );
    assert!(mid_run > 0, "the power went while publishers were waiting");
}
