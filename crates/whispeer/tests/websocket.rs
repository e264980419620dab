//! The server over WebSocket, driven by a real WebSocket client (tokio-tungstenite).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use whispeer::proto::{
    Body, ContentType, Envelope, ErrorCode, Filter, Flags, Frame, Limits, MessageId, Qos, Topic,
};
use whispeer::server::{ServerConfig, serve, serve_websocket};
use whispeer::{Broker, BrokerOptions};

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn soon<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("timed out")
}

struct Servers {
    broker: Broker,
    ws: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

/// One broker behind a WebSocket listener and a TCP listener.
async fn start() -> Servers {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = ws_listener.local_addr().unwrap();
    let mut config = ServerConfig::default();
    config.heartbeat = Duration::from_millis(300);
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = futures_util::future::FutureExt::shared(async {
        let _ = stopped.await;
    });
    let (b1, b2, c1, c2, s1, s2) =
        (broker.clone(), broker.clone(), config.clone(), config, stopped.clone(), stopped);
    tokio::spawn(async move { serve_websocket(ws_listener, b1, c1, s1).await.unwrap() });
    tokio::spawn(async move { serve(tcp_listener, b2, c2, s2).await.unwrap() });
    Servers { broker, ws, stop: Some(stop) }
}

async fn send(client: &mut Client, frame: Frame) {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf, usize::MAX).unwrap();
    client.send(Message::Binary(buf.freeze())).await.unwrap();
}

