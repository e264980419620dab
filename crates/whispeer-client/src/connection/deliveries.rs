//! Deliveries, from the read buffer to their subscriptions' staging, in runs.
//!
//! Each DELIVER's head is read where it lies in the buffer ([`Frame::peek_deliver`]): its
//! subscription, offset and id decide whether it is taken. Consecutive deliveries taken for one
//! subscription are cut off the buffer in one piece, a [`Run`], rather than one by one; the
//! subscription takes them apart as it hands them out. A delivery not taken (a redelivery of a
//! message acked already, one over a full buffer, one for a subscription that is gone) ends the
//! run before it and is cut off alone and dropped.
//!
//! A compact delivery that numbers its topic is learnt here, whatever becomes of it, before
//! any later delivery is cut off: each run carries the connection's numbers as they were when
//! it was cut, which name every topic its deliveries name by number.

use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use whispeer_proto::{Body, DeliverHead, Frame, Limits, OutBuf, TopicAliases};

use super::{Actor, Run, Sub, encode};
use crate::ClientError;

impl Actor {
    /// Takes every whole DELIVER at the front of `inbound` to its subscription's staging,
    /// stopping at the first other frame (or one not whole yet). A run's subscription is looked
    /// up once, not for each of its deliveries.
    pub(super) fn take_deliveries(
        &mut self,
        inbound: &mut BytesMut,
        limits: &Limits,
        out: &mut OutBuf,
        max: usize,
    ) -> Result<(), ClientError> {
        while let Some(first) = Frame::peek_deliver(inbound, limits) {
            let Some(subscription) = self.subscriptions.get_mut(&first.sub) else {
                // For a subscription that is gone: dropped.
                if first.defines {
                    learn(&mut self.aliases, &first, inbound, limits)?;
                }
                inbound.advance(first.frame_len);
                continue;
            };
            // Bytes and deliveries of the run read so far.
            let (mut bytes, mut count) = (0, 0);
            let mut head = Some(first);
            let mut refused = None;
            while let Some(next) = head.filter(|next| next.sub == first.sub) {
                // Taken or dropped below, it is read: what it defines holds from now on.
                if next.defines {
                    let at = inbound.get(bytes..).unwrap_or_default();
                    learn(&mut self.aliases, &next, at, limits)?;
                }
                match admit(subscription, &next, out, max) {
                    Ok(true) => {
                        bytes += next.frame_len;
                        count += 1;
                        head =
                            inbound.get(bytes..).and_then(|rest| Frame::peek_deliver(rest, limits));
                    }
                    Ok(false) => {
                        refused = Some(Ok(next.frame_len));
                        break;
                    }
                    Err(err) => {
                        refused = Some(Err(err));
                        break;
                    }
                }
            }
            if count > 0 {
                let frames = inbound.split_to(bytes).freeze();
                if subscription.staged.is_empty() {
                    self.staged.push(first.sub);
                }
                subscription.staged.push(Run::new(frames, count, self.aliases.clone()));
            }
            match refused {
                // Not taken: cut off alone and dropped, after the run before it.
                Some(Ok(frame_len)) => inbound.advance(frame_len),
                // What was admitted is counted in the staging: it is staged, not lost.
                Some(Err(err)) => return Err(err),
                None => {}
            }
        }
        Ok(())
    }
}

/// Learns the topic number the delivery `head` read at the front of `frames` defines (one that
/// defines one, `head.defines`). A definition out of order, or of a topic that is not one, is
/// the server's error: the connection is lost.
#[cold]
fn learn(
    aliases: &mut TopicAliases,
    head: &DeliverHead,
    frames: &[u8],
    limits: &Limits,
) -> Result<(), ClientError> {
    let frame = frames.get(..head.frame_len).unwrap_or_default();
    aliases.learn(frame, limits).map_err(|err| ClientError::Protocol(err.to_string()))
}

/// Whether a delivery is taken for `subscription` (and counted in its staging). A redelivery
/// of a message acked already is acked again instead; one over a full buffer is dropped and
/// counted.
#[inline]
fn admit(
    subscription: &mut Sub,
    head: &DeliverHead,
    out: &mut OutBuf,
    max: usize,
) -> Result<bool, ClientError> {
    let (sub, id) = (head.sub, head.id);
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
