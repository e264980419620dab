//! Dead letters: a message given up on is published to `$dlq/<topic>` with the reason.

use bytes::BytesMut;
use whispeer_proto::{ContentType, Envelope, Flags, Topic, header};

use super::Shared;
use crate::delivery::GivenUp;
use crate::message::{DEAD_LETTER_PREFIX, no_limits, now_ms};
use crate::queue::Counters;
use crate::stats::bump;

impl Shared {
    /// Publishes a message that was given up to `$dlq/<topic>`: the original envelope, whole
    /// (so it still opens), as the payload, and why in the headers.
    pub(crate) fn dead_letter(&self, letter: GivenUp, counters: &Counters) {
        bump(&counters.dead_lettered);
        bump(&self.counters.dead_lettered);
        let original = letter.message.envelope();
        tracing::warn!(topic = %original.topic, id = %original.id, attempts = letter.attempts, reason = letter.reason.as_str(), "message dead-lettered");
        let topic = format!("{DEAD_LETTER_PREFIX}{}", original.topic);
        let Ok(topic) = Topic::parse_with(&topic, &no_limits()) else { return };
        let mut payload = BytesMut::new();
        if let Err(err) = original.encode(&mut payload) {
            tracing::warn!(%err, "dead letter not published");
            return;
        }
        let id = self.next_message_id();
        let flags = Flags::with_content(ContentType::Raw);
        let mut envelope = Envelope::new(id, topic, now_ms(), flags, payload.freeze());
        envelope.headers.insert(header::DEAD_LETTER_REASON, letter.reason.as_str());
        envelope.headers.insert(header::DEAD_LETTER_ATTEMPTS, letter.attempts.to_string());
        let (scope, admit) = (super::Scope::All, super::known_valid);
        let _ = self.route(id, envelope, None, scope, admit, |envelope, _| envelope);
    }
}
