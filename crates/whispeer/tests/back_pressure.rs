//! `SlowConsumer::BackPressure`: a publisher that waits for room (`Broker::room`) keeps to its
//! slowest subscriber's pace and nothing is dropped; a subscriber that makes no room within
//! the timeout is closed and the publisher goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{sleep, timeout};
use whispeer::proto::{Envelope, Flags};
use whispeer::{
    Broker, BrokerOptions, MessageId, PushBatch, Qos, SlowConsumer, SubscribeOptions, Topic,
};

const CAPACITY: usize = 16;

/// Publishes `count` numbered messages to "jobs", waiting for room after each, to a subscriber
/// of `policy` that pauses every 50 messages; returns what it received, the most it ever found
/// queued, and the broker.
async fn slow_subscriber(policy: SlowConsumer, count: u32) -> (Vec<u32>, usize, Broker) {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let options = SubscribeOptions::new("jobs").capacity(CAPACITY).slow_consumer(policy);
    let mut sub = broker.messages(options).expect("subscribed");
    let most_queued = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let most_queued = Arc::clone(&most_queued);
        async move {
            let mut got = Vec::new();
            while let Ok(Some(message)) =
                timeout(Duration::from_millis(500), sub.recv_message()).await
            {
                most_queued.fetch_max(sub.stats().queued, Ordering::Relaxed);
                let bytes: [u8; 4] = message.payload()[..].try_into().expect("four bytes");
                got.push(u32::from_be_bytes(bytes));
                if got.len().is_multiple_of(50) {
                    sleep(Duration::from_millis(2)).await;
                }
            }
            got
        }
    });
    for n in 0..count {
        broker.publish_bytes("jobs", n.to_be_bytes().to_vec()).expect("published");
        broker.room().wait().await;
    }
    let got = reader.await.expect("reader");
    (got, most_queued.load(Ordering::Relaxed), broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_waits_for_room_keeps_to_a_slow_subscribers_pace_and_loses_nothing() {
    let (got, most, broker) = slow_subscriber(SlowConsumer::BackPressure, 2000).await;
    assert_eq!(got, (0..2000).collect::<Vec<_>>(), "every message, in order");
    let stats = broker.stats();
    assert_eq!((stats.dropped_oldest, stats.disconnected), (0, 0));
    assert!(stats.held_back > 0, "the publisher was held back: {stats:?}");
    // The queue stays within its bound and the one message that found it full.
    assert!(most <= CAPACITY + 1, "{most} queued at most");

    // The same run under the default policy drops: what the wait prevents.
    let (got, _, broker) = slow_subscriber(SlowConsumer::DropOldest, 2000).await;
    assert!(got.len() < 2000 && broker.stats().dropped_oldest > 0, "{} received", got.len());
    assert_eq!(broker.stats().held_back, 0);
}

#[tokio::test]
async fn a_subscriber_that_makes_no_room_in_time_is_closed_and_the_publisher_goes_on() {
    let mut options = BrokerOptions::default();
    options.back_pressure_timeout = Duration::from_millis(100);
    let broker = Broker::builder(options).build();
    let stalled =
        SubscribeOptions::new("jobs").capacity(4).slow_consumer(SlowConsumer::BackPressure);
    let mut stalled = broker.messages(stalled).expect("subscribed");
    for n in 0..4u8 {
        broker.publish_bytes("jobs", vec![n]).expect("published");
    }
    let room = broker.room();
    assert!(!room.is_empty(), "the fourth message filled the queue");
    let closed = timeout(Duration::from_secs(5), room.wait()).await.expect("within the timeout");
    assert_eq!(closed, 1);
    let stats = broker.stats();
    assert_eq!((stats.disconnected, stats.held_back, stats.dropped_oldest), (1, 1, 0));
    // Closed: the subscriber's stream ends, and publishing goes on unheld.
    assert!(stalled.recv_message().await.is_none());
    broker.publish_bytes("jobs", vec![9]).expect("published");
    assert!(broker.room().is_empty());
}

#[tokio::test]
async fn a_reads_batch_notes_the_queues_it_filled_and_room_is_found_once_they_are_read() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let options =
        SubscribeOptions::new("jobs").capacity(4).slow_consumer(SlowConsumer::BackPressure);
    let mut sub = broker.messages(options).expect("subscribed");
    let topic = Topic::parse("jobs").expect("topic");
    {
        let _batch = PushBatch::begin();
        for n in 0..6u8 {
            let id = MessageId(u128::from(n) + 1);
            let envelope = Envelope::new(id, topic.clone(), 0, Flags(0), Bytes::from(vec![n]));
            broker.publish_envelope(envelope).expect("published");
        }
        // Held back with the batch: nothing is pushed, nothing noted yet.
        assert!(broker.room().is_empty());
    }
    let room = broker.room();
    assert!(!room.is_empty(), "six queued against a bound of four");
    let waiter = tokio::spawn(room.wait());
    sleep(Duration::from_millis(30)).await;
    assert!(!waiter.is_finished(), "no room yet");
    for n in 0..6u8 {
        assert_eq!(sub.recv_message().await.expect("message").payload()[..], [n]);
    }
    let closed = timeout(Duration::from_secs(5), waiter).await.expect("room found");
    assert_eq!(closed.expect("waiter"), 0);
    assert_eq!(broker.stats().dropped_oldest, 0);
}

#[tokio::test]
async fn under_back_pressure_a_qos1_subscriber_holds_its_publisher_back_instead_of_refusing() {
    let mut options = BrokerOptions::default();
    options.slow_consumer = SlowConsumer::BackPressure;
    let broker = Broker::builder(options).build();
    let sub = SubscribeOptions::new("orders").capacity(2).qos(Qos::AtLeastOnce);
    let _sub = broker.messages(sub).expect("subscribed");
    for n in 0..3u8 {
        broker.publish_bytes("orders", vec![n]).expect("queued, not refused");
    }
    assert!(!broker.room().is_empty());
    assert_eq!(broker.stats().rejected_full, 0);
}
