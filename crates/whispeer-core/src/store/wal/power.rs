//! Power loss, simulated: the real broker and its log on [`SimDisk`], the power lost at a
//! random operation while publishers wait for their acknowledgements (seeded rounds), and at
//! every operation of a scripted run of the log (appends, group commits, commits, segment
//! roll-over, deletion, the close mark), and every operation failing once with an I/O error or
//! a full disk; a failed sync and a full disk at the broker. Every failure prints its seed or
//! operation.
//!
//! `WHISPEER_POWER_LOSS_ROUNDS` sets the rounds with `fsync = always` (1,000 by default;
//! `scripts/reliability` runs 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whispeer_proto::{ContentType, Envelope, Filter, Flags, MessageId, Topic};

use super::damage::options_on;
use super::sim::SimDisk;
use super::*;
use crate::store::Durability;
use crate::store::power_loss::{self, PUBLISHERS, Round, read_back};
use crate::{Broker, BrokerOptions};

const EACH: u32 = 40;

fn broker_on(disk: &Arc<SimDisk>, fsync: FsyncPolicy) -> Broker {
    let wal = options_on(disk).fsync(fsync).segment_bytes(2048);
    let durability = Durability::new(wal).topic(Filter::parse("t/#").unwrap());
    let options = BrokerOptions { durability: Some(durability), ..BrokerOptions::default() };
    Broker::builder(options).try_build().expect("the log recovers")
}

/// Publishers wait for each acknowledgement; the power goes at a random operation of the disk
/// (or after the last acknowledgement); the broker is started again on what the disk kept.
fn round(runtime: &tokio::runtime::Runtime, seed: u64, fsync: FsyncPolicy) -> Round {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new();
    let broker = broker_on(&disk, fsync);
    disk.stop_at(disk.ops() + rng.random_range(0..400));
    power_loss::round(runtime, seed, EACH, broker, |broker| {
        let restored = disk.power_loss(seed);
        let off = disk.off_since().unwrap_or_else(Instant::now);
        drop(broker);
        (broker_on(&restored, fsync), off)
    })
}

