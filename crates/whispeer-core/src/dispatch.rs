//! Dispatchers: the tasks that run sync callback subscriptions, many subscriptions each.
//!
//! A task of its own per callback subscription costs a wake-up of that task per delivery once
//! subscriptions are many and each gets few messages (and, when the runtime's workers have
//! run dry, a system call to wake a worker). A dispatcher holds many subscriptions with a ready
//! list, as a server connection's writer does: each subscription is polled with a waker of its
//! own, which puts it on the list (once until the dispatcher takes it) and wakes the
//! dispatcher — a wake-up that costs nothing while the dispatcher is busy.
//!
//! Subscriptions are spread round robin over one dispatcher per core. A dispatcher gives each
//! subscription up to [`PER_SUBSCRIPTION`] messages before the next one, and yields to the
//! runtime after [`PER_TURN`]. Callbacks of one dispatcher run one after another: one that
//! blocks delays the others of its dispatcher (async callbacks and streams keep a task each).
//!
//! A dispatcher ends when the broker is gone and it holds nothing; one whose runtime shut down
//! is replaced at the next subscription.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

use crate::runtime::Spawner;

/// Messages one subscription delivers before the dispatcher moves to the next ready one.
const PER_SUBSCRIPTION: usize = 64;
/// Messages a dispatcher delivers before it yields to the runtime, so its worker thread
/// serves other tasks too.
const PER_TURN: usize = 1024;

/// What a subscription's turn came to: a dispatcher's, or a
/// [`Subscription::drain_unsettled`](crate::Subscription::drain_unsettled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Nothing more now (with a context, its waker is registered).
    Empty,
    /// Stopped before running out (the dispatcher's allowance, or the caller's `false`):
    /// there may be more to take.
    More,
    /// The subscription ended.
    Ended,
}

/// A subscription a dispatcher runs.
pub(crate) trait Drain: Send + 'static {
    /// Delivers what is there, at most `allowance` messages (taken off it as they go), with
    /// `cx`'s waker registered when it runs out.
    fn drain(&mut self, cx: &mut Context<'_>, allowance: &mut usize) -> Drained;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Shard {
    /// Subscriptions handed over and not yet held.
    incoming: Mutex<Vec<Box<dyn Drain>>>,
    /// Slots with something to deliver, in the order they asked.
    ready: Mutex<VecDeque<usize>>,
    task: AtomicWaker,
    /// The broker is gone: end once nothing is held.
    closed: AtomicBool,
    /// The task is gone (its runtime shut down).
    gone: AtomicBool,
}

/// One subscription's waker: queues its slot once until the dispatcher takes it.
struct SlotWaker {
    slot: usize,
    queued: AtomicBool,
    shard: Arc<Shard>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.shard.ready).push_back(self.slot);
            self.shard.task.wake();
        }
    }
}

struct Held {
    drain: Box<dyn Drain>,
    flag: Arc<SlotWaker>,
    waker: Waker,
}

/// Marks its shard gone when the task is dropped, finished or not.
struct Gone(Arc<Shard>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Release);
    }
}

/// The broker's dispatchers, started on the first callback subscription.
#[derive(Default)]
pub(crate) struct Dispatchers {
    shards: Mutex<Vec<Arc<Shard>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Dispatchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatchers").field("shards", &lock(&self.shards).len()).finish()
    }
}

impl Dispatchers {
    /// Hands `drain` to the next dispatcher, starting (or restarting) it if need be.
    ///
    /// # Errors
    /// The error of starting the broker's own runtime, when one was needed and failed.
    pub(crate) fn add(&self, spawner: &Spawner, drain: Box<dyn Drain>) -> io::Result<()> {
        let mut shards = lock(&self.shards);
        if shards.is_empty() {
            // Asked once: the answer reads the cgroup's files.
            let count = std::thread::available_parallelism().map_or(1, usize::from);
            let gone = || Arc::new(Shard { gone: AtomicBool::new(true), ..Shard::default() });
            shards.extend(std::iter::repeat_with(gone).take(count));
        }
        let at = self.next.fetch_add(1, Ordering::Relaxed) % shards.len();
        if shards[at].gone.load(Ordering::Acquire) {
            let shard = Arc::new(Shard::default());
            // The guard travels in the future: a task dropped before it ever ran marks it too.
            spawner.spawn(run(Gone(Arc::clone(&shard))))?;
            shards[at] = shard;
        }
        let shard = &shards[at];
        lock(&shard.incoming).push(drain);
        shard.task.wake();
        Ok(())
    }
}

impl Drop for Dispatchers {
    fn drop(&mut self) {
        for shard in lock(&self.shards).iter() {
            shard.closed.store(true, Ordering::Release);
            shard.task.wake();
        }
    }
}

