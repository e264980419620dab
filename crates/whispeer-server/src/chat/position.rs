//! Where a connection is in its user's inbox. Every inbox message goes out with its position
//! (`"at"`). The device's cursor follows what was written — or, on a connection opened with
//! `?ack=1`, what the client acknowledged (`{"type":"ack","at":N}`), so that a message written
//! in the instant a connection dies comes again on the device's next connection.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::hub::Cursor;

/// Messages a client that acks may hold unacknowledged; past it its inbox is not read until
/// acknowledgements come (what waits is read from the position again).
pub(crate) const MAX_UNACKED: usize = 4096;

/// One connection's place in its user's inbox.
#[derive(Debug, Default)]
pub(crate) struct InboxPosition {
    acking: bool,
    /// Positions written and not acknowledged yet (a client that acks), oldest first.
    unacked: VecDeque<u64>,
    /// The last position this connection handled: written, or skipped (the copy of a message
    /// this connection sent).
    handled: Option<u64>,
}

impl InboxPosition {
    /// A connection's position; `acking`: the client acknowledges what it received.
    pub(crate) fn new(acking: bool) -> Self {
        Self { acking, ..Self::default() }
    }

    /// Whether more of the inbox may be written now.
    pub(crate) fn has_room(&self) -> bool {
        self.unacked.len() < MAX_UNACKED
    }

    /// A batch went out: the positions `written`, and `last`, the last one handled. Without
    /// acknowledgements the cursor moves to `last` now.
    pub(crate) fn written(&mut self, written: Vec<u64>, last: Option<u64>, cursor: &Cursor) {
        let Some(last) = last else { return };
        self.handled = Some(self.handled.map_or(last, |handled| handled.max(last)));
        if !self.acking {
            cursor.advance(last);
            return;
        }
        self.unacked.extend(written);
        if self.unacked.is_empty() {
            cursor.advance(last);
        }
    }

    /// The client has everything through `at`: the cursor moves up to the first message still
    /// unacknowledged (what lies before it was acknowledged or skipped), never past what this
    /// connection handled.
    pub(crate) fn acked(&mut self, at: u64, cursor: &Cursor) {
        while self.unacked.front().is_some_and(|&position| position <= at) {
            self.unacked.pop_front();
        }
        let Some(handled) = self.handled else { return };
        match self.unacked.front() {
            // Everything written is acknowledged: the skipped copies after it are passed too.
            None => cursor.advance(handled),
            Some(&waiting) => cursor.advance(waiting.saturating_sub(1).min(handled)),
        }
    }

    /// The position after which to read the inbox (again): what this connection handled, or
    /// the device's cursor.
    pub(crate) fn resume_after(&self, cursor: &Cursor) -> u64 {
        cursor.offset.load(Ordering::Acquire).max(self.handled.unwrap_or(0))
    }
}

/// `payload` (a JSON object the server wrote) with `"at":at` as its last field.
pub(crate) fn with_position(payload: &Bytes, at: u64) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?;
    let body = text.trim_end().strip_suffix('}')?;
    let separator = if body.trim_end().ends_with('{') { "" } else { "," };
    Some(format!("{body}{separator}\"at\":{at}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cursor: &Cursor) -> u64 {
        cursor.offset.load(Ordering::Acquire)
    }

    #[test]
    fn without_acks_the_cursor_follows_what_was_written() {
        let (cursor, mut position) = (Cursor::default(), InboxPosition::new(false));
        position.written(vec![1, 2], Some(3), &cursor);
        assert_eq!(at(&cursor), 3);
        assert_eq!(position.resume_after(&cursor), 3);
    }

    #[test]
    fn with_acks_the_cursor_follows_what_was_acknowledged() {
        let (cursor, mut position) = (Cursor::default(), InboxPosition::new(true));
        // 1 and 2 written, 3 skipped (this connection's own copy), then 4 written.
        position.written(vec![1, 2], Some(3), &cursor);
        position.written(vec![4], Some(4), &cursor);
        assert_eq!(at(&cursor), 0, "nothing acknowledged");
        assert_eq!(position.resume_after(&cursor), 4, "read on after what was written");
        position.acked(1, &cursor);
        assert_eq!(at(&cursor), 1);
        position.acked(2, &cursor);
        assert_eq!(at(&cursor), 3, "the skipped copy is passed, not the unacknowledged 4");
        position.acked(99, &cursor);
        assert_eq!(at(&cursor), 4, "never past what was handled");
        // A batch of skipped copies alone, with nothing waiting: passed at once.
        position.written(Vec::new(), Some(6), &cursor);
        assert_eq!(at(&cursor), 6);
    }

    #[test]
    fn a_client_that_does_not_ack_stops_its_inbox_at_the_bound() {
        let (cursor, mut position) = (Cursor::default(), InboxPosition::new(true));
        let written: Vec<u64> = (1..=MAX_UNACKED as u64).collect();
        position.written(written, Some(MAX_UNACKED as u64), &cursor);
        assert!(!position.has_room());
        position.acked(10, &cursor);
        assert!(position.has_room());
    }

    #[test]
    fn the_position_is_added_to_the_json_object() {
        let text = |payload: &str| with_position(&Bytes::from(payload.to_string()), 7);
        assert_eq!(
            text(r#"{"from":"a","msg":{"x":1}}"#).unwrap(),
            r#"{"from":"a","msg":{"x":1},"at":7}"#
        );
        assert_eq!(text("{}").unwrap(), r#"{"at":7}"#);
        assert_eq!(text("not json"), None);
    }
}
