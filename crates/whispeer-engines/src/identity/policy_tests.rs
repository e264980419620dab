//! `PolicyKeys`: a bundle opens for its members' devices only, a removed member opens nothing
//! sealed afterwards, a message moved to another topic does not open, an owner key that changes
//! is refused until trusted (in one run, and after a restart from the kept file), and a new
//! device of the owner is trusted on first sight.

use super::*;

struct Device {
    identity: Identity,
    public: PublicIdentity,
}

fn device(name: &str) -> Device {
    let identity = Identity::generate().unwrap();
    let public = identity.public(name);
    Device { identity, public }
}

fn filter(text: &str) -> Filter {
    Filter::parse(text).unwrap()
}

/// The owner's state and a follower's, both trusting `laptop` as the owner's device.
fn policy(laptop: &Device) -> PolicyKeys {
    let mut keys = PolicyKeys::new("alice", "telemetry");
    assert!(keys.check_owner(&laptop.identity, std::slice::from_ref(&laptop.public)).is_empty());
    keys
}

#[test]
fn members_open_what_members_seal_and_a_removed_member_nothing_after() {
    let (laptop, bob, carol) = (device("laptop"), device("phone"), device("phone"));
    let mut owner = policy(&laptop);
    let devices = [laptop.public.clone(), bob.public.clone(), carol.public.clone()];
    let members = vec!["bob".to_string(), "carol".to_string()];
    let bundle =
        owner.make_bundle(&laptop.identity, &filter("sensors/#"), members, &devices).unwrap();
    let (mut at_bob, mut at_carol) = (policy(&laptop), policy(&laptop));
    assert_eq!(at_bob.read_bundle(&bob.identity, &bundle).unwrap(), BundleRead::Opened(1));
    assert_eq!(at_carol.read_bundle(&carol.identity, &bundle).unwrap(), BundleRead::Opened(1));
    let (_, members, epoch) = at_bob.state().unwrap();
    assert_eq!((members, epoch), (vec!["alice".into(), "bob".into(), "carol".into()], 1));

    let sealed = at_bob.seal(&bob.identity, "sensors/a", b"21.5").unwrap();
    assert_eq!(owner.open("sensors/a", &sealed).unwrap(), (b"21.5".to_vec(), bob.public.ed25519));
    assert!(at_carol.open("sensors/b", &sealed).is_err(), "moved to another topic");
    assert!(matches!(
        at_bob.seal(&bob.identity, "other/a", b"x"),
        Err(PolicyError::Outside { .. })
    ));

    // Carol is removed: epoch 2 is sealed to the others only.
    let devices = [laptop.public.clone(), bob.public.clone()];
    let members = vec!["bob".to_string()];
    let bundle =
        owner.make_bundle(&laptop.identity, &filter("sensors/#"), members, &devices).unwrap();
    assert_eq!(at_bob.read_bundle(&bob.identity, &bundle).unwrap(), BundleRead::Opened(2));
    assert_eq!(at_carol.read_bundle(&carol.identity, &bundle).unwrap(), BundleRead::NotForMe(2));
    let after = at_bob.seal(&bob.identity, "sensors/a", b"22.0").unwrap();
    assert_eq!(PolicyKeys::epoch_of(&after).unwrap(), 2);
    assert!(matches!(at_carol.open("sensors/a", &after), Err(PolicyError::NoKey(2))));
    assert!(matches!(
        at_carol.seal(&carol.identity, "sensors/a", b"x"),
        Err(PolicyError::NotMember(_))
    ));
    // What carol had still opens for her.
    assert_eq!(at_carol.open("sensors/a", &sealed).unwrap().0, b"21.5");
    // A second bundle for an epoch already opened does not replace its key.
    let mut rival = policy(&laptop);
    let devices = [laptop.public.clone(), carol.public.clone()];
    let bundle =
        rival.make_bundle(&laptop.identity, &filter("#"), vec!["carol".into()], &devices).unwrap();
    assert_eq!(at_carol.read_bundle(&carol.identity, &bundle).unwrap(), BundleRead::Opened(1));
    assert_eq!(at_carol.open("sensors/a", &sealed).unwrap().0, b"21.5");
}

