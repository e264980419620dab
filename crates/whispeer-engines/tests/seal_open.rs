//! Sealing and opening through the public API: every combination, every failure.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use bytes::Bytes;
use proptest::prelude::*;
use whispeer_engines::{
    CipherAlgorithm, Compression, CompressionAlgorithm, Encryption, Engines, Key, KeyId, Keyring,
    OpenError, Sealing, TopicRule,
};
use whispeer_proto::{ContentType, Envelope, Filter, Flags, Headers, MessageId, Topic};

const MAX: usize = 1 << 20;

fn content() -> Flags {
    Flags::with_content(ContentType::Raw)
}

/// Seals `payload` for `topic` and returns the envelope a subscriber would receive.
fn seal(engines: &Engines, topic: &str, id: u128, headers: Headers, payload: &[u8]) -> Envelope {
    let meta =
        Sealing { topic, id: MessageId(id), timestamp_ms: 1_700_000_000_000, headers: &headers };
    let (flags, sealed) = engines.seal(&meta, content(), Bytes::copy_from_slice(payload)).unwrap();
    let mut envelope = Envelope::new(
        MessageId(id),
        Topic::parse(topic).unwrap(),
        1_700_000_000_000,
        flags,
        sealed,
    );
    envelope.headers = headers;
    envelope
}

fn compressible(len: usize) -> Vec<u8> {
    b"{\"sensor\":\"kitchen\",\"celsius\":21.5},".iter().copied().cycle().take(len).collect()
}

fn engines(
    compression: Option<Compression>,
    cipher: Option<CipherAlgorithm>,
    keyring: &Keyring,
) -> Engines {
    let mut e = Engines::new().with_max_message_bytes(MAX);
    if let Some(c) = compression {
        e = e.with_compression(c);
    }
    if let Some(c) = cipher {
        e = e.with_encryption(Encryption::with_keyring(keyring.clone()).cipher(c));
    }
    e
}

#[test]
fn every_combination_round_trips_at_every_size() {
    let keyring = Keyring::generate().unwrap();
    let sizes = [0, 1, 255, 256, 4096, 65_536, MAX];
    for compression in [None, Some(Compression::new()), Some(Compression::lz4())] {
        for cipher in
            [None, Some(CipherAlgorithm::XChaCha20Poly1305), Some(CipherAlgorithm::Aes256Gcm)]
        {
            let e = engines(compression, cipher, &keyring);
            for size in sizes {
                let payload = compressible(size);
                let envelope = seal(&e, "t/a", 1, Headers::new(), &payload);
                let what = format!("{compression:?} {cipher:?} {size} B");
                assert_eq!(
                    envelope.flags.cipher(),
                    Some(cipher.unwrap_or(CipherAlgorithm::None)),
                    "{what}"
                );
                let compressed = compression.is_some() && size >= 256;
                assert_eq!(
                    envelope.flags.compression() != Some(CompressionAlgorithm::None),
                    compressed,
                    "{what}"
                );
                assert_eq!(envelope.flags.content(), Some(ContentType::Raw));
                assert_eq!(&e.open(&envelope).unwrap()[..], &payload[..], "{what}");
            }
        }
    }
}

#[test]
fn ciphertext_hides_the_plaintext_and_nonces_differ() {
    let e = engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &Keyring::generate().unwrap());
    let secret = b"attack at dawn, attack at dawn, attack at dawn";
    let a = seal(&e, "t", 1, Headers::new(), secret);
    let b = seal(&e, "t", 1, Headers::new(), secret);
    assert!(!a.payload.windows(6).any(|w| w == b"attack"));
    assert_ne!(a.payload, b.payload, "same plaintext, same id: still a fresh nonce");
    assert_eq!(a.payload.len(), 4 + 24 + secret.len() + 16);
}

#[test]
fn tampering_anywhere_fails_authentication() {
    for cipher in [CipherAlgorithm::XChaCha20Poly1305, CipherAlgorithm::Aes256Gcm] {
        let e = engines(Some(Compression::new()), Some(cipher), &Keyring::generate().unwrap());
        let envelope = seal(&e, "orders/1", 7, Headers::new(), &compressible(1000));
        for at in 4..envelope.payload.len() {
            let mut bytes = envelope.payload.to_vec();
            bytes[at] ^= 0x01;
            let tampered = Envelope { payload: Bytes::from(bytes), ..envelope.clone() };
            assert_eq!(e.open(&tampered), Err(OpenError::Authentication), "{cipher:?} byte {at}");
        }
    }
}

