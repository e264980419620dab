//! The log on a real file system: round trips, torn tails, flipped bytes, segment roll-over.

use std::fs::{self, OpenOptions};
use std::sync::atomic::{AtomicU32, Ordering};

use whispeer_proto::{ContentType, Envelope, Flags, MessageId, Topic};

use super::*;

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("whispeer-wal-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn record(n: u64) -> Record {
    let topic = Topic::parse(&format!("t/{}", n % 3)).unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(format!("message {n}").into_bytes());
    let envelope = Envelope::new(MessageId(u128::from(n)), topic, 1_000 + n, flags, payload);
    Record { offset: n, accepted_ms: 2_000 + n, envelope }
}

fn write(options: &WalOptions, range: std::ops::Range<u64>) -> Recovered {
    let (wal, recovered) = Wal::open(options).unwrap();
    let mut last = 0;
    for n in range {
        last = wal.push(record(n).encode().unwrap());
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(wal.wait_durable(last)));
    drop(wal);
    recovered
}

fn reopen(options: &WalOptions) -> Recovered {
    let (wal, recovered) = Wal::open(options).unwrap();
    drop(wal);
    recovered
}

fn offsets(recovered: &Recovered) -> Vec<u64> {
    recovered.records.iter().map(|r| r.offset).collect()
}

/// A segment file's records: its bytes without the zeroes laid after them.
fn records_of(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    // A record never ends with a zero here: the close mark's kind, a payload's text.
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// Writes `bytes` right after a segment's records, as the writer would have.
fn write_after_records(path: &Path, bytes: &[u8]) {
    let end = records_of(path).len() as u64;
    let file = OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, bytes, end).unwrap();
}

/// A log of `range` in one segment on a real disk: its directory, options and segment, and
/// the segment file's size and its records' length.
fn one_segment(range: std::ops::Range<u64>) -> (TempDir, WalOptions, PathBuf, u64, u64) {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0);
    write(&options, range);
    let path = only_segment(&dir.0);
    let size = fs::metadata(&path).unwrap().len();
    let valid = records_of(&path).len() as u64;
    (dir, options, path, size, valid)
}

fn only_segment(dir: &Path) -> PathBuf {
    let segments = list_segments(&OsDisk, dir).unwrap();
    assert_eq!(segments.len(), 1);
    segments[0].path.clone()
}

#[test]
fn records_survive_a_restart_whole_and_in_order() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0);
    assert!(write(&options, 1..101).records.is_empty());
    let recovered = write(&options, 101..151);
    assert_eq!(offsets(&recovered), (1..101).collect::<Vec<_>>());
    let recovered = reopen(&options);
    assert_eq!(recovered.records.len(), 150);
    assert_eq!(recovered.records[41], record(42), "every field comes back");
    assert_eq!((recovered.truncated_bytes, recovered.skipped_records), (0, 0));
}

#[test]
fn a_torn_tail_is_cut_off_and_the_log_goes_on() {
    let (_dir, options, path, size, valid) = one_segment(1..11);
    let torn = record(11).encode().unwrap();
    write_after_records(&path, &torn[..torn.len() / 2]);
    let recovered = write(&options, 11..13);
    assert_eq!(offsets(&recovered), (1..11).collect::<Vec<_>>());
    // Cut at the last whole record: the torn one and the zeroes after it.
    assert_eq!(recovered.truncated_bytes, size - valid);
    assert_eq!(offsets(&reopen(&options)), (1..13).collect::<Vec<_>>(), "appends after the repair");
}

#[test]
fn a_flipped_byte_in_a_body_loses_that_record_only() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0);
    write(&options, 1..21);
    let path = only_segment(&dir.0);
    let mut bytes = fs::read(&path).unwrap();
    let record_len = record(1).encode().unwrap().len();
    // A byte inside the payload of the eighth record.
    let at = 7 * record_len + record_len - 3;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let recovered = reopen(&options);
    let mut expected: Vec<u64> = (1..21).collect();
    expected.remove(7);
    assert_eq!(offsets(&recovered), expected);
    assert_eq!((recovered.skipped_records, recovered.truncated_bytes), (1, 0));
    assert_eq!(offsets(&reopen(&options)), expected, "the same on every read");
}

#[test]
fn a_length_prefix_beyond_the_limit_is_not_allocated() {
    let (_dir, options, path, size, valid) = one_segment(1..3);
    write_after_records(&path, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1, 2, 3]);
    let recovered = reopen(&options);
    assert_eq!((offsets(&recovered), recovered.truncated_bytes), (vec![1, 2], size - valid));
}

