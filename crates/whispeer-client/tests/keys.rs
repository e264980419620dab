//! End-to-end keys for pub/sub through a real server with API keys: the directory of device
//! identities (each principal writes only its own entries), a key policy whose messages only
//! its members' devices open, rotation when a member is removed, and messages that do not open
//! once re-addressed or altered.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use whispeer::server::{ApiKeys, Permissions, Principal, ServerConfig, Tcp};
use whispeer::{Broker, BrokerOptions};
use whispeer_client::engines::Identity;
use whispeer_client::proto::ErrorCode;
use whispeer_client::{Client, ClientError, ClientOptions, ClientSubscription, Delivery};
use whispeer_client::{KeyPolicy, PolicyError};

fn server() -> (Broker, SocketAddr) {
    let mut keys = ApiKeys::default();
    for (index, name) in ["alice", "bob", "carol", "mallory"].iter().enumerate() {
        let principal = Principal::new(*name, Permissions::everything());
        keys.add(index, &format!("{name}-key"), principal).unwrap();
    }
    let mut config = ServerConfig::default();
    config.api_keys = keys;
    let broker = Broker::builder(BrokerOptions::default())
        .with(Tcp::new("127.0.0.1:0").config(config))
        .build();
    let addr = broker.local_addrs()[0];
    (broker, addr)
}

async fn client(addr: SocketAddr, name: &str) -> Client {
    let options = ClientOptions::new(addr.to_string()).api_key(format!("{name}-key"));
    Client::connect_with(options).await.unwrap()
}

/// A device of `name`: connected, its identity published as `device`.
async fn device(addr: SocketAddr, name: &str, device: &str) -> (Client, Arc<Identity>) {
    let client = client(addr, name).await;
    let identity = Arc::new(Identity::generate().unwrap());
    client.publish_identity(name, device, &identity).await.unwrap();
    (client, identity)
}

