//! The SDK's connection task when a connection ends: what is published while the client
//! reconnects waits (bounded) in the outbox and goes out on the next connection, QoS 0 and
//! QoS 1 alike, each task's publishes in order; publishes past a full outbox wait for room and
//! arrive whole, in order; deliveries read before a bad frame still reach their subscription;
//! a client that only receives pings a server that never does; one connection's many
//! subscriptions each get their messages.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use whispeer::server::{ServerConfig, serve};
use whispeer::{Broker, BrokerOptions, Message, Subscription};
use whispeer_client::proto::{Body, ContentType, Envelope, Flags, Frame, Limits, MessageId, Topic};
use whispeer_client::{Client, ClientOptions, Qos, SubscribeOptions};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(20), f).await.expect("timed out")
}

/// A server on `addr` until `stop` is sent, with an embedded subscription to `t` made before
/// it accepts anyone.
async fn server(
    addr: &str,
) -> (SocketAddr, Subscription<Message>, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::builder(BrokerOptions::default()).build();
    let seen = broker.messages("t").unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut config = ServerConfig::default();
    config.shutdown_grace = Duration::from_millis(200);
    let task = tokio::spawn(async move {
        serve(listener, broker, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, seen, stop, task)
}

#[tokio::test]
async fn what_is_published_while_disconnected_goes_out_on_the_next_connection() {
    let (addr, _first_seen, stop, task) = server("127.0.0.1:0").await;
    let mut options = ClientOptions::new(addr.to_string());
    options.backoff = (Duration::from_millis(50), Duration::from_millis(50));
    let client = Client::connect_with(options).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.stats().reconnects, 0);
    let _ = stop.send(());
    soon(task).await.unwrap();
    // The client sees the connection go, and tries again every 50 ms against a closed port.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.publish_bytes("t", &b"one"[..]).await.unwrap();
    let acked = tokio::spawn({
        let client = client.clone();
        async move { client.publish_acked_bytes("t", &b"two"[..]).await }
    });
    client.publish_bytes("t", &b"three"[..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!acked.is_finished(), "no PUBACK without a server");

    let (_, mut seen, stop, task) = server(&addr.to_string()).await;
    soon(acked).await.unwrap().unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(soon(seen.recv()).await.unwrap().payload().to_vec());
    }
    // One task's publishes keep their order; the other task's may come anywhere among them.
    let at = |text: &[u8]| got.iter().position(|p| p == text).unwrap();
    assert!(at(b"one") < at(b"three"), "{got:?}");
    assert_eq!(at(b"two") + at(b"one") + at(b"three"), 3, "each once: {got:?}");
    assert_eq!(client.stats().reconnects, 1, "counted once, not per failed attempt");
    let _ = stop.send(());
    soon(task).await.unwrap();
}

#[tokio::test]
async fn publishes_past_a_full_outbox_wait_for_room_and_arrive_whole_in_order() {
    let (addr, mut seen, stop, task) = server("127.0.0.1:0").await;
    let mut options = ClientOptions::new(addr.to_string());
    // Room for one frame at a time: every publish after the first waits for the last to go.
    options.publish_buffer_bytes = 1;
    let client = Client::connect_with(options).await.unwrap();
    for n in 0..300u32 {
        if n % 2 == 0 {
            client.publish_bytes("t", n.to_be_bytes().to_vec()).await.unwrap();
        } else {
            client.publish("t", &n).await.unwrap();
        }
    }
    client.flush().await.unwrap();
    for n in 0..300u32 {
        let message = soon(seen.recv()).await.unwrap();
        let got = if n % 2 == 0 {
            u32::from_be_bytes(message.payload()[..].try_into().unwrap())
        } else {
            message.decode::<u32>().unwrap()
        };
        assert_eq!(got, n, "in order, whole");
    }
    let _ = stop.send(());
    soon(task).await.unwrap();
}

/// The next frame from `stream`.
async fn frame(stream: &mut tokio::net::TcpStream, buf: &mut BytesMut) -> Frame {
    loop {
        if let Some(frame) = Frame::decode(buf, &Limits::default()).unwrap() {
            return frame;
        }
        assert!(stream.read_buf(buf).await.unwrap() > 0, "the client hung up");
    }
}

/// Accepts a client, greets it with `heartbeat_ms`, and accepts its one subscription (OK is
/// written); returns the stream, what was read past the SUBSCRIBE, and the subscription's id.
async fn greet_and_subscribe(
    listener: &TcpListener,
    heartbeat_ms: u32,
) -> (tokio::net::TcpStream, BytesMut, u32) {
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut buf = BytesMut::new();
    let hello = frame(&mut stream, &mut buf).await;
    let welcome = Body::Welcome {
        version: 1,
        capabilities: 0,
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 16,
        heartbeat_ms,
        name: "fake".into(),
    };
    let mut out = BytesMut::new();
    Frame::new(hello.correlation, welcome).encode(&mut out, usize::MAX).unwrap();
    stream.write_all(&out).await.unwrap();
    let subscribe = frame(&mut stream, &mut buf).await;
    let Body::Subscribe { sub, .. } = subscribe.body else { panic!("{subscribe:?}") };
    out.clear();
    Frame::new(subscribe.correlation, Body::Ok).encode(&mut out, usize::MAX).unwrap();
    stream.write_all(&out).await.unwrap();
    (stream, buf, sub)
}

/// A DELIVER of message `id` on topic `t` to subscription `sub`.
fn deliver(sub: u32, id: u128, payload: &'static str) -> Frame {
    let topic = Topic::parse("t").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let envelope = Envelope::new(MessageId(id), topic, 0, flags, Bytes::from(payload));
    Frame::new(0, Body::Deliver { sub, attempt: 1, offset: 0, envelope })
}

#[tokio::test]
async fn deliveries_read_before_a_bad_frame_still_reach_their_subscription() {
    // A server written here: it greets, accepts the subscription, then sends two deliveries
    // and a frame of an unknown type in one write.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _, sub) = greet_and_subscribe(&listener, 10_000).await;
        let mut out = BytesMut::new();
        for (id, payload) in [(1, "first"), (2, "second")] {
            deliver(sub, id, payload).encode(&mut out, usize::MAX).unwrap();
        }
        out.extend_from_slice(&[0, 0, 0, 5, 0x7e, 0, 0, 0, 0]);
        stream.write_all(&out).await.unwrap();
        let _ = stream.read(&mut [0u8; 64]).await;
    });
    let client =
        Client::connect_with(ClientOptions::new(addr.to_string()).reconnect(false)).await.unwrap();
    let mut deliveries = client.messages("t").await.unwrap();
    for expected in [&b"first"[..], b"second"] {
        let delivery = soon(deliveries.recv()).await.expect("read before the bad frame");
        assert_eq!(&delivery.payload()[..], expected);
    }
    assert!(soon(deliveries.recv()).await.is_none(), "then the subscription ends");
    server.abort();
}