#[test]
fn moved_to_another_topic_or_envelope_fails() {
    let e = engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &Keyring::generate().unwrap());
    let mut headers = Headers::new();
    headers.insert("trace", "abc");
    let envelope = seal(&e, "orders/1", 7, headers, b"pay 10 EUR");
    assert!(e.open(&envelope).is_ok());

    let moved = Envelope { topic: Topic::parse("orders/2").unwrap(), ..envelope.clone() };
    assert_eq!(e.open(&moved), Err(OpenError::Authentication));
    let new_id = Envelope { id: MessageId(8), ..envelope.clone() };
    assert_eq!(e.open(&new_id), Err(OpenError::Authentication));
    let new_time = Envelope { timestamp_ms: 1, ..envelope.clone() };
    assert_eq!(e.open(&new_time), Err(OpenError::Authentication));
    let mut edited = envelope.clone();
    edited.headers = Headers::new();
    edited.headers.insert("trace", "abd");
    assert_eq!(e.open(&edited), Err(OpenError::Authentication));
    let mut added = envelope.clone();
    added.headers.insert("extra", "1");
    assert_eq!(e.open(&added), Err(OpenError::Authentication));
    // Claiming "not compressed" when it was is a flag edit too.
    let reflagged =
        Envelope { flags: envelope.flags.with_compression(CompressionAlgorithm::Lz4), ..envelope };
    assert_eq!(e.open(&reflagged), Err(OpenError::Authentication));
}

#[test]
fn wrong_key_and_unknown_key_id_are_refused() {
    let sender =
        engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &Keyring::generate().unwrap());
    let envelope = seal(&sender, "t", 1, Headers::new(), b"hello");
    // Same key id (1), different key.
    let stranger =
        engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &Keyring::generate().unwrap());
    assert_eq!(stranger.open(&envelope), Err(OpenError::Authentication));
    // No key with that id.
    let mut other = Keyring::new();
    other.insert(KeyId(9), Key::generate().unwrap()).unwrap();
    let other = engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &other);
    assert_eq!(other.open(&envelope), Err(OpenError::UnknownKeyId(KeyId(1))));
    // No keyring at all.
    assert_eq!(Engines::new().open(&envelope), Err(OpenError::NoKeyring));
}

#[test]
fn after_rotation_old_messages_still_open() {
    let mut keyring = Keyring::generate().unwrap();
    let before = engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &keyring);
    let old = seal(&before, "t", 1, Headers::new(), b"old");
    assert_eq!(keyring.rotate(Key::generate().unwrap()), KeyId(2));
    let after = engines(None, Some(CipherAlgorithm::XChaCha20Poly1305), &keyring);
    let new = seal(&after, "t", 2, Headers::new(), b"new");
    assert_eq!(&new.payload[..4], &2u32.to_be_bytes());
    assert_eq!(&after.open(&old).unwrap()[..], b"old");
    assert_eq!(&after.open(&new).unwrap()[..], b"new");
    // The old party cannot read what the new key sealed.
    assert_eq!(before.open(&new), Err(OpenError::UnknownKeyId(KeyId(2))));
}

#[test]
fn topic_rules_choose_key_cipher_compression_or_plaintext() {
    let mut keyring = Keyring::generate().unwrap();
    keyring.insert(KeyId(2), Key::generate().unwrap()).unwrap();
    keyring.set_current(KeyId(1)).unwrap();
    let rule = |f: &str| TopicRule::new(Filter::parse(f).unwrap());
    let e = engines(Some(Compression::new()), Some(CipherAlgorithm::XChaCha20Poly1305), &keyring)
        .with_rule(rule("orders/#").key(KeyId(2)))
        .with_rule(rule("legacy/#").cipher(CipherAlgorithm::Aes256Gcm))
        .with_rule(rule("public/#").plaintext().compression(Compression::none()))
        .with_rule(rule("tenant/+").derive_from(KeyId(1)))
        .with_rule(rule("metrics/#").compression(Compression::lz4()));
    let payload = compressible(2000);

    let orders = seal(&e, "orders/eu/1", 1, Headers::new(), &payload);
    assert_eq!(&orders.payload[..4], &2u32.to_be_bytes());
    let legacy = seal(&e, "legacy/x", 1, Headers::new(), &payload);
    assert_eq!(legacy.flags.cipher(), Some(CipherAlgorithm::Aes256Gcm));
    let public = seal(&e, "public/news", 1, Headers::new(), &payload);
    assert_eq!(
        (public.flags.cipher(), public.flags.compression()),
        (Some(CipherAlgorithm::None), Some(CompressionAlgorithm::None))
    );
    assert_eq!(&public.payload[..], &payload[..]);
    let metrics = seal(&e, "metrics/cpu", 1, Headers::new(), &payload);
    assert_eq!(metrics.flags.compression(), Some(CompressionAlgorithm::Lz4));
    let tenant = seal(&e, "tenant/acme", 1, Headers::new(), &payload);
    assert!(tenant.flags.key_derived());
    for envelope in [&orders, &legacy, &public, &metrics, &tenant] {
        assert_eq!(&e.open(envelope).unwrap()[..], &payload[..], "{}", envelope.topic);
    }
    // A derived key is bound to its topic: moving the message is refused.
    let moved = Envelope { topic: Topic::parse("tenant/other").unwrap(), ..tenant };
    assert_eq!(e.open(&moved), Err(OpenError::Authentication));
}

