//! Damage, exhaustively, on the simulated disk: a segment cut at every length, 10,000 random
//! bit flips, zeroed tails and a resurrected old segment. For each: no damaged record is read
//! as valid, nothing is lost but the damaged record, and numbering goes on past everything
//! kept.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whispeer_proto::{ContentType, Envelope, Flags, MessageId, Topic};

use super::sim::SimDisk;
use super::*;

fn message(n: u64) -> Record {
    let topic = Topic::parse(&format!("t/{}", n % 3)).unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(format!("message {n} {}", "x".repeat((n % 7) as usize * 9)));
    let envelope = Envelope::new(MessageId(u128::from(n)), topic, 1_000 + n, flags, payload);
    Record { offset: n, accepted_ms: 2_000 + n, envelope }
}

pub(super) fn options_on(disk: &Arc<SimDisk>) -> WalOptions {
    let mut options = WalOptions::new("wal");
    options.disk = Arc::new(Arc::clone(disk));
    options
}

/// A log of `count` messages in one segment, closed cleanly: the disk, the segment's path and
/// bytes, and where each message's record ends.
fn one_segment(count: u64) -> (Arc<SimDisk>, PathBuf, Vec<u8>, Vec<usize>) {
    let disk = SimDisk::new();
    let options = options_on(&disk);
    let (wal, _) = Wal::open(&options).unwrap();
    let mut last = 0;
    let mut ends = Vec::new();
    let mut end = 0;
    for n in 1..=count {
        let framed = message(n).encode().unwrap();
        end += framed.len();
        ends.push(end);
        last = wal.push_message(&message(n).envelope.topic, n, framed);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(wal.wait_durable(last)));
    drop(wal);
    let segments = list_segments(&*options.disk, &options.dir).unwrap();
    let path = segments[0].path.clone();
    let mut bytes = disk.contents(&path).unwrap();
    // The segment's records, without the zeroes laid after them (the close mark ends in its
    // kind, never a zero).
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    (disk, path, bytes, ends)
}

fn recover_now(disk: &Arc<SimDisk>) -> Recovered {
    let options = options_on(disk);
    recover(&*options.disk, &options.dir, &TopicIndex::default()).unwrap().0
}

/// Every record recovered is one that was written, unchanged, in order, and the ones missing
/// are at most those in `lost`.
fn check(recovered: &Recovered, count: u64, lost: &[u64], what: &str) {
    let mut expected = 1..=count;
    for record in &recovered.records {
        let n = expected.find(|n| *n == record.offset || !lost.contains(n));
        assert_eq!(Some(record.offset), n, "{what}: a record missing or out of order");
        assert_eq!(*record, message(record.offset), "{what}: a damaged record read as valid");
    }
    if let Some(n) = expected.find(|n| !lost.contains(n)) {
        panic!("{what}: record {n} lost beyond the damage");
    }
}

#[test]
fn a_segment_cut_at_every_length_keeps_every_whole_record() {
    let (disk, path, bytes, ends) = one_segment(40);
    for cut in 0..=bytes.len() {
        disk.overwrite(&path, bytes[..cut].to_vec());
        let recovered = recover_now(&disk);
        let whole = ends.iter().filter(|&&end| end <= cut).count() as u64;
        let offsets: Vec<u64> = recovered.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (1..=whole).collect::<Vec<_>>(), "cut at {cut}");
        check(&recovered, whole, &[], &format!("cut at {cut}"));
        let kept = match whole {
            _ if cut == bytes.len() => cut,
            0 => 0,
            whole => ends[whole as usize - 1],
        };
        // Zeroes after the last whole record are where the records end, not damage (the
        // first bytes of a header, a short length's, may be zeroes).
        let cut_off = if bytes[kept..cut].iter().all(|&b| b == 0) { 0 } else { cut - kept };
        assert_eq!(recovered.truncated_bytes, cut_off as u64, "cut at {cut}");
        assert_eq!(recovered.clean, cut == bytes.len(), "clean only when whole, at {cut}");
        // A cut log numbers on from its last whole record: no number is given twice.
        assert_eq!(recovered.last_record, whole, "cut at {cut}");
    }
}

#[test]
fn ten_thousand_bit_flips_lose_at_most_the_flipped_record() {
    let (disk, path, bytes, ends) = one_segment(60);
    let seed = 0x5eed_f11b;
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut repaired, mut skipped) = (0, 0);
    for round in 0..10_000 {
        let at = rng.random_range(0..bytes.len());
        let bit = rng.random_range(0..8);
        let mut damaged = bytes.clone();
        damaged[at] ^= 1 << bit;
        disk.overwrite(&path, damaged);
        let recovered = recover_now(&disk);
        // The record the flip is in (none when it is in the close mark).
        let hit = ends.iter().position(|&end| at < end).map(|i| i as u64 + 1);
        let what = format!("flip {round} at byte {at} bit {bit} (seed {seed:#x})");
        check(&recovered, 60, hit.as_slice(), &what);
        repaired += recovered.repaired_records;
        skipped += recovered.skipped_records;
        assert!(
            recovered.truncated_bytes == 0 || hit.is_none(),
            "{what}: only a close mark is cut"
        );
    }
    // Flips in headers are repaired; flips in bodies skip their record.
    assert!(repaired > 0 && skipped > 0, "{repaired} repaired, {skipped} skipped");
}

#[test]
fn a_zeroed_tail_keeps_every_record_before_it() {
    let (disk, path, bytes, ends) = one_segment(30);
    for from in (0..bytes.len()).step_by(7) {
        let mut damaged = bytes.clone();
        damaged[from..].fill(0);
        disk.overwrite(&path, damaged);
        let recovered = recover_now(&disk);
        let whole = ends.iter().filter(|&&end| end <= from).count() as u64;
        check(&recovered, whole, &[], &format!("zeroes from {from}"));
        assert_eq!(recovered.records.len() as u64, whole, "zeroes from {from}");
    }
}

#[test]
fn a_resurrected_old_segment_neither_repeats_nor_reuses_numbers() {
    let disk = SimDisk::new();
    let mut options = options_on(&disk).segment_bytes(1024);
    options.max_bytes = 4096;
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let write = |range: std::ops::RangeInclusive<u64>| {
        let (wal, _) = Wal::open(&options).unwrap();
        let mut last = 0;
        for n in range {
            last = wal.push_message(&message(n).envelope.topic, n, message(n).encode().unwrap());
        }
        assert!(runtime.block_on(wal.wait_durable(last)));
    };
    write(1..=20);
    let first = list_segments(&*options.disk, &options.dir).unwrap().remove(0);
    let old = disk.contents(&first.path).unwrap();
    write(21..=200);
    let segments = list_segments(&*options.disk, &options.dir).unwrap();
    assert!(segments[0].first > first.first, "the first segment was deleted");
    // Its removal was never synced: the power goes and it comes back.
    let mut file = options.disk.open(&first.path, true).unwrap();
    file.write_at(&old, 0).unwrap();
    file.sync_data().unwrap();
    let recovered = recover_now(&disk);
    let offsets: Vec<u64> = recovered.records.iter().map(|r| r.offset).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order, none twice: {offsets:?}");
    assert_eq!(recovered.last_record, 200, "numbering goes on from the newest segment");
    write(201..=210);
    let recovered = recover_now(&disk);
    assert_eq!(recovered.records.last().map(|r| r.offset), Some(210));
    assert_eq!(recovered.last_record, 210);
}
