//! The SDK's chat against a real chat listener: messages as events, groups, history, presence
//! and refusals by code.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::timeout;
use whispeer::server::Chat as ChatListener;
use whispeer::{Broker, BrokerOptions};
use whispeer_client::{Chat, ChatError, ChatEvent, ChatEvents, ChatOptions, Conversation};

fn listener() -> (Broker, String) {
    listener_with(whispeer::server::ChatConfig::default())
}

/// A listener whose per-user rate limit lets a test send a backlog of a thousand at once.
fn fast_listener() -> (Broker, String) {
    let mut config = whispeer::server::ChatConfig::default();
    config.max_messages_per_sec = 100_000;
    listener_with(config)
}

fn listener_with(config: whispeer::server::ChatConfig) -> (Broker, String) {
    let chat = ChatListener::new("127.0.0.1:0").config(config);
    let status = chat.status();
    let broker = Broker::builder(BrokerOptions::default()).with(chat).build();
    (broker, format!("ws://{}/ws", status.local_addr().unwrap()))
}

async fn as_user(url: &str, user: &str, device: &str) -> (Chat, ChatEvents) {
    Chat::connect(ChatOptions::new(url).user(user).device(device)).await.unwrap()
}

/// The next event for which `wanted` gives something.
async fn next<T>(events: &mut ChatEvents, wanted: impl Fn(ChatEvent) -> Option<T>) -> T {
    loop {
        let event = timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap();
        if let Some(found) = wanted(event) {
            return found;
        }
    }
}

