//! Compact deliveries and publishes. Deliveries: DELIVER_COMPACT (0x33), sent only to a
//! client that asked for them in its HELLO ([`CAP_COMPACT_DELIVER`]) and only for a delivery a
//! DELIVER would carry with attempt 1, offset 0 and no headers (a first delivery of a message
//! not kept in a topic's history). What a DELIVER spells out and such a delivery does not need
//! is left out: the attempt and offset (1 and 0), the header count (none), the payload's length
//! (the rest of the frame), and the subscription moves into the frame's correlation field,
//! unused by a DELIVER.
//! The topic is named by a number once the server has named it in full: the first 1,024
//! distinct topics a connection delivers are numbered in the order they first go out, the frame
//! that names one defining its number for the rest of the connection.
//!
//! ```text
//! length u32 | 0x33 | sub u32 (the correlation) | id u128 | timestamp_ms u64 | flags u16 |
//! topic u16 | [topic str, when topic is 0 or defines] | payload (the rest of the frame)
//! ```
//!
//! `topic`: 0, the topic follows and is not numbered; `0x8000 | n`, the topic follows and is
//! number `n` from now on (`n` one more than the last number defined, at most
//! [`MAX_TOPIC_ALIASES`]); `n` (1 to [`MAX_TOPIC_ALIASES`]), the topic numbered `n`.
//!
//! A 128-byte payload to an 18-byte topic: 205 bytes as a DELIVER, 165 as a DELIVER_COMPACT.
//! The numbers belong to the connection (not to a subscription), so the task that reads the
//! connection learns every definition as it reads it — also from a delivery it then drops —
//! and a subscription decoding a delivery later finds its number known ([`TopicAliases`]).
//!
//! **Compact publishes** go the other way: PUBLISH_COMPACT (0x22), which a server that sets
//! [`CAP_COMPACT_PUBLISH`] in its WELCOME reads, means a PUBLISH without headers.
//!
//! ```text
//! length u32 | 0x22 | correlation u32 | qos u8 | id u128 | timestamp_ms u64 | flags u16 |
//! topic u16 | [topic str, when topic is 0 or defines] | payload (the rest of the frame)
//! ```
//!
//! Its topic field reads as a delivery's, but the client chooses its numbers: any from 1 to
//! [`MAX_TOPIC_ALIASES`], in any order, a definition replacing the number's earlier one. The
//! server keeps them for the connection (in its [`TopicCache`](crate::TopicCache)); a
//! definition whose topic it refuses (`INVALID_TOPIC`) leaves the number naming that refusal,
//! so later frames naming it are refused the same way, and a number never defined or out of
//! range closes the connection as malformed. The Rust SDK numbers the topics of each batch it
//! writes afresh, so no number outlives the connection it was defined on. A 128-byte payload to
//! an 18-byte topic: 190 bytes as a PUBLISH, 166 as a PUBLISH_COMPACT naming a number (186
//! defining it).

use std::sync::Arc;

use bytes::BytesMut;

use super::writer::frame_len;
use super::{DecodeError, EncodeError, Frame, HEADER_LEN, PlainHead};
use crate::{Limits, Qos, Topic};

/// HELLO capability: the client reads DELIVER_COMPACT frames.
pub const CAP_COMPACT_DELIVER: u32 = 1;
/// WELCOME capability: the server sends DELIVER_COMPACT frames (the client asked).
pub const CAP_COMPACT_ACCEPTED: u32 = 1 << 1;
/// WELCOME capability: the server reads PUBLISH_COMPACT frames (see *Compact publishes*).
pub const CAP_COMPACT_PUBLISH: u32 = 1 << 2;
/// Most topics one connection numbers (each way).
pub const MAX_TOPIC_ALIASES: u16 = 1024;
/// The type byte of a DELIVER_COMPACT.
pub(super) const DELIVER_COMPACT: u8 = 0x33;
/// The type byte of a PUBLISH_COMPACT.
pub(super) const PUBLISH_COMPACT: u8 = 0x22;
/// The bit of a topic field that defines its number.
const DEFINES: u16 = 0x8000;
/// Id, time stamp, flags and the topic field, after the frame's head.
pub(super) const COMPACT_FIXED: usize = 16 + 8 + 2 + 2;

/// How a DELIVER_COMPACT names its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicRef {
    /// In full, not numbered.
    Given,
    /// In full, numbered from now on.
    Define(u16),
    /// By the number defined before.
    Alias(u16),
}

impl TopicRef {
    /// The topic field as it is sent.
    fn to_wire(self) -> u16 {
        match self {
            Self::Given => 0,
            Self::Define(n) => DEFINES | n,
            Self::Alias(n) => n,
        }
    }

    /// The topic field as it was read.
    pub(super) fn from_wire(field: u16) -> Self {
        match field {
            0 => Self::Given,
            n if n & DEFINES != 0 => Self::Define(n & !DEFINES),
            n => Self::Alias(n),
        }
    }
}

impl Frame {
    /// Appends the head of a PUBLISH_COMPACT of the message `head` describes, with `qos`
    /// (its payload not included: the caller appends it right after), naming its topic as
    /// `topic` says. On error nothing is appended. See *Compact publishes* below.
    ///
    /// # Errors
    /// As [`Frame::encode`]: a frame over `max_frame_bytes`, a topic over 65,535 bytes.
    #[inline(never)]
    pub fn encode_compact_publish_head(
        dst: &mut BytesMut,
        correlation: u32,
        qos: Qos,
        head: &PlainHead<'_>,
        topic: TopicRef,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        let lead = [qos.to_byte()];
        compact_head(dst, PUBLISH_COMPACT, correlation, lead, head, topic, max_frame_bytes)
    }

