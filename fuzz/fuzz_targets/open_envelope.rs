//! Opening arbitrary payloads under arbitrary flags never panics, never allocates past the
//! limit, and never authenticates a forged encrypted payload; sealing then opening any payload
//! is the identity.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use whispeer_engines::{CipherAlgorithm, Compression, Encryption, Engines, Key, KeyId, Keyring, Sealing};
use whispeer_proto::{ContentType, Envelope, Flags, Headers, MessageId, Topic};

const MAX: usize = 64 * 1024;

fn engines() -> Engines {
    let mut keyring = Keyring::new();
    keyring.insert(KeyId(1), Key::from_bytes([7; 32])).expect("fresh keyring");
    Engines::new()
        .with_compression(Compression::new().threshold(16))
        .with_encryption(Encryption::with_keyring(keyring).cipher(CipherAlgorithm::XChaCha20Poly1305))
        .with_max_message_bytes(MAX)
}

fuzz_target!(|data: (u16, &[u8], &[u8])| {
    let (flags, forged, plaintext) = data;
    let engines = engines();
    let topic = Topic::parse("fuzz/topic").expect("valid topic");
    let envelope = Envelope::new(MessageId(1), topic.clone(), 0, Flags(flags), Bytes::copy_from_slice(forged));
    if let Ok(opened) = engines.open(&envelope) {
        assert!(opened.len() <= MAX);
        assert_eq!(Flags(flags).cipher(), Some(CipherAlgorithm::None), "forged ciphertext opened");
    }
    if plaintext.len() <= MAX {
        let headers = Headers::new();
        let meta = Sealing { topic: topic.as_str(), id: MessageId(2), timestamp_ms: 5, headers: &headers };
        let content = Flags::with_content(ContentType::Raw);
        let (flags, sealed) = engines.seal(&meta, content, Bytes::copy_from_slice(plaintext)).expect("seal");
        let envelope = Envelope::new(MessageId(2), topic, 5, flags, sealed);
        assert_eq!(&engines.open(&envelope).expect("open what was sealed")[..], plaintext);
    }
});