/// A dispatcher's task.
async fn run(gone: Gone) {
    let shard = &gone.0;
    let mut held: Vec<Option<Held>> = Vec::new();
    let (mut free, mut live) = (Vec::new(), 0usize);
    // Slots taken off the ready list and not served yet (kept across a yield).
    let mut taken: VecDeque<usize> = VecDeque::new();
    poll_fn(|cx| {
        shard.task.register(cx.waker());
        for drain in std::mem::take(&mut *lock(&shard.incoming)) {
            let slot = free.pop().unwrap_or(held.len());
            let queued = AtomicBool::new(false);
            let flag = Arc::new(SlotWaker { slot, queued, shard: Arc::clone(shard) });
            let waker = Waker::from(Arc::clone(&flag));
            // Served once, which registers its waker.
            flag.wake_by_ref();
            let entry = Some(Held { drain, flag, waker });
            match held.get_mut(slot) {
                Some(place) => *place = entry,
                None => held.push(entry),
            }
            live += 1;
        }
        let mut turn = PER_TURN;
        loop {
            if taken.is_empty() {
                std::mem::swap(&mut taken, &mut *lock(&shard.ready));
            }
            let Some(slot) = taken.pop_front() else { break };
            let Some(entry) = held.get_mut(slot).and_then(Option::as_mut) else { continue };
            // Cleared first: a message that comes while it is served queues it again.
            entry.flag.queued.store(false, Ordering::Release);
            let mut allowance = PER_SUBSCRIPTION.min(turn);
            let given = allowance;
            match entry.drain.drain(&mut Context::from_waker(&entry.waker), &mut allowance) {
                Drained::Empty => {}
                Drained::More => entry.flag.wake_by_ref(),
                Drained::Ended => {
                    held[slot] = None;
                    free.push(slot);
                    live -= 1;
                }
            }
            turn -= given - allowance;
            if turn == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        if live == 0 && shard.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;

    /// A subscription that counts what its shared source holds.
    struct Counter {
        source: Arc<Source>,
        delivered: Arc<AtomicU64>,
    }

    #[derive(Default)]
    struct Source {
        pending: Mutex<u64>,
        ended: AtomicBool,
        waker: AtomicWaker,
    }

    impl Source {
        fn put(&self, n: u64) {
            *lock(&self.pending) += n;
            self.waker.wake();
        }
    }

    impl Drain for Counter {
        fn drain(&mut self, cx: &mut Context<'_>, allowance: &mut usize) -> Drained {
            self.source.waker.register(cx.waker());
            let mut pending = lock(&self.source.pending);
            let n = (*pending).min(*allowance as u64);
            *pending -= n;
            *allowance -= n as usize;
            self.delivered.fetch_add(n, Ordering::Relaxed);
            if *pending > 0 {
                Drained::More
            } else if self.source.ended.load(Ordering::Acquire) {
                Drained::Ended
            } else {
                Drained::Empty
            }
        }
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..2000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("not reached in time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_subscriptions_share_dispatchers_and_each_gets_all_it_is_given() {
        let (dispatchers, spawner) = (Dispatchers::default(), Spawner::new(None));
        let mut sources = Vec::new();
        for _ in 0..100 {
            let (source, delivered) = (Arc::new(Source::default()), Arc::default());
            let counter =
                Counter { source: Arc::clone(&source), delivered: Arc::clone(&delivered) };
            dispatchers.add(&spawner, Box::new(counter)).unwrap();
            sources.push((source, delivered));
        }
        let count = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(lock(&dispatchers.shards).len(), count, "one per core");
        // More than a turn's worth to one, a little to each of the others.
        sources[0].0.put(5000);
        for (source, _) in &sources[1..] {
            source.put(3);
        }
        let all = || {
            let got = |(_, d): &(Arc<Source>, Arc<AtomicU64>)| d.load(Ordering::Relaxed);
            got(&sources[0]) == 5000 && sources[1..].iter().all(|s| got(s) == 3)
        };
        until(all).await;
        // Ended subscriptions leave their dispatcher; a dispatcher ends once the broker (here,
        // its `Dispatchers`) is gone and it holds nothing.
        for (source, _) in &sources {
            source.ended.store(true, Ordering::Release);
            source.waker.wake();
        }
        let shards: Vec<_> = lock(&dispatchers.shards).clone();
        drop(dispatchers);
        until(|| shards.iter().all(|s| s.gone.load(Ordering::Acquire))).await;
    }

    #[test]
    fn a_dispatcher_whose_runtime_ended_is_replaced() {
        let (dispatchers, spawner) = (Dispatchers::default(), Spawner::new(None));
        let delivered = Arc::new(AtomicU64::new(0));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let source = Arc::new(Source::default());
        runtime.block_on(async {
            let counter =
                Counter { source: Arc::clone(&source), delivered: Arc::clone(&delivered) };
            dispatchers.add(&spawner, Box::new(counter)).unwrap();
        });
        drop(runtime);
        // The next subscriptions, outside any runtime, go to dispatchers on the broker's own:
        // one per dispatcher, the dead one's replaced.
        let count = std::thread::available_parallelism().map_or(1, usize::from);
        for _ in 0..count {
            let source = Arc::new(Source::default());
            let counter =
                Counter { source: Arc::clone(&source), delivered: Arc::clone(&delivered) };
            dispatchers.add(&spawner, Box::new(counter)).unwrap();
            source.put(1);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while delivered.load(Ordering::Relaxed) < count as u64 {
            assert!(std::time::Instant::now() < deadline, "not every one delivered");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
