//! Chat on a cluster: two `whispeer serve --chat-listen` nodes on one nats-server (and on one
//! redis-server), users on different nodes. Direct and group messages cross nodes with one `seq` everywhere; a group
//! made on one node is joined on the other; a device that goes away from one node and comes
//! back on the other gets what it missed, once; presence, device keys and group delivery
//! receipts cross nodes; a node started later has the same groups. While the engine is away a
//! send is refused, never acknowledged, and nothing refused is delivered afterwards.

use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::chat::{ChatClient, ChatServer};
use common::engines::{Nats, Redis};

/// A chat node named `name` on the engine at `url` (`engine`: `nats` or `redis`).
fn node(engine: &str, url: &str, name: &str) -> ChatServer {
    let urls = format!("[\"{url}\"]");
    ChatServer::start(&[
        ("WHISPEER_CLUSTER__ENGINE", engine),
        ("WHISPEER_CLUSTER__URLS", &urls),
        ("WHISPEER_CLUSTER__NODE", name),
    ])
}

/// The next chat message (one with `msg`).
async fn message(client: &mut ChatClient) -> Value {
    client.next_where(|v| v.get("msg").is_some()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_users_on_different_nodes_chat_as_on_one() {
    let nats = Nats::start(0);
    chat_across(|name| node("nats", &nats.url, name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_users_on_different_nodes_chat_as_on_one() {
    let redis = Redis::start();
    chat_across(|name| node("redis", &redis.url, name)).await;
}

async fn chat_across(node: impl Fn(&str) -> ChatServer) {
    let (a, b) = (node("a"), node("b"));
    let mut alice = ChatClient::join(&a.url, "alice", "laptop").await;
    let mut bob = ChatClient::join(&b.url, "bob", "phone").await;

    // A direct message crosses; its seq is the same in the reply, the delivery and history.
    let sent = alice.ask(json!({"to": "bob", "msg": "hi bob"})).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let got = message(&mut bob).await;
    assert_eq!((got["from"].as_str(), got["msg"].as_str()), (Some("alice"), Some("hi bob")));
    assert_eq!(got["seq"], sent["seq"], "one seq: {got} {sent}");
    assert!(sent["seq"].as_u64().is_some(), "{sent}");
    let reply = bob.ask(json!({"to": "alice", "msg": "hi alice"})).await;
    assert_eq!(message(&mut alice).await["msg"], "hi alice");
    let on_a = alice.ask(json!({"type": "history", "with": "bob"})).await;
    let on_b = bob.ask(json!({"type": "history", "with": "alice"})).await;
    let seqs = |page: &Value| -> Vec<Value> {
        page["messages"].as_array().expect("a list").iter().map(|m| m["seq"].clone()).collect()
    };
    assert_eq!(seqs(&on_a), vec![sent["seq"].clone(), reply["seq"].clone()], "{on_a}");
    assert_eq!(seqs(&on_a), seqs(&on_b), "the same history on both nodes");

    // A group made on a is joined on b; a message from a reaches b, and its sender gets the
    // group's delivery receipt once bob's device has it.
    assert_eq!(
        alice.ask(json!({"type": "create", "group": "team", "open": true})).await["type"],
        "ok"
    );
    let joined = bob.ask(json!({"type": "join", "group": "team"})).await;
    assert_eq!(joined["type"], "ok", "{joined}");
    let to_group = alice.ask(json!({"group": "team", "msg": "hello team"})).await;
    assert_eq!(to_group["type"], "sent", "{to_group}");
    let in_group = bob.next_where(|v| v["msg"] == "hello team").await;
    assert_eq!(in_group["group"], "team");
    let receipt = alice
        .next_where(|v| v["type"] == "receipt" && v["id"] == to_group["id"] && v["group"] == "team")
        .await;
    assert_eq!(receipt["members"], 1, "{receipt}");
    let members = alice.ask(json!({"type": "members", "group": "team"})).await;
    let names: Vec<&str> = members["members"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(names, ["alice", "bob"], "{members}");

    // Typing and topic broadcasts are live: they cross nodes too.
    alice.send(&json!({"type": "typing", "to": "bob"})).await;
    let typing = bob.next_where(|v| v["type"] == "typing").await;
    assert_eq!(typing["from"], "alice", "{typing}");
    assert_eq!(bob.ask(json!({"type": "subscribe", "topic": "news"})).await["type"], "ok");
    // The subscription reaches node a through the engine: broadcast until bob hears one.
    let heard = loop {
        assert_eq!(alice.ask(json!({"topic": "news", "msg": "extra"})).await["type"], "sent");
        if let Some(news) = bob.try_next(Duration::from_millis(300)).await
            && news["topic"] == "news"
        {
            break news;
        }
    };
    assert_eq!(heard["msg"], "extra");

    // Presence and device keys cross nodes.
    alice.send(&json!({"type": "who"})).await;
    let presence = alice.next_where(|v| v["type"] == "presence" && v.get("users").is_some()).await;
    let bob_there =
        presence["users"].as_array().expect("a list").iter().find(|u| u["user"] == "bob");
    assert_eq!(bob_there.map(|u| u["online"].clone()), Some(json!(true)), "{presence}");
    assert_eq!(bob.ask(json!({"type": "keys", "publish": "phone:bob-key"})).await["type"], "ok");
    alice.send(&json!({"type": "keys", "user": "bob"})).await;
    let keys = alice.next_where(|v| v["type"] == "keys" && v.get("devices").is_some()).await;
    assert_eq!(keys["devices"], json!(["phone:bob-key"]), "{keys}");

    // Bob's phone leaves b; alice sends 20; the phone comes back on a and gets them, once.
    bob.leave().await;
    // Its cursor reaches the engine within a second (and every node soon after); alice reads
    // meanwhile, so her connection answers the server's pings.
    alice.no_message_within(Duration::from_secs(3)).await;
    for n in 0..20u64 {
        assert_eq!(alice.ask(json!({"to": "bob", "msg": n})).await["type"], "sent");
    }
    let mut phone = ChatClient::join(&a.url, "bob", "phone").await;
    let mut numbers = Vec::new();
    while numbers.len() < 20 {
        let got = message(&mut phone).await;
        numbers.push(got["msg"].as_u64().unwrap_or(u64::MAX));
    }
    assert_eq!(numbers, (0..20).collect::<Vec<_>>(), "in order, each once");
    phone.no_message_within(Duration::from_millis(500)).await;

    // A node started later has the same state.
    let c = node("c");
    let mut late = ChatClient::join(&c.url, "carol", "web").await;
    let joined = late.ask(json!({"type": "join", "group": "team"})).await;
    assert_eq!(joined["type"], "ok", "{joined}");
    let members = late.ask(json!({"type": "members", "group": "team"})).await;
    assert_eq!(members["members"].as_array().map(Vec::len), Some(3), "{members}");
}

/// The reply to a send while the engine is away or recovering: it may wait for the engine's
/// timeouts (and more on a loaded machine) before it comes.
async fn slow_reply(client: &mut ChatClient, request: Value) -> Value {
    client.send(&request).await;
    loop {
        let reply = client.try_next(Duration::from_secs(60)).await.expect("a reply");
        if matches!(reply["type"].as_str(), Some("sent" | "error")) {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_engine_is_away_sends_are_refused_and_none_is_delivered_later() {
    let mut nats = Nats::start(0);
    let (a, b) = (node("nats", &nats.url, "a"), node("nats", &nats.url, "b"));
    let mut alice = ChatClient::join(&a.url, "alice", "laptop").await;
    let mut bob = ChatClient::join(&b.url, "bob", "phone").await;
    assert_eq!(alice.ask(json!({"to": "bob", "msg": "before"})).await["type"], "sent");
    // Delivered before bob leaves: "sent" means the engine has it, and bob's node may take a
    // moment more to hand it over (a leave before that would rightly leave it in his inbox).
    assert_eq!(message(&mut bob).await["msg"], "before");
    bob.leave().await;

    nats.kill();
    let refused = slow_reply(&mut alice, json!({"to": "bob", "msg": "while away"})).await;
    assert_eq!(refused["type"], "error", "not acknowledged: {refused}");
    let code = refused["code"].as_str().unwrap_or_default();
    assert!(["unavailable", "store_failed"].contains(&code), "{refused}");

    nats.restart();
    let started = std::time::Instant::now();
    loop {
        let reply = slow_reply(&mut alice, json!({"to": "bob", "msg": "after"})).await;
        if reply["type"] == "sent" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never back: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut bob = ChatClient::join(&b.url, "bob", "phone").await;
    let mut got = Vec::new();
    while got.last().is_none_or(|m: &Value| m != "after") {
        got.push(message(&mut bob).await["msg"].clone());
    }
    assert!(!got.contains(&json!("while away")), "a refused message was delivered: {got:?}");
    assert!(!got.contains(&json!("before")), "delivered before, and again: {got:?}");
}
