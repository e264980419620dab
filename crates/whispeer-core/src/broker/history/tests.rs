//! Reading history in pages, from memory and the store, and moving durable subscriptions.

use std::time::Duration;

use super::*;
use crate::store::conformance::Scratch;
use crate::{BrokerOptions, Persistence, Qos, Retention, SubscribeOptions};

fn retaining(filter: &str, rule: Retention) -> BrokerOptions {
    BrokerOptions { retention: vec![(Filter::parse(filter).unwrap(), rule)], ..Default::default() }
}

fn offsets(page: &HistoryPage) -> Vec<u64> {
    page.messages.iter().map(|m| m.offset().unwrap()).collect()
}

#[tokio::test]
async fn history_reads_in_pages_to_the_end() {
    let broker = Broker::builder(retaining("log/#", Retention::messages(6))).build();
    let topic = Topic::parse("log/a").unwrap();
    for n in 0..10u32 {
        broker.publish(topic.as_str(), &n).unwrap();
    }
    let page = broker.history(&topic, StartAt::Earliest, 4).unwrap();
    assert_eq!((page.first_offset, page.next_offset), (5, 11));
    assert_eq!(offsets(&page), [5, 6, 7, 8]);
    assert_eq!(page.next_from(), Some(9));
    let last = broker.history(&topic, StartAt::Offset(9), 4).unwrap();
    assert_eq!(offsets(&last), [9, 10]);
    assert_eq!(last.next_from(), None, "the end of history");
    assert_eq!(last.messages[1].decode::<u32>().unwrap(), 9);

    let evicted = broker.history(&topic, StartAt::Offset(2), 4).unwrap_err();
    assert!(matches!(evicted, HistoryError::OffsetEvicted { requested: 2, first: 5 }));
    let other = Topic::parse("other").unwrap();
    assert!(matches!(
        broker.history(&other, StartAt::Earliest, 4),
        Err(HistoryError::NotRetained(_))
    ));
}

#[tokio::test]
async fn a_durable_topic_reads_from_its_store_beyond_memory() {
    let broker = Broker::builder(retaining("d/#", Retention::messages(3)))
        .with(Persistence::memory())
        .build();
    let topic = Topic::parse("d/x").unwrap();
    for n in 0..8u32 {
        broker.publish(topic.as_str(), &n).unwrap();
    }
    let page = broker.history(&topic, StartAt::Earliest, 100).unwrap();
    assert_eq!(page.first_offset, 6, "memory holds the last three");
    assert_eq!(offsets(&page), (1..=8).collect::<Vec<_>>(), "the store has the rest, once each");
    let middle = broker.history(&topic, StartAt::Offset(4), 3).unwrap();
    assert_eq!(offsets(&middle), [4, 5, 6]);
}

#[tokio::test]
async fn rewinding_a_durable_subscription_delivers_again_from_there() {
    let options = BrokerOptions {
        group_linger: Duration::from_secs(60),
        ..retaining("jobs/#", Retention::messages(100))
    };
    let broker = Broker::builder(options).build();
    let filter = Filter::parse("jobs/#").unwrap();
    let group = SubscribeOptions::new("jobs/#").qos(Qos::AtLeastOnce).group("workers");
    let mut member = broker.subscription::<u32>(group.clone()).unwrap();
    for n in 1..=5u32 {
        broker.publish("jobs/a", &n).unwrap();
    }
    for n in 1..=5u32 {
        let delivery = member.recv_delivery().await.unwrap();
        assert_eq!(*delivery.value(), n);
        assert!(delivery.ack());
    }
    let active = broker.rewind(&filter, "workers", StartAt::Offset(2)).unwrap_err();
    assert!(matches!(active, HistoryError::Active { members: 1, .. }), "{active}");
    drop(member);

    let moved = broker.rewind(&filter, "workers", StartAt::Offset(2)).unwrap();
    assert_eq!(moved, [(Topic::parse("jobs/a").unwrap(), 2)]);
    broker.publish("jobs/a", &6u32).unwrap();
    let mut member = broker.subscription::<u32>(group).unwrap();
    for n in 2..=6u32 {
        let delivery = member.recv_delivery().await.unwrap();
        assert_eq!(*delivery.value(), n, "from the new position, then what came after");
        assert!(delivery.ack());
    }
    let lag = broker.durable_subscriptions();
    assert_eq!((lag[0].committed, lag[0].lag), (6, 0));

    let unknown = broker.rewind(&filter, "nobody", StartAt::Earliest).unwrap_err();
    assert!(matches!(unknown, HistoryError::NoSuchGroup { .. }), "{unknown}");
}

