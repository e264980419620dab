//! Deliveries, from the read buffer to their subscriptions' staging, in runs.
//!
//! Each DELIVER's head is read where it lies in the buffer ([`Frame::peek_deliver`]): its
//! subscription, offset and id decide whether it is taken. Consecutive deliveries taken for one
//! subscription are cut off the buffer in one piece, a [`Run`], rather than one by one; the
//! subscription takes them apart as it hands them out. A delivery not taken (a redelivery of a
//! message acked already, one over a full buffer, one for a subscription that is gone) ends the
//! run before it and is cut off alone and dropped.

use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use whispeer_proto::{Body, DeliverHead, Frame, Limits, OutBuf};

use super::{Actor, Run, encode};
use crate::ClientError;

/// The run being read at the front of the buffer: its subscription, bytes and deliveries.
#[derive(Clone, Copy)]
struct Reading {
    sub: u32,
    bytes: usize,
    count: usize,
}

impl Actor {
    /// Takes every whole DELIVER at the front of `inbound` to its subscription's staging,
    /// stopping at the first other frame (or one not whole yet).
    pub(super) fn take_deliveries(
        &mut self,
        inbound: &mut BytesMut,
        limits: &Limits,
        out: &mut OutBuf,
        max: usize,
    ) -> Result<(), ClientError> {
        let mut reading: Option<Reading> = None;
        loop {
            let at = reading.map_or(0, |r| r.bytes);
            let Some(head) = inbound.get(at..).and_then(|rest| Frame::peek_deliver(rest, limits))
            else {
                break;
            };
            if let Some(run) = reading.filter(|r| r.sub != head.sub) {
                self.cut(inbound, run);
                reading = None;
                continue;
            }
            let admitted = match self.admit(&head, out, max) {
                Ok(admitted) => admitted,
                Err(err) => {
                    // What was admitted is counted in the staging: it is staged, not lost.
                    if let Some(run) = reading {
                        self.cut(inbound, run);
                    }
                    return Err(err);
                }
            };
            if admitted {
                let run = reading.get_or_insert(Reading { sub: head.sub, bytes: 0, count: 0 });
                run.bytes += head.frame_len;
                run.count += 1;
            } else {
                if let Some(run) = reading.take() {
                    self.cut(inbound, run);
                }
                inbound.advance(head.frame_len);
            }
        }
        if let Some(run) = reading {
            self.cut(inbound, run);
        }
        Ok(())
    }

    /// Whether a delivery is taken for its subscription (and counted in its staging). A
    /// redelivery of a message acked already is acked again instead; one over a full buffer is
    /// dropped and counted; one for a subscription that is gone is dropped.
    fn admit(
        &mut self,
        head: &DeliverHead,
        out: &mut OutBuf,
        max: usize,
    ) -> Result<bool, ClientError> {
        let (sub, id) = (head.sub, head.id);
        let Some(subscription) = self.subscriptions.get_mut(&sub) else { return Ok(false) };
        if head.offset > 0 {
            subscription.last_offset = Some(head.offset);
        }
        if subscription.acked.set.contains(&id) {
            // Acked already; the ack was lost with a connection. Ack again, drop it.
            subscription.buffer.duplicates.fetch_add(1, Ordering::Relaxed);
            encode(&Frame::new(0, Body::Ack { sub, id }), out.frames(), max)?;
            return Ok(false);
        }
        // Under QoS 1 the buffer holds the prefetch, so only what comes beyond it (redeliveries
        // of messages still waiting there) can be dropped; unacknowledged, it comes again after
        // its timeout.
        if !subscription.buffer.admit(&mut subscription.staged, head.envelope_len()) {
            tracing::warn!(sub, %id, "subscription buffer full; message dropped");
            return Ok(false);
        }
        Ok(true)
    }

    /// Cuts the run read so far off the front of `inbound` and stages it.
    fn cut(&mut self, inbound: &mut BytesMut, run: Reading) {
        let frames = inbound.split_to(run.bytes).freeze();
        // Admitted, so the subscription is there.
        let Some(subscription) = self.subscriptions.get_mut(&run.sub) else { return };
        if subscription.staged.is_empty() {
            self.staged.push(run.sub);
        }
        subscription.staged.push(Run::new(frames, run.count));
    }
}
