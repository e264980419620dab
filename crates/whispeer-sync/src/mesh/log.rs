//! A mesh node's memory: the recent shared messages of every publisher (its own and those it
//! received), bounded by count and bytes, for peers that reconnect to catch up on; and how far
//! it has got with each publisher (its cursors), kept in a file beside the peer key when there
//! is one, so a restarted node asks only for what it missed.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use whispeer_core::proto::Envelope;

/// One shared message.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) origin: Arc<str>,
    pub(crate) seq: u64,
    pub(crate) envelope: Envelope,
    bytes: usize,
}

/// The log and the cursors; see the module documentation.
#[derive(Debug)]
pub(crate) struct MeshLog {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
    /// The last seq taken from each publisher (this node's own included).
    cursors: HashMap<Arc<str>, u64>,
    /// Messages that fell out of the log by its bounds.
    pub(crate) evicted: u64,
    dirty: bool,
}

impl MeshLog {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_messages: max_messages.max(1),
            max_bytes,
            cursors: HashMap::new(),
            evicted: 0,
            dirty: false,
        }
    }

    /// Takes a message from `origin` at `seq` if it is new (past the cursor); whether it was.
    pub(crate) fn take(&mut self, origin: &Arc<str>, seq: u64, envelope: &Envelope) -> bool {
        let cursor = self.cursors.entry(Arc::clone(origin)).or_insert(0);
        if seq <= *cursor {
            return false;
        }
        *cursor = seq;
        self.dirty = true;
        let bytes = envelope.payload.len() + envelope.topic.as_str().len() + 64;
        self.entries.push_back(Entry {
            origin: Arc::clone(origin),
            seq,
            envelope: envelope.clone(),
            bytes,
        });
        self.bytes += bytes;
        while self.entries.len() > self.max_messages || self.bytes > self.max_bytes {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.bytes;
            self.evicted += 1;
        }
        true
    }

    /// The cursors, for a `Hello`.
    pub(crate) fn cursors(&self) -> Vec<(String, u64)> {
        self.cursors.iter().map(|(node, seq)| (node.to_string(), *seq)).collect()
    }

    /// The cursor of `origin`.
    pub(crate) fn cursor(&self, origin: &str) -> u64 {
        self.cursors.get(origin).copied().unwrap_or(0)
    }

    /// What a peer whose cursors are `theirs` misses, in log order (so in order per
    /// publisher), leaving out the peer's own messages. Of another node's messages, only a
    /// run without holes that continues the peer's cursor (any run, if the peer has none) is
    /// sent, up to its first hole: a hole would move the peer's cursor past messages that
    /// their publisher itself can still send.
    pub(crate) fn missed_by(
        &self,
        peer: &str,
        me: &str,
        theirs: &HashMap<String, u64>,
    ) -> Vec<Entry> {
        // Per publisher: the seq the next entry must have (`None`: any), or blocked.
        let mut next: HashMap<&str, Option<Option<u64>>> = HashMap::new();
        let mut out = Vec::new();
        for entry in &self.entries {
            let origin = &*entry.origin;
            let cursor = theirs.get(origin).copied();
            if origin == peer || cursor.is_some_and(|c| entry.seq <= c) {
                continue;
            }
            if origin == me {
                out.push(entry.clone());
                continue;
            }
            let state = next.entry(origin).or_insert(Some(cursor.map(|c| c + 1)));
            match *state {
                Some(want) if want.is_none_or(|w| w == entry.seq) => {
                    *state = Some(Some(entry.seq + 1));
                    out.push(entry.clone());
                }
                _ => *state = None,
            }
        }
        out
    }

    /// This node's own messages after `seq`.
    pub(crate) fn own_after(&self, me: &str, seq: u64) -> Vec<Entry> {
        // Own messages are appended in seq order: scan back from the newest.
        let mut out: Vec<Entry> = self
            .entries
            .iter()
            .rev()
            .take_while(|e| !(&*e.origin == me && e.seq <= seq))
            .filter(|e| &*e.origin == me)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// The cursors as text (`<node> <seq>` per line), when they changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.cursors.iter().map(|(node, seq)| format!("{node} {seq}\n")).collect())
    }

    /// Reads cursors written by [`MeshLog::take_dirty`]; lines that do not parse are skipped.
    pub(crate) fn restore(&mut self, text: &str) {
        for line in text.lines() {
            if let Some((node, seq)) = line.split_once(' ')
                && let Ok(seq) = seq.trim().parse::<u64>()
            {
                self.cursors.insert(Arc::from(node), seq);
            }
        }
    }
}

/// Where a node's cursors are kept: beside its key file.
pub(crate) fn cursor_file(key_file: &std::path::Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".cursors");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use whispeer_core::proto::{Flags, MessageId, Topic};

    fn envelope(n: u128) -> Envelope {
        let topic = Topic::parse("docs/a").expect("topic");
        Envelope::new(MessageId(n), topic, 0, Flags::default(), Bytes::from_static(b"x"))
    }

    fn seqs(entries: &[Entry]) -> Vec<(String, u64)> {
        entries.iter().map(|e| (e.origin.to_string(), e.seq)).collect()
    }

    #[test]
    fn each_message_is_taken_once_and_catch_up_never_skips() {
        let mut log = MeshLog::new(5, usize::MAX);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert!(log.take(&a, 1, &envelope(1)));
        assert!(!log.take(&a, 1, &envelope(1)), "a repeat");
        assert!(log.take(&a, 2, &envelope(2)));
        assert!(log.take(&b, 5, &envelope(3)));
        assert!(log.take(&a, 3, &envelope(4)));
        let pair = |o: &str, s: u64| (o.to_string(), s);
        // A peer at a=1 gets a's 2 and 3 (continuing), and b's run (it has no cursor for b).
        let theirs = HashMap::from([("a".to_string(), 1)]);
        assert_eq!(
            seqs(&log.missed_by("c", "me", &theirs)),
            [pair("a", 2), pair("b", 5), pair("a", 3)]
        );
        // The peer's own messages never go back to it.
        assert!(log.missed_by("a", "me", &HashMap::new()).iter().all(|e| &*e.origin != "a"));
        // A hole in a's run (6 missing) stops it there; a itself sends past holes.
        assert!(log.take(&a, 7, &envelope(5)));
        assert!(log.take(&b, 6, &envelope(6)));
        assert_eq!(log.evicted, 1, "bounded by count: a's 1 is gone");
        assert_eq!(
            seqs(&log.missed_by("c", "me", &theirs)),
            [pair("a", 2), pair("b", 5), pair("a", 3), pair("b", 6)]
        );
        assert_eq!(
            seqs(&log.missed_by("c", "a", &theirs)),
            [pair("a", 2), pair("b", 5), pair("a", 3), pair("a", 7), pair("b", 6)]
        );
        // A peer at a=0 would need a's evicted 1: a's run is left to a itself.
        let theirs = HashMap::from([("a".to_string(), 0)]);
        assert_eq!(seqs(&log.missed_by("c", "me", &theirs)), [pair("b", 5), pair("b", 6)]);
        let text = log.take_dirty().expect("changed");
        let mut again = MeshLog::new(3, usize::MAX);
        again.restore(&text);
        assert_eq!(again.cursor("a"), 7);
        assert_eq!(again.cursor("b"), 6);
        assert!(log.take_dirty().is_none());
    }
}
