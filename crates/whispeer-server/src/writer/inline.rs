//! Writers run by the reader that gave them work.
//!
//! A connection's writer is a future of its own, driven by a task of its own. When a reader
//! publishes a read's messages, their queues wake the writers of their subscribers as the
//! read's `PushBatch` ends. Woken as tasks, those writers ran on whichever worker took them,
//! often another core: every message was then made by one core and encoded, written and let go
//! by another, and each read cost a wake-up of another worker. Measured on two shared cores,
//! the server on one runtime worker spent a third less CPU a delivery in 1→1 than on two.
//!
//! So the reader runs them itself, as nats-server's reading loop flushes the clients it
//! delivered to: while a [`Capture`] lives on a thread, a writer woken there is noted rather
//! than woken, and when the capture ends each noted writer is polled on the spot, up to
//! [`MOST_HERE`] of them (the rest, a large fan-out's, are woken as tasks, so that other
//! workers share them). A writer that cannot go on here (its socket full, its control queue
//! empty) has registered its waker as any future does, and its task takes over from there.
//!
//! One writer future is polled by one thread at a time: its task and an inline poll take a
//! lock with `try_lock`; one that finds it taken says so (`again`), and the holder wakes the
//! task once it lets go, so no wake-up is lost and nobody waits on the lock.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Writers a capture polls on its own thread; those noted after them are woken as tasks.
pub(crate) const MOST_HERE: usize = 2;

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Whether a capture is open on this thread (the outermost one polls what it noted).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The writers woken under the open capture, in the order they were woken.
    static NOTED: RefCell<Vec<Arc<Shared>>> = const { RefCell::new(Vec::new()) };
}

/// A writer future, and what drives it.
struct Shared {
    future: Mutex<Option<Boxed>>,
    /// The task that drives the future when no reader does.
    task: AtomicWaker,
    /// The thread whose capture noted it and has not polled it yet (0: none; see `here`).
    noted: AtomicUsize,
    /// Another thread's capture woke it while it was noted: several readers feed it at once,
    /// and its task, which writes what they all gave it in one go, runs it this time.
    shared_feed: AtomicBool,
    /// A poll found the future locked: the holder wakes the task once it lets go.
    again: AtomicBool,
    /// The future completed.
    done: AtomicBool,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if CAPTURING.with(Cell::get) {
            let me = here();
            match self.noted.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => NOTED.with(|noted| noted.borrow_mut().push(Arc::clone(self))),
                Err(by) if by != me => self.shared_feed.store(true, Ordering::Release),
                Err(_) => {}
            }
            return;
        }
        self.task.wake();
    }
}

/// This thread, as a number no other live thread has (the address of its list of noted
/// writers; never 0).
fn here() -> usize {
    NOTED.with(|noted| std::ptr::from_ref(noted) as usize)
}

impl Shared {
    fn new(future: impl Future<Output = ()> + Send + 'static) -> Arc<Self> {
        Arc::new(Self {
            future: Mutex::new(Some(Box::pin(future))),
            task: AtomicWaker::new(),
            noted: AtomicUsize::new(0),
            shared_feed: AtomicBool::new(false),
            again: AtomicBool::new(false),
            done: AtomicBool::new(false),
        })
    }

    /// The future, to poll here; `None` if another thread is polling it, which then wakes
    /// the task when it lets go (`again`). The lock is tried again after `again` is set: a
    /// holder that let go and looked at `again` before it was set would wake no one, but then
    /// the lock is free, and this thread takes its turn.
    fn turn(&self) -> Option<MutexGuard<'_, Option<Boxed>>> {
        let mut told = false;
        loop {
            match self.future.try_lock() {
                Ok(slot) => return Some(slot),
                Err(TryLockError::WouldBlock) if told => return None,
                Err(TryLockError::WouldBlock) => {
                    #[cfg(test)]
                    tests::BUSY.with(|busy| busy.take().map(|then| then()));
                    self.again.store(true, Ordering::Release);
                    told = true;
                }
                // A writer that panicked is over.
                Err(TryLockError::Poisoned(_)) => {
                    self.finish();
                    return None;
                }
            }
        }
    }

    /// Polls the future here, unless another thread is polling it (then that one wakes the
    /// task when it is done).
    fn poll_here(self: &Arc<Self>) {
        let Some(mut slot) = self.turn() else { return };
        self.again.store(false, Ordering::Release);
        if let Some(future) = slot.as_mut() {
            let waker = Waker::from(Arc::clone(self));
            if future.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                *slot = None;
                drop(slot);
                self.finish();
                return;
            }
        }
        drop(slot);
        // Someone came while this poll held the future: whatever woke it, poll again.
        if self.again.swap(false, Ordering::AcqRel) {
            self.task.wake();
        }
    }

    fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs `future` as a writer: driven by a task of its own, and polled inline by a reader whose