fn rounds() -> u64 {
    std::env::var("WHISPEER_POWER_LOSS_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn with_fsync_always_power_loss_loses_no_acknowledged_message_and_reuses_no_offset() {
    let runtime = runtime();
    let base = 0xa1_0000;
    let (mut acked, mut crashes_mid_run) = (0, 0);
    for seed in base..base + rounds() {
        let round = round(&runtime, seed, FsyncPolicy::Always);
        round.check_order(seed);
        round.check_kept(seed);
        acked += round.acked.len();
        crashes_mid_run += usize::from(round.acked.len() < (PUBLISHERS * EACH) as usize);
    }
    println!(
        "power loss, fsync always: {} rounds, {crashes_mid_run} mid-run, {acked} acknowledged, 0 lost",
        rounds()
    );
    assert!(crashes_mid_run > 0, "the power went while publishers were waiting");
}

#[test]
fn with_fsync_interval_power_loss_loses_only_the_last_interval() {
    let runtime = runtime();
    let interval = Duration::from_millis(5);
    let mut widest = Duration::ZERO;
    let mut lost_total = 0;
    for seed in 0xb2_0000..0xb2_0000 + 200 {
        let round = round(&runtime, seed, FsyncPolicy::Interval(interval));
        round.check_order(seed);
        for (_, _, at) in round.lost() {
            widest = widest.max(round.off.saturating_duration_since(at));
            lost_total += 1;
        }
    }
    println!(
        "power loss, fsync interval 5 ms: 200 rounds, {lost_total} acknowledged lost, \
         the oldest acknowledged {} µs before the power went",
        widest.as_micros()
    );
}

#[test]
fn with_fsync_never_the_log_is_still_a_clean_prefix() {
    let runtime = runtime();
    for seed in 0xc3_0000..0xc3_0000 + 200 {
        round(&runtime, seed, FsyncPolicy::Never).check_order(seed);
    }
}

fn record(n: u64) -> Record {
    let topic = Topic::parse("a").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(format!("message {n}"));
    let envelope = Envelope::new(MessageId(u128::from(n)), topic, n, flags, payload);
    Record { offset: n, accepted_ms: n, envelope }
}

const GROUP: (&str, &str) = ("a", "g");

/// A scripted run of the log: 30 messages waited for one by one, a commit after every tenth,
/// small segments that roll over and are deleted. Returns the acknowledged offsets.
fn scripted(options: &WalOptions) -> Vec<u64> {
    let Ok((wal, _)) = Wal::open(options) else { return Vec::new() };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let topic = Topic::parse("a").unwrap();
    let key: GroupKey = (GROUP.0.into(), GROUP.1.into());
    let mut acked = Vec::new();
    for n in 1..=30 {
        let ticket = wal.push_message(&topic, n, record(n).encode().unwrap());
        if n % 10 == 0 && wal.push_commit(&key, &topic, n).is_err() {
            break;
        }
        if !runtime.block_on(wal.wait_durable(ticket)) {
            break;
        }
        acked.push(n);
    }
    acked
}

fn scripted_options(disk: &Arc<SimDisk>) -> WalOptions {
    let mut options = options_on(disk).segment_bytes(400);
    options.max_bytes = 1600;
    options
}

/// What the log holds after `acked` were acknowledged: each of them not deleted by the size
/// bound, in a run without holes, and the latest commit before the last acknowledgement.
fn check_recovered(recovered: &Recovered, acked: &[u64], what: &str) {
    let offsets: Vec<u64> = recovered.records.iter().map(|r| r.offset).collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{what}: holes in {offsets:?}");
    let oldest = offsets.first().copied().unwrap_or(u64::MAX);
    let missing = acked.iter().find(|&&n| n >= oldest && !offsets.contains(&n));
    assert_eq!(missing, None, "{what}: acknowledged and lost ({offsets:?})");
    if let (Some(&last), false) = (acked.last(), acked.is_empty()) {
        assert!(offsets.last().is_some_and(|&l| l >= last), "{what}: {last} lost");
        // A commit pushed before an acknowledged message is durable with it.
        let committed = (last - 1) / 10 * 10;
        let latest = recovered.commits.iter().map(|c| c.offset).next_back().unwrap_or(0);
        assert!(latest >= committed, "{what}: commit {committed} lost (latest {latest})");
    }
}

#[test]
fn power_lost_at_every_operation_of_the_log_loses_nothing_acknowledged() {
    let whole = SimDisk::new();
    assert_eq!(scripted(&scripted_options(&whole)).len(), 30);
    let operations = whole.ops();
    assert!(operations > 60, "{operations} operations");
    for at in 0..=operations {
        let disk = SimDisk::new();
        disk.stop_at(at);
        let acked = scripted(&scripted_options(&disk));
        for seed in 0..4 {
            let restored = disk.power_loss(at * 4 + seed);
            let what = format!("power lost at operation {at} of {operations}, seed {seed}");
            let (wal, recovered) = Wal::open(&scripted_options(&restored)).expect(&what);
            check_recovered(&recovered, &acked, &what);
            drop(wal);
        }
    }
}

#[test]
fn an_operation_failing_at_every_step_loses_nothing_acknowledged() {
    let whole = SimDisk::new();
    scripted(&scripted_options(&whole));
    let operations = whole.ops();
    for kind in [io::ErrorKind::Other, io::ErrorKind::StorageFull] {
        for at in 0..operations {
            let disk = SimDisk::new();
            disk.fail_at(at, kind);
            let acked = scripted(&scripted_options(&disk));
            disk.fail_at(u64::MAX, kind);
            let what = format!("{kind:?} at operation {at} of {operations}");
            // The process starts again on the same disk (nothing lost from the page cache),
            // then the machine loses power too.
            let (wal, recovered) = Wal::open(&scripted_options(&disk)).expect(&what);
            check_recovered(&recovered, &acked, &what);
            drop(wal);
            let restored = disk.power_loss(at);
            let (_, recovered) = Wal::open(&scripted_options(&restored)).expect(&what);
            check_recovered(&recovered, &acked, &format!("{what}, then power lost"));
        }
    }
}

#[test]
fn a_failed_sync_is_never_acknowledged_and_the_broker_says_so() {
    let runtime = runtime();
    let disk = SimDisk::new();
    let broker = broker_on(&disk, FsyncPolicy::Always);
    let receipt = broker.publish_bytes("t/0", "0 1").unwrap();
    assert!(runtime.block_on(broker.durable(&receipt)));
    assert!(broker.store_healthy());
    disk.fail_syncs(true);
    let receipt = broker.publish_bytes("t/0", "0 2").unwrap();
    assert!(!runtime.block_on(broker.durable(&receipt)), "not acknowledged");
    assert!(!broker.store_healthy(), "readiness learns it");
    let refused = broker.publish_bytes("t/0", "0 3").unwrap_err().to_string();
    assert!(refused.contains("restarted"), "publishers learn it: {refused}");
    // Started again on a disk that syncs: the acknowledged message is there.
    drop(broker);
    disk.fail_syncs(false);
    let broker = broker_on(&disk, FsyncPolicy::Always);
    assert_eq!(read_back(&broker, "t/0").first().map(|m| (m.1, m.2)), Some((0, 1)));
}

#[test]
fn a_full_disk_holds_acknowledgements_refuses_publishes_and_recovers_when_it_has_room() {
    let runtime = runtime();
    let disk = SimDisk::new();
    let broker = broker_on(&disk, FsyncPolicy::Always);
    let receipt = broker.publish_bytes("t/0", "0 1").unwrap();
    assert!(runtime.block_on(broker.durable(&receipt)));
    disk.capacity(Some(0));
    let waiting = broker.publish_bytes("t/0", "0 2").unwrap();
    let full = Instant::now();
    while broker.store_healthy() {
        assert!(full.elapsed() < Duration::from_secs(10), "the full disk was noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let refused = broker.publish_bytes("t/0", "0 3").unwrap_err().to_string();
    assert!(refused.contains("full"), "publishers learn it: {refused}");
    let pending = runtime.block_on(async {
        tokio::time::timeout(Duration::from_millis(300), broker.durable(&waiting)).await
    });
    assert!(pending.is_err(), "not acknowledged while the disk is full");
    disk.capacity(None);
    assert!(runtime.block_on(broker.durable(&waiting)), "acknowledged once there is room");
    assert!(broker.store_healthy(), "writing again");
    let receipt = broker.publish_bytes("t/0", "0 4").unwrap();
    assert!(runtime.block_on(broker.durable(&receipt)));
    // What a full disk cut off was written again whole: after a power cut, 1, 2 and 4.
    let restored = disk.power_loss(7);
    drop(broker);
    let broker = broker_on(&restored, FsyncPolicy::Always);
    let read: Vec<u32> = read_back(&broker, "t/0").iter().map(|m| m.2).collect();
    assert_eq!(read, [1, 2, 4]);
}