fn message(event: ChatEvent) -> Option<whispeer_client::ChatMessage> {
    match event {
        ChatEvent::Message(message) => Some(message),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_group_messages_history_presence_and_refusals() {
    let (_broker, url) = listener();
    let (alice, mut alice_events) = as_user(&url, "alice", "laptop").await;
    let (bob, mut bob_events) = as_user(&url, "bob", "phone").await;
    assert_eq!((alice.user(), alice.device()), ("alice", "laptop"));

    let sent = alice.send_to("bob", "hi bob").await.unwrap();
    let got = next(&mut bob_events, message).await;
    assert_eq!(
        (got.id.as_str(), got.from.as_str(), got.msg.as_str()),
        (sent.id.as_str(), "alice", Some("hi bob"))
    );

    alice.create_group("team", false).await.unwrap();
    let refused = bob.join("team").await.unwrap_err();
    assert!(
        matches!(&refused, ChatError::Refused { code, .. } if code == "invite_only"),
        "{refused}"
    );
    alice.invite("team", "bob").await.unwrap();
    bob.join("team").await.unwrap();
    alice.send_group("team", serde_json::json!({"text": "standup"})).await.unwrap();
    let group = next(&mut bob_events, |e| message(e).filter(|m| m.group.is_some())).await;
    assert_eq!(group.msg["text"], "standup");
    let members = bob.members("team").await.unwrap();
    assert_eq!(members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(members[0].role.as_deref(), Some("owner"));

    let history = bob.history(&Conversation::User("alice".into()), None, 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].seq, Some(1));
    let team = alice.history(&Conversation::Group("team".into()), None, 10).await.unwrap();
    assert!(team.iter().any(|m| m.msg["text"] == "standup"), "{team:?}");

    let unread = bob.unread().await.unwrap();
    assert!(unread.contains(&(Conversation::User("alice".into()), 1, 1)), "{unread:?}");
    bob.read(&Conversation::User("alice".into()), 1).await.unwrap();
    let read = next(&mut alice_events, |e| match e {
        ChatEvent::Receipt { status, by, seq, .. } if status == "read" => Some((by, seq)),
        _ => None,
    })
    .await;
    assert_eq!(read, ("bob".to_string(), Some(1)));
    bob.typing(&Conversation::User("alice".into())).await.unwrap();
    let typing = next(&mut alice_events, |e| match e {
        ChatEvent::Typing { from, .. } => Some(from),
        _ => None,
    })
    .await;
    assert_eq!(typing, "bob");
    let who = alice.who().await.unwrap();
    assert!(who.iter().any(|p| p.user == "bob" && p.online), "{who:?}");
    drop((bob, bob_events));
    let offline = next(&mut alice_events, |e| match e {
        ChatEvent::Presence { user, online: false, last_seen } => Some((user, last_seen)),
        _ => None,
    })
    .await;
    assert_eq!(offline.0, "bob");
    assert!(offline.1.is_some());
}

/// A connection that does not seal: it sees what the server holds.
async fn plain(url: &str, user: &str, device: &str) -> (Chat, ChatEvents) {
    Chat::connect(ChatOptions::new(url).user(user).device(device).plain()).await.unwrap()
}

fn opened(event: ChatEvent) -> Option<whispeer_client::ChatMessage> {
    message(event).filter(|m| m.sealed && m.unreadable.is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_direct_message_is_sealed_and_opens_on_both_recipient_devices_only() {
    let (_broker, url) = listener();
    let (alice, mut alice_events) = as_user(&url, "alice", "laptop").await;
    let (_phone, mut phone_events) = as_user(&url, "bob", "phone").await;
    let (_laptop, mut laptop_events) = as_user(&url, "bob", "laptop").await;
    let sent = alice.send_to("bob", serde_json::json!({"text": "for bob only"})).await.unwrap();
    assert!(sent.sealed);
    for events in [&mut phone_events, &mut laptop_events] {
        let got = next(events, message).await;
        assert!(got.sealed && got.unreadable.is_none(), "{got:?}");
        assert_eq!((got.from.as_str(), &got.msg["text"]), ("alice", &"for bob only".into()));
    }
    // The server holds a box: a connection that does not seal gets only that, and carol
    // (neither party) cannot open the copy.
    let (raw, _raw_events) = plain(&url, "bob", "raw").await;
    let stored = raw.history(&Conversation::User("alice".into()), None, 10).await.unwrap();
    assert!(stored[0].msg["sealed"].is_string(), "{:?}", stored[0].msg);
    assert!(!stored[0].msg.to_string().contains("for bob only"));
    let (carol, _carol_events) = as_user(&url, "carol", "phone").await;
    let Some(copy) = message(carol.open(stored[0].clone())) else { panic!("not a message") };
    assert!(copy.unreadable.is_some(), "{copy:?}");
    // Bob's own history opens.
    let mine = _phone.history(&Conversation::User("alice".into()), None, 10).await.unwrap();
    assert_eq!(mine[0].msg["text"], "for bob only");

    // Bob's phone comes back with another key: alice is told and sends nothing until she
    // trusts it; a message signed by the new key is reported, not opened.
    let (renewed, mut renewed_events) = as_user(&url, "bob", "phone").await;
    // Contacts are told when a user's devices change (alice heard of her own device too).
    next(&mut alice_events, |e| {
        matches!(e, ChatEvent::KeysChanged { user } if user == "bob").then_some(())
    })
    .await;
    let refused = alice.send_to("bob", "still there?").await.unwrap_err();
    let ChatError::KeyChanged(changes) = refused else { panic!("{refused}") };
    assert_eq!(changes[0].device, "phone");
    assert_eq!(Some(changes[0].now.clone()), renewed.fingerprint());
    renewed.send_to("alice", "new phone").await.unwrap();
    let change = next(&mut alice_events, |e| match e {
        ChatEvent::KeyChanged { change, message } => Some((change, message)),
        _ => None,
    })
    .await;
    assert_eq!((change.0.user.as_str(), change.1.msg.get("sealed").is_some()), ("bob", true));
    assert_eq!(alice.trust("bob"), 1);
    alice.send_to("bob", "welcome back").await.unwrap();
    let got = next(&mut renewed_events, opened).await;
    assert_eq!(got.msg, "welcome back");
    // Sending to a client that publishes no keys is refused, and plain reaches it.
    let refused = alice.send_to("dave", "hi").await.unwrap_err();
    assert!(matches!(refused, ChatError::Keys(_)), "{refused}");
    alice.send_plain_to("dave", "hi").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_removal_the_group_key_rotates_and_the_removed_member_cannot_open_what_follows() {
    let (_broker, url) = listener();
    let (alice, mut alice_events) = as_user(&url, "alice", "phone").await;
    let (bob, mut bob_events) = as_user(&url, "bob", "phone").await;
    let (carol, mut carol_events) = as_user(&url, "carol", "phone").await;
    alice.create_group("team", true).await.unwrap();
    bob.join("team").await.unwrap();
    carol.join("team").await.unwrap();
    next(&mut alice_events, |e| {
        matches!(e, ChatEvent::Group { user, .. } if user == "carol").then_some(())
    })
    .await;
    alice.send_group("team", "before").await.unwrap();
    for events in [&mut bob_events, &mut carol_events] {
        let key = next(events, |e| match e {
            ChatEvent::GroupKey { epoch, from, .. } => Some((epoch, from)),
            _ => None,
        })
        .await;
        assert_eq!(key, (1, "alice".to_string()));
        assert_eq!(next(events, opened).await.msg, "before");
    }
    // Bob sends under the same key (no new one); the others open it.
    bob.send_group("team", "from bob").await.unwrap();
    assert_eq!(next(&mut alice_events, opened).await.msg, "from bob");

    alice.remove("team", "carol").await.unwrap();
    alice.send_group("team", "after").await.unwrap();
    let epoch = next(&mut bob_events, |e| match e {
        ChatEvent::GroupKey { epoch, .. } => Some(epoch),
        _ => None,
    })
    .await;
    assert_eq!(epoch, 2);
    assert_eq!(next(&mut bob_events, opened).await.msg, "after");
    // Carol, removed, gets nothing more; given the stored copies she opens what she had and
    // neither the new key nor what followed.
    let (raw, _raw_events) = plain(&url, "bob", "raw").await;
    let log = raw.history(&Conversation::Group("team".into()), None, 50).await.unwrap();
    let sealed: Vec<_> = log.into_iter().filter(|m| m.msg.get("group_key").is_none()).collect();
    assert_eq!(sealed.len(), 3, "{sealed:?}");
    let Some(before) = message(carol.open(sealed[0].clone())) else { panic!() };
    assert_eq!(before.msg, "before");
    let Some(after) = message(carol.open(sealed[2].clone())) else { panic!() };
    let reason = after.unreadable.clone().unwrap_or_default();
    assert!(reason.contains("no key of epoch 2"), "{reason}");
    // Still the sealed form (an object), never the text: a substring test on the sealed JSON
    // would fail by chance whenever its base64 happened to spell the word.
    assert!(after.msg.is_object() && after.msg != "after", "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_left_out_of_the_next_group_key() {
    let (_broker, url) = listener();
    let (alice, mut alice_events) = as_user(&url, "alice", "laptop").await;
    let (phone, mut phone_events) = as_user(&url, "bob", "phone").await;
    let (_lost, mut lost_events) = as_user(&url, "bob", "lost").await;
    alice.create_group("team", true).await.unwrap();
    phone.join("team").await.unwrap();
    next(&mut alice_events, |e| {
        matches!(e, ChatEvent::Group { user, .. } if user == "bob").then_some(())
    })
    .await;
    alice.send_group("team", "one").await.unwrap();
    assert_eq!(next(&mut lost_events, opened).await.msg, "one");
    // Bob revokes the device he lost: the members are told, and the next key leaves it out.
    phone.revoke_device("lost").await.unwrap();
    assert_eq!(phone.keys("bob").await.unwrap().len(), 1);
    let refused = phone.revoke_device("lost").await.unwrap_err();
    assert!(refused.to_string().contains("no_such_device"), "{refused}");
    next(&mut alice_events, |e| {
        matches!(e, ChatEvent::Group { event, .. } if event == "keys").then_some(())
    })
    .await;
    alice.send_group("team", "two").await.unwrap();
    for expected in ["one", "two"] {
        assert_eq!(next(&mut phone_events, opened).await.msg, expected);
    }
    // The lost device still reads bob's inbox (until its session ends), but cannot open it.
    let unread = next(&mut lost_events, |e| message(e).filter(|m| m.unreadable.is_some())).await;
    assert!(unread.msg.is_object() && unread.msg != "two", "{unread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_file_keeps_the_device_key_and_its_group_keys_across_restarts() {
    let (_broker, url) = listener();
    let dir = std::env::temp_dir().join(format!("whispeer-chat-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("alice.identity");
    let connect = || {
        Chat::connect(ChatOptions::new(&url).user("alice").device("laptop").identity_file(&file))
    };
    let (alice, mut alice_events) = connect().await.unwrap();
    let fingerprint = alice.fingerprint();
    let (bob, mut bob_events) = as_user(&url, "bob", "phone").await;
    alice.create_group("team", true).await.unwrap();
    bob.join("team").await.unwrap();
    bob.send_group("team", "first").await.unwrap();
    assert_eq!(next(&mut alice_events, opened).await.msg, "first");
    drop((alice, alice_events));
    // Back with the same file: same fingerprint (bob's client sees no change), bob's group key
    // still opens, and alice seals under it without making a new one.
    let (alice, mut alice_events) = connect().await.unwrap();
    assert_eq!(alice.fingerprint(), fingerprint);
    bob.send_to("alice", "direct").await.unwrap();
    alice.send_group("team", "still epoch 1").await.unwrap();
    let got = next(&mut bob_events, |e| match e {
        ChatEvent::GroupKey { .. } => Some(None),
        ChatEvent::Message(m) if m.group.is_some() => Some(Some(m)),
        _ => None,
    })
    .await;
    assert_eq!(got.map(|m| m.msg), Some("still epoch 1".into()), "no new key was made");
    bob.send_group("team", "second").await.unwrap();
    // "first" may come again: the new connection can open the inbox before the old one's last
    // acknowledgement reached the server (at least once, the same id).
    let new = |e| opened(e).filter(|m| m.msg != "first");
    assert_eq!(next(&mut alice_events, new).await.msg, "direct");
    assert_eq!(next(&mut alice_events, new).await.msg, "second");
    let mode = std::fs::metadata(&file).unwrap();
    #[cfg(unix)]
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_program_did_not_take_comes_again_on_the_next_connection() {
    let (_broker, url) = listener();
    let (alice, _alice_events) = plain(&url, "alice", "laptop").await;
    let (bob, mut events) = plain(&url, "bob", "phone").await;
    for n in 0..3 {
        alice.send_to("bob", n).await.unwrap();
    }
    // Bob's program takes the first message; all three reached its connection.
    assert_eq!(next(&mut events, message).await.msg, serde_json::json!(0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.who().await.unwrap();
    drop((bob, events));
    // The device comes back: what its program never took comes again, once.
    let (_bob, mut again) = plain(&url, "bob", "phone").await;
    assert_eq!(next(&mut again, message).await.msg, serde_json::json!(1));
    assert_eq!(next(&mut again, message).await.msg, serde_json::json!(2));
    let more = timeout(Duration::from_millis(500), again.next()).await;
    assert!(!matches!(more, Ok(Some(ChatEvent::Message(_)))), "nothing twice: {more:?}");
}

/// A device that was away comes back to more in its inbox than the events queue holds (1,024):
/// here the delivery receipts of its own messages, kept for it and never taken (its program
/// dropped the events), as `whispeer bench --chat` leaves its senders. `connect` publishes the
/// device's key and returns, though the reply waits behind the backlog that the program can
/// take only once connected; then the backlog comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_to_a_backlog_larger_than_the_events_queue_connects_and_gets_it_all() {
    let (_broker, url) = fast_listener();
    let (_bob, mut bob_events) = as_user(&url, "bob", "phone").await;
    let (alice, alice_events) = as_user(&url, "alice", "laptop").await;
    drop(alice_events);
    const BACKLOG: u64 = 1_100;
    for n in 0..BACKLOG {
        alice.send_to("bob", n).await.unwrap();
    }
    for n in 0..BACKLOG {
        assert_eq!(next(&mut bob_events, opened).await.msg, serde_json::json!(n));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(alice);
    let (_alice, mut events) = timeout(Duration::from_secs(20), as_user(&url, "alice", "laptop"))
        .await
        .expect("connect returned");
    let mut receipts = 0;
    while receipts < BACKLOG {
        if matches!(next(&mut events, Some).await, ChatEvent::Receipt { .. }) {
            receipts += 1;
        }
    }
}

/// A program that reads its messages and ends at once: `ChatEvents::close` acknowledges what
/// it took before the connection goes, so the device's next connection gets none of it again.
/// (The program is a runtime of its own, dropped once `close` returns, as a process that exits:
/// without `close`, the acknowledgement, sent at most 50 ms after the messages were taken,
/// would never go.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_closes_its_events_and_ends_gets_nothing_again() {
    let (_broker, url) = listener();
    let (alice, _alice_events) = plain(&url, "alice", "laptop").await;
    let (connected, ready) = tokio::sync::oneshot::channel();
    let program = std::thread::spawn({
        let url = url.clone();
        move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let (_bob, mut events) = plain(&url, "bob", "phone").await;
                connected.send(()).unwrap();
                for n in 0..3 {
                    assert_eq!(next(&mut events, message).await.msg, serde_json::json!(n));
                }
                timeout(Duration::from_secs(10), events.close()).await.expect("closed");
            });
        }
    });
    ready.await.unwrap();
    for n in 0..3 {
        alice.send_to("bob", n).await.unwrap();
    }
    tokio::task::spawn_blocking(move || program.join().unwrap()).await.unwrap();
    let (_bob, mut again) = plain(&url, "bob", "phone").await;
    alice.send_to("bob", 3).await.unwrap();
    assert_eq!(next(&mut again, message).await.msg, serde_json::json!(3), "nothing twice");
}

/// `close` while the connection's task waits for room in a full events queue (1,024): the
/// program took one message of 1,100 waiting and closes. `close` returns, and the next
/// connection starts at the second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_behind_a_full_events_queue_and_acknowledges_only_what_was_taken() {
    let (_broker, url) = fast_listener();
    let (alice, _alice_events) = plain(&url, "alice", "laptop").await;
    drop(plain(&url, "bob", "phone").await);
    for n in 0..1_100 {
        alice.send_to("bob", n).await.unwrap();
    }
    let (_bob, mut events) = plain(&url, "bob", "phone").await;
    assert_eq!(next(&mut events, message).await.msg, serde_json::json!(0));
    // The queue fills behind the message taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    timeout(Duration::from_secs(10), events.close()).await.expect("close returned");
    let (_bob, mut again) = plain(&url, "bob", "phone").await;
    assert_eq!(next(&mut again, message).await.msg, serde_json::json!(1));
}
