//! End-to-end behaviour of the embedded broker through its public API.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;
use whispeer::{
    Broker, BrokerOptions, Codec, Plugin, PublishError, Rejection, SlowConsumer, SubscribeError,
    SubscribeOptions,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MyData {
    name: String,
    id: i32,
}

fn data(id: i32) -> MyData {
    MyData { name: format!("item-{id}"), id }
}

fn broker() -> Broker {
    Broker::builder(BrokerOptions::default()).build()
}

/// Guards an await so a broken test fails instead of hanging.
async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(10), f).await.expect("timed out waiting")
}

#[tokio::test]
async fn sync_callback_receives_typed_values() {
    let broker = broker();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _a = broker.subscribe("some-event", move |d: MyData| tx.send(d).unwrap()).unwrap();
    broker.publish("some-event", &data(1)).unwrap();
    broker.publish::<MyData>("some-event", &data(2)).unwrap();
    assert_eq!(soon(rx.recv()).await, Some(data(1)));
    assert_eq!(soon(rx.recv()).await, Some(data(2)));
}

#[tokio::test]
async fn turbofish_subscribe_and_async_callback() {
    let broker = broker();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tx2 = tx.clone();
    let _b = broker
        .subscribe::<MyData>("sensor/+/temperature", move |d| tx.send(("sync", d)).unwrap())
        .unwrap();
    let _c = broker
        .subscribe_async("chat/#", move |d: MyData| {
            let tx = tx2.clone();
            async move {
                tokio::task::yield_now().await;
                tx.send(("async", d)).unwrap();
            }
        })
        .unwrap();
    broker.publish("sensor/k1/temperature", &data(1)).unwrap();
    broker.publish("sensor/k1/humidity", &data(2)).unwrap();
    broker.publish("chat", &data(3)).unwrap();
    let mut got = vec![soon(rx.recv()).await.unwrap(), soon(rx.recv()).await.unwrap()];
    got.sort_by_key(|(_, d)| d.id);
    assert_eq!(got, [("sync", data(1)), ("async", data(3))]);
}

#[tokio::test]
async fn pull_subscription_is_a_stream() {
    let broker = broker();
    let mut s = broker.subscription::<MyData>("orders/*").unwrap();
    for i in 0..3 {
        broker.publish(&format!("orders/{i}"), &data(i)).unwrap();
    }
    broker.publish("orders/1/extra", &data(99)).unwrap();
    assert_eq!(soon(s.recv()).await, Some(data(0)));
    assert_eq!(soon(s.next()).await, Some(data(1)));
    assert_eq!(s.try_recv(), Some(data(2)));
    assert_eq!(s.try_recv(), None);
}

#[tokio::test]
async fn raw_messages_carry_topic_id_and_shared_payload() {
    let broker = broker();
    let mut a = broker.messages("fan/#").unwrap();
    let mut b = broker.messages("fan/out").unwrap();
    let receipt = broker.publish("fan/out", &data(7)).unwrap();
    assert_eq!(receipt.subscribers, 2);
    let (ma, mb) = (soon(a.recv()).await.unwrap(), soon(b.recv()).await.unwrap());
    assert_eq!(ma.topic().as_str(), "fan/out");
    assert_eq!((ma.id(), mb.id()), (receipt.id, receipt.id));
    // Encoded once: both subscribers hold the very same bytes.
    assert_eq!(ma.payload().as_ptr(), mb.payload().as_ptr());
    assert_eq!(ma.decode::<MyData>().unwrap(), data(7));
}

#[tokio::test]
async fn publish_bytes_reaches_raw_subscribers_and_fails_typed_decode() {
    let broker = broker();
    let mut raw = broker.messages("bytes").unwrap();
    let mut typed = broker.subscription::<MyData>("bytes").unwrap();
    broker.publish_bytes("bytes", &b"\x00\x01"[..]).unwrap();
    broker.publish("bytes", &data(1)).unwrap();
    assert_eq!(&soon(raw.recv()).await.unwrap().payload()[..], b"\x00\x01");
    // The raw message is skipped by the typed subscriber and counted.
    assert_eq!(soon(typed.recv()).await, Some(data(1)));
    assert_eq!(typed.stats().decode_errors, 1);
}

#[tokio::test]
async fn undecodable_messages_are_counted_not_fatal() {
    let broker = broker();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = broker.subscribe("mixed", move |d: MyData| tx.send(d).unwrap()).unwrap();
    broker.publish("mixed", &vec![0xffu8; 4]).unwrap();
    broker.publish("mixed", &data(5)).unwrap();
    assert_eq!(soon(rx.recv()).await, Some(data(5)));
    assert_eq!(sub.stats().decode_errors, 1);
    assert_eq!(broker.stats().decode_errors, 1);
}