/// Reads frames out of binary messages, skipping pings; `None` once the server closes.
async fn next_frame(client: &mut Client, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(frame) = Frame::decode(buf, &Limits::default()).unwrap() {
            if frame.body == Body::Ping {
                continue;
            }
            return Some(frame);
        }
        match client.next().await {
            Some(Ok(Message::Binary(bytes))) => buf.extend_from_slice(&bytes),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

async fn hello(client: &mut Client, buf: &mut BytesMut) {
    send(
        client,
        Frame::new(1, Body::Hello { version: 1, capabilities: 0, name: "ws-test".into() }),
    )
    .await;
    let welcome = soon(next_frame(client, buf)).await.unwrap();
    assert!(matches!(welcome.body, Body::Welcome { .. }), "{welcome:?}");
}

#[tokio::test]
async fn websocket_clients_subscribe_and_publish_with_the_same_frames() {
    let servers = start().await;
    let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
    let mut buf = BytesMut::new();
    hello(&mut client, &mut buf).await;
    let filter = Filter::parse("chat/#").unwrap();
    let subscribe = Body::Subscribe {
        sub: 7,
        qos: Qos::AtMostOnce,
        filter,
        prefetch: 0,
        group: None,
        start: Default::default(),
    };
    send(&mut client, Frame::new(2, subscribe)).await;
    assert_eq!(soon(next_frame(&mut client, &mut buf)).await.unwrap(), Frame::new(2, Body::Ok));

    // Published in the broker (as a TCP client's message would be), delivered over WebSocket.
    for i in 0..100u32 {
        servers.broker.publish_bytes(&format!("chat/{i}"), i.to_be_bytes().to_vec()).unwrap();
    }
    for i in 0..100u32 {
        let frame = soon(next_frame(&mut client, &mut buf)).await.unwrap();
        let Body::Deliver { sub: 7, attempt: 1, offset: 0, envelope } = frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!(envelope.topic.as_str(), format!("chat/{i}"));
        assert_eq!(&envelope.payload[..], i.to_be_bytes());
    }

    // Published over WebSocket (QoS 1), received in the broker.
    let mut inbox = servers.broker.messages("inbox").unwrap();
    let envelope = Envelope::new(
        MessageId(42),
        Topic::parse("inbox").unwrap(),
        1,
        Flags::with_content(ContentType::Raw),
        Bytes::from_static(b"from the browser"),
    );
    send(&mut client, Frame::new(3, Body::Publish { qos: Qos::AtLeastOnce, envelope })).await;
    assert_eq!(soon(next_frame(&mut client, &mut buf)).await.unwrap(), Frame::new(3, Body::PubAck));
    let message = soon(inbox.recv_message()).await.unwrap();
    assert_eq!((message.id(), &message.payload()[..]), (MessageId(42), &b"from the browser"[..]));
    drop(servers.stop);
}

#[tokio::test]
async fn other_paths_are_refused_and_mixed_modes_close_the_connection() {
    let servers = start().await;
    let err = connect_async(format!("ws://{}/elsewhere", servers.ws)).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    // Binary first, then a text message: refused.
    let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
    let mut buf = BytesMut::new();
    hello(&mut client, &mut buf).await;
    client.send(Message::text(r#"{"op":"ping"}"#)).await.unwrap();
    let frame = soon(next_frame(&mut client, &mut buf)).await.unwrap();
    assert!(matches!(frame.body, Body::Error { code: ErrorCode::MALFORMED, .. }), "{frame:?}");
    assert_eq!(soon(next_frame(&mut client, &mut buf)).await, None, "closed");

    // Garbage in a binary message gets the same typed error as over TCP.
    let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
    client
        .send(Message::Binary(Bytes::from_static(&[0, 0, 0, 5, 0x66, 0, 0, 0, 0])))
        .await
        .unwrap();
    let frame = soon(next_frame(&mut client, &mut buf)).await.unwrap();
    assert!(matches!(frame.body, Body::Error { code: ErrorCode::MALFORMED, .. }), "{frame:?}");
    drop(servers.stop);
}

/// The next JSON object from the server, skipping pings; `None` once it closes.
async fn next_json(client: &mut Client) -> Option<serde_json::Value> {
    loop {
        match client.next().await {
            Some(Ok(Message::Text(text))) => {
                let value: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                if value["op"] != "ping" {
                    return Some(value);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn json_clients_need_no_sdk() {
    let servers = start().await;
    let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
    client
        .send(Message::text(r#"{"op":"subscribe","id":1,"filter":"chat/#","ref":5}"#))
        .await
        .unwrap();
    let welcome = soon(next_json(&mut client)).await.unwrap();
    assert_eq!(
        (welcome["op"].as_str(), welcome["auth_required"].as_bool()),
        (Some("welcome"), Some(false))
    );
    assert_eq!(
        soon(next_json(&mut client)).await.unwrap(),
        serde_json::json!({"op": "ok", "ref": 5})
    );

    let mut binary_side = servers.broker.messages("chat/#").unwrap();
    let publish =
        r#"{"op":"publish","topic":"chat/rust","payload":{"text":"hi","n":1},"qos":1,"ref":6}"#;
    client.send(Message::text(publish)).await.unwrap();
    let mut saw_ack = false;
    let mut saw_message = false;
    while !(saw_ack && saw_message) {
        let reply = soon(next_json(&mut client)).await.unwrap();
        match reply["op"].as_str() {
            Some("puback") => {
                assert_eq!(reply["ref"], 6);
                saw_ack = true;
            }
            Some("message") => {
                assert_eq!(
                    (reply["id"].as_u64(), reply["topic"].as_str()),
                    (Some(1), Some("chat/rust"))
                );
                assert_eq!(reply["payload"], serde_json::json!({"text": "hi", "n": 1}));
                assert_eq!(reply["message_id"].as_str().map(str::len), Some(32));
                saw_message = true;
            }
            _ => panic!("{reply}"),
        }
    }
    // Rust subscribers get the same message as JSON content.
    let message = soon(binary_side.recv_message()).await.unwrap();
    assert_eq!(
        message.decode::<serde_json::Value>().unwrap(),
        serde_json::json!({"text": "hi", "n": 1})
    );

    // Raw bytes from the broker arrive base64-encoded.
    servers.broker.publish_bytes("chat/raw", vec![0u8, 1, 2]).unwrap();
    let raw = soon(next_json(&mut client)).await.unwrap();
    assert_eq!((raw["op"].as_str(), raw["data"].as_str()), (Some("message"), Some("AAEC")));
    drop(servers.stop);
}

#[tokio::test]
async fn bad_json_gets_a_clear_error_then_close() {
    let servers = start().await;
    for bad in
        ["not json", r#"{"op":"launch"}"#, r#"{"op":"subscribe","id":1,"qos":7,"filter":"a"}"#]
    {
        let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
        client.send(Message::text(bad)).await.unwrap();
        let error = soon(next_json(&mut client)).await.unwrap();
        assert_eq!(
            (error["op"].as_str(), error["code"].as_u64()),
            (Some("error"), Some(1)),
            "{bad}: {error}"
        );
        assert!(!error["message"].as_str().unwrap().is_empty(), "{error}");
        assert_eq!(soon(next_json(&mut client)).await, None, "closed after {bad}");
    }
    drop(servers.stop);
}

#[tokio::test]
async fn json_requests_naming_invalid_topics_are_refused_alone_like_binary_frames() {
    let servers = start().await;
    let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
    let deep = vec!["d"; 40].join("/");
    let refused = [
        r#"{"op":"subscribe","id":1,"filter":"wj/#/x","ref":3}"#.to_string(),
        r#"{"op":"publish","topic":"wj/+/x","payload":1,"ref":4}"#.to_string(),
        format!(r#"{{"op":"publish","topic":"{deep}","payload":1,"ref":5}}"#),
        format!(r#"{{"op":"subscribe","id":2,"filter":"{}","ref":6}}"#, "x".repeat(2000)),
    ];
    for (request, reference) in refused.iter().zip(3..) {
        client.send(Message::text(request.as_str())).await.unwrap();
        let error = soon(next_json(&mut client)).await.unwrap();
        assert_eq!(
            (error["op"].as_str(), error["code"].as_u64(), error["ref"].as_u64()),
            (Some("error"), Some(5), Some(reference)),
            "{request}: {error}"
        );
        assert!(error["message"].as_str().unwrap().contains("invalid topic"), "{error}");
    }
    // The connection goes on: a valid request is served (after the implied HELLO's welcome).
    client
        .send(Message::text(r#"{"op":"subscribe","id":1,"filter":"wj/+/x","ref":7}"#))
        .await
        .unwrap();
    assert_eq!(soon(next_json(&mut client)).await.unwrap()["op"], "welcome");
    assert_eq!(
        soon(next_json(&mut client)).await.unwrap(),
        serde_json::json!({"op": "ok", "ref": 7})
    );
    client.send(Message::text(r#"{"op":"publish","topic":"wj/a/x","payload":42}"#)).await.unwrap();
    let delivered = soon(next_json(&mut client)).await.unwrap();
    assert_eq!(
        (delivered["op"].as_str(), delivered["payload"].as_u64()),
        (Some("message"), Some(42))
    );
    drop(servers.stop);
}

/// Everything the server sends until it closes: binary frames, JSON objects, and the close
/// frame's code and reason.
async fn until_close(
    client: &mut Client,
) -> (Vec<Frame>, Vec<serde_json::Value>, Option<(u16, String)>) {
    let (mut frames, mut json, mut buf) = (Vec::new(), Vec::new(), BytesMut::new());
    loop {
        match soon(client.next()).await {
            Some(Ok(Message::Binary(bytes))) => {
                buf.extend_from_slice(&bytes);
                while let Some(frame) = Frame::decode(&mut buf, &Limits::default()).unwrap() {
                    if frame.body != Body::Ping {
                        frames.push(frame);
                    }
                }
            }
            Some(Ok(Message::Text(text))) => {
                json.push(serde_json::from_str(text.as_str()).unwrap())
            }
            Some(Ok(Message::Close(close))) => {
                let close = close.map(|c| (u16::from(c.code), c.reason.to_string()));
                return (frames, json, close);
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return (frames, json, None),
        }
    }
}

#[tokio::test]
async fn oversize_websocket_messages_get_too_large_and_close_1009() {
    let servers = start().await;
    let limit = Limits::default().max_frame_bytes + 4;
    for size in [limit + 1, 1_100 * 1024 + limit / 10, 4 << 20] {
        // A binary client after its HELLO.
        let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
        hello(&mut client, &mut BytesMut::new()).await;
        client.send(Message::Binary(Bytes::from(vec![0u8; size]))).await.unwrap();
        let (frames, _, close) = until_close(&mut client).await;
        let codes: Vec<_> = frames
            .iter()
            .filter_map(|f| match &f.body {
                Body::Error { code, message } => Some((*code, message.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(codes.len(), 1, "{frames:?}");
        assert_eq!(codes[0].0, ErrorCode::TOO_LARGE);
        assert!(codes[0].1.contains(&format!("{size} bytes")), "{}", codes[0].1);
        let (code, reason) = close.expect("a close frame with a code");
        assert_eq!(code, 1009, "{reason}");
        assert!(reason.contains(&limit.to_string()), "{reason}");

        // A JSON client gets the error as JSON.
        let (mut client, _) = connect_async(format!("ws://{}/ws", servers.ws)).await.unwrap();
        client.send(Message::text(r#"{"op":"ping","ref":1}"#)).await.unwrap();
        let text = format!(r#"{{"op":"publish","topic":"t","data":"{}"}}"#, "A".repeat(size));
        client.send(Message::text(text)).await.unwrap();
        let (_, json, close) = until_close(&mut client).await;
        let error = json.iter().find(|v| v["op"] == "error").expect("an error");
        assert_eq!(error["code"].as_u64(), Some(2), "{error}");
        assert_eq!(close.map(|c| c.0), Some(1009));
    }
    drop(servers.stop);
}
