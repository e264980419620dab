//! Sealed boxes: every recipient device opens, nobody else does, and nothing moved or altered
//! opens.

use super::*;

pub(super) fn device(name: &str) -> (Identity, PublicIdentity) {
    let identity = Identity::generate().unwrap();
    let public = identity.public(name);
    (identity, public)
}

#[test]
fn every_recipient_device_opens_and_no_one_else() {
    let (alice, alice_laptop) = device("laptop");
    let (bob_phone, bob_phone_pub) = device("phone");
    let (bob_laptop, bob_laptop_pub) = device("laptop");
    let (carol, _) = device("phone");
    let context = b"chat|from:alice|to:bob";
    let recipients = [bob_phone_pub, bob_laptop_pub, alice_laptop.clone()];
    let sealed = seal_for(&alice, &recipients, context, b"hello bob").unwrap();
    for me in [&bob_phone, &bob_laptop, &alice] {
        assert_eq!(
            open_sealed(me, &sealed, context, Some(&alice_laptop.ed25519)).unwrap(),
            b"hello bob"
        );
    }
    assert_eq!(open_sealed(&carol, &sealed, context, None), Err(IdentityError::NotForMe));
    assert_eq!(sealed_sender(&sealed).unwrap(), alice_laptop.ed25519);
}

#[test]
fn a_box_moved_altered_or_from_another_signer_does_not_open() {
    let (alice, alice_pub) = device("laptop");
    let (bob, bob_pub) = device("phone");
    let (mallory, _) = device("phone");
    let sealed =
        seal_for(&alice, std::slice::from_ref(&bob_pub), b"to:bob|from:alice", b"x").unwrap();
    assert_eq!(
        open_sealed(&bob, &sealed, b"to:bob|from:carol", None),
        Err(IdentityError::BadSignature)
    );
    let mut flipped = sealed.clone();
    let at = flipped.len() - 70;
    flipped[at] ^= 1;
    assert_eq!(
        open_sealed(&bob, &flipped, b"to:bob|from:alice", None),
        Err(IdentityError::BadSignature)
    );
    // Mallory re-seals to bob claiming alice's context: it verifies only as mallory's box.
    let forged = seal_for(&mallory, &[bob_pub], b"to:bob|from:alice", b"y").unwrap();
    assert_eq!(
        open_sealed(&bob, &forged, b"to:bob|from:alice", Some(&alice_pub.ed25519)),
        Err(IdentityError::WrongSender)
    );
    for cut in 0..sealed.len() {
        assert!(
            open_sealed(&bob, &sealed[..cut], b"to:bob|from:alice", None).is_err(),
            "cut at {cut}"
        );
    }
}

#[test]
fn identities_and_public_identities_round_trip_and_a_swapped_key_is_caught() {
    let (alice, public) = device("laptop");
    let again = Identity::from_text(&alice.to_text()).unwrap();
    assert_eq!(again.public("laptop"), public);
    let parsed = PublicIdentity::from_text(&public.to_text()).unwrap();
    assert_eq!(parsed, public);
    assert_eq!(parsed.fingerprint(), public.fingerprint());
    assert_eq!(public.fingerprint().split(' ').count(), 12);
    // A directory that swaps in another X25519 key under alice's signing key is caught.
    let (_, other) = device("laptop");
    let swapped = PublicIdentity { x25519: other.x25519, ..public.clone() };
    assert_eq!(swapped.verify(), Err(IdentityError::BadIdentity));
    assert!(PublicIdentity::from_text(&swapped.to_text()).is_err());
    // Another device's whole entry has another fingerprint.
    assert_ne!(other.fingerprint(), public.fingerprint());
    assert!(Identity::from_text("whispeer-identity-v1:short").is_err());
}