/// capture woke it. The returned handle completes when the future has.
pub(crate) fn spawn(
    future: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let owner = Owner(Shared::new(future));
    tokio::spawn(poll_fn(move |cx| {
        let shared = &owner.0;
        shared.task.register(cx.waker());
        if !shared.done.load(Ordering::Acquire) {
            shared.poll_here();
        }
        if shared.done.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
    }))
}

/// The driving task's hold on a writer: when the task is dropped unfinished (its runtime shut
/// down), the future goes with it. The wakers it registered hold its `Shared`, which holds the
/// future: left there, the two would keep each other, and the socket, alive.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        let future = self.0.future.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        drop(future);
    }
}

/// While it lives, writers woken on this thread are noted; when it ends, they are polled here
/// (see the module documentation). Nests: the outermost polls. Not `Send`.
#[derive(Debug)]
pub(crate) struct Capture {
    outermost: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Capture {
    pub(crate) fn begin() -> Self {
        let outermost = !CAPTURING.with(|capturing| capturing.replace(true));
        Self { outermost, _not_send: std::marker::PhantomData }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.outermost {
            CAPTURING.with(|capturing| capturing.set(false));
            run_noted();
        }
    }
}

/// Within a capture, runs the writers noted so far, and goes on capturing: a reader that
/// reads on without waiting lets its subscribers' writers write every few reads.
pub(crate) fn flush() {
    if CAPTURING.with(|capturing| capturing.replace(false)) {
        run_noted();
        CAPTURING.with(|capturing| capturing.set(true));
    }
}

/// Polls `future` with a capture open for each poll: the writers it wakes run on its thread
/// when it next waits (or ends), and not before unless it calls [`flush`].
pub(crate) async fn captured<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    poll_fn(|cx| {
        let _capture = Capture::begin();
        future.as_mut().poll(cx)
    })
    .await
}