#[test]
fn a_changed_owner_key_is_reported_and_refused_until_trusted() {
    let (laptop, bob) = (device("laptop"), device("phone"));
    let mut at_bob = policy(&laptop);
    // Someone else's key published as alice's laptop, and a bundle signed by it.
    let swapped = device("laptop");
    let mut forger = policy(&swapped);
    let devices = [swapped.public.clone(), bob.public.clone()];
    let bundle =
        forger.make_bundle(&swapped.identity, &filter("#"), vec!["bob".into()], &devices).unwrap();
    assert_eq!(at_bob.read_bundle(&bob.identity, &bundle).unwrap(), BundleRead::UnknownSigner(1));
    let changes = at_bob.check_owner(&bob.identity, std::slice::from_ref(&swapped.public));
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].was.as_str(), changes[0].now.as_str()),
        (laptop.public.fingerprint().as_str(), swapped.public.fingerprint().as_str())
    );
    assert_eq!(at_bob.changes(), changes);
    assert!(at_bob.state().is_none(), "nothing signed by the changed key was opened");
    let message = forger.seal(&swapped.identity, "a/b", b"x").unwrap();
    assert!(matches!(at_bob.open("a/b", &message), Err(PolicyError::OwnerKeyChanged(_))));
    assert!(matches!(
        at_bob.seal(&bob.identity, "a/b", b"x"),
        Err(PolicyError::OwnerKeyChanged(_))
    ));
    // Trusted after comparing fingerprints: the bundle that waited opens.
    assert_eq!(at_bob.trust_owner(&bob.identity), 1);
    assert!(at_bob.changes().is_empty());
    assert_eq!(at_bob.open("a/b", &message).unwrap().0, b"x");
}

#[test]
fn a_new_owner_device_is_trusted_on_first_sight() {
    let (laptop, phone, bob) = (device("laptop"), device("phone"), device("phone"));
    let mut at_bob = policy(&laptop);
    let mut from_phone = policy(&phone);
    let devices = [phone.public.clone(), bob.public.clone()];
    let bundle = from_phone
        .make_bundle(&phone.identity, &filter("#"), vec!["bob".into()], &devices)
        .unwrap();
    assert_eq!(at_bob.read_bundle(&bob.identity, &bundle).unwrap(), BundleRead::UnknownSigner(1));
    let directory = [laptop.public, phone.public.clone()];
    assert!(at_bob.check_owner(&bob.identity, &directory).is_empty());
    assert_eq!(at_bob.state().map(|s| s.2), Some(1), "the waiting bundle opened");
}

#[test]
fn kept_keys_and_owner_devices_come_back_and_catch_a_swapped_entry() {
    let (laptop, bob) = (device("laptop"), device("phone"));
    let mut owner = policy(&laptop);
    let devices = [laptop.public.clone(), bob.public.clone()];
    let bundle =
        owner.make_bundle(&laptop.identity, &filter("#"), vec!["bob".into()], &devices).unwrap();
    let mut at_bob = policy(&laptop);
    at_bob.read_bundle(&bob.identity, &bundle).unwrap();
    assert!(at_bob.take_changed());
    assert!(!at_bob.take_changed());
    let sealed = owner.seal(&laptop.identity, "a", b"kept").unwrap();
    let kept = at_bob.to_kept();

    // After a restart the directory lists another key for the laptop: the kept one stays
    // trusted and the change is reported.
    let swapped = device("laptop");
    let mut restarted = PolicyKeys::new("alice", "telemetry");
    restarted.check_owner(&bob.identity, std::slice::from_ref(&swapped.public));
    let changes = restarted.read_kept(&kept).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].was, laptop.public.fingerprint());
    assert_eq!(restarted.open("a", &sealed).unwrap().0, b"kept");

    // The form written before owner lines existed (keys only) still reads.
    let keys_only =
        kept.lines().filter(|l| !l.starts_with("owner ")).collect::<Vec<_>>().join("\n");
    let mut old = PolicyKeys::new("alice", "telemetry");
    assert!(old.read_kept(&keys_only).unwrap().is_empty());
    assert_eq!(old.open("a", &sealed).unwrap().0, b"kept");
    assert!(PolicyKeys::new("a", "b").read_kept("not base64!").is_err());
}
