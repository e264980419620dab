//! A byte budget that several queues share (a connection's), maybe within a larger one (the
//! server's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a budget's count of holders starts in its `load` word (the bytes below, as
/// in a queue's, up to 1 TiB held); up to 2^24 queues.
const HOLDER_SHIFT: u32 = 40;
const HOLDER_ONE: u64 = 1 << HOLDER_SHIFT;
const BYTES_MASK: u64 = HOLDER_ONE - 1;

/// A byte budget shared by several queues: together they hold at most `max` bytes (payloads plus
/// 256 per message), each queue still bounded by its own limits too. Cloning shares the budget.
/// It is shared fairly: a queue holding more than its share (`max` over the queues holding
/// bytes) meets its policy once the budget is seven-eighths full, so queues that are read keep
/// the last eighth.
///
/// A budget within another ([`ByteBudget::within`]) draws on it ahead of its use, by a chunk of
/// at most 64 KiB and a sixty-fourth of the larger budget over the budgets drawing on it (none
/// below 4 KiB: then exactly what it holds), and gives back what it drew past two chunks: most
/// charges then leave the larger budget's word alone, where every core's queues would meet. So
/// what the larger one counts is what the budgets within it drew, which is about a
/// thirty-second of it at most past what they hold (a chunk is sized when it is drawn, by the
/// budgets drawing then).
///
/// ```
/// use whispeer_core::{ByteBudget, SubscribeOptions};
/// let connection = ByteBudget::new(8 << 20);
/// let a = SubscribeOptions::new("a/#").budget(connection.clone());
/// let b = SubscribeOptions::new("b/#").budget(connection);
/// # let _ = (a, b);
/// ```
#[derive(Clone, Debug)]
pub struct ByteBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    /// The bytes charged to it (below `HOLDER_SHIFT`) and its holders (from `HOLDER_SHIFT`
    /// up): the queues holding some of them, and the budgets within it that drew on it.
    load: AtomicU64,
    max: usize,
    /// A larger budget this one draws on too (a server's, for each connection's).
    parent: Option<ByteBudget>,
    /// The bytes drawn from `parent`: what this one holds and up to two chunks ahead (see
    /// `ByteBudget::draw`), give or take charges that race (never for long: the next charge
    /// or release here sets it right).
    drawn: AtomicU64,
}

/// Most bytes a budget draws on its parent ahead of its use.
const CHUNK_MOST: u64 = 64 * 1024;
/// Below this, a budget draws exactly what it holds.
const CHUNK_LEAST: u64 = 4 * 1024;