#[tokio::test]
async fn a_rewind_holds_across_a_restart() {
    let scratch = Scratch::new("rewind");
    let open = || {
        let options = retaining("jobs/#", Retention::messages(100));
        Broker::builder(options).with(Persistence::wal(&scratch.0)).build()
    };
    let group = SubscribeOptions::new("jobs/#").qos(Qos::AtLeastOnce).group("workers");
    let filter = Filter::parse("jobs/#").unwrap();
    {
        let broker = open();
        let mut member = broker.subscription::<u32>(group.clone()).unwrap();
        for n in 1..=4u32 {
            let receipt = broker.publish("jobs/a", &n).unwrap();
            assert!(broker.durable(&receipt).await);
        }
        for _ in 1..=4 {
            assert!(member.recv_delivery().await.unwrap().ack());
        }
        drop(member);
        broker.rewind(&filter, "workers", StartAt::Offset(3)).unwrap();
    }
    let broker = open();
    let mut member = broker.subscription::<u32>(group).unwrap();
    for n in 3..=4u32 {
        let next = tokio::time::timeout(Duration::from_secs(10), member.recv_delivery()).await;
        assert_eq!(*next.unwrap().unwrap().value(), n, "the rewound position");
    }
}

#[tokio::test]
async fn a_page_ends_early_past_its_byte_bound() {
    let broker = Broker::builder(retaining("big", Retention::messages(20))).build();
    let topic = Topic::parse("big").unwrap();
    let megabyte = 1 << 20;
    for _ in 0..10 {
        broker.publish_bytes("big", vec![0u8; megabyte]).unwrap();
    }
    let page = broker.history(&topic, StartAt::Earliest, 100).unwrap();
    assert_eq!(page.messages.len(), HISTORY_PAGE_BYTES / megabyte);
    assert_eq!(page.next_from(), Some(9));
    let rest = broker.history(&topic, StartAt::Offset(9), 100).unwrap();
    assert_eq!((offsets(&rest), rest.next_from()), (vec![9, 10], None));
}

#[tokio::test]
async fn a_group_lingers_for_its_own_time_and_ending_it_drops_what_it_queued() {
    // The broker's linger is zero: only the group's own keeps it.
    let options = BrokerOptions { group_linger: Duration::ZERO, ..BrokerOptions::default() };
    let broker = Broker::builder(options).build();
    let filter = Filter::parse("dev/#").unwrap();
    let group = SubscribeOptions::new("dev/#")
        .qos(Qos::AtLeastOnce)
        .group("session")
        .linger(Duration::from_secs(3600));
    let member = broker.subscription::<u32>(group.clone()).unwrap();
    drop(member);
    broker.publish("dev/a", &1u32).unwrap();
    let mut member = broker.subscription::<u32>(group.clone()).unwrap();
    let kept = tokio::time::timeout(Duration::from_secs(5), member.recv_delivery()).await;
    assert_eq!(*kept.unwrap().unwrap().value(), 1, "queued while the group lingered");

    let active = broker.end_group(&filter, "session").unwrap_err();
    assert!(matches!(active, HistoryError::Active { members: 1, .. }), "{active}");
    drop(member);
    broker.publish("dev/a", &2u32).unwrap();
    assert!(broker.end_group(&filter, "session").unwrap(), "the lingering group ended");
    assert!(!broker.end_group(&filter, "session").unwrap(), "nothing left to end");
    let mut member = broker.subscription::<u32>(group).unwrap();
    broker.publish("dev/a", &3u32).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), member.recv_delivery()).await;
    assert_eq!(*next.unwrap().unwrap().value(), 3, "what the ended group queued is gone");

    // Without a linger of its own, the broker's (zero) removes the group with its member.
    let plain = SubscribeOptions::new("dev/#").qos(Qos::AtLeastOnce).group("plain");
    drop(broker.subscription::<u32>(plain).unwrap());
    assert!(!broker.end_group(&filter, "plain").unwrap());
}
