//! A delivered message: the shared envelope plus open-once and decode-once slots.
//!
//! One `Message` is created per publish and every matching subscriber gets a clone of the same
//! `Arc`, so the payload is encoded once and never copied per subscriber. A sealed payload is
//! opened (decrypted, decompressed) at most once per message in this process, whoever asks
//! first. When a message goes to more than one subscriber, the first subscriber to decode it
//! leaves the decoded value in a slot and subscribers of the same type clone that value instead
//! of decoding again. Neither slot ever blocks: racing subscribers work for themselves and the
//! first to finish fills the slot.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use whispeer_engines::{Codec, Engines, OpenError};
use whispeer_proto::{Envelope, Headers, MessageId, Topic, header};

use whispeer_engines::ReceiveError;

mod spares;

use spares::{LOCAL, this_thread};
pub(crate) use spares::{kept_buffer, kept_payload};

/// A message as a subscriber receives it. Cloning is cheap.
#[derive(Clone)]
pub struct Message {
    inner: Arc<Inner>,
}

struct Inner {
    envelope: Envelope,
    /// When the message's time to live runs out, if it has one.
    expires_at: Option<Instant>,
    /// Offset in the topic's retained history; 0 when the topic keeps none.
    offset: u64,
    /// The pipeline that sealed the payload, to open it; `None` when the broker has none.
    engines: Option<Arc<Engines>>,
    opened: OnceLock<Result<Bytes, OpenError>>,
    /// Whether decoding should go through `decoded` (the message has several subscribers).
    share_decoded: bool,
    decoded: OnceLock<Decoded>,
    /// The thread that made the message ([`this_thread`]) if it was made by
    /// [`Message::from_spare`], else 0: let go, its allocation becomes a spare (see
    /// `spares.rs`).
    made_on: u32,
    /// A spare's: its last payload's allocation, for a later payload of the same length
    /// ([`kept_payload`]); empty otherwise.
    kept: Box<[u8]>,
}

impl Inner {
    fn new(
        envelope: Envelope,
        share_decoded: bool,
        engines: Option<Arc<Engines>>,
        expires_at: Option<Instant>,
        offset: u64,
        made_on: u32,
    ) -> Self {
        Self {
            envelope,
            expires_at,
            offset,
            engines,
            opened: OnceLock::new(),
            share_decoded,
            decoded: OnceLock::new(),
            made_on,
            kept: Box::default(),
        }
    }
}

/// The first decoding of the payload: the type asked for and, if it decoded, the value.
struct Decoded {
    type_id: TypeId,
    value: Option<Box<dyn Any + Send + Sync>>,
}

impl Message {
    pub(crate) fn new(
        envelope: Envelope,
        subscribers: usize,
        engines: Option<Arc<Engines>>,
        expires_at: Option<Instant>,
    ) -> Self {
        Self::retained(envelope, subscribers > 1, engines, expires_at, 0)
    }

    /// A message with its offset in its topic's history (0: none). `share_decoded` when it may
    /// reach several subscribers.
    pub(crate) fn retained(
        envelope: Envelope,
        share_decoded: bool,
        engines: Option<Arc<Engines>>,
        expires_at: Option<Instant>,
        offset: u64,
    ) -> Self {
        let inner = Inner::new(envelope, share_decoded, engines, expires_at, offset, 0);
        Self { inner: Arc::new(inner) }
    }

    /// Like [`Message::new`], for a publish in this process on the plain path (see
    /// `Shared::routes_plainly`): made in a spare allocation if
    /// this thread or the shared depot has one (`spares.rs`), and made a spare again when let
    /// go. A publisher thread that only allocates and subscriber workers that only free is the
    /// pattern spares serve, and a thread that publishes many before it takes them. An
    /// envelope from elsewhere (a server connection's read) is made so when it has one
    /// subscriber: its writer mostly runs on the reader's thread, which lets it go where it
    /// was made (`Shared::route`; 1 → 1 over the server, 1,514 → 1,309 instructions a
    /// message on one thread). With several it is left to the system allocator: let go by
    /// whichever writer is last, often on another worker, where spares measured no better
    /// (2026-12-06, before writers ran on their readers' threads: the allocator's work went,
    /// and as much went to making the spare, the first touch of a message last seen
    /// thousands of messages earlier).
    pub(crate) fn from_spare(
        envelope: Envelope,
        subscribers: usize,
        engines: Option<Arc<Engines>>,
        expires_at: Option<Instant>,
    ) -> Self {
        let made_on = this_thread();
        // Looking first costs two loads; taking from an empty queue costs more.
        // Not reached while the thread's own values are being destroyed.
        if let Ok(Some(mut spare)) = LOCAL.try_with(|local| local.borrow_mut().take())
            && let Some(slot) = Arc::get_mut(&mut spare)
        {
            // Field by field: `opened` and `decoded` were emptied when it became a spare.
            slot.envelope = envelope;
            slot.expires_at = expires_at;
            slot.offset = 0;
            slot.engines = engines;
            slot.share_decoded = subscribers > 1;
            slot.made_on = made_on;
            // Not taken for this payload (another length): freed here, where it was made.
            slot.kept = Box::default();
            return Self { inner: spare };
        }
        let inner = Inner::new(envelope, subscribers > 1, engines, expires_at, 0, made_on);
        Self { inner: Arc::new(inner) }
    }