/// Runs the writers noted on this thread (outside any capture: what they wake is woken).
fn run_noted() {
    let mut noted = NOTED.with(|noted| std::mem::take(&mut *noted.borrow_mut()));
    for (n, shared) in noted.iter().enumerate() {
        shared.noted.store(0, Ordering::Release);
        let fed_by_others = shared.shared_feed.swap(false, Ordering::AcqRel);
        // A reader unwinding from a panic only wakes them: a second panic would abort.
        if n < MOST_HERE && !fed_by_others && !std::thread::panicking() {
            shared.poll_here();
        } else {
            shared.task.wake();
        }
    }
    // The list keeps its room for the next capture.
    noted.clear();
    NOTED.with(|list| {
        let mut list = list.borrow_mut();
        if list.is_empty() {
            *list = noted;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;

    thread_local! {
        /// Run once by this thread's next poll that finds the writer busy, before it says so.
        pub(super) static BUSY: Cell<Option<Box<dyn FnOnce()>>> = Cell::new(None);
    }

    /// A writer that counts its wake-ups' turns and the threads it ran on.
    async fn counting(
        notify: Arc<Notify>,
        turns: Arc<AtomicUsize>,
        threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
        stop: usize,
    ) {
        while turns.load(Ordering::SeqCst) < stop {
            notify.notified().await;
            turns.fetch_add(1, Ordering::SeqCst);
            threads.lock().unwrap().push(std::thread::current().id());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_woken_under_a_capture_runs_on_the_capturing_thread_when_it_ends() {
        let (notify, turns, threads) = (Arc::new(Notify::new()), Arc::default(), Arc::default());
        let writer =
            spawn(counting(Arc::clone(&notify), Arc::clone(&turns), Arc::clone(&threads), 3));
        // Its task has polled it once (registered with the notify).
        tokio::time::sleep(Duration::from_millis(20)).await;
        for turn in 1..=2 {
            let here = std::thread::current().id();
            {
                let _capture = Capture::begin();
                notify.notify_one();
                assert_eq!(turns.load(Ordering::SeqCst), turn - 1, "noted, not run, meanwhile");
            }
            assert_eq!(turns.load(Ordering::SeqCst), turn, "run as the capture ended");
            assert_eq!(threads.lock().unwrap().last(), Some(&here), "on this thread");
        }
        // Woken outside a capture, its task runs it; it ends, and so does the handle.
        notify.notify_one();
        tokio::time::timeout(Duration::from_secs(5), writer).await.unwrap().unwrap();
        assert_eq!(turns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_most_a_capture_runs_the_writers_are_woken_as_tasks() {
        let notify = Arc::new(Notify::new());
        let writers: Vec<_> = (0..MOST_HERE + 4)
            .map(|_| {
                let (turns, threads) = (Arc::new(AtomicUsize::new(0)), Arc::default());
                let handle = spawn(counting(Arc::clone(&notify), Arc::clone(&turns), threads, 1));
                (handle, turns)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        {
            let _capture = Capture::begin();
            notify.notify_waiters();
        }
        let ran_here = writers.iter().filter(|(_, turns)| turns.load(Ordering::SeqCst) == 1);
        assert!(ran_here.count() >= MOST_HERE, "the first ones ran as the capture ended");
        for (handle, turns) in writers {
            tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
            assert_eq!(turns.load(Ordering::SeqCst), 1, "every one ran, here or as a task");
        }
    }

    #[test]
    fn a_reader_runs_its_writers_when_it_waits_or_flushes_and_not_before() {
        let (shared, polls, task) = polled();
        let waker = Waker::from(Arc::clone(&shared));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut turn = 0;
        runtime.block_on(captured(poll_fn(|cx| {
            turn += 1;
            match turn {
                // Woken and flushed while the reader reads on: run at once, and the capture
                // goes on (the next wake is noted again).
                1 => {
                    waker.wake_by_ref();
                    assert_eq!(polls.load(Ordering::SeqCst), 0, "noted, not run");
                    flush();
                    assert_eq!(polls.load(Ordering::SeqCst), 1, "run by the flush");
                    waker.wake_by_ref();
                    assert_eq!(polls.load(Ordering::SeqCst), 1, "noted again");
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                // The reader waited in between: the writer ran then, on this thread.
                _ => {
                    assert_eq!(polls.load(Ordering::SeqCst), 2, "run when the reader waited");
                    Poll::Ready(())
                }
            }
        })));
        assert_eq!(task.0.load(Ordering::SeqCst), 0, "never left to its task");
        assert!(!CAPTURING.with(Cell::get), "no capture open once the reader is done");
    }

    #[test]
    fn a_writer_whose_runtime_ends_goes_with_it() {
        let (notify, held) = (Arc::new(Notify::new()), Arc::new(()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (notify, held) = (Arc::clone(&notify), Arc::clone(&held));
            // Never ends; its waker stays with the notify, which outlives the runtime.
            drop(spawn(async move {
                let _held = held;
                loop {
                    notify.notified().await;
                }
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        drop(runtime);
        assert_eq!(Arc::strong_count(&held), 1, "the future was dropped with its task");
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A writer whose first poll, on a thread of its own, holds it until `let_go` is called
    /// (which returns once that poll is over); its polls are counted, and so are its task's
    /// wake-ups.
    fn held_by_another_thread()
    -> (Arc<Shared>, Arc<AtomicUsize>, Arc<Counted>, impl FnOnce() + 'static) {
        let (inside, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (tell, wait) = (Mutex::new(inside.0), Mutex::new(go.1));
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let (shared, task) = with_task(poll_fn(move |_| {
            if counted.fetch_add(1, Ordering::SeqCst) == 0
                && let Ok(tell) = tell.lock()
                && tell.send(()).is_ok()
            {
                let _ = wait.lock().unwrap().recv();
            }
            Poll::Pending
        }));
        let holder = std::thread::spawn({
            let shared = Arc::clone(&shared);
            move || shared.poll_here()
        });
        inside.1.recv().unwrap();
        let let_go = move || {
            drop(go.0);
            holder.join().unwrap();
        };
        (shared, polls, task, let_go)
    }

    #[test]
    fn a_poll_that_finds_the_writer_busy_has_the_holder_wake_its_task() {
        let (shared, polls, task, let_go) = held_by_another_thread();
        // Another poll while the holder polls: it cannot, and says so.
        shared.poll_here();
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        let_go();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the holder woke the task as it let go");
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_poll_that_finds_the_writer_busy_and_then_free_runs_it_itself() {
        let (shared, polls, task, let_go) = held_by_another_thread();
        // This poll finds it busy; the holder lets go, and looks for a late poll, before this
        // one says it came.
        BUSY.with(|busy| busy.set(Some(Box::new(let_go))));
        shared.poll_here();
        assert_eq!(polls.load(Ordering::SeqCst), 2, "polled again here once it was free");
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
    }

    /// A writer that counts its polls, with a task waker that counts its wake-ups.
    fn polled() -> (Arc<Shared>, Arc<AtomicUsize>, Arc<Counted>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let (shared, task) = with_task(poll_fn(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            Poll::Pending
        }));
        (shared, polls, task)
    }

    /// A writer not driven by any task, with a task waker that counts its wake-ups.
    fn with_task(future: impl Future<Output = ()> + Send + 'static) -> (Arc<Shared>, Arc<Counted>) {
        let (shared, task) = (Shared::new(future), Arc::new(Counted::default()));
        shared.task.register(&Waker::from(Arc::clone(&task)));
        (shared, task)
    }

    #[test]
    fn a_writer_that_readers_on_two_threads_fed_at_once_is_left_to_its_task() {
        // Fed by this thread's reader alone: run here.
        let (shared, polls, task) = polled();
        let capture = Capture::begin();
        Waker::from(Arc::clone(&shared)).wake_by_ref();
        drop(capture);
        assert_eq!((polls.load(Ordering::SeqCst), task.0.load(Ordering::SeqCst)), (1, 0));
        // Woken by another thread's capture too before this one ended: its task runs it.
        let (shared, polls, task) = polled();
        let capture = Capture::begin();
        Waker::from(Arc::clone(&shared)).wake_by_ref();
        std::thread::spawn({
            let shared = Arc::clone(&shared);
            move || {
                let _capture = Capture::begin();
                Waker::from(shared).wake_by_ref();
            }
        })
        .join()
        .unwrap();
        drop(capture);
        assert_eq!((polls.load(Ordering::SeqCst), task.0.load(Ordering::SeqCst)), (0, 1));
    }

    #[test]
    fn a_wake_while_another_thread_polls_the_writer_is_not_lost() {
        /// What a writer waits on: a count, and the waker to tell when it moves.
        #[derive(Default)]
        struct Source {
            sent: AtomicUsize,
            waker: AtomicWaker,
        }
        const SENT: usize = 5_000;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let source = Arc::new(Source::default());
            let seen = Arc::new(AtomicUsize::new(0));
            let writer = spawn({
                let (source, seen) = (Arc::clone(&source), Arc::clone(&seen));
                poll_fn(move |cx| {
                    source.waker.register(cx.waker());
                    seen.store(source.sent.load(Ordering::SeqCst), Ordering::SeqCst);
                    if seen.load(Ordering::SeqCst) == SENT {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
            });
            // Wakes from captures on this thread race the writer's own task on the other.
            for _ in 0..SENT {
                let capture = Capture::begin();
                source.sent.fetch_add(1, Ordering::SeqCst);
                source.waker.wake();
                drop(capture);
                if seen.load(Ordering::SeqCst).is_multiple_of(7) {
                    tokio::task::yield_now().await;
                }
            }
            tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), SENT);
        });
    }
}
