//! Compression and encryption through the broker: what the middle sees, and what a subscriber
//! gets when a message does not open.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use whispeer::proto::{CipherAlgorithm, CompressionAlgorithm, Envelope};
use whispeer::{
    Broker, BrokerOptions, Compression, Encryption, Filter, KeyId, Keyring, OpenError, Plugin,
    ReceiveError, Rejection, TopicRule,
};

const SECRET: &str = "TOP-SECRET-PLAINTEXT";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    text: String,
    padding: String,
}

fn note() -> Note {
    // Long enough to be compressed as well as encrypted.
    Note { text: SECRET.into(), padding: "lorem ipsum dolor sit amet ".repeat(40) }
}

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(10), f).await.expect("timed out waiting")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Records every envelope it sees; optionally tampers with it like a hostile relay would.
#[derive(Clone, Default)]
struct Spy {
    seen: Arc<Mutex<Vec<Envelope>>>,
    tamper: Option<fn(&mut Envelope)>,
}

impl Plugin for Spy {
    fn name(&self) -> &'static str {
        "spy"
    }

    fn on_publish(&self, envelope: &mut Envelope) -> Result<(), Rejection> {
        self.seen.lock().expect("no test thread panicked holding the lock").push(envelope.clone());
        if let Some(tamper) = self.tamper {
            tamper(envelope);
        }
        Ok(())
    }
}

#[tokio::test]
async fn plugins_and_stored_envelopes_hold_only_ciphertext() {
    let spy = Spy::default();
    let broker = Broker::build_default().with(spy.clone()).build();
    let mut stored = broker.messages("notes/#").unwrap();
    let mut reader = broker.subscription::<Note>("notes/#").unwrap();
    broker.publish("notes/1", &note()).unwrap();

    // The plugin saw the envelope after sealing: encrypted (and compressed) bytes only.
    let seen = spy.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.flags.cipher(), Some(CipherAlgorithm::XChaCha20Poly1305));
    assert_eq!(seen.flags.compression(), Some(CompressionAlgorithm::Zstd));
    assert!(!contains(&seen.payload, SECRET) && !contains(&seen.payload, "lorem"));

    // What a store would append is that same envelope.
    let message = soon(stored.recv()).await.unwrap();
    assert_eq!(message.payload(), &seen.payload);
    assert!(!contains(message.payload(), SECRET));
    // The subscribing edge opens it.
    assert!(contains(&message.plaintext().unwrap(), SECRET));
    assert_eq!(soon(reader.recv()).await, Some(note()));
}

#[tokio::test]
async fn topic_rules_opt_out_and_pick_keys_through_the_broker() {
    let spy = Spy::default();
    let mut keyring = Keyring::generate().unwrap();
    keyring.rotate(whispeer::Key::generate().unwrap());
    keyring.set_current(KeyId(1)).unwrap();
    let broker = Broker::builder(BrokerOptions::default())
        .with(Compression::lz4())
        .with(Encryption::with_keyring(keyring).cipher(CipherAlgorithm::Aes256Gcm))
        .with(
            TopicRule::new(Filter::parse("public/#").unwrap())
                .plaintext()
                .compression(Compression::none()),
        )
        .with(TopicRule::new(Filter::parse("orders/#").unwrap()).key(KeyId(2)))
        .with(spy.clone())
        .build();
    let mut public = broker.subscription::<Note>("public/#").unwrap();
    let mut orders = broker.subscription::<Note>("orders/#").unwrap();
    broker.publish("public/news", &note()).unwrap();
    broker.publish("orders/7", &note()).unwrap();
    assert_eq!(soon(public.recv()).await, Some(note()));
    assert_eq!(soon(orders.recv()).await, Some(note()));

    let seen = spy.seen.lock().unwrap().clone();
    assert!(contains(&seen[0].payload, SECRET), "public topics opt out of encryption");
    assert_eq!(seen[1].flags.cipher(), Some(CipherAlgorithm::Aes256Gcm));
    assert_eq!(seen[1].flags.compression(), Some(CompressionAlgorithm::Lz4));
    assert_eq!(&seen[1].payload[..4], &2u32.to_be_bytes(), "orders/# seals with key 2");
}