async fn next(sub: &mut ClientSubscription<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_devices_open_a_policys_messages_and_a_removed_member_opens_nothing_new() {
    let (_broker, addr) = server();
    let (alice, alice_id) = device(addr, "alice", "laptop").await;
    let (bob, bob_id) = device(addr, "bob", "phone").await;
    let (bob_laptop, bob_laptop_id) = device(addr, "bob", "laptop").await;
    let (carol, carol_id) = device(addr, "carol", "phone").await;
    let (mallory, mallory_id) = device(addr, "mallory", "phone").await;

    // The directory: each principal's devices, signed; nobody writes another's entries.
    let bobs = alice.identities("bob").await.unwrap();
    let mut names: Vec<&str> = bobs.iter().map(|p| p.device.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["laptop", "phone"]);
    let forged = mallory.publish_identity("bob", "phone", &mallory_id).await.unwrap_err();
    assert!(
        matches!(&forged, ClientError::Server { code, .. } if *code == ErrorCode::FORBIDDEN),
        "{forged:?}"
    );
    assert_eq!(alice.identities("bob").await.unwrap().len(), 2, "bob's entries unchanged");

    let policy = KeyPolicy::create(&alice, alice_id, "alice", "ops", "ops/#", &["bob", "carol"])
        .await
        .unwrap();
    assert_eq!(policy.state().unwrap().1, ["alice", "bob", "carol"]);
    let at_bob = KeyPolicy::follow(&bob, Arc::clone(&bob_id), "alice", "ops").await.unwrap();
    let at_bob_laptop =
        KeyPolicy::follow(&bob_laptop, bob_laptop_id, "alice", "ops").await.unwrap();
    let at_carol = KeyPolicy::follow(&carol, carol_id, "alice", "ops").await.unwrap();
    let at_mallory =
        KeyPolicy::follow(&mallory, Arc::clone(&mallory_id), "alice", "ops").await.unwrap();

    let mut bob_sub = bob.messages("ops/#").await.unwrap();
    let mut bob_laptop_sub = bob_laptop.messages("ops/#").await.unwrap();
    let mut carol_sub = carol.messages("ops/#").await.unwrap();
    let mut mallory_sub = mallory.messages("ops/#").await.unwrap();
    policy.publish("ops/deploy", "release 1.2").await.unwrap();
    let first = next(&mut bob_sub).await;
    assert_eq!(at_bob.open_value::<String>(&first).await.unwrap(), "release 1.2");
    let on_laptop = next(&mut bob_laptop_sub).await;
    assert_eq!(at_bob_laptop.open_value::<String>(&on_laptop).await.unwrap(), "release 1.2");
    let at_carols = next(&mut carol_sub).await;
    assert_eq!(at_carol.open_value::<String>(&at_carols).await.unwrap(), "release 1.2");
    // A principal outside the policy receives the bytes (its ACLs allow the topic) and opens
    // nothing; it cannot publish under the policy either.
    let seen = next(&mut mallory_sub).await;
    assert!(at_mallory.open(&seen).await.is_err());
    assert!(!seen.payload().windows(11).any(|w| w == b"release 1.2"), "ciphertext only");
    let refused = at_mallory.publish("ops/x", "let me in").await.unwrap_err();
    assert!(matches!(refused, PolicyError::NotMember(_)), "{refused:?}");

    // Members publish too, only inside the filter.
    at_carol.publish("ops/status", "green").await.unwrap();
    let green = next(&mut bob_sub).await;
    assert_eq!(at_bob.open_value::<String>(&green).await.unwrap(), "green");
    let _ = next(&mut bob_laptop_sub).await;
    let _ = next(&mut carol_sub).await;
    let _ = next(&mut mallory_sub).await;
    let outside = at_carol.publish("elsewhere/x", "no").await.unwrap_err();
    assert!(matches!(outside, PolicyError::Outside { .. }), "{outside:?}");

    // A message re-addressed to another topic does not open.
    let mut watch = bob.messages("moved/deploy").await.unwrap();
    let relay = client(addr, "mallory").await;
    let options = whispeer_client::PublishOptions::new();
    relay.publish_bytes_with("moved/deploy", first.payload().clone(), &options).await.unwrap();
    let moved = next(&mut watch).await;
    assert!(at_bob.open(&moved).await.is_err(), "bound to its topic");

    // Bob's phone keeps its keys in a file from now on.
    let saved = std::env::temp_dir().join(format!("whispeer-policy-{}.keys", std::process::id()));
    let _ = std::fs::remove_file(&saved);
    at_bob.save_keys_in(&saved).unwrap();
    // Carol is removed: a new epoch, sealed to alice and bob only.
    policy.set_members(&["bob"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    policy.publish("ops/deploy", "release 1.3").await.unwrap();
    let after = next(&mut bob_sub).await;
    assert_eq!(at_bob.open_value::<String>(&after).await.unwrap(), "release 1.3");
    let carols = next(&mut carol_sub).await;
    let shut = at_carol.open(&carols).await.unwrap_err();
    assert!(matches!(shut, PolicyError::NoKey(2)), "{shut:?}");
    // What she had still opens for her; she may no longer publish under the policy.
    assert_eq!(at_carol.open_value::<String>(&at_carols).await.unwrap(), "release 1.2");
    let removed = at_carol.publish("ops/status", "still here").await.unwrap_err();
    assert!(matches!(removed, PolicyError::NotMember(_)), "{removed:?}");
    // A device that follows later gets the current epoch only, and what it kept.
    let late = KeyPolicy::follow(&bob, Arc::clone(&bob_id), "alice", "ops").await.unwrap();
    assert_eq!(late.state().unwrap().2, 2);
    assert!(late.open(&first).await.is_err(), "epoch 1 was not sealed in the current bundle");
    late.save_keys_in(&saved).unwrap();
    assert_eq!(late.open_value::<String>(&first).await.unwrap(), "release 1.2");
    assert_eq!(late.open_value::<String>(&after).await.unwrap(), "release 1.3");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the keys file is its owner's only");
    }
    let _ = std::fs::remove_file(&saved);
}

/// Waits (up to 5 s) until `done` holds.
async fn eventually(done: impl Fn() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(done(), "not within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_key_changed_in_the_directory_is_reported_and_not_trusted_until_told() {
    let (_broker, addr) = server();
    let (alice, alice_laptop) = device(addr, "alice", "laptop").await;
    let (bob, bob_id) = device(addr, "bob", "phone").await;
    let kept = std::env::temp_dir().join(format!("whispeer-owner-{}.keys", std::process::id()));
    let _ = std::fs::remove_file(&kept);
    let policy =
        KeyPolicy::create(&alice, alice_laptop, "alice", "ops", "ops/#", &["bob"]).await.unwrap();
    let at_bob =
        KeyPolicy::follow_kept(&bob, Arc::clone(&bob_id), "alice", "ops", &kept).await.unwrap();
    assert_eq!(at_bob.state().unwrap().2, 1);
    assert!(at_bob.changes().is_empty());

    // A new device of alice's publishes the next epoch: trusted on first sight.
    let (alice_phone, alice_phone_id) = device(addr, "alice", "phone").await;
    // (Not sealed to the phone yet, it knows the policy's epoch but not its filter: it makes
    // the policy again.)
    KeyPolicy::create(&alice_phone, alice_phone_id, "alice", "ops", "ops/#", &["bob"])
        .await
        .unwrap();
    eventually(|| at_bob.state().unwrap().2 == 2).await;
    assert!(at_bob.changes().is_empty(), "a new device is not a change");
    let mut bob_sub = bob.messages("ops/#").await.unwrap();
    eventually(|| policy.state().unwrap().2 == 2).await;
    policy.publish("ops/deploy", "from the laptop").await.unwrap();
    let first = next(&mut bob_sub).await;
    assert_eq!(at_bob.open_value::<String>(&first).await.unwrap(), "from the laptop");

    // Someone with alice's API key but not her laptop puts another key in the directory for
    // the laptop, and publishes an epoch that lets mallory in.
    let (_mallory, _) = device(addr, "mallory", "phone").await;
    let thief = client(addr, "alice").await;
    let stolen = Arc::new(Identity::generate().unwrap());
    thief.publish_identity("alice", "laptop", &stolen).await.unwrap();
    // Its epoch 3 names mallory.
    let members = ["bob", "mallory"];
    let forged =
        KeyPolicy::create(&thief, stolen.clone(), "alice", "ops", "ops/#", &members).await.unwrap();
    eventually(|| !at_bob.changes().is_empty()).await;
    let changes = at_bob.changes();
    assert_eq!(changes.len(), 1, "the laptop's new key is reported");
    assert_eq!(changes[0].device, "laptop");
    assert_eq!(changes[0].now, stolen.public("laptop").fingerprint());
    assert_eq!(at_bob.state().unwrap().2, 3, "epoch 3 seen, not opened");
    let refused = at_bob.publish("ops/status", "hello?").await.unwrap_err();
    assert!(matches!(refused, PolicyError::OwnerKeyChanged(_)), "{refused:?}");
    forged.publish("ops/deploy", "from the thief").await.unwrap();
    let sneaky = next(&mut bob_sub).await;
    let unopened = at_bob.open(&sneaky).await.unwrap_err();
    assert!(matches!(unopened, PolicyError::OwnerKeyChanged(_)), "{unopened:?}");

    // After a restart the kept file still says which key the laptop had: reported at once.
    drop(at_bob);
    let again =
        KeyPolicy::follow_kept(&bob, Arc::clone(&bob_id), "alice", "ops", &kept).await.unwrap();
    assert_eq!(again.changes().len(), 1);
    assert!(again.open(&sneaky).await.is_err());
    assert_eq!(again.open_value::<String>(&first).await.unwrap(), "from the laptop");
    // Told to trust it (say, after comparing fingerprints), bob opens the new epoch.
    assert_eq!(again.trust_owner(), 1);
    assert_eq!(again.open_value::<String>(&sneaky).await.unwrap(), "from the thief");
    let _ = std::fs::remove_file(&kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_leaves_the_directory_and_the_owner_renews_the_key_without_it() {
    let (_broker, addr) = server();
    let (alice, alice_id) = device(addr, "alice", "laptop").await;
    let (bob, bob_id) = device(addr, "bob", "phone").await;
    let (lost, lost_id) = device(addr, "bob", "lost").await;
    let policy =
        KeyPolicy::create(&alice, alice_id, "alice", "ops", "ops/#", &["bob"]).await.unwrap();
    let _renewal = policy.renew_on_device_changes().await.unwrap();
    let at_bob = KeyPolicy::follow(&bob, Arc::clone(&bob_id), "alice", "ops").await.unwrap();
    let at_lost = KeyPolicy::follow(&lost, lost_id, "alice", "ops").await.unwrap();
    // A device publishing the same identity again (as every CLI run does) changes nothing.
    bob.publish_identity("bob", "phone", &bob_id).await.unwrap();
    let mut lost_sub = lost.messages("ops/#").await.unwrap();
    let mut bob_sub = bob.messages("ops/#").await.unwrap();
    policy.publish("ops/a", "before").await.unwrap();
    assert_eq!(at_lost.open_value::<String>(&next(&mut lost_sub).await).await.unwrap(), "before");
    let _ = next(&mut bob_sub).await;
    assert_eq!(policy.state().unwrap().2, 1, "nothing renewed for an unchanged device");

    // Only bob may take his device out of the directory.
    let refused = alice.revoke_identity("bob", "lost").await.unwrap_err();
    assert!(matches!(&refused, ClientError::Server { code, .. } if *code == ErrorCode::FORBIDDEN));
    bob.revoke_identity("bob", "lost").await.unwrap();
    let left: Vec<String> =
        alice.identities("bob").await.unwrap().into_iter().map(|p| p.device).collect();
    assert_eq!(left, ["phone"]);
    // The owner's watch renews the key by itself, without the lost device.
    eventually(|| policy.state().unwrap().2 == 2).await;
    eventually(|| at_bob.state().unwrap().2 == 2).await;
    policy.publish("ops/a", "after").await.unwrap();
    assert_eq!(at_bob.open_value::<String>(&next(&mut bob_sub).await).await.unwrap(), "after");
    let shut = at_lost.open(&next(&mut lost_sub).await).await.unwrap_err();
    assert!(matches!(shut, PolicyError::NoKey(2)), "{shut:?}");
}
