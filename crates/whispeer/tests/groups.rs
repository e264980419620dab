//! QoS 0 queue groups deal each push over their members: a burst is shared evenly among
//! members that keep up, a slow member still gets its share, and a member that stops taking
//! holds up at most its credit (8,192 messages), which goes to the others when it leaves. A
//! group its slow-consumer policy closed is started anew by the next member to join.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use whispeer::{Broker, BrokerOptions, Qos, SlowConsumer, SubscribeOptions, Subscription};

/// Waits (up to 10 s) until `count` reads `goal`.
async fn reaches(count: &AtomicU64, goal: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::Acquire) < goal {
        assert!(Instant::now() < deadline, "{} of {goal}", count.load(Ordering::Acquire));
        sleep(Duration::from_millis(2)).await;
    }
}

/// A group member reading its stream in a task of its own, `pause` after each message.
fn member(broker: &Broker, pause: Duration) -> Arc<AtomicU64> {
    let mut sub =
        broker.subscription::<u32>(SubscribeOptions::new("jobs").group("w")).expect("subscribed");
    let got = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&got);
    tokio::spawn(async move {
        while sub.recv().await.is_some() {
            count.fetch_add(1, Ordering::Release);
            if !pause.is_zero() {
                sleep(pause).await;
            }
        }
    });
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_dealt_evenly_and_a_slow_member_gets_its_share() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    // One member takes a millisecond a message, the other nothing: taken as they come, the
    // quick one would have nearly all of the burst.
    let slow = member(&broker, Duration::from_millis(1));
    let quick = member(&broker, Duration::ZERO);
    sleep(Duration::from_millis(20)).await;
    for n in 0..200u32 {
        broker.publish("jobs", &n).unwrap();
    }
    let all = async {
        while slow.load(Ordering::Acquire) + quick.load(Ordering::Acquire) < 200 {
            sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(Duration::from_secs(10), all).await.expect("every message delivered");
    assert_eq!(slow.load(Ordering::Acquire) + quick.load(Ordering::Acquire), 200);
    // Dealt in turn: a hundred each (give or take a few that the quick member may take while
    // the slow one's count of what it took is on its way back to the queue).
    let share = slow.load(Ordering::Acquire);
    assert!((90..=110).contains(&share), "the slow member's share: {share} of 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_taking_holds_up_only_its_credit_until_it_leaves() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let taking = member(&broker, Duration::ZERO);
    // A member whose stream is never read.
    let stopped = broker.subscription::<u32>(SubscribeOptions::new("jobs").group("w")).unwrap();
    sleep(Duration::from_millis(20)).await;
    let total: u32 = 2 * 8192 + 10;
    for n in 0..total {
        broker.publish("jobs", &n).unwrap();
    }
    // Every other message is dealt to the stopped member, which is owed at most 8,192: the
    // rest reach the member that takes.
    reaches(&taking, u64::from(total) - 8192).await;
    sleep(Duration::from_millis(100)).await;
    assert_eq!(taking.load(Ordering::Acquire), u64::from(total) - 8192, "only its credit held");
    // Leaving, it gives what it was owed to the others.
    drop(stopped);
    reaches(&taking, u64::from(total)).await;
}

/// A QoS 1 group "w" on "orders" of two messages under `policy`, lingering a minute.
fn closing_group(broker: &Broker, policy: SlowConsumer) -> Subscription<u32> {
    let options = SubscribeOptions::new("orders")
        .group("w")
        .qos(Qos::AtLeastOnce)
        .capacity(2)
        .slow_consumer(policy);
    broker.subscription::<u32>(options).expect("subscribed")
}

#[tokio::test]
async fn a_group_its_policy_closed_is_started_anew_by_the_next_member() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let mut first = closing_group(&broker, SlowConsumer::Disconnect);
    let mut second = closing_group(&broker, SlowConsumer::Disconnect);
    // Nobody reads: the third message finds the queue full and closes the group.
    for n in 0..3u32 {
        let _ = broker.publish("orders", &n);
    }
    assert_eq!(broker.stats().disconnected, 1);
    assert!(first.recv().await.is_none() && second.recv().await.is_none(), "closed");
    // A member joining while the closed group's members are still there starts a new group.
    let mut third = closing_group(&broker, SlowConsumer::Disconnect);
    broker.publish("orders", &10u32).unwrap();
    let got = timeout(Duration::from_secs(5), third.recv()).await.expect("delivered");
    assert_eq!(got, Some(10));
    // The closed group's members leave it, not the new one.
    drop((first, second));
    broker.publish("orders", &11u32).unwrap();
    assert_eq!(timeout(Duration::from_secs(5), third.recv()).await.expect("delivered"), Some(11));
    // Once the new one closes and its member has gone (lingering), the next starts another.
    drop(third);
    let lingering = closing_group(&broker, SlowConsumer::Disconnect);
    for n in 0..3u32 {
        let _ = broker.publish("orders", &n);
    }
    drop(lingering);
    let mut fourth = closing_group(&broker, SlowConsumer::Disconnect);
    broker.publish("orders", &12u32).unwrap();
    assert_eq!(timeout(Duration::from_secs(5), fourth.recv()).await.expect("delivered"), Some(12));
}
