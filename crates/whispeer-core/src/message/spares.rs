//! Spare allocations of messages: those let go, kept for new messages to be made in.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use whispeer_proto::Headers;

use super::{Inner, Message};

/// How many spares move between threads together: a thread keeps the spares it let go until it
/// has this many, and a thread that reuses them takes this many at a time.
const MAGAZINE: usize = 32;

/// Most spares a thread keeps of those it made and let go itself (512 × 288 bytes, and the
/// payloads they keep: at most 512 KiB).
const KEPT_HERE: usize = 512;

/// How many full magazines [`DEPOT`] keeps (1,024 spares).
const DEPOT_MAGAZINES: usize = 32;

/// Allocations of messages ([`Message::from_spare`]) let go on another thread than the one that
/// made them, for new messages to reuse. A publisher thread that only allocates and subscriber
/// threads that only free is a pattern the system allocator serves slowly (its per-thread caches
/// hold the wrong thread's blocks, so both sides take its shared arena, each other's lock).
/// A message let go on the thread that made it stays with that thread ([`LOCAL`], up to
/// [`KEPT_HERE`]): the allocator's own per-thread cache holds seven blocks of a size, and a
/// thread that publishes a few hundred before it takes them (a window) overflowed it into the
/// allocator's slow paths, a sixth of the instructions of `publish_bytes` and a take on one
/// thread (`--bench publish_cost` under callgrind). Spares of other threads travel in magazines of [`MAGAZINE`]: each thread gathers those
/// it lets go in its own ([`LOCAL`]), hands a full one here, and takes one from here when its
/// own spares run out — one take of this lock for 32 messages, where a queue shared by every
/// thread moved its cache lines between the two sides for each. Policy when full: the
/// magazine is freed. A spare holds no headers, engines or opened and decoded values (they are
/// dropped when it becomes one); only its last topic, until it is reused, and its payload's
/// allocation if that was small and no one else held it ([`keepable`]), for the thread that
/// takes the spare to encode a payload of that length in ([`kept_payload`]). A thread holds at
/// most [`KEPT_HERE`] of its own and a magazine of others'.
static DEPOT: Mutex<Vec<Vec<Arc<Inner>>>> = Mutex::new(Vec::new());

/// How many magazines [`DEPOT`] holds, read without its lock.
static DEPOT_LEN: AtomicUsize = AtomicUsize::new(0);

/// A thread's spares: those to reuse here, and those let go here to hand on.
#[derive(Default)]
pub(super) struct Spares {
    reuse: Vec<Arc<Inner>>,
    let_go: Vec<Arc<Inner>>,
}

impl Spares {
    /// A spare to reuse, taking a magazine from [`DEPOT`] when this thread has none.
    pub(super) fn take(&mut self) -> Option<Arc<Inner>> {
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

    /// Keeps a spare: one let go on the thread that made it (`here`) with this thread while
    /// it keeps fewer than [`KEPT_HERE`], any other in the magazine handed to [`DEPOT`] once
    /// full.
    fn give(&mut self, spare: Arc<Inner>, here: bool) {
        if here && self.reuse.len() < KEPT_HERE {
            self.reuse.push(spare);
            return;
        }
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
    pub(super) static LOCAL: RefCell<Spares> = RefCell::default();
}

/// Numbers threads for [`this_thread`].
static NEXT_THREAD: AtomicU32 = AtomicU32::new(1);

/// A number for the calling thread, the same at every call (after four billion threads numbers
/// repeat, which only makes a spare less likely to be kept).
pub(super) fn this_thread() -> u32 {
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
        if made_on != 0 && Arc::strong_count(&self.inner) == 1 {
            self.spare(made_on == this_thread());
        }
    }
}

impl Message {
    /// Empties the last holder's allocation of what it keeps alive and offers it to
    /// [`DEPOT`].
    #[inline(never)]
    fn spare(&mut self, here: bool) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.kept = keepable(std::mem::take(&mut inner.envelope.payload));
            // Most messages have none: nothing to drop then (a call the drop glue costs).
            if !inner.envelope.headers.is_empty() {
                inner.envelope.headers = Headers::new();
            }
            inner.engines = None;
            inner.opened = OnceLock::new();
            inner.decoded = OnceLock::new();
            // Not kept (the thread's values are being destroyed, or the depot is full): this
            // reference is dropped here and `self.inner` frees the allocation.
            let _ = LOCAL.try_with(|local| local.borrow_mut().give(Arc::clone(&self.inner), here));
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

#[cfg(test)]
mod tests {
    use super::super::tests::message;
    use super::*;

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

    /// Messages made and let go on one thread (a window of publishes, then their takes) are
    /// made again in the same allocations, on a thread of its own (the depot is shared by
    /// other tests); past [`KEPT_HERE`] the rest go to the system allocator or the depot.
    #[test]
    fn messages_let_go_where_they_were_made_are_made_again_in_their_allocations() {
        std::thread::spawn(|| {
            let make = |n: u32| {
                let envelope = message(&(n, "x".to_string()), 1).envelope().clone();
                Message::from_spare(envelope, 1, None, None)
            };
            let window: Vec<Message> = (0..64).map(make).collect();
            let before: std::collections::HashSet<*const Inner> =
                window.iter().map(|m| Arc::as_ptr(&m.inner)).collect();
            drop(window);
            let again: Vec<Message> = (64..128).map(make).collect();
            for (n, m) in (64..).zip(&again) {
                assert!(before.contains(&Arc::as_ptr(&m.inner)), "made in a spare");
                assert_eq!(m.decode::<(u32, String)>().unwrap(), (n, "x".to_string()));
            }
            // A message another holder still has is not a spare when one copy goes.
            let held = make(7);
            let clone = held.clone();
            drop(held);
            assert_eq!(clone.decode::<(u32, String)>().unwrap(), (7, "x".to_string()));
            let kept = LOCAL.with(|local| local.borrow().reuse.len());
            let many: Vec<Message> = (0..2 * KEPT_HERE as u32).map(make).collect();
            drop(many);
            let kept_after = LOCAL.with(|local| local.borrow().reuse.len());
            assert!(kept <= KEPT_HERE && kept_after == KEPT_HERE, "{kept} then {kept_after}");
        })
        .join()
        .unwrap();
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
}
