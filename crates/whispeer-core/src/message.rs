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
use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use whispeer_engines::{Codec, Engines, OpenError};
use whispeer_proto::{Envelope, Headers, MessageId, Topic, header};

use whispeer_engines::ReceiveError;

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
    /// [`Message::from_spare`], else 0: let go on another thread, its allocation goes to
    /// [`DEPOT`].
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
    /// [`DEPOT`] has one, and put back there when let go on another thread. A publisher
    /// thread that only allocates and subscriber workers that only free is the pattern spares
    /// serve; an envelope from elsewhere (a server connection decodes it on one runtime worker
    /// and another writes it out, every worker doing both) is left to the system allocator,
    /// whose per-thread caches serve that well: spares measured slower there.
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

/// How many spares move between threads together: a thread keeps the spares it let go until it
/// has this many, and a thread that reuses them takes this many at a time.
const MAGAZINE: usize = 32;

/// How many full magazines [`DEPOT`] keeps (1,024 spares).
const DEPOT_MAGAZINES: usize = 32;

/// Allocations of messages ([`Message::from_spare`]) let go on another thread than the one that
/// made them, for new messages to reuse. A publisher thread that only allocates and subscriber
/// threads that only free is a pattern the system allocator serves slowly (its per-thread caches
/// hold the wrong thread's blocks, so both sides take its shared arena, each other's lock).
/// A message let go on the thread that made it is freed as usual: the allocator's own cache for
/// that thread is faster. Spares travel in magazines of [`MAGAZINE`]: each thread gathers those
/// it lets go in its own ([`LOCAL`]), hands a full one here, and takes one from here when its
/// own spares run out — one take of this lock for 32 messages, where a queue shared by every
/// thread moved its cache lines between the two sides for each. Policy when full: the
/// magazine is freed. A spare holds no headers, engines or opened and decoded values (they are
/// dropped when it becomes one); only its last topic, until it is reused, and its payload's
/// allocation if that was small and no one else held it ([`keepable`]), for the thread that
/// takes the spare to encode a payload of that length in ([`kept_payload`]). A thread holds at
/// most two magazines' worth.
static DEPOT: Mutex<Vec<Vec<Arc<Inner>>>> = Mutex::new(Vec::new());

/// How many magazines [`DEPOT`] holds, read without its lock.
static DEPOT_LEN: AtomicUsize = AtomicUsize::new(0);

/// A thread's spares: those to reuse here, and those let go here to hand on.
#[derive(Default)]
struct Spares {
    reuse: Vec<Arc<Inner>>,
    let_go: Vec<Arc<Inner>>,
}

impl Spares {
    /// A spare to reuse, taking a magazine from [`DEPOT`] when this thread has none.
    fn take(&mut self) -> Option<Arc<Inner>> {
        self.refill();
        self.reuse.pop()
    }

    /// The payload allocation the next spare keeps, if it is `len` bytes long.
    fn kept(&mut self, len: usize) -> Option<Box<[u8]>> {
        self.refill();
        let next = Arc::get_mut(self.reuse.last_mut()?)?;
        (next.kept.len() == len).then(|| std::mem::take(&mut next.kept))
    }

    /// Takes a magazine from [`DEPOT`] when this thread has no spare.
    fn refill(&mut self) {
        if self.reuse.is_empty() && DEPOT_LEN.load(Ordering::Relaxed) > 0 {
            let mut depot = DEPOT.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(magazine) = depot.pop() {
                DEPOT_LEN.store(depot.len(), Ordering::Relaxed);
                drop(depot);
                self.reuse = magazine;
            }
        }
    }