    /// Appends the head of a DELIVER_COMPACT of the message `head` describes (its payload
    /// not included: the caller appends it, or sends it by a vectored write right after) to
    /// subscription `sub`, naming its topic as `topic` says. On error nothing is appended.
    ///
    /// # Errors
    /// As [`Frame::encode`]: a frame over `max_frame_bytes`, a topic over 65,535 bytes.
    #[inline(always)]
    pub fn encode_compact_deliver_head(
        dst: &mut BytesMut,
        sub: u32,
        head: &PlainHead<'_>,
        topic: TopicRef,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        compact_head(dst, DELIVER_COMPACT, sub, [], head, topic, max_frame_bytes)
    }
}

/// The head of a compact frame of type `frame_type`: its length, type and correlation, the
/// bytes `lead` (a publish's QoS; none for a delivery), the message's id, time stamp and
/// flags, and its topic as `topic` names it. `LEAD` a constant for each caller, the fixed part
/// is copied in place, without a call.
#[inline(always)]
fn compact_head<const LEAD: usize>(
    dst: &mut BytesMut,
    frame_type: u8,
    correlation: u32,
    lead: [u8; LEAD],
    head: &PlainHead<'_>,
    topic: TopicRef,
    max_frame_bytes: usize,
) -> Result<(), EncodeError> {
    const { assert!(LEAD <= 1, "at most a QoS before the message's fields") };
    let at = HEADER_LEN + LEAD;
    let fixed_len = at + COMPACT_FIXED;
    let text = match topic {
        TopicRef::Alias(_) => &[][..],
        TopicRef::Given | TopicRef::Define(_) => head.topic.as_bytes(),
    };
    let text_len =
        u16::try_from(text.len()).map_err(|_| EncodeError::TextTooLong { len: text.len() })?;
    let named = if matches!(topic, TopicRef::Alias(_)) { 0 } else { 2 + text.len() };
    let len = fixed_len - 4 + named + head.payload_len;
    let frame_len = frame_len(len, max_frame_bytes)?;
    let mut fixed = [0; HEADER_LEN + 1 + COMPACT_FIXED];
    fixed[..4].copy_from_slice(&frame_len.to_be_bytes());
    fixed[4] = frame_type;
    fixed[5..9].copy_from_slice(&correlation.to_be_bytes());
    fixed[HEADER_LEN..at].copy_from_slice(&lead);
    fixed[at..at + 16].copy_from_slice(&head.id.0.to_be_bytes());
    fixed[at + 16..at + 24].copy_from_slice(&head.timestamp_ms.to_be_bytes());
    fixed[at + 24..at + 26].copy_from_slice(&head.flags.0.to_be_bytes());
    fixed[at + 26..at + 28].copy_from_slice(&topic.to_wire().to_be_bytes());
    dst.reserve(fixed_len + named);
    dst.extend_from_slice(&fixed[..fixed_len]);
    if named > 0 {
        dst.extend_from_slice(&text_len.to_be_bytes());
        dst.extend_from_slice(text);
    }
    Ok(())
}

/// The topics a connection's compact deliveries numbered so far, in order. The table only
/// grows; a clone is the table as it was (cheap: shared until the next definition), which is
/// what a run of deliveries cut off the stream carries to the subscription that decodes it.
#[derive(Clone, Debug, Default)]
pub struct TopicAliases(Arc<Vec<Topic>>);

impl TopicAliases {
    /// The topic numbered `alias`.
    #[inline]
    pub fn get(&self, alias: u16) -> Option<&Topic> {
        self.0.get(usize::from(alias).checked_sub(1)?)
    }

    /// How many topics are numbered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Learns the number the DELIVER_COMPACT `frame` (whole, its length prefix included and
    /// nothing after it) defines, if it defines one (see
    /// [`DeliverHead::defines`](super::DeliverHead::defines)).
    ///
    /// # Errors
    /// A definition out of order (not one more than the last number) or over
    /// [`MAX_TOPIC_ALIASES`], a topic that is not one, or a frame too short for its topic:
    /// the connection is beyond repair.
    pub fn learn(&mut self, frame: &[u8], limits: &Limits) -> Result<(), DecodeError> {
        const TOPIC_AT: usize = HEADER_LEN + COMPACT_FIXED;
        let truncated = DecodeError::Truncated { frame_type: DELIVER_COMPACT };
        let field = frame.get(TOPIC_AT - 2..TOPIC_AT).ok_or(truncated.clone())?;
        let TopicRef::Define(alias) = TopicRef::from_wire(u16::from_be_bytes([field[0], field[1]]))
        else {
            return Ok(());
        };
        let next = self.0.len() + 1;
        if usize::from(alias) != next || alias > MAX_TOPIC_ALIASES {
            return Err(DecodeError::TopicAlias { alias });
        }
        let len_field = frame.get(TOPIC_AT..TOPIC_AT + 2).ok_or(truncated.clone())?;
        let len = usize::from(u16::from_be_bytes([len_field[0], len_field[1]]));
        let text = frame.get(TOPIC_AT + 2..TOPIC_AT + 2 + len).ok_or(truncated)?;
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8)?;
        let topic = Topic::parse_with(text, limits)?;
        Arc::make_mut(&mut self.0).push(topic);
        Ok(())
    }
}