impl Drop for BudgetInner {
    fn drop(&mut self) {
        // What it drew and its queues did not give back (they give back all they hold when
        // dropped, but charges that raced may leave a chunk drawn).
        let drawn = *self.drawn.get_mut();
        if let (Some(parent), true) = (&self.parent, drawn > 0) {
            parent.sub(drawn as usize, true);
        }
    }
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self::with_parent(max, None)
    }

    /// A budget of `max` bytes that also draws on `parent`: what its queues hold counts in
    /// both, and a message that would pass either bound meets the queue's policy. A server
    /// gives each connection one within the budget of all its connections.
    pub fn within(max: usize, parent: &Self) -> Self {
        Self::with_parent(max, Some(parent.clone()))
    }

    fn with_parent(max: usize, parent: Option<Self>) -> Self {
        let (load, drawn) = (AtomicU64::new(0), AtomicU64::new(0));
        Self { inner: Arc::new(BudgetInner { load, max, parent, drawn }) }
    }

    /// Charges `weight` bytes of a holder (a queue, or a budget within this one) that held none
    /// before when `first`.
    pub(crate) fn add(&self, weight: usize, first: bool) {
        let holder = if first { HOLDER_ONE } else { 0 };
        let before = self.inner.load.fetch_add(weight as u64 + holder, Ordering::AcqRel);
        if let Some(parent) = &self.inner.parent {
            self.draw(parent, (before & BYTES_MASK) + weight as u64);
        }
    }

    /// Gives back `weight` bytes of a holder that holds none after when `last`.
    pub(crate) fn sub(&self, weight: usize, last: bool) {
        let holder = if last { HOLDER_ONE } else { 0 };
        let before = self.inner.load.fetch_sub(weight as u64 + holder, Ordering::AcqRel);
        if let Some(parent) = &self.inner.parent {
            self.undraw(parent, (before & BYTES_MASK) - weight as u64);
        }
    }

    /// How far ahead of its use a budget within this one draws on it: a sixty-fourth of the
    /// bound over the budgets drawing on it, at most `CHUNK_MOST`; none below `CHUNK_LEAST`.
    fn chunk(&self) -> u64 {
        let holders = (self.inner.load.load(Ordering::Acquire) >> HOLDER_SHIFT).max(1);
        let chunk = (self.inner.max as u64 / 64 / holders).min(CHUNK_MOST);
        if chunk < CHUNK_LEAST { 0 } else { chunk }
    }

    /// Draws on `parent` so that what is drawn covers `used` (and a chunk ahead, where the
    /// parent has the room): nothing when it covers it already.
    fn draw(&self, parent: &Self, used: u64) {
        let drawn = &self.inner.drawn;
        let mut current = drawn.load(Ordering::Acquire);
        while current < used {
            let room =
                (parent.inner.max as u64).saturating_sub(parent.used() as u64 + used - current);
            let target = used + parent.chunk().min(room);
            match drawn.compare_exchange_weak(current, target, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return parent.add((target - current) as usize, current == 0),
                Err(now) => current = now,
            }
        }
    }

    /// Gives `parent` back what is drawn past `used` and a chunk once that is more than two
    /// chunks, and all of it once nothing is held.
    fn undraw(&self, parent: &Self, used: u64) {
        let drawn = &self.inner.drawn;
        let mut current = drawn.load(Ordering::Acquire);
        loop {
            let chunk = parent.chunk();
            let target = match used {
                0 => 0,
                _ if current > used + 2 * chunk => used + chunk,
                _ => return,
            };
            if current <= target {
                return;
            }
            match drawn.compare_exchange_weak(current, target, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return parent.sub((current - target) as usize, target == 0),
                Err(now) => current = now,
            }
        }
    }

    /// Whether `other` is this budget (a clone of it), not merely one of the same size.
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Bytes held now by the queues sharing it.
    pub fn used(&self) -> usize {
        (self.inner.load.load(Ordering::Acquire) & BYTES_MASK) as usize
    }

    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        (self.inner.load.load(Ordering::Acquire) >> HOLDER_SHIFT) as usize
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Whether a holder of `queued` bytes (a queue, or a budget within this one) may not take
    /// `weight` more. Shared fairly: a holder past its share (the bound over the holders) may
    /// fill the budget to seven eighths only, so the last eighth stays for those under their
    /// share — subscribers that read keep getting messages while stalled ones hold the rest.
    pub(crate) fn would_exceed(&self, queued: usize, weight: usize) -> bool {
        let inner = &self.inner;
        // One read of the word gives both the bytes and the holders.
        let load = inner.load.load(Ordering::Acquire);
        let (used, holders) = ((load & BYTES_MASK) as usize, (load >> HOLDER_SHIFT) as usize);
        let share = inner.max / holders.max(1);
        let bound = if queued + weight > share { inner.max - inner.max / 8 } else { inner.max };
        if used + weight > bound {
            return true;
        }
        // What it drew covers it: the parent has agreed to that much already. Else this
        // budget asks for the rest as one holder of the parent's.
        let Some(parent) = &inner.parent else { return false };
        let drawn = inner.drawn.load(Ordering::Acquire) as usize;
        used + weight > drawn && parent.would_exceed(drawn, used + weight - drawn)
    }
}