#[test]
fn segments_roll_over_and_damage_in_one_keeps_the_later_ones() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0).segment_bytes(1024);
    write(&options, 1..101);
    let segments = list_segments(&OsDisk, &dir.0).unwrap();
    assert!(segments.len() > 3, "{} segments", segments.len());
    assert_eq!(offsets(&reopen(&options)), (1..101).collect::<Vec<_>>());
    // Cut the second segment inside its last record: that record is lost, nothing else.
    let second = &segments[1];
    let bytes = records_of(&second.path);
    let lost = segments[2].first - 1;
    let record_len = record(lost).encode().unwrap().len();
    fs::write(&second.path, &bytes[..bytes.len() - record_len / 2]).unwrap();
    let recovered = reopen(&options);
    let expected: Vec<u64> = (1..101).filter(|&n| n != lost).collect();
    assert_eq!(offsets(&recovered), expected);
    assert_eq!(recovered.truncated_bytes, (record_len - record_len / 2) as u64);
}

#[test]
fn the_oldest_segments_go_past_the_size_bound() {
    let dir = TempDir::new();
    let mut options = WalOptions::new(&dir.0).segment_bytes(1024);
    options.max_bytes = 4096;
    write(&options, 1..201);
    // At most the bound and one segment more; a file written directly ends on a 4 KiB block.
    let segments = list_segments(&OsDisk, &dir.0).unwrap();
    assert!(segments.len() <= 4096 / 1024 + 1, "{} segments kept", segments.len());
    let lens: Vec<u64> = segments.iter().map(|s| s.len).collect();
    assert!(lens.iter().all(|&len| len <= 4096), "{lens:?}");
    let recovered = reopen(&options);
    assert_eq!(recovered.records.last().map(|r| r.offset), Some(200));
    assert!(recovered.records.len() < 200, "the oldest were deleted");
    assert_eq!(recovered.last_record, 200, "records keep their numbers");
    // New segments after a restart sort after the old ones.
    write(&options, 201..301);
    let recovered = reopen(&options);
    assert_eq!(
        (recovered.last_record, recovered.records.last().map(|r| r.offset)),
        (300, Some(300))
    );
    let offsets = offsets(&recovered);
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "contiguous, in order");
}

#[test]
fn commit_records_come_back_beside_the_messages() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0);
    let (wal, _) = Wal::open(&options).unwrap();
    wal.push(record(1).encode().unwrap());
    let key: GroupKey = ("inbox/+".into(), "phone".into());
    let last = wal.push(encode_commit(&key, "inbox/ada", 1).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(wal.wait_durable(last)));
    drop(wal);
    let recovered = reopen(&options);
    assert_eq!(offsets(&recovered), [1]);
    let commit = Commit { key, topic: Topic::parse("inbox/ada").unwrap(), offset: 1 };
    assert_eq!(recovered.commits, [commit]);
    assert_eq!(recovered.last_record, 2);
}

#[test]
fn a_log_in_use_is_refused() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0);
    let (first, _) = Wal::open(&options).unwrap();
    let err = Wal::open(&options).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    drop(first);
    assert!(Wal::open(&options).is_ok(), "free again once the first is closed");
}

#[test]
fn every_fsync_policy_makes_appends_durable_for_waiters() {
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::EveryN(10),
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        let dir = TempDir::new();
        let options = WalOptions::new(&dir.0).fsync(fsync);
        write(&options, 1..26);
        assert_eq!(reopen(&options).records.len(), 25, "{fsync:?}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn garbage_after_good_records_is_cut_and_never_panics(
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300),
    ) {
        let dir = TempDir::new();
        let options = WalOptions::new(&dir.0);
        write(&options, 1..4);
        let path = only_segment(&dir.0);
        write_after_records(&path, &garbage);
        let recovered = reopen(&options);
        // Garbage cannot carry a valid checksum by chance often enough to matter; when it is
        // cut, the records before it stay.
        proptest::prop_assert!(offsets(&recovered).starts_with(&[1, 2, 3]));
    }
}

fn message(topic: &str, offset: u64) -> Record {
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(vec![b'x'; 100]);
    let topic = Topic::parse(topic).unwrap();
    let envelope = Envelope::new(MessageId(u128::from(offset)), topic, offset, flags, payload);
    Record { offset, accepted_ms: offset, envelope }
}

