//! PUBACKs for publishes that wait on the store (or the cluster): one task per connection takes
//! them in the order they were published, so a group commit that makes many of them durable
//! wakes one task, which sends all their PUBACKs, instead of one task per publish.
//!
//! The queue is bounded (`PENDING`); past it, a publish gets a task of its own, as before.

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
pub(super) struct Confirmations(Option<mpsc::Sender<Waiting>>);

impl Confirmations {
    /// Sends the PUBACK for `correlation` (or why not) through `out` once `receipt` is
    /// confirmed, after those queued before it.
    pub(super) fn push(
        &mut self,
        broker: &Broker,
        out: &mpsc::Sender<Outbound>,
        correlation: u32,
        receipt: PublishReceipt,
    ) {
        let queue = self.0.get_or_insert_with(|| {
            let (queue, waiting) = mpsc::channel(PENDING);
            tokio::spawn(confirm_in_order(broker.clone(), waiting, out.clone()));
            queue
        });
        match queue.try_send((correlation, receipt)) {
            Ok(()) => {}
            Err(
                TrySendError::Full((correlation, receipt))
                | TrySendError::Closed((correlation, receipt)),
            ) => {
                let (broker, out) = (broker.clone(), out.clone());
                tokio::spawn(async move {
                    let reply = reply(&broker, correlation, &receipt).await;
                    let _ = out.send(Outbound::Frame(reply)).await;
                });
            }
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
