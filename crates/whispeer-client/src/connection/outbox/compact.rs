//! Compact publishes from the outbox (PUBLISH_COMPACT, `PROTOCOL.md`, "Compact publishes"):
//! the topics a connection numbers, and the way back to PUBLISHes for what was buffered when a
//! connection was lost.
//!
//! Numbers belong to a connection, as the server's reader keeps them: the first publish to a
//! topic names it in full and defines its number, the next ones name the number, over as many
//! batches as the connection carries. [`SLOTS`] numbers are reused in turn, each reuse
//! defining its number again. What the outbox holds when a new connection starts was encoded
//! for the last one, whose numbers the new server does not know: it is written back as
//! PUBLISHes first ([`expand`]), read with the numbers as they stood when the connection task
//! last took the buffer ([`Names::taken`]), and the new connection defines its numbers afresh.
//! A lone publish that defines its number is still 4 bytes shorter than a PUBLISH.

use bytes::{Buf, BytesMut};
use whispeer_proto::{Frame, Limits, OutBuf, Topic, TopicCache, TopicRef, same_text};

use super::TopicCheck;
use crate::ClientError;

/// How many topics a connection numbers: past that, the slots are reused in turn.
pub(super) const SLOTS: usize = 8;

/// The topics numbered on the current connection.
#[derive(Debug, Default)]
pub(super) struct Names {
    /// Slot `i` holds number `i + 1`'s topic; the first `used` are defined (the others keep
    /// their allocations for later).
    slots: Vec<String>,
    used: usize,
    /// The slot reused next once all are used.
    next: usize,
    /// The slot named last, looked at first (a publisher mostly repeats its topic).
    last: usize,
    /// Whether the buffer holds a compact frame.
    held: bool,
    /// The defined slots as they stood when the buffer was last taken: what the frames in it
    /// may name without defining.
    taken: Vec<String>,
    /// Whether a number was defined since `taken` was copied.
    changed: bool,
}

impl Names {
    /// How a compact publish to `topic` names it: by its number if one is defined (it was
    /// checked to be a topic then), else by defining one once `check` finds it is a topic. The
    /// caller encodes the frame at once, or calls [`Names::forget`] if it cannot.
    ///
    /// # Errors
    /// `check`'s refusal, nothing defined.
    #[inline(always)]
    pub(super) fn name(&mut self, topic: &str, check: TopicCheck) -> Result<TopicRef, ClientError> {
        let last = self.slots.get(self.last).filter(|_| self.last < self.used);
        if last.is_some_and(|last| same_text(last, topic)) {
            self.held = true;
            return Ok(alias(self.last));
        }
        self.name_other(topic, check)
    }

    /// [`Names::name`] for a topic other than the one named last.
    #[inline(never)]
    fn name_other(&mut self, topic: &str, check: TopicCheck) -> Result<TopicRef, ClientError> {
        if let Some(at) = self.slots[..self.used].iter().position(|held| same_text(held, topic)) {
            (self.last, self.held) = (at, true);
            return Ok(alias(at));
        }
        check(topic)?;
        self.held = true;
        let at = if self.used < SLOTS {
            self.used += 1;
            if self.slots.len() < self.used {
                self.slots.push(String::new());
            }
            self.used - 1
        } else {
            let at = self.next;
            self.next = (self.next + 1) % SLOTS;
            at
        };
        self.slots[at].clear();
        self.slots[at].push_str(topic);
        (self.last, self.changed) = (at, true);
        Ok(TopicRef::Define(number(at)))
    }

    /// Forgets every number for what is encoded next, which defines them again: after a frame
    /// that defined one could not be encoded.
    pub(super) fn forget(&mut self) {
        (self.used, self.next, self.last, self.changed) = (0, 0, 0, true);
    }

    /// The buffer was taken: what is encoded next may name the numbers defined so far.
    pub(super) fn taken(&mut self) {
        self.held = false;
        if self.changed {
            self.taken.truncate(self.used);
            self.taken.resize(self.used, String::new());
            for (taken, slot) in self.taken.iter_mut().zip(&self.slots) {
                taken.clone_from(slot);
            }
            self.changed = false;
        }
    }

    /// A new connection starts, knowing no number: `buf`, encoded for the last one, as
    /// PUBLISHes if it holds compact frames; numbers are defined afresh from now on.
    pub(super) fn connected(&mut self, buf: OutBuf, vectored: bool) -> OutBuf {
        let buf = if self.held { expand(buf, &self.taken, vectored) } else { buf };
        self.forget();
        self.taken.clear();
        (self.held, self.changed) = (false, false);
        buf
    }
}

fn number(slot: usize) -> u16 {
    // At most `SLOTS`, far below `MAX_TOPIC_ALIASES`.
    u16::try_from(slot + 1).unwrap_or(u16::MAX)
}

fn alias(slot: usize) -> TopicRef {
    TopicRef::Alias(number(slot))
}

/// `buf` (publishes only, as the outbox holds them) with every PUBLISH_COMPACT written back as
/// the PUBLISH it stands for, under the same correlation id; `numbered`, the topics numbered
/// before its first frame. Rare (a connection lost with publishes buffered), so it copies: the
/// frames are read as a server would have read them.
#[cold]
fn expand(mut buf: OutBuf, numbered: &[String], vectored: bool) -> OutBuf {
    let mut frames = BytesMut::from(buf.copy_to_bytes(buf.remaining()));
    // The frames were checked when they were encoded; read them back whatever their size.
    let mut limits = Limits::DEFAULT;
    limits.max_topic_len = usize::MAX;
    limits.max_topic_depth = usize::MAX;
    limits.max_message_bytes = usize::MAX;
    limits.max_frame_bytes = usize::MAX;
    let (mut topics, mut out) = (TopicCache::default(), OutBuf::default());
    for (slot, topic) in numbered.iter().enumerate() {
        if let Ok(topic) = Topic::parse_with(topic, &limits) {
            topics.define_numbered(number(slot), topic);
        }
    }
    while let Ok(Some(raw)) = Frame::split(&mut frames, &limits) {
        let correlation = raw.correlation();
        // Only publishes are buffered: anything else is written back as it decodes.
        let written = match raw.publish(&limits, &mut topics) {
            Ok(Ok((qos, envelope))) => {
                Frame::encode_publish_head(out.frames(), correlation, qos, &envelope, usize::MAX)
                    .map(|()| out.put_payload(&envelope.payload, vectored))
                    .map_err(|err| err.to_string())
            }
            Ok(Err(other)) => {
                other.decode(&limits, &mut topics).map_err(|err| err.to_string()).and_then(
                    |frame| frame.encode(out.frames(), usize::MAX).map_err(|e| e.to_string()),
                )
            }
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = written {
            tracing::warn!(%err, correlation, "a buffered publish could not be sent again");
        }
    }
    out
}
