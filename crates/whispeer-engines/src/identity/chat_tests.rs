//! `ChatKeys`: direct and group messages open for their members' devices only, a moved or
//! re-signed message does not open, a changed key is refused until trusted, and the state
//! survives a save and a restore.

use serde_json::{Value, json};

use super::*;

fn device(user: &str, name: &str) -> ChatKeys {
    ChatKeys::new(Identity::generate().unwrap(), user, name, None).unwrap()
}

fn message(opened: Opened) -> Value {
    match opened {
        Opened::Message(value) => value,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn a_direct_message_opens_on_every_device_of_both_users_and_nowhere_else() {
    let mut alice = device("alice", "laptop");
    let mut alice_phone = device("alice", "phone");
    let mut bob_phone = device("bob", "phone");
    let mut bob_laptop = device("bob", "laptop");
    let mut carol = device("carol", "phone");
    let bob_keys = [bob_phone.public().clone(), bob_laptop.public().clone()];
    let own = [alice.public().clone(), alice_phone.public().clone()];
    let sealed = alice.seal_direct("bob", &bob_keys, &own, &json!("hi bob")).unwrap();
    for reader in [&mut bob_phone, &mut bob_laptop, &mut alice_phone] {
        assert_eq!(message(reader.open("alice", Some("bob"), None, &sealed)), json!("hi bob"));
    }
    assert!(matches!(carol.open("alice", Some("bob"), None, &sealed), Opened::Unreadable(_)));
    // Moved to another conversation, or claimed by another sender: it does not open.
    assert!(matches!(bob_phone.open("alice", Some("carol"), None, &sealed), Opened::Unreadable(_)));
    assert!(matches!(bob_phone.open("mallory", Some("bob"), None, &sealed), Opened::Unreadable(_)));
    assert_eq!(bob_phone.open("alice", Some("bob"), None, &json!("plain")), Opened::Plain);
    assert!(matches!(
        alice.seal_direct("dave", &[], &own, &json!("x")),
        Err(ChatKeysError::NoKeys(user)) if user == "dave"
    ));
}

#[test]
fn a_changed_key_is_refused_until_trusted() {
    let mut alice = device("alice", "laptop");
    let bob = device("bob", "phone");
    let own = [alice.public().clone()];
    alice.seal_direct("bob", &[bob.public().clone()], &own, &json!(1)).unwrap();
    // The directory now gives another key for bob's phone (swapped, or a reinstalled phone).
    let mut swapped = device("bob", "phone");
    let refused = alice.seal_direct("bob", &[swapped.public().clone()], &own, &json!(2));
    let Err(ChatKeysError::KeyChanged(changes)) = refused else { panic!("{refused:?}") };
    assert_eq!(changes[0].was, bob.public().fingerprint());
    assert_eq!(changes[0].now, swapped.public().fingerprint());
    // A message signed by the new key is not opened either.
    let from_new = swapped.seal_direct("alice", &own, &[], &json!("it's me")).unwrap();
    assert!(matches!(alice.open("bob", Some("alice"), None, &from_new), Opened::KeyChanged(_)));
    assert_eq!(alice.trust("bob"), 1);
    let sealed = alice.seal_direct("bob", &[swapped.public().clone()], &own, &json!(3)).unwrap();
    assert_eq!(message(swapped.open("alice", Some("bob"), None, &sealed)), json!(3));
    assert_eq!(message(alice.open("bob", Some("alice"), None, &from_new)), json!("it's me"));
}

#[test]
fn a_removed_member_cannot_open_what_follows_a_rotation() {
    let mut alice = device("alice", "laptop");
    let mut bob = device("bob", "phone");
    let mut carol = device("carol", "phone");
    let members = |users: &[&ChatKeys]| -> Vec<(String, Vec<PublicIdentity>)> {
        users.iter().map(|k| (k.user().to_string(), vec![k.public().clone()])).collect()
    };
    assert!(alice.needs_group_key("team"));
    let (key_message, epoch) = alice.new_group_key("team", &members(&[&bob, &carol])).unwrap();
    assert_eq!(epoch, 1);
    for member in [&mut bob, &mut carol] {
        let learned = member.open("alice", None, Some("team"), &key_message);
        assert_eq!(learned, Opened::GroupKey { group: "team".into(), epoch: 1 });
    }
    let first = alice.seal_group("team", &json!("to both")).unwrap();
    assert_eq!(message(carol.open("alice", None, Some("team"), &first)), json!("to both"));
    // Carol is removed: the group needs a new key; the next one leaves her out.
    alice.group_changed("team");
    assert!(alice.needs_group_key("team"));
    let (key_message, epoch) = alice.new_group_key("team", &members(&[&bob])).unwrap();
    assert_eq!(epoch, 2);
    bob.open("alice", None, Some("team"), &key_message);
    assert!(matches!(carol.open("alice", None, Some("team"), &key_message), Opened::Unreadable(_)));
    let after = alice.seal_group("team", &json!("bob only")).unwrap();
    assert_eq!(message(bob.open("alice", None, Some("team"), &after)), json!("bob only"));
    assert!(matches!(carol.open("alice", None, Some("team"), &after), Opened::Unreadable(_)));
    // The old epoch still opens for those who had it; a group message moved does not.
    assert_eq!(message(bob.open("alice", None, Some("team"), &first)), json!("to both"));
    assert!(matches!(bob.open("alice", None, Some("other"), &after), Opened::Unreadable(_)));
    // Bob, a member, can send under the current key.
    let from_bob = bob.seal_group("team", &json!("hi")).unwrap();
    assert_eq!(message(alice.open("bob", None, Some("team"), &from_bob)), json!("hi"));
}

#[test]
fn the_state_survives_a_save_and_a_restore() {
    let identity_text = Identity::generate().unwrap().to_text();
    let identity = Identity::from_text(&identity_text).unwrap();
    let mut alice = ChatKeys::new(identity, "alice", "laptop", None).unwrap();
    let mut bob = device("bob", "phone");
    let (key_message, _) =
        alice.new_group_key("team", &[("bob".into(), vec![bob.public().clone()])]).unwrap();
    bob.open("alice", None, Some("team"), &key_message);
    assert!(alice.take_changed());
    assert!(!alice.take_changed());
    let saved = alice.to_text();
    let identity = Identity::from_text(&identity_text).unwrap();
    let mut again = ChatKeys::new(identity, "alice", "laptop", Some(&saved)).unwrap();
    assert!(!again.needs_group_key("team"));
    let sealed = again.seal_group("team", &json!("after a restart")).unwrap();
    assert_eq!(message(bob.open("alice", None, Some("team"), &sealed)), json!("after a restart"));
    // Bob's key is remembered too: a swapped one is still caught after the restart.
    let swapped = device("bob", "phone");
    let own = [again.public().clone()];
    assert!(matches!(
        again.seal_direct("bob", &[swapped.public().clone()], &own, &json!(1)),
        Err(ChatKeysError::KeyChanged(_))
    ));
    assert!(ChatKeys::new(Identity::generate().unwrap(), "a", "b", Some("{")).is_err());
}

#[test]
fn a_directory_entry_whose_signature_does_not_verify_is_never_sealed_to() {
    let mut alice = device("alice", "laptop");
    let bob = device("bob", "phone");
    let mut forged = bob.public().clone();
    forged.x25519 = device("mallory", "phone").public().x25519;
    let own = [alice.public().clone()];
    assert!(matches!(
        alice.seal_direct("bob", &[forged], &own, &json!("x")),
        Err(ChatKeysError::NoKeys(_))
    ));
    // The real entry, seen afterwards, is taken on first sight and used.
    let sealed = alice.seal_direct("bob", &[bob.public().clone()], &own, &json!("y")).unwrap();
    let mut bob = bob;
    assert_eq!(message(bob.open("alice", Some("bob"), None, &sealed)), json!("y"));
}