#[tokio::test]
async fn a_malformed_delivery_is_skipped_counted_and_refused_and_the_connection_goes_on() {
    // A server written here: three QoS 1 deliveries in one write, the second with a topic that
    // is not UTF-8; then it reads what the client settles.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, mut buf, sub) = greet_and_subscribe(&listener, 10_000).await;
        let mut out = BytesMut::new();
        for id in 1..=3 {
            let at = out.len();
            deliver(sub, id, "m").encode(&mut out, usize::MAX).unwrap();
            if id == 2 {
                // Length, type, correlation, sub, attempt, offset, id, time, flags, topic length.
                out[at + 4 + 1 + 4 + 4 + 4 + 8 + 16 + 8 + 2 + 2] = 0xff;
            }
        }
        stream.write_all(&out).await.unwrap();
        let mut settled = Vec::new();
        while settled.len() < 3 {
            match frame(&mut stream, &mut buf).await.body {
                Body::Ack { id, .. } => settled.push((id.0, "ack")),
                Body::Nack { id, requeue: false, .. } => settled.push((id.0, "dead-letter")),
                Body::Ping => {}
                other => panic!("{other:?}"),
            }
        }
        settled.sort_unstable();
        settled
    });
    let client =
        Client::connect_with(ClientOptions::new(addr.to_string()).reconnect(false)).await.unwrap();
    let options = SubscribeOptions::new("t").qos(Qos::AtLeastOnce);
    let mut deliveries = client.messages(options).await.unwrap();
    assert_eq!(soon(deliveries.recv()).await.unwrap().id(), MessageId(1));
    assert_eq!(soon(deliveries.recv()).await.unwrap().id(), MessageId(3), "the second skipped");
    assert_eq!(deliveries.stats().decode_errors, 1);
    let settled = soon(server).await.unwrap();
    assert_eq!(settled, [(1, "ack"), (2, "dead-letter"), (3, "ack")]);
}