#[test]
fn a_group_message_opens_with_its_epoch_key_only_and_names_its_signer() {
    let (alice, alice_pub) = device("laptop");
    let (mallory, _) = device("phone");
    let first = GroupKey::generate(1).unwrap();
    let second = GroupKey::generate(2).unwrap();
    let sealed = seal_group(&alice, &second, b"group team", b"after the rotation").unwrap();
    assert_eq!(group_sealed_by(&sealed).unwrap(), (2, alice_pub.ed25519));
    assert_eq!(
        open_group(&second, &sealed, b"group team", Some(&alice_pub.ed25519)).unwrap(),
        b"after the rotation"
    );
    assert_eq!(open_group(&first, &sealed, b"group team", None), Err(IdentityError::NotForMe));
    assert_eq!(
        open_group(&second, &sealed, b"group other", None),
        Err(IdentityError::BadSignature)
    );
    let forged = seal_group(&mallory, &second, b"group team", b"as alice").unwrap();
    assert_eq!(
        open_group(&second, &forged, b"group team", Some(&alice_pub.ed25519)),
        Err(IdentityError::WrongSender)
    );
    let copied = GroupKey::from_bytes(&second.to_bytes()).unwrap();
    assert_eq!(open_group(&copied, &sealed, b"group team", None).unwrap(), b"after the rotation");
    for cut in 0..sealed.len() {
        assert!(open_group(&second, &sealed[..cut], b"group team", None).is_err());
    }
}

/// The nonces of a pairwise box to three devices, by its layout: each wrap's, then the
/// payload's.
fn pairwise_nonces(sealed: &[u8], devices: usize) -> Vec<Vec<u8>> {
    let mut at = 4 + 32 + 2;
    let mut nonces = Vec::new();
    for _ in 0..devices {
        nonces.push(sealed[at + KEY_ID..at + KEY_ID + NONCE].to_vec());
        at += KEY_ID + NONCE + 64 + TAG;
    }
    nonces.push(sealed[at..at + NONCE].to_vec());
    nonces
}

#[test]
fn one_draw_gives_every_wrap_and_the_payload_a_nonce_of_its_own() {
    let draw = Draw::new(3).unwrap();
    let nonces: Vec<_> = (0..3).map(|i| draw.nonce(i).unwrap()).collect();
    assert!(nonces[0] != nonces[1] && nonces[1] != nonces[2] && nonces[0] != nonces[2]);
    assert!(nonces.iter().all(|n| n[..] != draw.key()[..NONCE]), "the key is not a nonce");
    assert!(matches!(draw.nonce(3), Err(IdentityError::Random(_))), "none past those drawn");

    let (alice, _) = device("laptop");
    let recipients = [device("phone").1, device("laptop").1, device("tablet").1];
    let mut pairs = PairKeys::default();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let sealed = seal_pairwise(&alice, &mut pairs, &recipients, b"c", b"hi").unwrap();
        seen.extend(pairwise_nonces(&sealed, recipients.len()));
    }
    let distinct: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no nonce twice within a box or across two");
}

#[test]
fn decompressed_signing_keys_are_kept_by_their_bytes_and_group_messages_still_check_the_signer() {
    let no_point = (0..=255u8)
        .map(|b| [b; 32])
        .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
        .unwrap();
    assert!(verifying_key(&no_point).is_none());
    assert!(verifying_key(&no_point).is_none(), "a refusal is not kept as a key");

    let senders: Vec<_> = ["a", "b", "c"].iter().map(|d| device(d)).collect();
    let key = GroupKey::generate(1).unwrap();
    for round in 0..3 {
        for (sender, public) in &senders {
            let sealed = seal_group(sender, &key, b"g", format!("{round}").as_bytes()).unwrap();
            let opened = open_group(&key, &sealed, b"g", Some(&public.ed25519)).unwrap();
            assert_eq!(opened, format!("{round}").as_bytes());
            assert_eq!(
                verifying_key(&public.ed25519),
                VerifyingKey::from_bytes(&public.ed25519).ok()
            );
        }
    }
    // Signed by a, claiming b's key: b's kept key does not verify a's signature.
    let mut forged = seal_group(&senders[0].0, &key, b"g", b"x").unwrap();
    forged[8..40].copy_from_slice(&senders[1].1.ed25519);
    assert_eq!(open_group(&key, &forged, b"g", None), Err(IdentityError::BadSignature));
}
