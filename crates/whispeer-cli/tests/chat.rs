//! Chat end to end: a real `whispeer serve --chat-listen` and real WebSocket clients speaking the
//! chat's JSON — the seed's session, refusals, groups, offline delivery to two devices across a
//! SIGKILL, history and presence (the terminal chat: `chat_terminal.rs`).
#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::chat::{ChatClient, ChatServer};
use serde_json::{Value, json};

fn temp_dir(name: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("whispeer-chat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = dir.to_string_lossy().into_owned();
    (dir, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_session_works_as_written() {
    let server = ChatServer::start(&[]);
    // client-b names itself with its first message, as the seed's clients do.
    let mut b = ChatClient::connect(&server.url).await;
    b.send(&json!({"from": "client-b"})).await;
    assert_eq!(b.next().await["type"], "welcome");
    let mut a = ChatClient::connect(&server.url).await;
    a.send_text(r#"{"from":"client-a","to":"client-b","msg":"Hello from A!"}"#).await;
    assert_eq!(a.next().await["type"], "welcome");
    let sent = a.reply().await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let got = b.next_where(|v| v.get("msg").is_some()).await;
    assert_eq!(got["from"], "client-a");
    assert_eq!(got["to"], "client-b");
    assert_eq!(got["msg"], "Hello from A!");
    assert_eq!(got["id"], sent["id"], "the receiver sees the id the sender was given");
    // A user named on the URL is welcomed at once, and gets what was sent before it came.
    a.send(&json!({"from": "client-a", "to": "client-c", "msg": "before you came"})).await;
    assert_eq!(a.reply().await["type"], "sent");
    let mut c = ChatClient::connect(&format!("{}?id=client-c", server.url)).await;
    assert_eq!(c.next().await["user"], "client-c");
    assert_eq!(c.next_where(|v| v.get("msg").is_some()).await["msg"], "before you came");
    // The sender's own device does not get its message back.
    a.no_message_within(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_malformed_oversize_and_unnamed_requests_are_refused_alone() {
    let server = ChatServer::start(&[("WHISPEER_CHAT__MAX_MESSAGE_BYTES", "1024")]);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let mut bob = ChatClient::join(&server.url, "bob", "phone").await;
    let mut anon = ChatClient::connect(&server.url).await;
    let refusals = [
        (json!({"from": "bob", "to": "alice", "msg": "it is me, bob"}), "spoofed_sender"),
        (json!({"to": "bob", "msg": "x".repeat(2000)}), "too_large"),
        (json!({"to": "bob/../x", "msg": "hi"}), "invalid_name"),
        (json!({"type": "teleport"}), "unknown_type"),
        (json!({"group": "nowhere", "msg": "hi"}), "not_member"),
        (json!({"to": "bob", "group": "g", "msg": "two targets"}), "malformed"),
    ];
    for (request, code) in refusals {
        let reply = alice.ask(request).await;
        assert_eq!(reply["code"], code, "{reply}");
        assert!(reply["error"].as_str().unwrap().len() > 10, "a sentence for people: {reply}");
    }
    alice.send_text("{not json").await;
    assert_eq!(alice.reply().await["code"], "malformed");
    anon.send(&json!({"to": "bob", "msg": "who am I"})).await;
    assert_eq!(anon.next().await["code"], "unidentified");
    // Nothing of that reached bob; alice's connection still works.
    bob.no_message_within(Duration::from_millis(300)).await;
    assert_eq!(alice.ask(json!({"to": "bob", "msg": "real", "ref": 9})).await["ref"], 9);
    assert_eq!(bob.next_where(|v| v.get("msg").is_some()).await["from"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_keep_their_members_across_a_restart_and_removed_members_hear_nothing() {
    let (dir, dir_text) = temp_dir("groups");
    let envs = [("WHISPEER_STORAGE__DIR", dir_text.as_str())];
    let server = ChatServer::start(&envs);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let mut bob = ChatClient::join(&server.url, "bob", "phone").await;
    let mut carol = ChatClient::join(&server.url, "carol", "phone").await;
    assert_eq!(alice.ask(json!({"type": "create", "group": "team"})).await["type"], "ok");
    let refused = bob.ask(json!({"type": "join", "group": "team"})).await;
    assert_eq!(refused["code"], "invite_only", "{refused}");
    alice.ask(json!({"type": "invite", "group": "team", "user": "bob"})).await;
    assert_eq!(bob.ask(json!({"type": "join", "group": "team"})).await["type"], "ok");
    let posted = carol.ask(json!({"group": "team", "msg": "let me in"})).await;
    assert_eq!(posted["code"], "not_member");
    assert_eq!(alice.ask(json!({"group": "team", "msg": "hello team"})).await["type"], "sent");
    let got = bob.next_where(|v| v.get("msg").is_some()).await;
    assert_eq!((got["group"].as_str(), got["msg"].as_str()), (Some("team"), Some("hello team")));
    carol.no_message_within(Duration::from_millis(200)).await;
    drop((alice, bob, carol));
    server.kill();

    let server = ChatServer::start(&envs);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let mut bob = ChatClient::join(&server.url, "bob", "phone").await;
    let members = alice.ask(json!({"type": "members", "group": "team"})).await;
    let names: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alice", "bob"], "{members}");
    assert_eq!(members["members"][0]["role"], "owner");
    let removed = alice.ask(json!({"type": "remove", "group": "team", "user": "bob"})).await;
    assert_eq!(removed["type"], "ok", "{removed}");
    let notice = bob.next_where(|v| v["event"] == "removed").await;
    assert_eq!(notice["group"], "team");
    alice.ask(json!({"group": "team", "msg": "after bob left"})).await;
    bob.no_message_within(Duration::from_millis(300)).await;
    let history = bob.ask(json!({"type": "history", "group": "team"})).await;
    assert_eq!(history["code"], "not_member", "a removed member cannot read on");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `count` messages from alice, alternately to bob and to the group `team`, pipelined;
/// returns the numbers whose `sent` came back before the connection ended.
async fn send_numbered(alice: &mut ChatClient, from: usize, count: usize) -> Vec<usize> {
    for n in from..from + count {
        let request = if n % 2 == 0 {
            json!({"to": "bob", "msg": format!("m{n}"), "ref": n})
        } else {
            json!({"group": "team", "msg": format!("m{n}"), "ref": n})
        };
        if !alice.try_send(&request).await {
            break;
        }
    }
    let mut acked = Vec::new();
    while acked.len() < count {
        let Some(reply) = alice.try_next(Duration::from_secs(30)).await else { break };
        if reply["type"] == "sent" {
            acked.push(reply["ref"].as_u64().unwrap() as usize);
        }
    }
    acked
}

/// The numbers of the messages a device gets until `last` arrives, in order.
async fn numbers_until(device: &mut ChatClient, last: usize) -> Vec<usize> {
    let mut seen = Vec::new();
    loop {
        let value = device.next_where(|v| v.get("msg").is_some()).await;
        let n: usize = value["msg"].as_str().unwrap()[1..].parse().unwrap();
        seen.push(n);
        if n == last {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_offline_devices_each_get_every_acknowledged_message_once_in_order_across_a_sigkill() {
    let (dir, dir_text) = temp_dir("offline");
    let envs = [
        ("WHISPEER_STORAGE__DIR", dir_text.as_str()),
        ("WHISPEER_CHAT__MAX_MESSAGES_PER_SEC", "100000"),
    ];
    let server = ChatServer::start(&envs);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    alice.ask(json!({"type": "create", "group": "team", "open": true})).await;
    for device in ["phone", "laptop"] {
        let mut bob = ChatClient::join(&server.url, "bob", device).await;
        bob.ask(json!({"type": "join", "group": "team"})).await;
    }
    // Both of bob's devices are known and offline; their cursors reach chat.db within a second
    // (alice reads meanwhile, so she answers the server's pings).
    alice.no_message_within(Duration::from_millis(1500)).await;
    let mut acked = send_numbered(&mut alice, 0, 500).await;
    assert_eq!(acked.len(), 500);
    // Killed while alice's next burst is in flight: what was acknowledged must survive.
    let burst = tokio::spawn(async move {
        let acked = send_numbered(&mut alice, 500, 300).await;
        (alice, acked)
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.kill();
    let (_, during) = burst.await.unwrap();
    acked.extend(during.iter().copied());
    let server = ChatServer::start(&envs);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let unacked: Vec<usize> = (500..800).filter(|n| !during.contains(n)).collect();
    let resent = send_numbered(&mut alice, 800, 200).await;
    assert_eq!(resent.len(), 200);
    acked.extend(resent);
    for device in ["phone", "laptop"] {
        let mut bob = ChatClient::join(&server.url, "bob", device).await;
        let seen = numbers_until(&mut bob, 999).await;
        let unique: HashSet<usize> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{device}: duplicates in {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{device}: out of order: {seen:?}");
        let lost: Vec<&usize> = acked.iter().filter(|n| !unique.contains(n)).collect();
        assert!(lost.is_empty(), "{device}: acknowledged and lost: {lost:?}");
        assert!(seen.iter().all(|n| acked.contains(n) || unacked.contains(n)));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_back_by_seq_and_id_and_presence_follows_devices() {
    let server = ChatServer::start(&[("WHISPEER_CHAT__MAX_MESSAGES_PER_SEC", "1000")]);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let mut ids = Vec::new();
    for n in 0..30 {
        let sent = alice.ask(json!({"to": "bob", "msg": format!("m{n}")})).await;
        ids.push(sent["id"].as_str().unwrap().to_string());
    }
    let page = alice.ask(json!({"type": "history", "with": "bob", "limit": 10})).await;
    let texts = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["msg"].as_str().unwrap().into())
            .collect()
    };
    assert_eq!(texts(&page), (20..30).map(|n| format!("m{n}")).collect::<Vec<_>>());
    let oldest = page["messages"][0]["seq"].as_u64().unwrap();
    let before =
        alice.ask(json!({"type": "history", "with": "bob", "before": oldest, "limit": 5})).await;
    assert_eq!(texts(&before), (15..20).map(|n| format!("m{n}")).collect::<Vec<_>>());
    let after_id =
        alice.ask(json!({"type": "history", "with": "bob", "after": ids[3], "limit": 2})).await;
    assert_eq!(texts(&after_id), vec!["m4", "m5"]);
    // Positions past either end give empty pages, never a failure.
    for edge in [json!({"after": u64::MAX}), json!({"before": 0}), json!({"after": 0, "limit": 1})]
    {
        let mut request = json!({"type": "history", "with": "bob"});
        request.as_object_mut().unwrap().extend(edge.as_object().unwrap().clone());
        let page = alice.ask(request.clone()).await;
        assert_eq!(page["type"], "history", "{request} -> {page}");
    }
    assert_eq!(
        alice.ask(json!({"type": "history", "with": "bob", "after": 0, "limit": 1})).await["messages"]
            [0]["msg"],
        "m0"
    );
    // Bob sees the same conversation from his side.
    let mut phone = ChatClient::join(&server.url, "bob", "phone").await;
    let theirs = phone.ask(json!({"type": "history", "with": "alice", "limit": 1})).await;
    assert_eq!(texts(&theirs), vec!["m29"]);
    // Presence: alice hears bob come online on a second device, and go offline after the last.
    let laptop = ChatClient::join(&server.url, "bob", "laptop").await;
    alice.send(&json!({"type": "who"})).await;
    let who = alice.next_where(|v| v["type"] == "presence" && v.get("users").is_some()).await;
    assert_eq!(who["users"][0]["user"], "bob");
    assert_eq!(who["users"][0]["devices"], json!(["laptop", "phone"]), "{who}");
    phone.send(&json!({"type": "typing", "to": "alice"})).await;
    assert_eq!(alice.next_where(|v| v["type"] == "typing").await["from"], "bob");
    drop((phone, laptop));
    let offline = alice.next_where(|v| v["type"] == "presence" && v["status"] == "offline").await;
    assert_eq!(offline["user"], "bob");
    assert!(offline["last_seen"].as_u64().unwrap() > 0);
}

#[test]
fn the_chat_benchmark_runs_its_three_workloads() {
    let server = ChatServer::start(&[("WHISPEER_CHAT__MAX_MESSAGES_PER_SEC", "100000")]);
    let output = std::process::Command::new(common::BIN)
        .args(["bench", "--chat", &server.url, "--chat-idle", "20", "--chat-pairs", "2"])
        .args(["--chat-group", "3", "--chat-messages", "40", "--chat-window", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("chat idle: 20 users connected"), "{stdout}");
    assert!(stdout.contains("chat 1:1: 2 pairs, 40 messages"), "{stdout}");
    assert!(stdout.contains("chat group: 3 members, 13 messages"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_unread_counts_follow_delivery_and_reading() {
    let server = ChatServer::start(&[]);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    let mut ids = Vec::new();
    for (n, text) in ["one", "two", "three"].iter().enumerate() {
        let sent = alice.ask(json!({"to": "bob", "msg": text})).await;
        assert_eq!(sent["seq"], n as u64 + 1, "{sent}");
        ids.push(sent["id"].clone());
    }
    // Bob's phone comes online: the messages arrive with their seq, and alice hears of each.
    let mut phone = ChatClient::join(&server.url, "bob", "phone").await;
    let first = phone.next_where(|v| v.get("msg").is_some()).await;
    assert_eq!((first["msg"].as_str(), first["seq"].as_u64()), (Some("one"), Some(1)));
    for id in &ids {
        let receipt = alice.next_where(|v| v["status"] == "delivered").await;
        assert_eq!(
            (&receipt["id"], &receipt["by"], &receipt["device"]),
            (id, &json!("bob"), &json!("phone"))
        );
    }
    alice.ask(json!({"type": "create", "group": "team", "open": true})).await;
    phone.ask(json!({"type": "join", "group": "team"})).await;
    // Every other member (bob) has them: one receipt each, for the group.
    alice.send(&json!({"group": "team", "msg": "g1"})).await;
    alice.send(&json!({"group": "team", "msg": "g2"})).await;
    let (sent, receipts) = sent_and_group_receipts(&mut alice, 2, 2).await;
    assert_eq!(sent, receipts.iter().map(|r| r["id"].clone()).collect::<Vec<_>>());
    assert!(receipts.iter().all(|r| r["members"] == 1), "{receipts:?}");
    phone.send(&json!({"type": "unread"})).await;
    let unread = phone.next_where(|v| v["type"] == "unread").await;
    let count = |unread: &Value, key: &str, name: &str| {
        unread["conversations"].as_array().unwrap().iter().find(|c| c[key] == name).unwrap()["unread"].clone()
    };
    assert_eq!(count(&unread, "with", "alice"), 3, "{unread}");
    assert_eq!(count(&unread, "group", "team"), 2, "{unread}");
    // Reading up to "two" (by id) tells alice, and leaves one unread.
    let read = phone.ask(json!({"type": "read", "with": "alice", "id": ids[1]})).await;
    assert_eq!(read["seq"], 2, "{read}");
    let receipt = alice.next_where(|v| v["status"] == "read").await;
    assert_eq!((receipt["by"].as_str(), receipt["seq"].as_u64()), (Some("bob"), Some(2)));
    phone.send(&json!({"type": "unread"})).await;
    let unread = phone.next_where(|v| v["type"] == "unread").await;
    assert_eq!(count(&unread, "with", "alice"), 1, "{unread}");
    // Bob's laptop learns where he read up to.
    let mut laptop = ChatClient::join(&server.url, "bob", "laptop").await;
    let synced = laptop.next_where(|v| v["status"] == "read").await;
    assert_eq!((synced["with"].as_str(), synced["seq"].as_u64()), (Some("alice"), Some(2)));

    // A group receipt waits for every member: carol is away; it comes when she is back, and
    // for a message she never gets, when she is removed.
    let mut carol = ChatClient::join(&server.url, "carol", "phone").await;
    carol.ask(json!({"type": "join", "group": "team"})).await;
    drop(carol);
    // Sent only once the server has seen her go: before, it may still write to her socket.
    carol_went_offline(&mut alice).await;
    let waits = alice.ask(json!({"group": "team", "msg": "g3"})).await["id"].clone();
    phone.next_where(|v| v["msg"] == "g3").await;
    alice.no_message_within(Duration::from_millis(300)).await;
    let mut carol = ChatClient::join(&server.url, "carol", "phone").await;
    carol.next_where(|v| v["msg"] == "g3").await;
    let receipt = alice.next_where(|v| v["status"] == "delivered" && v["group"] == "team").await;
    assert_eq!((&receipt["id"], receipt["members"].as_u64()), (&waits, Some(2)), "{receipt}");
    drop(carol);
    carol_went_offline(&mut alice).await;
    let last = alice.ask(json!({"group": "team", "msg": "g4"})).await["id"].clone();
    phone.next_where(|v| v["msg"] == "g4").await;
    alice.no_message_within(Duration::from_millis(300)).await;
    alice.send(&json!({"type": "remove", "group": "team", "user": "carol"})).await;
    let (_, receipts) = sent_and_group_receipts(&mut alice, 0, 1).await;
    assert_eq!(receipts[0]["id"], last, "{receipts:?}");
}

/// Waits until `client` hears that carol's last device went: a group receipt that came before
/// it is not skipped unseen.
async fn carol_went_offline(client: &mut ChatClient) {
    let offline = client
        .next_where(|v| {
            let receipt = v["type"] == "receipt" && v.get("group").is_some();
            assert!(!receipt, "a group receipt while carol was leaving: {v}");
            v["type"] == "presence" && v["status"] == "offline" && v["user"] == "carol"
        })
        .await;
    assert!(offline["last_seen"].as_u64().is_some(), "{offline}");
}

/// Reads `client`'s events until `sent` replies and `receipts` group delivery receipts came
/// (in any order): the ids of each, sorted (replies to other requests are skipped).
async fn sent_and_group_receipts(
    client: &mut ChatClient,
    sent: usize,
    receipts: usize,
) -> (Vec<Value>, Vec<Value>) {
    let (mut replies, mut got) = (Vec::new(), Vec::new());
    while replies.len() < sent || got.len() < receipts {
        let event = client.next().await;
        if event["type"] == "sent" {
            replies.push(event["id"].clone());
        } else if event["status"] == "delivered" && event.get("group").is_some() {
            got.push(event);
        }
    }
    replies.sort_by_key(Value::to_string);
    got.sort_by_key(|r| r["id"].to_string());
    (replies, got)
}

/// A server with `bound` set, bob's phone away while alice sends `sent` messages, and the phone
/// back with the notice it got first.
async fn back_after(bound: (&str, &str), sent: usize) -> (ChatServer, ChatClient, Value) {
    let server = ChatServer::start(&[bound, ("WHISPEER_CHAT__MAX_MESSAGES_PER_SEC", "1000")]);
    ChatClient::join(&server.url, "bob", "phone").await.leave().await;
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    for n in 0..sent {
        assert_eq!(alice.ask(json!({"to": "bob", "msg": format!("m{n}")})).await["type"], "sent");
    }
    let mut phone = ChatClient::join(&server.url, "bob", "phone").await;
    let notice = phone.next_where(|v| v["type"] == "notice").await;
    (server, phone, notice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_after_the_inbox_bound_is_told_how_many_it_missed() {
    let (server, mut phone, notice) =
        back_after(("WHISPEER_CHAT__INBOX_MAX_MESSAGES", "5"), 8).await;
    assert_eq!((notice["code"].as_str(), notice["missed"].as_u64()), (Some("missed"), Some(3)));
    let kept = numbers_until(&mut phone, 7).await;
    assert_eq!(kept, vec![3, 4, 5, 6, 7]);
    // A device seen for the first time gets what the inbox keeps, without a notice.
    let mut tablet = ChatClient::join(&server.url, "bob", "tablet").await;
    let first = tablet.next_where(|v| v.get("msg").is_some() || v["type"] == "notice").await;
    assert_eq!(first["msg"], "m3", "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_after_the_bound_on_all_history_is_told_how_many_it_missed() {
    // Each inbox may keep 10,000 messages, but all history together only about twenty (a
    // message weighs its envelope's payload plus 256, kept in the inbox and the conversation).
    let (_server, mut phone, notice) =
        back_after(("WHISPEER_MAX_HISTORY_BYTES", "12000"), 40).await;
    assert_eq!(notice["code"], "missed", "{notice}");
    let missed = notice["missed"].as_u64().unwrap();
    assert!((1..40).contains(&missed), "{notice}");
    // The oldest went: what is left is the latest, in order, to the last one.
    let kept = numbers_until(&mut phone, 39).await;
    let expected: Vec<usize> = (missed as usize..40).collect();
    assert_eq!(kept, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_refused_by_name_while_others_are_served() {
    let server = ChatServer::start(&[
        ("WHISPEER_CHAT__MAX_MESSAGES_PER_SEC", "5"),
        ("WHISPEER_CHAT__MAX_GROUPS_PER_USER", "1"),
        ("WHISPEER_CHAT__MAX_MEMBERS_PER_GROUP", "2"),
        ("WHISPEER_CHAT__MAX_CONNECTIONS_PER_USER", "2"),
    ]);
    let mut alice = ChatClient::join(&server.url, "alice", "laptop").await;
    // Twenty at once: a second's worth (5) go, the rest are refused (a few more may go if the
    // burst takes longer than a fifth of a second to arrive).
    for n in 0..20 {
        alice.send(&json!({"to": "bob", "msg": format!("m{n}")})).await;
    }
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(alice.reply().await["code"].as_str().unwrap_or("sent").to_string());
    }
    let sent = codes.iter().filter(|c| *c == "sent").count();
    assert!((5..20).contains(&sent), "a second's worth: {codes:?}");
    assert!(codes.iter().all(|c| c == "sent" || c == "rate_limited"), "{codes:?}");
    assert_eq!(
        alice.ask(json!({"type": "create", "group": "one", "open": true})).await["type"],
        "ok"
    );
    let second = alice.ask(json!({"type": "create", "group": "two"})).await;
    assert_eq!(second["code"], "too_many_groups", "{second}");
    let mut bob = ChatClient::join(&server.url, "bob", "phone").await;
    assert_eq!(bob.ask(json!({"type": "join", "group": "one"})).await["type"], "ok");
    let mut carol = ChatClient::join(&server.url, "carol", "phone").await;
    assert_eq!(carol.ask(json!({"type": "join", "group": "one"})).await["code"], "group_full");
    // A third connection of bob's is refused; his two others stay.
    let _tablet = ChatClient::join(&server.url, "bob", "tablet").await;
    let mut third = ChatClient::connect(&format!("{}?id=bob&device=watch", server.url)).await;
    assert_eq!(third.next().await["code"], "too_many_connections");
    assert_eq!(bob.ask(json!({"type": "members", "group": "one"})).await["type"], "members");
}

#[test]
fn the_chat_page_is_served_over_tls_too() {
    use std::io::BufRead;
    let (dir, _) = temp_dir("tls-page");
    let web = dir.join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("whispeer_wasm.js"), "export default 42;").unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let made = std::process::Command::new(common::BIN)
        .args(["cert", "--out", &path(""), "--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", path("cert.pem"), path("key.pem"));
    std::fs::write(path("whispeer.toml"), tls).unwrap();
    let web_dir = web.to_string_lossy().into_owned();
    let args = ["--chat-listen", "127.0.0.1:0", "--chat-page", &web_dir, "--config"];
    let mut server =
        common::serve_command(&[&args[..], &[path("whispeer.toml").as_str()]].concat(), &[])
            .spawn()
            .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut page = String::new();
    while page.is_empty() {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the server ended");
        if let Some(url) = line.trim().strip_prefix("whispeer: chat page on ") {
            page = url.to_string();
        }
    }
    assert!(page.starts_with("https://127.0.0.1:"), "{page}");
    let curl = |url: &str| {
        let got = std::process::Command::new("curl")
            .args(["-s", "--fail", "--cacert", &path("ca.pem"), url])
            .output()
            .expect("curl: run scripts/install-servers");
        (got.status.success(), String::from_utf8_lossy(&got.stdout).into_owned())
    };
    let (ok, html) = curl(&page);
    assert!(ok && html.contains("whispeer_wasm.js"), "{html}");
    assert_eq!(curl(&format!("{page}pkg/whispeer_wasm.js")), (true, "export default 42;".into()));
    // Plain HTTP on the TLS port gets nothing.
    let (ok, _) = curl(&page.replace("https://", "http://"));
    assert!(!ok);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