#[tokio::test]
async fn json_codec_writes_json_payloads() {
    let mut options = BrokerOptions::default();
    options.codec = Codec::Json;
    let broker = Broker::builder(options).build();
    let mut raw = broker.messages("j").unwrap();
    let mut typed = broker.subscription::<MyData>("j").unwrap();
    broker.publish("j", &data(3)).unwrap();
    let message = soon(raw.recv()).await.unwrap();
    assert_eq!(&message.payload()[..], br#"{"name":"item-3","id":3}"#);
    assert_eq!(soon(typed.recv()).await, Some(data(3)));
}

#[tokio::test]
async fn bound_topic_refuses_other_types() {
    let broker = broker();
    let orders = broker.topic::<MyData>("orders").unwrap();
    let mut s = orders.subscription().unwrap();
    orders.publish(&data(1)).unwrap();
    assert_eq!(soon(s.recv()).await, Some(data(1)));

    let err = broker.publish("orders", &"not an order".to_string()).unwrap_err();
    assert!(matches!(err, PublishError::WrongType { .. }), "{err:?}");
    assert!(matches!(broker.publish_bytes("orders", "x"), Err(PublishError::WrongType { .. })));
    let err = broker.subscription::<String>("orders").unwrap_err();
    assert!(matches!(err, SubscribeError::WrongType { .. }), "{err:?}");
    assert!(broker.topic::<String>("orders").is_err());
    assert!(broker.topic::<MyData>("orders").is_ok());
    // Raw and wildcard subscribers are not typed by the binding.
    assert!(broker.messages("orders").is_ok());
    assert!(broker.subscription::<String>("orders/#").is_ok());
}

#[tokio::test]
async fn invalid_and_reserved_topics_are_refused() {
    let broker = broker();
    assert!(matches!(broker.publish("a//b", &1), Err(PublishError::InvalidTopic(_))));
    assert!(matches!(broker.publish("a/+", &1), Err(PublishError::InvalidTopic(_))));
    assert!(matches!(broker.publish("$sys/x", &1), Err(PublishError::ReservedTopic(_))));
    assert!(matches!(broker.subscription::<u8>("a/#/b"), Err(SubscribeError::InvalidFilter(_))));
    let zero = SubscribeOptions::new("a").capacity(0);
    assert!(matches!(broker.subscription::<u8>(zero), Err(SubscribeError::InvalidCapacity { .. })));
}

#[tokio::test]
async fn oversized_message_is_refused_before_routing() {
    let mut options = BrokerOptions::default();
    options.limits.max_message_bytes = 16;
    let broker = Broker::builder(options).build();
    let mut s = broker.messages("big").unwrap();
    let err = broker.publish_bytes("big", vec![0u8; 17]).unwrap_err();
    assert!(matches!(err, PublishError::TooLarge { len: 17, max: 16 }));
    assert!(s.try_recv().is_none());
}

fn small(filter: &str, policy: SlowConsumer) -> SubscribeOptions {
    SubscribeOptions::new(filter).capacity(2).slow_consumer(policy)
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest() {
    let broker = broker();
    let mut s = broker.subscription::<i32>(small("q", SlowConsumer::DropOldest)).unwrap();
    for i in 1..=5 {
        broker.publish("q", &i).unwrap();
    }
    assert_eq!((s.try_recv(), s.try_recv(), s.try_recv()), (Some(4), Some(5), None));
    assert_eq!(s.stats().dropped_oldest, 3);
    assert_eq!(broker.stats().dropped_oldest, 3);
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest() {
    let broker = broker();
    let mut s = broker.subscription::<i32>(small("q", SlowConsumer::DropNewest)).unwrap();
    for i in 1..=5 {
        broker.publish("q", &i).unwrap();
    }
    assert_eq!((s.try_recv(), s.try_recv(), s.try_recv()), (Some(1), Some(2), None));
    assert_eq!(s.stats().dropped_newest, 3);
    assert_eq!(broker.stats().dropped_newest, 3);
}

#[tokio::test]
async fn fail_publish_reports_full_queue_and_still_delivers_to_others() {
    let broker = broker();
    let mut slow = broker.subscription::<i32>(small("q", SlowConsumer::FailPublish)).unwrap();
    let mut fast = broker.subscription::<i32>("q").unwrap();
    broker.publish("q", &1).unwrap();
    broker.publish("q", &2).unwrap();
    let err = broker.publish("q", &3).unwrap_err();
    assert!(matches!(err, PublishError::QueueFull { full: 1, delivered: 1 }), "{err:?}");
    assert_eq!((slow.try_recv(), slow.try_recv(), slow.try_recv()), (Some(1), Some(2), None));
    assert_eq!(fast.try_recv(), Some(1));
    assert_eq!(slow.stats().rejected_full, 1);
    // Room again: publishing succeeds.
    broker.publish("q", &4).unwrap();
    assert_eq!(slow.try_recv(), Some(4));
}

#[tokio::test]
async fn disconnect_closes_the_subscription() {
    let broker = broker();
    let mut s = broker.subscription::<i32>(small("q", SlowConsumer::Disconnect)).unwrap();
    assert_eq!(broker.stats().subscriptions, 1);
    for i in 1..=3 {
        broker.publish("q", &i).unwrap();
    }
    assert!(s.is_closed());
    assert_eq!(soon(s.recv()).await, None);
    assert_eq!(broker.stats().disconnected, 1);
    assert_eq!(broker.stats().subscriptions, 0);
    assert_eq!(broker.publish("q", &4).unwrap().subscribers, 0);
}

#[tokio::test]
async fn dropping_or_unsubscribing_removes_the_route() {
    let broker = broker();
    let a = broker.subscription::<i32>("t/#").unwrap();
    let b = broker.subscribe("t/x", |_: i32| {}).unwrap();
    assert_eq!(broker.publish("t/x", &1).unwrap().subscribers, 2);
    drop(a);
    assert_eq!(broker.publish("t/x", &1).unwrap().subscribers, 1);
    b.unsubscribe();
    assert_eq!(broker.publish("t/x", &1).unwrap().subscribers, 0);
    assert_eq!(broker.stats().subscriptions, 0);
    assert_eq!(broker.stats().unrouted, 1);
}

async fn until(mut condition: impl FnMut() -> bool) {
    soon(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_subscribers_leave_no_tasks_behind() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let broker = broker();
    let mut subs = Vec::new();
    for i in 0..50 {
        subs.push(broker.subscribe(format!("leak/{i}"), |_: u32| {}).unwrap());
        subs.push(broker.subscribe_async("leak/#", |_: u32| async {}).unwrap());
    }
    // A task per async subscriber; sync ones share the broker's dispatchers, one per core.
    let dispatchers = std::thread::available_parallelism().map_or(1, usize::from).min(50);
    assert_eq!(metrics.num_alive_tasks(), baseline + 50 + dispatchers);
    for i in 0..50 {
        broker.publish(&format!("leak/{i}"), &7u32).unwrap();
    }
    drop(subs);
    until(|| metrics.num_alive_tasks() == baseline + dispatchers).await;
    assert_eq!(broker.stats().subscriptions, 0);
    // The dispatchers end with the broker.
    drop(broker);
    until(|| metrics.num_alive_tasks() == baseline).await;
}

#[tokio::test]
async fn panicking_callback_is_counted_and_keeps_going() {
    let broker = broker();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = broker
        .subscribe("p", move |n: i32| {
            assert!(n != 1, "deliberate panic for message 1");
            tx.send(n).unwrap();
        })
        .unwrap();
    broker.publish("p", &1).unwrap();
    broker.publish("p", &2).unwrap();
    assert_eq!(soon(rx.recv()).await, Some(2));
    assert_eq!(sub.stats().callback_panics, 1);
    assert_eq!(broker.stats().callback_panics, 1);
}

/// A value whose `Deserialize` panics on 1: user code that runs before the callback does.
#[derive(Clone, Debug, Serialize)]
struct Touchy(i32);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = i32::deserialize(deserializer)?;
        assert!(n != 1, "deliberate panic decoding 1");
        Ok(Self(n))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_decoding_a_value_costs_that_message_not_the_subscribers_sharing_its_dispatcher() {
    let broker = broker();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // More subscribers than dispatchers, so some share one with the touchy subscriber.
    let touchy = {
        let tx = tx.clone();
        broker.subscribe("p", move |t: Touchy| tx.send(("touchy", t.0)).unwrap()).unwrap()
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let others: Vec<_> = (0..cores * 2)
        .map(|_| {
            let tx = tx.clone();
            broker.subscribe("p", move |n: i32| tx.send(("plain", n)).unwrap()).unwrap()
        })
        .collect();
    broker.publish("p", &1).unwrap();
    broker.publish("p", &2).unwrap();
    let mut got = Vec::new();
    while got.len() < 1 + others.len() * 2 {
        got.push(soon(rx.recv()).await.unwrap());
    }
    got.sort_unstable();
    let mut want = vec![("plain", 1); others.len()];
    want.extend(vec![("plain", 2); others.len()]);
    want.push(("touchy", 2));
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(touchy.stats().callback_panics, 1, "counted as a panic of that subscriber");
    assert_eq!(broker.stats().callback_panics, 1);
    // An async subscriber, on a task of its own, goes on as well.
    let touchy_async = broker
        .subscribe_async("q", move |t: Touchy| {
            let tx = tx.clone();
            async move { tx.send(("async", t.0)).unwrap() }
        })
        .unwrap();
    broker.publish("q", &1).unwrap();
    broker.publish("q", &2).unwrap();
    assert_eq!(soon(rx.recv()).await, Some(("async", 2)));
    assert_eq!(touchy_async.stats().callback_panics, 1);
}

#[test]
fn callbacks_work_without_a_runtime() {
    let broker = broker();
    let (tx, rx) = std::sync::mpsc::channel();
    let _sub = broker.subscribe("plain", move |d: MyData| tx.send(d).unwrap()).unwrap();
    broker.publish("plain", &data(9)).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), data(9));
}

/// Records what it sees; adds a header; refuses topics under `deny/` and filters under `secret/`.
#[derive(Default)]
struct Recorder {
    published: AtomicUsize,
    subscribed: AtomicUsize,
    unsubscribed: AtomicUsize,
}

struct RecorderPlugin(Arc<Recorder>);

impl Plugin for RecorderPlugin {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn on_publish(&self, envelope: &mut whispeer::proto::Envelope) -> Result<(), Rejection> {
        if envelope.topic.as_str().starts_with("deny/") {
            return Err(Rejection::new("denied topic"));
        }
        self.0.published.fetch_add(1, Ordering::SeqCst);
        envelope.headers.insert("seen-by", "recorder");
        Ok(())
    }

    fn on_subscribe(&self, filter: &whispeer::Filter) -> Result<(), Rejection> {
        if filter.as_str().starts_with("secret/") {
            return Err(Rejection::new("no secrets"));
        }
        self.0.subscribed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn on_unsubscribe(&self, _filter: &whispeer::Filter) {
        self.0.unsubscribed.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn plugins_see_transform_and_refuse() {
    let recorder = Arc::new(Recorder::default());
    let broker = Broker::builder(BrokerOptions::default())
        .with(whispeer::LoggingPlugin::new())
        .with(RecorderPlugin(Arc::clone(&recorder)))
        .build();
    let mut s = broker.messages("ok/#").unwrap();
    broker.publish("ok/1", &1).unwrap();
    let message = soon(s.recv()).await.unwrap();
    assert_eq!(message.headers().get("seen-by").map(|v| &v[..]), Some(&b"recorder"[..]));

    let err = broker.publish("deny/1", &1).unwrap_err();
    assert!(matches!(err, PublishError::Rejected { plugin: "recorder", .. }), "{err:?}");
    assert_eq!(broker.stats().rejected_by_plugins, 1);
    let err = broker.messages("secret/#").unwrap_err();
    assert!(matches!(err, SubscribeError::Rejected { plugin: "recorder", .. }), "{err:?}");

    // A subscription closed by policy and then dropped is reported as ended exactly once.
    let full = broker.subscription::<i32>(small("ok/full", SlowConsumer::Disconnect)).unwrap();
    for i in 0..3 {
        broker.publish("ok/full", &i).unwrap();
    }
    drop(full);
    drop(s);
    assert_eq!(recorder.published.load(Ordering::SeqCst), 4);
    assert_eq!(recorder.subscribed.load(Ordering::SeqCst), 2);
    assert_eq!(recorder.unsubscribed.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishers_and_subscribers_lose_nothing_and_keep_order() {
    const PUBLISHERS: usize = 8;
    const PER_PUBLISHER: usize = 2_000;
    const TOTAL: usize = PUBLISHERS * PER_PUBLISHER;
    let broker = broker();
    let capacity = || SubscribeOptions::new("load/#").capacity(TOTAL);

    let callback_count = Arc::new(AtomicUsize::new(0));
    let async_count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&callback_count);
    let _sync = broker.subscribe(capacity(), move |_: (usize, usize)| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    let a = Arc::clone(&async_count);
    let _async = broker.subscribe_async(capacity(), move |_: (usize, usize)| {
        let a = Arc::clone(&a);
        async move {
            a.fetch_add(1, Ordering::Relaxed);
        }
    });
    let pulls: Vec<_> =
        (0..4).map(|_| broker.subscription::<(usize, usize)>(capacity()).unwrap()).collect();

    // Subscribers come and go while publishing; they must not disturb the others.
    let churn = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let s = broker.subscription::<(usize, usize)>(format!("load/{}", i % PUBLISHERS));
                drop(s);
                tokio::task::yield_now().await;
            }
        })
    };
    let threads: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let broker = broker.clone();
            std::thread::spawn(move || {
                for seq in 0..PER_PUBLISHER {
                    broker.publish(&format!("load/{p}"), &(p, seq)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    soon(churn).await.unwrap();

    let readers: Vec<_> = pulls
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut next = [0usize; PUBLISHERS];
                for _ in 0..TOTAL {
                    let (p, seq) = s.recv().await.unwrap();
                    assert_eq!(seq, next[p], "publisher {p} out of order");
                    next[p] += 1;
                }
                s.stats()
            })
        })
        .collect();
    for r in readers {
        let stats = soon(r).await.unwrap();
        assert_eq!((stats.received, stats.dropped_oldest), (TOTAL as u64, 0));
    }
    until(|| callback_count.load(Ordering::Relaxed) == TOTAL).await;
    until(|| async_count.load(Ordering::Relaxed) == TOTAL).await;
    assert_eq!(broker.stats().published, TOTAL as u64);
}

/// 1 KiB payloads weigh 1 024 + 256 bytes each, so a 6 400-byte bound holds five of them.
fn byte_bounded(policy: SlowConsumer) -> SubscribeOptions {
    SubscribeOptions::new("big").capacity(1000).max_bytes(6400).slow_consumer(policy)
}

fn kib(tag: u8) -> Vec<u8> {
    vec![tag; 1024]
}

#[tokio::test]
async fn the_byte_bound_drops_the_oldest_by_default() {
    let broker = broker();
    let mut s = broker.messages(byte_bounded(SlowConsumer::DropOldest)).unwrap();
    for tag in 0..10 {
        broker.publish_bytes("big", kib(tag)).unwrap();
    }
    let kept: Vec<u8> = std::iter::from_fn(|| s.try_recv().map(|m| m.payload()[0])).collect();
    assert_eq!(kept, [5, 6, 7, 8, 9], "the newest five fit");
    assert_eq!(s.stats().dropped_oldest, 5);
}

#[tokio::test]
async fn the_byte_bound_drops_the_newest_when_asked() {
    let broker = broker();
    let mut s = broker.messages(byte_bounded(SlowConsumer::DropNewest)).unwrap();
    for tag in 0..10 {
        broker.publish_bytes("big", kib(tag)).unwrap();
    }
    let kept: Vec<u8> = std::iter::from_fn(|| s.try_recv().map(|m| m.payload()[0])).collect();
    assert_eq!(kept, [0, 1, 2, 3, 4]);
    assert_eq!(s.stats().dropped_newest, 5);
    // Room again once the queue drained.
    broker.publish_bytes("big", kib(42)).unwrap();
    assert_eq!(s.try_recv().map(|m| m.payload()[0]), Some(42));
}

#[tokio::test]
async fn a_message_over_the_byte_bound_still_reaches_an_empty_queue() {
    let broker = broker();
    let mut s = broker.messages(byte_bounded(SlowConsumer::DropNewest)).unwrap();
    broker.publish_bytes("big", vec![1u8; 10_000]).unwrap();
    assert_eq!(s.try_recv().map(|m| m.payload().len()), Some(10_000));
    broker.publish_bytes("big", vec![2u8; 10_000]).unwrap();
    broker.publish_bytes("big", vec![3u8; 10]).unwrap();
    assert_eq!(s.try_recv().map(|m| m.payload()[0]), Some(2));
    assert!(s.try_recv().is_none(), "the small one did not fit behind the big one");
}

#[tokio::test]
async fn the_default_queue_holds_an_8_mib_burst_of_small_messages() {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let mut sub = broker.messages("burst").unwrap();
    // 8 MiB of 128-byte payloads in flight before the subscriber reads anything.
    let count = (8 << 20) / 128;
    for n in 0..count {
        let mut payload = vec![0u8; 128];
        payload[..4].copy_from_slice(&u32::try_from(n).unwrap().to_be_bytes());
        broker.publish_bytes("burst", payload).unwrap();
    }
    for n in 0..count {
        let message = sub.try_recv_message().expect("every message of the burst is queued");
        assert_eq!(message.payload()[..4], u32::try_from(n).unwrap().to_be_bytes());
    }
    let stats = broker.stats();
    assert_eq!((stats.dropped_oldest, stats.dropped_newest), (0, 0));
}