#[tokio::test]
async fn a_client_that_only_receives_pings_a_server_that_never_does() {
    // A server written here: heartbeat 100 ms, a delivery every 10 ms, never a PING of its own.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, mut buf, sub) = greet_and_subscribe(&listener, 100).await;
        let mut out = BytesMut::new();
        let (mut pings, mut n) = (0, 0u128);
        let until = tokio::time::Instant::now() + Duration::from_millis(600);
        while tokio::time::Instant::now() < until {
            out.clear();
            deliver(sub, n, "tick").encode(&mut out, usize::MAX).unwrap();
            stream.write_all(&out).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Whatever the client sent meanwhile.
            while let Ok(Ok(read)) =
                tokio::time::timeout(Duration::from_micros(100), stream.read_buf(&mut buf)).await
            {
                assert!(read > 0, "the client hung up");
            }
            while let Some(frame) = Frame::decode(&mut buf, &Limits::default()).unwrap() {
                assert_eq!(frame.body, Body::Ping, "only pings: {frame:?}");
                pings += 1;
            }
        }
        pings
    });
    let client =
        Client::connect_with(ClientOptions::new(addr.to_string()).reconnect(false)).await.unwrap();
    let mut deliveries = client.messages("t").await.unwrap();
    let pings = server.await.unwrap();
    assert!(pings >= 3, "a ping about every 100 ms of the 600, got {pings}");
    assert!(soon(deliveries.recv()).await.is_some());
}

#[tokio::test]
async fn one_connection_with_many_subscriptions_gets_each_its_messages() {
    // The server's writer keeps a connection's subscriptions with a ready list and reuses the
    // slots of those that end: every subscription gets its own messages, in order, also one
    // made in a slot another left.
    let (addr, _seen, stop, task) = server("127.0.0.1:0").await;
    let client = Client::connect(addr.to_string()).await.unwrap();
    let publisher = Client::connect(addr.to_string()).await.unwrap();
    let mut subs = Vec::new();
    for i in 0..200 {
        subs.push(Some(client.subscribe::<u32>(format!("many/{i}")).await.unwrap()));
    }
    let publish_all = |round: u32| {
        let publisher = publisher.clone();
        async move {
            for n in 0..5 {
                for i in (0..200).rev() {
                    publisher.publish(&format!("many/{i}"), &(round * 10 + n)).await.unwrap();
                }
            }
            publisher.flush().await.unwrap();
        }
    };
    publish_all(0).await;
    for sub in subs.iter_mut().flatten() {
        for n in 0..5 {
            assert_eq!(soon(sub.recv()).await, Some(n));
        }
    }
    // Every other one dropped; new ones take their slots on the server.
    for sub in subs.iter_mut().step_by(2) {
        *sub = None;
    }
    let mut fresh = Vec::new();
    for i in 200..300 {
        fresh.push(client.subscribe::<u32>(format!("many/{i}")).await.unwrap());
    }
    publish_all(1).await;
    for n in 0..5 {
        for i in 200..300 {
            publisher.publish(&format!("many/{i}"), &(20u32 + n)).await.unwrap();
        }
    }
    publisher.flush().await.unwrap();
    for sub in subs.iter_mut().flatten() {
        for n in 10..15 {
            assert_eq!(soon(sub.recv()).await, Some(n), "a kept subscription, in order");
        }
    }
    for sub in &mut fresh {
        for n in 20..25 {
            assert_eq!(soon(sub.recv()).await, Some(n), "a new subscription in a reused slot");
        }
    }
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn a_publish_without_engines_arrives_as_its_envelope_would() {
    let (addr, mut seen, stop, task) = server("127.0.0.1:0").await;
    let client = Client::connect(addr.to_string()).await.unwrap();
    let before = whispeer_client::proto::clock::now_ms();
    let id = client.publish_bytes("t", &b"plain"[..]).await.unwrap();
    let message = soon(seen.recv()).await.unwrap();
    assert_eq!((message.id(), message.topic().as_str()), (id, "t"));
    assert_eq!(&message.payload()[..], b"plain");
    let stamped = message.envelope().timestamp_ms;
    assert!(stamped >= before && stamped <= whispeer_client::proto::clock::now_ms());
    assert_eq!(message.envelope().flags, Flags::with_content(ContentType::Raw));
    // Refused before anything is encoded: the connection goes on.
    let bad = client.publish_bytes("t/+", &b"x"[..]).await.unwrap_err();
    assert!(matches!(bad, whispeer_client::ClientError::InvalidTopic(_)), "{bad:?}");
    let max = Limits::default().max_message_bytes;
    let big = client.publish_bytes("t", vec![0u8; max + 1]).await.unwrap_err();
    assert!(matches!(big, whispeer_client::ClientError::TooLarge { .. }), "{big:?}");
    let next = client.publish_bytes("t", &b"after"[..]).await.unwrap();
    assert_ne!(next, id);
    assert_eq!(&soon(seen.recv()).await.unwrap().payload()[..], b"after");
    // A typed publish takes the same way, with its codec's content type.
    let typed = client.publish("t", &7u32).await.unwrap();
    let message = soon(seen.recv()).await.unwrap();
    let content = ClientOptions::new("").codec.content_type();
    assert_eq!((message.id(), message.envelope().flags), (typed, Flags::with_content(content)));
    assert_eq!(message.decode::<u32>().unwrap(), 7);
    let _ = stop.send(());
    soon(task).await.unwrap();
}
