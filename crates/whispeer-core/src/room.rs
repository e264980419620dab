//! Publishers held back by full queues (`SlowConsumer::BackPressure`): a publish that leaves
//! such a queue past its bounds notes it on the publishing thread, and the publisher takes the
//! notes ([`Broker::room`](crate::Broker::room)) and waits until those queues have room again
//! ([`Room::wait`]) before it publishes more. A server connection does so after each read,
//! before it reads its socket again: a publisher then meets TCP's own flow control, as a
//! socket nobody reads.
//!
//! Notes are taken on the thread that published, before anything awaits (a publish is
//! synchronous), so they never follow the wrong task. A thread notes at most [`MOST_NOTED`]
//! queues between takes; a queue past that (or a publisher that never asks for room) still
//! meets the queue's hard bound (`queue/pressure.rs`).

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::ByteBudget;
use crate::queue::Queue;
use crate::stats::{BrokerCounters, bump};

/// Most queues a thread notes between two takes.
const MOST_NOTED: usize = 64;

/// A queue that held a publisher back, and the counters of its broker.
type Noted = (Weak<Queue>, Arc<BrokerCounters>);

thread_local! {
    static NOTED: RefCell<Vec<Noted>> = const { RefCell::new(Vec::new()) };
}

/// Notes that a publish on this thread left `queue` past its bounds.
#[cold]
#[inline(never)]
pub(crate) fn note(queue: &Arc<Queue>, counters: &Arc<BrokerCounters>) {
    NOTED.with(|noted| {
        let Ok(mut noted) = noted.try_borrow_mut() else { return };
        let known = noted.iter().any(|(q, _)| std::ptr::eq(q.as_ptr(), Arc::as_ptr(queue)));
        if !known && noted.len() < MOST_NOTED {
            noted.push((Arc::downgrade(queue), Arc::clone(counters)));
        }
    });
}

/// The queues under [`SlowConsumer::BackPressure`](crate::SlowConsumer::BackPressure) that
/// this thread's publishes left past their bounds: [`Room::wait`] waits until they have room.
///
/// ```
/// # use whispeer_core::{Broker, BrokerOptions, SlowConsumer, SubscribeOptions};
/// # #[tokio::main] async fn main() {
/// let broker = Broker::builder(BrokerOptions::default()).build();
/// let options = SubscribeOptions::new("jobs").capacity(16).slow_consumer(SlowConsumer::BackPressure);
/// let mut jobs = broker.messages(options).unwrap();
/// tokio::spawn(async move { while let Some(_job) = jobs.recv_message().await {} });
/// for n in 0..1000u32 {
///     broker.publish_bytes("jobs", n.to_be_bytes().to_vec()).unwrap();
///     // At the subscriber's pace: nothing dropped, at most one message past its 16.
///     broker.room().wait().await;
/// }
/// # }
/// ```
#[derive(Debug, Default)]
#[must_use = "a room does nothing unless waited for"]
pub struct Room {
    noted: Vec<Noted>,
    timeout: Duration,
}

impl Room {
    /// Takes this thread's notes; `timeout` is how long [`Room::wait`] waits for each queue.
    pub(crate) fn take(timeout: Duration) -> Self {
        let noted = NOTED.with(|noted| match noted.try_borrow_mut() {
            Ok(mut noted) if !noted.is_empty() => std::mem::take(&mut *noted),
            _ => Vec::new(),
        });
        Self { noted, timeout }
    }

    /// Whether no queue holds the publisher back.
    pub fn is_empty(&self) -> bool {
        self.noted.is_empty()
    }

    /// Adds the queues of `later` (taken since) to wait for.
    pub fn merge(&mut self, later: Self) {
        self.timeout = self.timeout.max(later.timeout);
        for (queue, counters) in later.noted {
            if !self.noted.iter().any(|(q, _)| Weak::ptr_eq(q, &queue)) {
                self.noted.push((queue, counters));
            }
        }
    }

    /// Leaves out the queues that draw on `budget`: a server connection's own subscriptions,
    /// whose room waits on what its client sends it (QoS 1 acks), which it would stop reading.
    pub fn ignoring(mut self, budget: &ByteBudget) -> Self {
        self.noted.retain(|(queue, _)| {
            queue.upgrade().is_some_and(|q| !q.budget().is_some_and(|b| b.same(budget)))
        });
        self
    }

    /// Waits until every queue noted is within its bounds again, or closed. A queue that finds
    /// no room within the timeout (`BrokerOptions::back_pressure_timeout`, from when the wait
    /// began) is closed as a slow consumer under `Disconnect` would be (counted in
    /// `BrokerStats::disconnected`), and the publisher goes on. Returns how many were closed.
    pub async fn wait(self) -> usize {
        let deadline = Instant::now() + self.timeout;
        let mut closed = 0;
        for (queue, counters) in self.noted {
            let Some(queue) = queue.upgrade() else { continue };
            if !queue.holds_back() {
                continue;
            }
            bump(&counters.held_back);
            if !queue.room(deadline).await {
                tracing::warn!(
                    filter = %queue.filter,
                    timeout_ms = self.timeout.as_millis(),
                    "subscriber disconnected: no room for its publishers within the timeout"
                );
                queue.close();
                bump(&counters.disconnected);
                closed += 1;
            }
        }
        closed
    }
}
