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
    let chat = ChatListener::new("127.0.0.1:0");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_message_opens_on_both_recipient_devices_and_nowhere_else() {
    use whispeer_client::KnownKeys;
    use whispeer_client::engines::Identity;
    let (_broker, url) = listener();
    let ids: Vec<Identity> = (0..4).map(|_| Identity::generate().unwrap()).collect();
    let (alice, _alice_events) = as_user(&url, "alice", "laptop").await;
    let (phone, mut phone_events) = as_user(&url, "bob", "phone").await;
    let (laptop, mut laptop_events) = as_user(&url, "bob", "laptop").await;
    let (carol, _carol_events) = as_user(&url, "carol", "phone").await;
    for (chat, id) in [(&alice, &ids[0]), (&phone, &ids[1]), (&laptop, &ids[2]), (&carol, &ids[3])]
    {
        chat.publish_identity(id).await.unwrap();
    }
    let mut known = KnownKeys::default();
    let bob_keys = alice.keys("bob").await.unwrap();
    assert_eq!(bob_keys.len(), 2);
    assert!(known.check("bob", &bob_keys).is_empty(), "first sight is remembered");

    alice
        .send_sealed_to(&ids[0], "bob", serde_json::json!({"text": "for bob only"}))
        .await
        .unwrap();
    let alice_keys = phone.keys("alice").await.unwrap();
    for (chat, events, id) in
        [(&phone, &mut phone_events, &ids[1]), (&laptop, &mut laptop_events, &ids[2])]
    {
        let sealed = next(events, message).await;
        assert!(sealed.msg["sealed"].is_string(), "the server saw only a box: {:?}", sealed.msg);
        let opened = chat.open(id, &sealed, &alice_keys).unwrap();
        assert_eq!(opened["text"], "for bob only");
    }
    // What the server keeps is the box: carol cannot open it even with the stored copy, and
    // bob cannot open it as coming from carol.
    let stored = phone.history(&Conversation::User("alice".into()), None, 1).await.unwrap();
    assert!(!stored[0].msg.to_string().contains("for bob only"));
    assert!(carol.open(&ids[3], &stored[0], &alice_keys).is_err());
    let carol_keys = phone.keys("carol").await.unwrap();
    assert!(phone.open(&ids[1], &stored[0], &carol_keys).is_err());

    // Bob's phone gets a new key: alice is told, not silently moved to it.
    let renewed = Identity::generate().unwrap();
    phone.publish_identity(&renewed).await.unwrap();
    let changes = known.check("bob", &alice.keys("bob").await.unwrap());
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device, "phone");
    assert_eq!(changes[0].now, renewed.public("phone").fingerprint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_removal_the_group_key_rotates_and_the_removed_member_cannot_open_what_follows() {
    use whispeer_client::GroupKeys;
    use whispeer_client::engines::Identity;
    let (_broker, url) = listener();
    let names = ["alice", "bob", "carol"];
    let mut members = Vec::new();
    for name in names {
        let (chat, events) = as_user(&url, name, "phone").await;
        let identity = Identity::generate().unwrap();
        chat.publish_identity(&identity).await.unwrap();
        members.push((chat, events, identity, GroupKeys::default()));
    }
    members[0].0.create_group("team", true).await.unwrap();
    for member in &members[1..] {
        member.0.join("team").await.unwrap();
    }
    let alice_keys = members[1].0.keys("alice").await.unwrap();
    let (alice, _, alice_id, alice_group) = &mut members[0];
    assert_eq!(alice.rotate_group_key(alice_id, alice_group, "team").await.unwrap(), 1);
    alice.send_sealed_group(alice_id, alice_group, "team", "before").await.unwrap();
    // Bob and carol learn epoch 1 and open the first message.
    let mut first_copy = None;
    for (chat, events, identity, keys) in &mut members[1..] {
        let key_message =
            next(events, |e| message(e).filter(|m| m.msg.get("group_key").is_some())).await;
        assert_eq!(keys.learn(identity, &key_message, &alice_keys).unwrap(), 1);
        let sealed =
            next(events, |e| message(e).filter(|m| m.msg.get("sealed_group").is_some())).await;
        assert_eq!(chat.open_group(keys, &sealed, &alice_keys).unwrap(), "before");
        first_copy = Some(sealed);
    }
    let (alice, _, alice_id, alice_group) = &mut members[0];
    alice.remove("team", "carol").await.unwrap();
    assert_eq!(alice.rotate_group_key(alice_id, alice_group, "team").await.unwrap(), 2);
    alice.send_sealed_group(alice_id, alice_group, "team", "after").await.unwrap();
    let (bob, bob_events, bob_id, bob_keys) = &mut members[1];
    let key_message =
        next(bob_events, |e| message(e).filter(|m| m.msg.get("group_key").is_some())).await;
    assert_eq!(bob_keys.learn(bob_id, &key_message, &alice_keys).unwrap(), 2);
    let after =
        next(bob_events, |e| message(e).filter(|m| m.msg.get("sealed_group").is_some())).await;
    assert_eq!(bob.open_group(bob_keys, &after, &alice_keys).unwrap(), "after");
    // Carol, removed, cannot learn epoch 2 even from bob's copy, nor open what followed; what
    // she had stays readable to her.
    let (carol, _, carol_id, carol_keys) = &mut members[2];
    assert!(carol_keys.learn(carol_id, &key_message, &alice_keys).is_err());
    let refused = carol.open_group(carol_keys, &after, &alice_keys).unwrap_err();
    assert!(refused.to_string().contains("no key of epoch 2"), "{refused}");
    assert_eq!(carol.open_group(carol_keys, &first_copy.unwrap(), &alice_keys).unwrap(), "before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_left_out_of_the_next_group_key() {
    use whispeer_client::GroupKeys;
    use whispeer_client::engines::Identity;
    let (_broker, url) = listener();
    let (alice, _alice_events) = as_user(&url, "alice", "laptop").await;
    let (phone, mut phone_events) = as_user(&url, "bob", "phone").await;
    let (lost, mut lost_events) = as_user(&url, "bob", "lost").await;
    let ids: Vec<Identity> = (0..3).map(|_| Identity::generate().unwrap()).collect();
    for (chat, id) in [(&alice, &ids[0]), (&phone, &ids[1]), (&lost, &ids[2])] {
        chat.publish_identity(id).await.unwrap();
    }
    alice.create_group("team", true).await.unwrap();
    phone.join("team").await.unwrap();
    let mut alice_group = GroupKeys::default();
    let alice_keys = phone.keys("alice").await.unwrap();
    // Bob revokes the device he lost; the next key leaves it out.
    phone.revoke_device("lost").await.unwrap();
    assert_eq!(phone.keys("bob").await.unwrap().len(), 1);
    let refused = phone.revoke_device("lost").await.unwrap_err();
    assert!(refused.to_string().contains("no_such_device"), "{refused}");
    assert_eq!(alice.rotate_group_key(&ids[0], &mut alice_group, "team").await.unwrap(), 1);
    let is_key = |e| message(e).filter(|m| m.msg.get("group_key").is_some());
    let for_phone = next(&mut phone_events, is_key).await;
    assert_eq!(GroupKeys::default().learn(&ids[1], &for_phone, &alice_keys).unwrap(), 1);
    // The lost device still reads bob's inbox (until its session ends), but cannot learn it.
    let for_lost = next(&mut lost_events, is_key).await;
    assert!(GroupKeys::default().learn(&ids[2], &for_lost, &alice_keys).is_err());
}
