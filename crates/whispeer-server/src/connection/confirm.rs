//! PUBACKs for publishes that wait on the store (or the cluster): one task per connection takes
//! them in the order they were published, so a group commit that makes many of them durable
//! wakes one task, which sends all their PUBACKs, instead of one task per publish.
//!
//! The queue is bounded (`PENDING`). Its policy when full is back-pressure: the publish that
//! found no room is held, and the connection reads nothing more until it has its place
//! ([`Confirmations::make_room`]), so a publisher that keeps more publishes in flight than
//! that waits for the store instead of costing the server a task (or memory) per publish.

use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use whispeer_core::{Broker, PublishReceipt, Unconfirmed};
use whispeer_proto::{Body, ErrorCode, Frame};

use crate::writer::Outbound;

/// Publishes a connection may have waiting in its confirmation queue.
const PENDING: usize = 16 * 1024;

/// Most PUBACKs handed to the writer in one message: while a connection's publishes keep being
/// confirmed, they go in turns of this many rather than in one batch that grows as they come.
const BATCH: usize = 1024;

type Waiting = (u32, PublishReceipt);

/// A connection's confirmation queue; its task starts with the first publish that waits.
#[derive(Default)]
pub(super) struct Confirmations {
    queue: Option<mpsc::Sender<Waiting>>,
    /// The publish that found the queue full, until [`Confirmations::make_room`] queues it.
    held: Option<Waiting>,
}

impl Confirmations {
    /// Sends the PUBACK for `correlation` (or why not) through `out` once `receipt` is
    /// confirmed, after those queued before it. When the queue is full the publish is held
    /// ([`holds`](Self::holds)), and the connection must await [`make_room`](Self::make_room)
    /// before it reads on.
    pub(super) fn push(
        &mut self,
        broker: &Broker,
        out: &mpsc::Sender<Outbound>,
        correlation: u32,
        receipt: PublishReceipt,
    ) {
        let queue = self.queue.get_or_insert_with(|| {
            let (queue, waiting) = mpsc::channel(PENDING);
            tokio::spawn(confirm_in_order(broker.clone(), waiting, out.clone()));
            queue
        });
        match queue.try_send((correlation, receipt)) {
            Ok(()) => {}
            Err(TrySendError::Full(waiting)) => self.held = Some(waiting),
            // The task ends only when the writer is gone, and the connection with it: no
            // PUBACK can be sent, and the publisher sends the publish again elsewhere.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Whether a publish is held until the queue has room.
    pub(super) fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// Waits until the held publish, if any, has its place in the queue (back-pressure: the
    /// connection reads nothing meanwhile).
    pub(super) async fn make_room(&mut self) {
        if let (Some(waiting), Some(queue)) = (self.held.take(), &self.queue) {
            // Closed: the connection is ending (see `push`).
            let _ = queue.send(waiting).await;
        }
    }
}

/// Sends the replies in order. A sync confirms many publishes at once: those already
/// confirmed when the first is go to the writer together (up to `BATCH`), one message and one
/// wake-up.
async fn confirm_in_order(
    broker: Broker,
    mut waiting: mpsc::Receiver<Waiting>,
    out: mpsc::Sender<Outbound>,
) {
    let mut replies = Vec::new();
    while let Some((correlation, receipt)) = waiting.recv().await {
        replies.push(reply(&broker, correlation, &receipt).await);
        while replies.len() < BATCH
            && let Ok((correlation, receipt)) = waiting.try_recv()
        {
            let mut next = pin!(reply(&broker, correlation, &receipt));
            let frame = match ready_now(next.as_mut()) {
                Some(frame) => frame,
                None => {
                    // Not confirmed yet: what is ready goes first.
                    let ready = Outbound::Frames(std::mem::take(&mut replies));
                    if out.send(ready).await.is_err() {
                        return;
                    }
                    next.await
                }
            };
            replies.push(frame);
        }
        let ready = match replies.len() {
            1 => replies.pop().map(Outbound::Frame),
            _ => Some(Outbound::Frames(std::mem::take(&mut replies))),
        };
        if let Some(ready) = ready
            && out.send(ready).await.is_err()
        {
            return;
        }
    }
}

/// `future`'s output if it is ready without waiting.
fn ready_now<F: Future>(future: Pin<&mut F>) -> Option<F::Output> {
    match future.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// PUBACK once `receipt` is confirmed, or the error that says why it was not.
async fn reply(broker: &Broker, correlation: u32, receipt: &PublishReceipt) -> Frame {
    let body = match broker.confirmed(receipt).await {
        Ok(()) => Body::PubAck,
        Err(err) => {
            let code = match err {
                Unconfirmed::Store => ErrorCode::INTERNAL,
                _ => ErrorCode::CLUSTER_UNAVAILABLE,
            };
            Body::Error { code, message: err.to_string() }
        }
    };
    Frame::new(correlation, body)
}