    /// Whether the message was made by [`Message::from_spare`]: in a spare, or in an
    /// allocation that becomes one when let go.
    #[cfg(test)]
    pub(crate) fn made_in_a_spare(&self) -> bool {
        self.inner.made_on != 0
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &Topic {
        &self.inner.envelope.topic
    }

    /// The message's unique id.
    pub fn id(&self) -> MessageId {
        self.inner.envelope.id
    }

    /// Publish time in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.inner.envelope.timestamp_ms
    }

    /// Application headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.envelope.headers
    }

    /// The payload as it travels: sealed (compressed, encrypted) if the broker's engines say so.
    /// See [`Message::plaintext`] for the opened bytes.
    pub fn payload(&self) -> &Bytes {
        &self.inner.envelope.payload
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    /// The message's offset in its topic's retained history (from 1), if the topic keeps one.
    pub fn offset(&self) -> Option<u64> {
        (self.inner.offset > 0).then_some(self.inner.offset)
    }

    /// When the message's time to live runs out (`tokio::time` clock), if it has one.
    pub fn expires_at(&self) -> Option<Instant> {
        self.inner.expires_at
    }

    /// Whether the time to live has run out at `now`.
    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.inner.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether the time to live has run out (reads the clock only if there is one).
    pub(crate) fn has_expired(&self) -> bool {
        self.inner.expires_at.is_some_and(|at| at <= Instant::now())
    }

    /// For a message of a dead-letter topic (`$dlq/...`): why its original was given up, after
    /// how many deliveries, and the original, which opens and decodes as before. `None` for
    /// any other message.
    pub fn dead_letter(&self) -> Option<DeadLetter> {
        let envelope = &self.inner.envelope;
        if !envelope.topic.as_str().starts_with(DEAD_LETTER_PREFIX) {
            return None;
        }
        let reason = envelope.headers.get(header::DEAD_LETTER_REASON)?;
        let reason = String::from_utf8(reason.to_vec()).ok()?;
        let attempts = envelope.headers.get(header::DEAD_LETTER_ATTEMPTS)?;
        let attempts = std::str::from_utf8(attempts).ok()?.parse().ok()?;
        let original = Envelope::decode(envelope.payload.clone(), &no_limits()).ok()?;
        let message = Self::new(original, 1, self.inner.engines.clone(), None);
        Some(DeadLetter { reason, attempts, message })
    }

    /// The payload opened: decrypted and decompressed as the envelope's flags say, and
    /// authenticated. Opened once per message; later calls return the same bytes.
    ///
    /// # Errors
    /// [`OpenError`] for a wrong or unknown key, tampering, corruption or an oversized payload.
    pub fn plaintext(&self) -> Result<Bytes, OpenError> {
        let envelope = &self.inner.envelope;
        if self.is_plain() {
            return Ok(envelope.payload.clone());
        }
        if let Some(opened) = self.inner.opened.get() {
            return opened.clone();
        }
        let opened = match &self.inner.engines {
            Some(engines) => engines.open(envelope),
            None => {
                Err(OpenError::Unsupported { what: "sealed payload on a broker without engines" })
            }
        };
        let _ = self.inner.opened.set(opened.clone());
        opened
    }

    /// Opens the payload and decodes it as a `T` with the codec recorded in the envelope.
    ///
    /// # Errors
    /// [`ReceiveError::Open`] if the payload does not open; [`ReceiveError::Decode`] if it is raw
    /// bytes or not a valid encoding of `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ReceiveError> {
        let envelope = &self.inner.envelope;
        let codec = Codec::for_content(envelope.flags.content())?;
        if self.is_plain() {
            // Decode from the shared payload itself: cloning the `Bytes` handle would make every
            // subscriber contend on its reference count.
            return Ok(codec.decode(&envelope.payload)?);
        }
        Ok(codec.decode(&self.plaintext()?)?)
    }

    /// Whether the payload is neither compressed nor encrypted.
    fn is_plain(&self) -> bool {
        self.inner.envelope.flags.is_plain()
    }

    /// Decodes like [`Message::decode`], but when the message has several subscribers, decodes
    /// once per message for the first type asked for and clones the value for the others.
    ///
    /// Never blocks: subscribers racing the first decode decode for themselves, and whichever
    /// finishes first fills the slot.
    pub(crate) fn decode_shared<T>(&self) -> Result<T, ReceiveError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        if !self.inner.share_decoded {
            return self.decode();
        }
        let slot = &self.inner.decoded;
        if let Some(decoded) = slot.get() {
            if decoded.type_id == TypeId::of::<T>() {
                return match decoded.value.as_ref().and_then(|v| v.downcast_ref::<T>()) {
                    Some(value) => Ok(value.clone()),
                    // Decoding is deterministic: decoding again yields the same error to report.
                    None => self.decode(),
                };
            }
            return self.decode();
        }
        let result = self.decode::<T>();
        let value = result.as_ref().ok().map(|v| Box::new(v.clone()) as Box<dyn Any + Send + Sync>);
        let _ = slot.set(Decoded { type_id: TypeId::of::<T>(), value });
        result
    }
}