/// Two topics, `a` and `b`, with offsets 1..=2000 each, interleaved.
fn write_two_topics(options: &WalOptions) {
    let (wal, _) = Wal::open(options).unwrap();
    let mut last = 0;
    for offset in 1..=2000u64 {
        for topic in ["a", "b"] {
            let record = message(topic, offset);
            let framed = record.encode().unwrap();
            last = wal.push_message(&record.envelope.topic, offset, framed);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(wal.wait_durable(last)));
}

fn read(wal: &Wal, topic: &str, from: u64, max: usize) -> Vec<u64> {
    let records = wal
        .read_topic(&Topic::parse(topic).unwrap(), from, PageBound::new(max, usize::MAX))
        .unwrap();
    assert!(records.iter().all(|r| r.envelope.topic.as_str() == topic));
    records.iter().map(|r| r.offset).collect()
}

#[test]
fn one_topic_reads_from_an_offset_across_segments_and_after_a_restart() {
    let dir = TempDir::new();
    let options = WalOptions::new(&dir.0).segment_bytes(16 * 1024);
    write_two_topics(&options);
    assert!(list_segments(&OsDisk, &dir.0).unwrap().len() > 20, "many segments");
    // Reopened: recovery rebuilds the index.
    let (wal, _) = Wal::open(&options).unwrap();
    assert_eq!(read(&wal, "a", 1500, 3), [1500, 1501, 1502]);
    assert_eq!(read(&wal, "b", 1, 2), [1, 2]);
    assert_eq!(read(&wal, "a", 1998, 100), [1998, 1999, 2000], "to the end");
    assert_eq!(read(&wal, "b", 700, 0), Vec::<u64>::new());
    assert!(read(&wal, "c", 1, 10).is_empty(), "a topic the log never held");
    // Appended after the restart: the index keeps up.
    let record = message("a", 2001);
    let ticket = wal.push_message(&record.envelope.topic, 2001, record.encode().unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(wal.wait_durable(ticket)));
    assert_eq!(read(&wal, "a", 2000, 10), [2000, 2001]);
}

#[test]
fn a_read_older_than_the_log_starts_at_its_oldest_segment() {
    let dir = TempDir::new();
    let mut options = WalOptions::new(&dir.0).segment_bytes(16 * 1024);
    options.max_bytes = 64 * 1024;
    write_two_topics(&options);
    let (wal, _) = Wal::open(&options).unwrap();
    let oldest = read(&wal, "a", 1, 1);
    assert!(oldest[0] > 1, "the first segments are gone: {oldest:?}");
    assert_eq!(read(&wal, "a", 2000, 1), [2000]);
}

#[test]
fn commits_outlive_the_segments_that_held_them() {
    let dir = TempDir::new();
    let mut options = WalOptions::new(&dir.0).segment_bytes(2048);
    options.max_bytes = 8 * 1024;
    let (key, other): (GroupKey, GroupKey) = (("#".into(), "g".into()), ("#".into(), "h".into()));
    let topic = Topic::parse("a").unwrap();
    {
        let (wal, _) = Wal::open(&options).unwrap();
        wal.push_commit(&key, &topic, 7).unwrap();
        wal.push_commit(&other, &topic, 9).unwrap();
        wal.push_commit(&other, &topic, 3).unwrap(); // moved back: the latest wins
        let mut last = 0;
        for offset in 1..=500u64 {
            let record = message("a", offset);
            last = wal.push_message(&topic, offset, record.encode().unwrap());
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(runtime.block_on(wal.wait_durable(last)));
    }
    let segments = list_segments(&OsDisk, &dir.0).unwrap();
    assert!(segments[0].first > 4, "the segment with the commits is gone: {}", segments[0].first);
    let recovered = reopen(&options);
    let latest = |group: &GroupKey| {
        recovered.commits.iter().filter(|c| c.key == *group).map(|c| c.offset).next_back()
    };
    assert_eq!((latest(&key), latest(&other)), (Some(7), Some(3)));
    // Checkpoints are not numbered records: numbering goes on from the last message.
    assert_eq!(recovered.last_record, 503);
    let (wal, _) = Wal::open(&options).unwrap();
    assert_eq!(read(&wal, "a", 500, 5), [500]);
}

#[test]
fn zeroes_laid_ahead_end_the_records_and_writing_goes_on_after_them() {
    let (dir, options, path, size, valid) = one_segment(1..11);
    assert!(size >= valid + writer::ZERO_AHEAD / 2, "{size} bytes for {valid} of records");
    let recovered = write(&options, 11..21);
    assert!(recovered.clean && recovered.truncated_bytes == 0, "zeroes are no damage");
    let recovered = reopen(&options);
    assert_eq!(offsets(&recovered), (1..21).collect::<Vec<_>>(), "written after the records");
    assert!(recovered.clean);
    assert_eq!(only_segment(&dir.0), path, "the same segment");
}

#[test]
fn bytes_past_the_zeroes_are_damage_and_cut_off() {
    let (_dir, options, path, size, valid) = one_segment(1..11);
    // A record of an earlier write that landed past a torn one: never read after the zeroes,
    // and gone before new records could reach it.
    let stray = record(12).encode().unwrap();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &stray, size - stray.len() as u64).unwrap();
    drop(file);
    let recovered = write(&options, 11..12);
    assert_eq!(offsets(&recovered), (1..11).collect::<Vec<_>>());
    assert_eq!(recovered.truncated_bytes, size - valid);
    assert!(!recovered.clean);
    assert_eq!(offsets(&reopen(&options)), (1..12).collect::<Vec<_>>());
}