#[test]
fn malformed_and_corrupt_payloads_are_typed_errors() {
    let e = engines(
        Some(Compression::new()),
        Some(CipherAlgorithm::XChaCha20Poly1305),
        &Keyring::generate().unwrap(),
    );
    let sealed = seal(&e, "t", 1, Headers::new(), b"x");
    let short = Envelope { payload: sealed.payload.slice(..10), ..sealed };
    assert_eq!(e.open(&short), Err(OpenError::Malformed { len: 10, need: 44 }));
    // Unencrypted but flagged as compressed with garbage inside.
    let flags = content().with_compression(CompressionAlgorithm::Zstd);
    let garbage = Envelope::new(
        MessageId(1),
        Topic::parse("t").unwrap(),
        0,
        flags,
        Bytes::from_static(b"garbage"),
    );
    assert_eq!(
        e.open(&garbage),
        Err(OpenError::Decompress { algorithm: CompressionAlgorithm::Zstd })
    );
    let unknown = Envelope { flags: Flags(0x0100), ..garbage };
    assert!(matches!(e.open(&unknown), Err(OpenError::Unsupported { .. })));
}

#[test]
fn oversized_plaintext_is_refused_on_open() {
    let sender = engines(Some(Compression::new()), None, &Keyring::new());
    let envelope = seal(&sender, "t", 1, Headers::new(), &vec![0u8; 4096]);
    let small = Engines::new().with_max_message_bytes(1024);
    assert_eq!(small.open(&envelope), Err(OpenError::TooLarge { max: 1024 }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_then_open_is_identity(
        payload in prop::collection::vec(any::<u8>(), 0..3000),
        repeat in 1usize..4,
        compression in 0u8..3,
        cipher in 0u8..3,
        topic in "[a-z]{1,8}(/[a-z]{1,8}){0,3}",
        id in any::<u128>(),
    ) {
        let payload = payload.repeat(repeat);
        let compression = [None, Some(Compression::new()), Some(Compression::lz4())][compression as usize];
        let cipher = [None, Some(CipherAlgorithm::XChaCha20Poly1305), Some(CipherAlgorithm::Aes256Gcm)][cipher as usize];
        let e = engines(compression, cipher, &Keyring::generate().unwrap());
        let envelope = seal(&e, &topic, id, Headers::new(), &payload);
        prop_assert_eq!(&e.open(&envelope).unwrap()[..], &payload[..]);
    }

    #[test]
    fn random_payloads_never_open_and_never_panic(
        payload in prop::collection::vec(any::<u8>(), 0..200),
        flags in any::<u16>(),
    ) {
        let e = engines(Some(Compression::new()), Some(CipherAlgorithm::XChaCha20Poly1305), &Keyring::generate().unwrap());
        let envelope = Envelope::new(MessageId(1), Topic::parse("t").unwrap(), 0, Flags(flags), Bytes::from(payload));
        let opened = e.open(&envelope);
        // Whatever is encrypted cannot be forged by chance.
        if envelope.flags.cipher().is_some_and(|c| c != CipherAlgorithm::None) {
            prop_assert!(opened.is_err());
        }
    }
}

/// Sealers sharing a key each keep one nonce prefix, and the key keeps the subkeys of the
/// prefixes it saw lately: more sealers than it keeps, sealing and opening on threads at once,
/// all open, and another key under the same id opens none.
#[test]
fn many_sealers_on_threads_share_a_key_and_every_message_opens() {
    let keyring = Keyring::generate().unwrap();
    let cipher = Some(CipherAlgorithm::XChaCha20Poly1305);
    let sealed: Vec<Vec<(Vec<u8>, Envelope)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40u128)
            .map(|sealer| {
                let keyring = &keyring;
                scope.spawn(move || {
                    let e = engines(None, cipher, keyring);
                    (0..50u128)
                        .map(|n| {
                            let plain = format!("sealer {sealer} message {n}").into_bytes();
                            let envelope =
                                seal(&e, "a/b", sealer << 32 | n, Headers::new(), &plain);
                            (plain, envelope)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let opener = engines(None, cipher, &keyring);
    std::thread::scope(|scope| {
        for messages in &sealed {
            let opener = &opener;
            scope.spawn(move || {
                for (plain, envelope) in messages {
                    assert_eq!(opener.open(envelope).unwrap(), plain.as_slice());
                }
            });
        }
    });
    let mut other = Keyring::new();
    other.insert(KeyId(1), Key::generate().unwrap()).unwrap();
    let stranger = engines(None, cipher, &other);
    for (_, envelope) in sealed.iter().flatten().step_by(97) {
        assert!(
            matches!(stranger.open(envelope), Err(OpenError::Authentication)),
            "another key under the same id opens nothing"
        );
    }
}
