//! What the power-loss tests of every store share (tests only): publishers that wait for each
//! acknowledgement on two durable topics until one is refused, a restart on what the disk kept,
//! and the checks — nothing acknowledged lost, each publisher's messages a run without holes,
//! offsets rising.

use std::collections::HashMap;
use std::time::Instant;

use whispeer_proto::{StartAt, Topic};

use crate::Broker;

pub(crate) const PUBLISHERS: u32 = 4;
pub(crate) const TOPICS: [&str; 2] = ["t/0", "t/1"];

/// What one round saw.
pub(crate) struct Round {
    /// (publisher, sequence, when acknowledged).
    pub(crate) acked: Vec<(u32, u32, Instant)>,
    /// When the power went.
    pub(crate) off: Instant,
    /// Per topic, the offset the next message would have had before the power went.
    pub(crate) next_before: HashMap<&'static str, u64>,
    /// Per topic, the same after the restart.
    pub(crate) next_after: HashMap<&'static str, u64>,
    /// Per topic, (offset, publisher, sequence) read back after the restart.
    pub(crate) read: HashMap<&'static str, Vec<(u64, u32, u32)>>,
}

pub(crate) fn next_offsets(broker: &Broker) -> HashMap<&'static str, u64> {
    let next = |topic| broker.history(&Topic::parse(topic).unwrap(), StartAt::Earliest, 1);
    TOPICS.iter().map(|&topic| (topic, next(topic).map_or(1, |page| page.next_offset))).collect()
}

/// (offset, publisher, sequence) of every message of `topic`.
pub(crate) fn read_back(broker: &Broker, topic: &str) -> Vec<(u64, u32, u32)> {
    let topic = Topic::parse(topic).unwrap();
    let page = broker.history(&topic, StartAt::Earliest, 100_000).unwrap();
    let parse = |message: &crate::Message| {
        let text = std::str::from_utf8(message.payload()).unwrap().to_string();
        let (p, s) = text.split_once(' ').unwrap();
        (message.offset().unwrap(), p.parse().unwrap(), s.parse().unwrap())
    };
    page.messages.iter().map(parse).collect()
}

/// Publishers send `each` messages, waiting for each acknowledgement, until one is refused or
/// not acknowledged (the power went); then `restart` cuts the power, drops the broker and
/// starts one on what the disk kept (with when the power went); that one is read back and
/// must take a new message.
pub(crate) fn round(
    runtime: &tokio::runtime::Runtime,
    seed: u64,
    each: u32,
    broker: Broker,
    restart: impl FnOnce(Broker) -> (Broker, Instant),
) -> Round {
    let acked = runtime.block_on(async {
        let publishers = (0..PUBLISHERS).map(|p| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for s in 1..=each {
                    let topic = TOPICS[(p % 2) as usize];
                    let Ok(receipt) = broker.publish_bytes(topic, format!("{p} {s}")) else {
                        break;
                    };
                    if !broker.durable(&receipt).await {
                        break;
                    }
                    acked.push((p, s, Instant::now()));
                }
                acked
            })
        });
        let mut acked = Vec::new();
        for publisher in publishers.collect::<Vec<_>>() {
            acked.extend(publisher.await.unwrap());
        }
        acked
    });
    let next_before = next_offsets(&broker);
    let (broker, off) = restart(broker);
    let read = TOPICS.iter().map(|&topic| (topic, read_back(&broker, topic))).collect();
    let next_after = next_offsets(&broker);
    // The restarted broker takes and acknowledges new messages.
    let receipt = broker.publish_bytes(TOPICS[0], "9 1").unwrap();
    assert!(runtime.block_on(broker.durable(&receipt)), "seed {seed}: durable after a restart");
    Round { acked, off, next_before, next_after, read }
}

impl Round {
    /// Offsets rise, each publisher's messages are in order and once each, and what each
    /// publisher has in the store is a run without holes (a clean prefix).
    pub(crate) fn check_order(&self, seed: u64) {
        for (topic, read) in &self.read {
            assert!(read.windows(2).all(|w| w[0].0 < w[1].0), "seed {seed}: {topic} offsets");
            for p in 0..PUBLISHERS {
                let sequence: Vec<u32> = read.iter().filter(|m| m.1 == p).map(|m| m.2).collect();
                let run = (1..=sequence.len() as u32).collect::<Vec<_>>();
                assert_eq!(sequence, run, "seed {seed}: publisher {p} in {topic}");
            }
        }
    }

    /// The acknowledged messages that were not read back.
    pub(crate) fn lost(&self) -> Vec<(u32, u32, Instant)> {
        let read =
            |p: u32, s: u32| self.read.values().flatten().any(|&(_, rp, rs)| (rp, rs) == (p, s));
        self.acked.iter().filter(|(p, s, _)| !read(*p, *s)).copied().collect()
    }

    /// Asserts that nothing acknowledged was lost and no offset is given twice.
    pub(crate) fn check_kept(&self, seed: u64) {
        let lost = self.lost();
        assert!(lost.is_empty(), "seed {seed}: acknowledged and lost: {:?}", &lost[..1]);
        for topic in TOPICS {
            let (before, after) = (self.next_before[topic], self.next_after[topic]);
            assert!(
                after >= before,
                "seed {seed}: {topic} offsets from {after}, given to {before}"
            );
        }
    }
}