fn flip_last_byte(envelope: &mut Envelope) {
    let mut bytes = envelope.payload.to_vec();
    if let Some(last) = bytes.last_mut() {
        *last ^= 1;
    }
    envelope.payload = Bytes::from(bytes);
}

fn add_header(envelope: &mut Envelope) {
    envelope.headers.insert("injected", "1");
}

#[tokio::test]
async fn tampered_messages_are_counted_per_subscriber_and_skipped() {
    for tamper in [flip_last_byte as fn(&mut Envelope), add_header] {
        let spy = Spy { tamper: Some(tamper), ..Spy::default() };
        let broker = Broker::build_default().with(spy).build();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = broker.subscribe("n", move |n: Note| tx.send(n).unwrap()).unwrap();
        let mut raw = broker.messages("n").unwrap();
        broker.publish("n", &note()).unwrap();

        let message = soon(raw.recv()).await.unwrap();
        assert_eq!(message.plaintext(), Err(OpenError::Authentication));
        assert!(matches!(
            message.decode::<Note>(),
            Err(ReceiveError::Open(OpenError::Authentication))
        ));
        soon(async {
            while sub.stats().open_errors == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert_eq!(sub.stats().decode_errors, 0);
        assert!(rx.try_recv().is_err(), "nothing unauthenticated reaches the callback");
        assert_eq!(broker.stats().open_errors, 1);
    }
}

#[tokio::test]
async fn compression_alone_round_trips_and_shrinks() {
    let spy = Spy::default();
    let broker = Broker::builder(BrokerOptions::default())
        .with(Compression::new())
        .with(spy.clone())
        .build();
    let mut reader = broker.subscription::<Note>("c").unwrap();
    broker.publish("c", &note()).unwrap();
    assert_eq!(soon(reader.recv()).await, Some(note()));
    let seen = spy.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.flags.cipher(), Some(CipherAlgorithm::None));
    assert_eq!(seen.flags.compression(), Some(CompressionAlgorithm::Zstd));
    assert!(seen.payload.len() < 200, "{} bytes", seen.payload.len());
}

#[tokio::test]
async fn sealing_without_a_usable_key_fails_the_publish() {
    let broker = Broker::builder(BrokerOptions::default())
        .with(Encryption::with_keyring(Keyring::generate().unwrap()))
        .with(TopicRule::new(Filter::parse("x/#").unwrap()).key(KeyId(42)))
        .build();
    let err = broker.publish("x/1", &1u8).unwrap_err();
    assert!(
        matches!(err, whispeer::PublishError::Seal(whispeer::SealError::NoKey(Some(KeyId(42))))),
        "{err:?}"
    );
    assert!(broker.publish("y", &1u8).is_ok());
}

#[tokio::test]
async fn one_open_serves_every_subscriber() {
    let broker = Broker::build_default().build();
    let mut subs: Vec<_> = (0..4).map(|_| broker.messages("fan").unwrap()).collect();
    broker.publish("fan", &note()).unwrap();
    let mut opened = Vec::new();
    for s in &mut subs {
        opened.push(soon(s.recv()).await.unwrap().plaintext().unwrap());
    }
    // Opened once: every subscriber holds the very same plaintext buffer.
    assert!(opened.iter().all(|p| p.as_ptr() == opened[0].as_ptr()));
}

/// Sealed messages of one length, published from one thread to eight subscribers whose
/// workers let them go (so their allocations come back to be written in again): each opens to
/// its own value, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_messages_in_reused_allocations_each_open_to_their_own_value() {
    const COUNT: usize = 3_000;
    let broker = Broker::build_default().build();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let mut sub = broker.subscription::<String>("seq").unwrap();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(COUNT);
                while got.len() < COUNT {
                    got.push(soon(sub.recv()).await.unwrap());
                }
                got
            })
        })
        .collect();
    let expected: Vec<String> = (0..COUNT).map(|n| format!("value {n:06}")).collect();
    for value in &expected {
        broker.publish("seq", value).unwrap();
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), expected);
    }
}