/// Dead-letter topics are this prefix followed by the original topic.
pub(crate) const DEAD_LETTER_PREFIX: &str = "$dlq/";

/// What a dead letter says; see [`Message::dead_letter`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Why the message was given up: `max-attempts`, `rejected` (nacked without requeue) or
    /// `undecodable`.
    pub reason: String,
    /// How many times it was delivered.
    pub attempts: u32,
    /// The original message.
    pub message: Message,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.inner.envelope;
        f.debug_struct("Message")
            .field("id", &e.id)
            .field("topic", &e.topic)
            .field("flags", &e.flags)
            .field("payload_len", &e.payload.len())
            .finish_non_exhaustive()
    }
}

pub(crate) use whispeer_proto::clock::now_ms;

/// Limits that accept any topic: topics inside the broker (routed, stored) were validated
/// under the broker's limits already; re-parsing one must not fail on a tighter default.
pub(crate) fn no_limits() -> whispeer_proto::Limits {
    let mut limits = whispeer_proto::Limits::DEFAULT;
    limits.max_topic_len = usize::MAX;
    limits.max_topic_depth = usize::MAX;
    limits
}

#[cfg(test)]
mod tests {
    use whispeer_proto::{ContentType, Flags};

    use super::*;

    pub(super) fn message(value: &impl serde::Serialize, subscribers: usize) -> Message {
        let payload = Codec::Postcard.encode(value).unwrap();
        let envelope = Envelope::new(
            MessageId(1),
            Topic::parse("t").unwrap(),
            0,
            Flags::with_content(ContentType::Postcard),
            payload,
        );
        Message::new(envelope, subscribers, None, None)
    }

    #[test]
    fn shared_decode_keeps_first_type_and_still_decodes_others() {
        let m = message(&(7u32, "x".to_string()), 3);
        let a: (u32, String) = m.decode_shared().unwrap();
        let b: (u32, String) = m.decode_shared().unwrap();
        assert_eq!(a, b);
        // A different type still decodes independently (here: the same bytes read as u8s).
        let raw: (u8, String) = m.decode_shared().unwrap();
        assert_eq!(raw, (7, "x".to_string()));
    }

    #[test]
    fn shared_decode_failure_is_reported_to_every_subscriber() {
        // Three bytes of 0xff are not UTF-8, so they cannot decode as a String.
        let m = message(&vec![0xffu8; 3], 2);
        assert!(m.decode_shared::<String>().is_err());
        assert!(m.decode_shared::<String>().is_err());
        assert_eq!(m.decode_shared::<Vec<u8>>().unwrap(), vec![0xff; 3]);
    }
}