    /// Keeps a spare, handing this thread's magazine to [`DEPOT`] once it is full.
    fn give(&mut self, spare: Arc<Inner>) {
        if self.let_go.capacity() == 0 {
            self.let_go.reserve_exact(MAGAZINE);
        }
        self.let_go.push(spare);
        if self.let_go.len() < MAGAZINE {
            return;
        }
        let magazine = std::mem::take(&mut self.let_go);
        let mut depot = DEPOT.lock().unwrap_or_else(PoisonError::into_inner);
        if depot.len() < DEPOT_MAGAZINES {
            depot.push(magazine);
            DEPOT_LEN.store(depot.len(), Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// This thread's number for [`this_thread`]; 0 until it is first asked.
    static THREAD: Cell<u32> = const { Cell::new(0) };
    /// This thread's spares; see [`DEPOT`].
    static LOCAL: RefCell<Spares> = RefCell::default();
}

/// Numbers threads for [`this_thread`].
static NEXT_THREAD: AtomicU32 = AtomicU32::new(1);

/// A number for the calling thread, the same at every call (after four billion threads numbers
/// repeat, which only makes a spare less likely to be kept).
fn this_thread() -> u32 {
    THREAD.with(|number| {
        if number.get() == 0 {
            number.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed).max(1));
        }
        number.get()
    })
}

impl Drop for Message {
    #[inline]
    fn drop(&mut self) {
        // Only the last holder puts the allocation back (a message never has weak references,
        // so no one can take a new one meanwhile). Two holders dropping at once both see the
        // other's reference and free it as before.
        let made_on = self.inner.made_on;
        if made_on != 0 && Arc::strong_count(&self.inner) == 1 && made_on != this_thread() {
            self.spare();
        }
    }
}

impl Message {
    /// Empties the last holder's allocation of what it keeps alive and offers it to
    /// [`DEPOT`].
    #[inline(never)]
    fn spare(&mut self) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.kept = keepable(std::mem::take(&mut inner.envelope.payload));
            inner.envelope.headers = Headers::new();
            inner.engines = None;
            inner.opened = OnceLock::new();
            inner.decoded = OnceLock::new();
            // Not kept (the thread's values are being destroyed, or the depot is full): this
            // reference is dropped here and `self.inner` frees the allocation.
            let _ = LOCAL.try_with(|local| local.borrow_mut().give(Arc::clone(&self.inner)));
        }
    }
}

/// Largest payload whose allocation a spare keeps (so [`DEPOT`] holds at most 1 MiB of them).
const KEPT_PAYLOAD_BYTES: usize = 1024;

/// A payload's allocation if no one else holds it, it is exactly as long as the payload and
/// small: kept by a spare for a later payload of that length, since a publisher thread that
/// allocates payloads while subscriber threads free them is the allocator's slow pattern (see
/// [`DEPOT`]). Otherwise empty, and the payload is freed.
fn keepable(payload: Bytes) -> Box<[u8]> {
    if payload.is_empty() || payload.len() > KEPT_PAYLOAD_BYTES {
        return Box::default();
    }
    let Ok(unique) = payload.try_into_mut() else { return Box::default() };
    let buffer = Vec::from(unique);
    if buffer.len() == buffer.capacity() { buffer.into_boxed_slice() } else { Box::default() }
}

/// A payload holding `encoded`: in the allocation the next spare of this thread keeps, if it
/// is as long (a typed publisher's values often are), else in a new one.
pub(crate) fn kept_payload(encoded: &[u8]) -> Bytes {
    let mut buffer = kept_buffer(encoded.len());
    buffer.extend_from_slice(encoded);
    Bytes::from(buffer)
}

