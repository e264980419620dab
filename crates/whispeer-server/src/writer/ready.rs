//! A connection's subscriptions as the writer holds them, with a ready list: each subscription
//! is polled with a waker of its own, which puts its slot on the list (once until the writer
//! takes it) and wakes the writer. A wake then costs the subscriptions that have something,
//! not a pass over every subscription the connection holds (thousands, for a chat server's or
//! a device fleet's connections).
//!
//! A subscription drained empty is armed again (polled, which registers its waker) only at
//! the writer's next pass, after the write in between: a queue group's member that just took
//! messages is not the first to hear of the next one, so the members share a group's messages
//! as they did when the writer polled every subscription once it was idle.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

use atomic_waker::AtomicWaker;
use whispeer_core::{Message, Subscription};

/// The slots with something to take, in the order they asked, and the writer to wake.
#[derive(Default)]
struct ReadyList {
    slots: Mutex<VecDeque<usize>>,
    writer: AtomicWaker,
}

/// One subscription's waker: queues its slot once until the writer takes it.
struct SlotWaker {
    slot: usize,
    queued: AtomicBool,
    ready: Arc<ReadyList>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.slots.lock().unwrap_or_else(PoisonError::into_inner).push_back(self.slot);
            self.ready.writer.wake();
        }
    }
}

/// A subscription in its slot.
pub(super) struct Held {
    pub(super) sub: u32,
    pub(super) subscription: Subscription<Message>,
    /// The number of this subscription's one topic in compact deliveries, once it has one
    /// (a subscription to an exact topic only: every message it gets has that topic).
    pub(super) number: Option<u16>,
    flag: Arc<SlotWaker>,
    waker: Waker,
}

impl Held {
    /// A context whose waker puts this subscription back on the ready list.
    pub(super) fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Puts this subscription back on the ready list (it has more than was taken).
    pub(super) fn again(&self) {
        self.flag.wake_by_ref();
    }
}

/// The writer's subscriptions.
#[derive(Default)]
pub(super) struct Slots {
    held: Vec<Option<Held>>,
    free: Vec<usize>,
    ready: Arc<ReadyList>,
    /// Slots drained empty and not polled since: their wakers may not be registered.
    unarmed: Vec<usize>,
}

impl Slots {
    /// Holds `subscription` as `sub`, ready to be polled (which registers its waker).
    pub(super) fn add(&mut self, sub: u32, subscription: Subscription<Message>) {
        let slot = self.free.pop().unwrap_or(self.held.len());
        let ready = Arc::clone(&self.ready);
        let flag = Arc::new(SlotWaker { slot, queued: AtomicBool::new(false), ready });
        let waker = Waker::from(Arc::clone(&flag));
        let held = Held { sub, subscription, number: None, flag, waker };
        held.again();
        if slot == self.held.len() {
            self.held.push(Some(held));
        } else {
            self.held[slot] = Some(held);
        }
    }

    /// Drops `sub` (which unsubscribes it).
    pub(super) fn remove(&mut self, sub: u32) {
        if let Some(slot) = self.held.iter().position(|h| h.as_ref().is_some_and(|h| h.sub == sub))
        {
            self.held[slot] = None;
            self.free.push(slot);
        }
    }

    /// Takes the next subscription on the ready list out of its slot (give it back with
    /// [`Slots::put`], or [`Slots::drop_slot`] when it ended); its waker is armed again.
    pub(super) fn next_ready(&mut self) -> Option<(usize, Held)> {
        loop {
            let slot =
                self.ready.slots.lock().unwrap_or_else(PoisonError::into_inner).pop_front()?;
            // A slot freed since it was queued is skipped; one reused is polled once for nothing.
            if let Some(held) = self.held.get_mut(slot).and_then(Option::take) {
                held.flag.queued.store(false, Ordering::Release);
                return Some((slot, held));
            }
        }
    }

    /// Gives a subscription taken with [`Slots::next_ready`] back to its slot.
    pub(super) fn put(&mut self, slot: usize, held: Held) {
        self.held[slot] = Some(held);
    }

    /// Gives back a subscription drained empty without registering its waker: it is armed at
    /// the next [`Slots::next_unarmed`].
    pub(super) fn put_unarmed(&mut self, slot: usize, held: Held) {
        self.held[slot] = Some(held);
        self.unarmed.push(slot);
    }

    /// Takes the next subscription to arm out of its slot (give it back with [`Slots::put`] or
    /// [`Slots::drop_slot`]).
    pub(super) fn next_unarmed(&mut self) -> Option<(usize, Held)> {
        while let Some(slot) = self.unarmed.pop() {
            // Skipped: a slot freed since, or listed twice (drained twice in one pass).
            if let Some(held) = self.held.get_mut(slot).and_then(Option::take) {
                return Some((slot, held));
            }
        }
        None
    }

    /// Frees the slot of a subscription taken with [`Slots::next_ready`] that ended.
    pub(super) fn drop_slot(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// Registers the writer's waker, then says whether any subscription is ready.
    pub(super) fn poll_ready(&self, cx: &Context<'_>) -> bool {
        self.ready.writer.register(cx.waker());
        !self.ready.slots.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}
