//! Compact publishes from the outbox (PUBLISH_COMPACT, `PROTOCOL.md`, "Compact publishes"):
//! the topics a connection numbers, and the way back to PUBLISHes for what was buffered when a
//! connection was lost.
//!
//! Numbers belong to a connection, as the server's reader keeps them: the first publish to a
//! topic names it in full and defines its number, the next ones name the number, over as many
//! batches as the connection carries. A connection numbers up to [`SLOTS`] topics (as many as
//! the protocol allows); past them the numbers are reused in turn, each reuse defining its
//! number again. What the outbox holds when a new connection starts was encoded for the last
//! one, whose numbers the new server does not know: it is written back as PUBLISHes first
//! ([`expand`]), read with the numbers as they stood when the connection task last took the
//! buffer ([`Names::taken`]), and the new connection defines its numbers afresh. A lone
//! publish that defines its number is still 4 bytes shorter than a PUBLISH.

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use whispeer_proto::{
    Frame, Limits, MAX_TOPIC_ALIASES, OutBuf, Topic, TopicCache, TopicRef, same_text,
};

use super::TopicCheck;
use crate::ClientError;

/// How many topics a connection numbers: past that, the numbers are reused in turn.
pub(super) const SLOTS: usize = MAX_TOPIC_ALIASES as usize;

/// The topics numbered on the current connection.
#[derive(Debug, Default)]
pub(super) struct Names {
    /// Slot `i` holds number `i + 1`'s topic; the first `used` are defined (the others keep
    /// their allocations for later).
    slots: Vec<String>,
    /// The slot of each defined topic.
    index: HashMap<Box<str>, usize, foldhash::fast::RandomState>,
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
    /// The slots defined since `taken` was brought up to date, unless `all` are.
    defined: Vec<usize>,
    /// Whether more slots were defined since than `defined` lists (bounded by [`SLOTS`]).
    all: bool,
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
        if let Some(&at) = self.index.get(topic) {
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
            self.index.remove(self.slots[at].as_str());
            at
        };
        self.slots[at].clear();
        self.slots[at].push_str(topic);
        self.index.insert(topic.into(), at);
        self.last = at;
        if self.defined.len() < SLOTS {
            self.defined.push(at);
        } else {
            self.all = true;
        }
        Ok(TopicRef::Define(number(at)))
    }

    /// Forgets every number for what is encoded next, which defines them again: after a frame
    /// that defined one could not be encoded.
    pub(super) fn forget(&mut self) {
        (self.used, self.next, self.last) = (0, 0, 0);
        self.index.clear();
    }

    /// The buffer was taken: what is encoded next may name the numbers defined so far.
    pub(super) fn taken(&mut self) {
        self.held = false;
        // Slots past `used` were forgotten; those below it defined since the last take are
        // listed (or `all`), the others unchanged since.
        self.taken.truncate(self.used);
        self.taken.resize(self.used, String::new());
        if self.all {
            for (taken, slot) in self.taken.iter_mut().zip(&self.slots) {
                taken.clone_from(slot);
            }
        } else {
            for &at in self.defined.iter().filter(|&&at| at < self.used) {
                self.taken[at].clone_from(&self.slots[at]);
            }
        }
        self.defined.clear();
        self.all = false;
    }

    /// A new connection starts, knowing no number: `buf`, encoded for the last one, as
    /// PUBLISHes if it holds compact frames; numbers are defined afresh from now on.
    pub(super) fn connected(&mut self, buf: OutBuf, vectored: bool) -> OutBuf {
        let buf = if self.held { expand(buf, &self.taken, vectored) } else { buf };
        self.forget();
        self.taken.clear();
        self.defined.clear();
        (self.held, self.all) = (false, false);
        buf
    }
}

fn number(slot: usize) -> u16 {
    // Below `SLOTS`: at most `MAX_TOPIC_ALIASES`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str) -> Result<(), ClientError> {
        Ok(())
    }

    /// Names `topics` (`t/<n>`), takes the buffer, and checks that what is taken is exactly
    /// the defined slots and that each defined topic, and no other, is found by its slot.
    fn name_and_take(names: &mut Names, topics: std::ops::Range<usize>) {
        for n in topics {
            names.name(&format!("t/{n}"), any).unwrap();
        }
        names.taken();
        assert_eq!(names.taken, names.slots[..names.used]);
        assert_eq!(names.index.len(), names.used);
        for (at, topic) in names.taken.iter().enumerate() {
            assert_eq!(names.index.get(topic.as_str()), Some(&at), "{topic}");
        }
    }

    /// At each take, what is taken mirrors the numbers defined: after a few definitions,
    /// after more than there are numbers (reused in turn), and after they were forgotten.
    #[test]
    fn what_is_taken_mirrors_the_numbers_defined() {
        let mut names = Names::default();
        name_and_take(&mut names, 0..5);
        name_and_take(&mut names, 3..9);
        assert_eq!(names.name("t/4", any).unwrap(), TopicRef::Alias(5));
        name_and_take(&mut names, 0..SLOTS + 300);
        // Reused numbers no longer name their old topics.
        assert!(matches!(names.name("t/0", any).unwrap(), TopicRef::Define(_)));
        name_and_take(&mut names, 10..20);
        names.forget();
        name_and_take(&mut names, 50..53);
        assert_eq!(names.used, 3);
        assert_eq!(names.name("t/51", any).unwrap(), TopicRef::Alias(2));
        // More definitions between two takes than there are numbers, forgotten after each
        // (every one number 1).
        for n in 100..100 + SLOTS {
            names.name(&format!("t/{n}"), any).unwrap();
            names.forget();
        }
        name_and_take(&mut names, 2000..2100);
    }
}