/// An empty buffer with room for `len` bytes: the allocation the next spare of this thread
/// keeps if it is that long (so a payload that fills it becomes `Bytes` without another
/// allocation), else a new one.
pub(crate) fn kept_buffer(len: usize) -> Vec<u8> {
    match LOCAL.try_with(|local| local.borrow_mut().kept(len)) {
        Ok(Some(kept)) => {
            let mut buffer = Vec::from(kept);
            buffer.clear();
            buffer
        }
        _ => Vec::with_capacity(len),
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

    fn message(value: &impl serde::Serialize, subscribers: usize) -> Message {
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

    /// More messages than [`DEPOT`] holds are let go on another thread with headers and a
    /// decoded value, then as many new ones are made: those made from spares carry
    /// nothing of the old.
    #[test]
    fn a_message_made_from_a_spare_carries_nothing_of_the_last() {
        let old: Vec<Message> = (0..2 * (DEPOT_MAGAZINES * MAGAZINE) as u32)
            .map(|n| {
                let mut envelope = message(&(n, "old".to_string()), 3).envelope().clone();
                envelope.headers.insert("h", "old");
                let m = Message::from_spare(envelope, 3, None, None);
                let _: (u32, String) = m.decode_shared().unwrap();
                m
            })
            .collect();
        // Let go on another thread, their allocations become spares (other tests share the
        // depot, so which new message gets which spare is not known; every one is checked).
        std::thread::spawn(move || drop(old)).join().unwrap();
        for n in 0..2 * (DEPOT_MAGAZINES * MAGAZINE) as u32 {
            let m = Message::from_spare(
                message(&(n, "new".to_string()), 3).envelope().clone(),
                3,
                None,
                None,
            );
            assert!(m.headers().get("h").is_none());
            assert_eq!(m.decode_shared::<(u32, String)>().unwrap(), (n, "new".to_string()));
            assert_eq!(m.decode::<(u32, String)>().unwrap(), (n, "new".to_string()));
        }
    }

    /// Only an allocation no one else holds, exactly as long as its small payload, is kept;
    /// a spare hands it once, to a payload of its length.
    #[test]
    fn a_sole_small_allocation_is_kept_and_handed_to_a_payload_of_its_length() {
        let payload = Bytes::from(vec![5u8; 100]);
        let at = payload.as_ptr();
        let kept = keepable(payload);
        assert_eq!((kept.as_ptr(), kept.len()), (at, 100));
        let held = Bytes::from(vec![6u8; 100]);
        assert!(keepable(held.clone()).is_empty());
        assert_eq!(held[..], [6; 100]);
        assert!(keepable(Bytes::from(vec![0u8; KEPT_PAYLOAD_BYTES + 1])).is_empty());
        assert!(keepable(Bytes::from_static(&[1; 100])).is_empty());
        let envelope = message(&(), 1).envelope().clone();
        let mut spare = Arc::new(Inner::new(envelope, false, None, None, 0, 0));
        Arc::get_mut(&mut spare).unwrap().kept = kept;
        let mut spares = Spares { reuse: vec![spare], let_go: Vec::new() };
        assert!(spares.kept(7).is_none(), "another length");
        assert_eq!(spares.kept(100).map(|taken| taken.as_ptr()), Some(at));
        assert!(spares.kept(100).is_none(), "handed on once");
    }

    /// Payloads let go on another thread, half of them still held by a clone: new payloads of
    /// the same length (some in kept allocations) never overwrite a held one.
    #[test]
    fn a_payload_held_elsewhere_is_never_written_in() {
        let count = 2 * DEPOT_MAGAZINES * MAGAZINE;
        let mut held = Vec::new();
        let old: Vec<Message> = (0..count)
            .map(|n| {
                let payload = kept_payload(&[n as u8; 100]);
                if n % 2 == 0 {
                    held.push(payload.clone());
                }
                let mut envelope = message(&(), 1).envelope().clone();
                envelope.payload = payload;
                Message::from_spare(envelope, 1, None, None)
            })
            .collect();
        std::thread::spawn(move || drop(old)).join().unwrap();
        let new: Vec<Bytes> = (0..count).map(|_| kept_payload(&[0xab; 100])).collect();
        assert!(new.iter().all(|payload| payload[..] == [0xab; 100]));
        for (i, payload) in held.iter().enumerate() {
            assert_eq!(payload[..], [(2 * i) as u8; 100], "a held payload was overwritten");
        }
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
