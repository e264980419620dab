//! A chat device that acknowledges its inbox (`?ack=1`): every inbox message carries its
//! position (`"at"`), the device's cursor moves only with `{"type":"ack","at":N}`, and what
//! was written but not acknowledged when the connection went comes again. A device that does
//! not ack has its cursor moved as messages are written.

use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::chat::{ChatClient, ChatServer};

/// The next direct message, its number and position.
async fn numbered(device: &mut ChatClient) -> (u64, u64) {
    let message = device.next_where(|v| v.get("msg").is_some()).await;
    (message["msg"].as_u64().expect("a number"), message["at"].as_u64().expect("a position"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_device_did_not_acknowledge_comes_again_and_nothing_else() {
    let server = ChatServer::start(&[]);
    let base = server.url.clone();
    let mut alice = ChatClient::join(&base, "alice", "laptop").await;
    let mut phone = ChatClient::join(&format!("{base}?ack=1"), "bob", "phone").await;
    let mut tablet = ChatClient::join(&base, "bob", "tablet").await;
    for n in 0..3u64 {
        assert_eq!(alice.ask(json!({"to": "bob", "msg": n})).await["type"], "sent");
    }
    let mut positions = Vec::new();
    for n in 0..3u64 {
        let (got, at) = numbered(&mut phone).await;
        assert_eq!(got, n);
        positions.push(at);
        assert_eq!(numbered(&mut tablet).await.0, n);
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions rise: {positions:?}");
    // The phone acknowledges the first only; both devices go.
    phone.send(&json!({"type": "ack", "at": positions[0]})).await;
    assert_eq!(phone.ask(json!({"type": "history", "with": "alice"})).await["type"], "history");
    phone.leave().await;
    tablet.leave().await;

    // The phone gets again what it did not acknowledge; the tablet, which does not ack, nothing.
    let mut phone = ChatClient::join(&format!("{base}?ack=1"), "bob", "phone").await;
    assert_eq!(numbered(&mut phone).await, (1, positions[1]));
    assert_eq!(numbered(&mut phone).await, (2, positions[2]));
    let mut tablet = ChatClient::join(&base, "bob", "tablet").await;
    tablet.no_message_within(Duration::from_millis(500)).await;

    // Acknowledged through the last: nothing comes again.
    phone.send(&json!({"type": "ack", "at": positions[2]})).await;
    assert_eq!(phone.ask(json!({"type": "history", "with": "alice"})).await["type"], "history");
    phone.leave().await;
    let mut phone = ChatClient::join(&format!("{base}?ack=1"), "bob", "phone").await;
    phone.no_message_within(Duration::from_millis(500)).await;
    let refused: Value = phone.ask(json!({"type": "ack"})).await;
    assert_eq!(refused["code"], "malformed");
}
