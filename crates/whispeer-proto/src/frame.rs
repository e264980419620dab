//! Wire frames: the sans-I/O encoder and incremental decoder of the binary protocol.
//!
//! ```text
//! +----------------+---------+--------------------+------------------------+
//! | length (u32)   | type u8 | correlation (u32)  | body (by type)         |
//! +----------------+---------+--------------------+------------------------+
//!   bytes after the length field; big-endian throughout
//! ```
//!
//! [`Frame::decode`] takes one frame off the front of a buffer, or says it needs more bytes. The
//! length prefix is checked against [`Limits::max_frame_bytes`] before anything is allocated,
//! every field is bounds-checked, and malformed input is a [`DecodeError`], never a panic.
//! Payloads are slices of the received buffer, not copies. `PROTOCOL.md` documents each body.

use bytes::{Bytes, BytesMut};

use crate::{Envelope, ErrorCode, Filter, Limits, MessageId, TopicError};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length, type and correlation id.
const HEADER_LEN: usize = 4 + 1 + 4;
/// The most headers an envelope may carry.
pub const MAX_HEADERS: u16 = 64;

/// Delivery guarantee asked for by a publish or a subscription.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Qos {
    /// At most once: no acknowledgement.
    #[default]
    AtMostOnce,
    /// At least once: acknowledged, redelivered until acknowledged.
    AtLeastOnce,
}

impl Qos {
    fn to_byte(self) -> u8 {
        match self {
            Self::AtMostOnce => 0,
            Self::AtLeastOnce => 1,
        }
    }
}

impl TryFrom<u8> for Qos {
    type Error = DecodeError;

    /// 0 or 1, as on the wire (and in the JSON form).
    fn try_from(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            other => Err(DecodeError::InvalidQos(other)),
        }
    }
}

/// Where a subscription starts in its topics' retained history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartAt {
    /// Only messages published from now on (no replay). The default.
    #[default]
    Latest,
    /// The oldest message each matching topic still retains.
    Earliest,
    /// This offset of the (single, exact) topic; an evicted offset is refused with the offset
    /// history now begins at.
    Offset(u64),
    /// The first retained messages the broker accepted at or after this time (milliseconds
    /// since the Unix epoch).
    Time(u64),
}

impl StartAt {
    fn to_wire(self) -> (u8, u64) {
        match self {
            Self::Latest => (0, 0),
            Self::Earliest => (1, 0),
            Self::Offset(offset) => (2, offset),
            Self::Time(ms) => (3, ms),
        }
    }

    pub(super) fn from_wire(kind: u8, value: u64) -> Result<Self, DecodeError> {
        match kind {
            0 => Ok(Self::Latest),
            1 => Ok(Self::Earliest),
            2 => Ok(Self::Offset(value)),
            3 => Ok(Self::Time(value)),
            other => Err(DecodeError::InvalidStart(other)),
        }
    }
}

/// One frame: a correlation id chosen by the sender of a request (echoed by its reply; 0 when
/// there is none) and a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Matches a reply to its request.
    pub correlation: u32,
    /// What the frame says.
    pub body: Body,
}

/// The frame bodies. Each starts with its type byte.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// `0x01` Client → server, first frame: protocol version, capabilities, client name.
    Hello {
        /// The client's protocol version.
        version: u16,
        /// Capability bits (none defined yet).
        capabilities: u32,
        /// A name for logs.
        name: String,
    },
    /// `0x02` Server → client, reply to `Hello`: the server's version and limits.
    Welcome {
        /// The server's protocol version.
        version: u16,
        /// Capability bits; bit 0: the server requires `Auth`.
        capabilities: u32,
        /// Largest frame the server accepts.
        max_frame_bytes: u32,
        /// Largest opened payload the server's subscribers accept.
        max_message_bytes: u32,
        /// The server pings an idle connection this often; it closes one silent for 3×.
        heartbeat_ms: u32,
        /// A name for logs.
        name: String,
    },
    /// `0x03` Client → server: an API key. Reply: `Ok` or `Error`.
    Auth {
        /// The key, as configured.
        key: Bytes,
    },
    /// `0x04` Success reply to `Auth`, `Subscribe` and `Unsubscribe`.
    Ok,
    /// `0x10` Client → server: deliver messages matching `filter` as subscription `sub`.
    Subscribe {
        /// Client-chosen id, unique on the connection.
        sub: u32,
        /// Requested guarantee.
        qos: Qos,
        /// What to match.
        filter: Filter,
        /// QoS 1: at most this many delivered, unacknowledged messages at a time (the credit
        /// window); 0 asks for the server's default.
        prefetch: u32,
        /// A queue group to join: members of one group share the filter's messages, each
        /// message going to one member. `None`: a subscription of its own.
        group: Option<String>,
        /// Where to start in the retained history.
        start: StartAt,
    },
    /// `0x11` Client → server: end subscription `sub`.
    Unsubscribe {
        /// The subscription.
        sub: u32,
    },
    /// `0x20` Client → server: publish an (already sealed) envelope. Reply: `PubAck` for QoS 1,
    /// nothing for QoS 0, `Error` on failure.
    Publish {
        /// Requested guarantee.
        qos: Qos,
        /// The message.
        envelope: Envelope,
    },
    /// `0x21` Server → client: the publish with this correlation id was accepted.
    PubAck,
    /// `0x30` Server → client: a message for subscription `sub`.
    Deliver {
        /// The subscription.
        sub: u32,
        /// 1 for a first delivery; more for a redelivery of an unacknowledged QoS 1 message.
        attempt: u32,
        /// The message's offset in its topic's retained history; 0 when the topic keeps none.
        offset: u64,
        /// The message, as published.
        envelope: Envelope,
    },
    /// `0x31` Client → server: message `id` of subscription `sub` was processed.
    Ack {
        /// The subscription.
        sub: u32,
        /// The message.
        id: MessageId,
    },
    /// `0x32` Client → server: message `id` of subscription `sub` was not processed.
    Nack {
        /// The subscription.
        sub: u32,
        /// The message.
        id: MessageId,
        /// Whether to deliver it again.
        requeue: bool,
    },
    /// `0x40` Either way: are you there? Reply: `Pong` with the same correlation id.
    Ping,
    /// `0x41` Reply to `Ping`.
    Pong,
    /// `0x7f` Either way: the request with this correlation id (0: the connection) failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Details for a person.
        message: String,
    },
}

impl Body {
    fn type_byte(&self) -> u8 {
        match self {
            Self::Hello { .. } => 0x01,
            Self::Welcome { .. } => 0x02,
            Self::Auth { .. } => 0x03,
            Self::Ok => 0x04,
            Self::Subscribe { .. } => 0x10,
            Self::Unsubscribe { .. } => 0x11,
            Self::Publish { .. } => 0x20,
            Self::PubAck => 0x21,
            Self::Deliver { .. } => 0x30,
            Self::Ack { .. } => 0x31,
            Self::Nack { .. } => 0x32,
            Self::Ping => 0x40,
            Self::Pong => 0x41,
            Self::Error { .. } => 0x7f,
        }
    }
}

/// Why bytes could not be decoded into a frame. The connection that sent them is beyond repair.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix exceeds the limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// The frame type byte is not one this version knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The frame ended before its body did.
    #[error("frame type {frame_type:#04x} ends early")]
    Truncated {
        /// The frame's type.
        frame_type: u8,
    },
    /// The frame has bytes after its body.
    #[error("frame type {frame_type:#04x} has {extra} bytes after its body")]
    TrailingBytes {
        /// The frame's type.
        frame_type: u8,
        /// How many.
        extra: usize,
    },
    /// A text field is not UTF-8.
    #[error("text field is not UTF-8")]
    InvalidUtf8,
    /// A topic or filter is invalid.
    #[error("invalid topic or filter: {0}")]
    InvalidTopic(#[from] TopicError),
    /// A complete frame names an invalid topic or filter (too long, too deep, or malformed).
    /// The frame was consumed whole, so a server can refuse this one request and go on.
    #[error("invalid topic or filter: {error}")]
    RequestTopic {
        /// The request's correlation id.
        correlation: u32,
        /// What is wrong with the topic or filter.
        error: TopicError,
    },
    /// The QoS byte is not 0 or 1.
    #[error("invalid QoS {0}")]
    InvalidQos(u8),
    /// The start kind is not one this version knows.
    #[error("invalid start position kind {0}")]
    InvalidStart(u8),
    /// An envelope has more headers than allowed.
    #[error("{count} headers exceed the limit of {max}")]
    TooManyHeaders {
        /// Announced count.
        count: u16,
        /// The limit.
        max: u16,
    },
    /// A compact delivery or publish names a topic number not defined, or defines one out of
    /// order (a delivery) or out of range.
    #[error("topic number {alias} is not defined, or defined out of order or range")]
    TopicAlias {
        /// The number.
        alias: u16,
    },
}

impl DecodeError {
    /// The error code to send back for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::TOO_LARGE,
            Self::InvalidTopic(_) | Self::RequestTopic { .. } => ErrorCode::INVALID_TOPIC,
            _ => ErrorCode::MALFORMED,
        }
    }

    /// For an error confined to one complete request, that request's correlation id: the
    /// stream is still in step, and the connection can answer it and go on.
    pub fn correlation(&self) -> Option<u32> {
        match self {
            Self::RequestTopic { correlation, .. } => Some(*correlation),
            _ => None,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A text field longer than 65 535 bytes.
    #[error("text field of {len} bytes exceeds 65535")]
    TextTooLong {
        /// Its length.
        len: usize,
    },
    /// The frame would exceed the limit it is encoded for.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More headers than [`MAX_HEADERS`].
    #[error("{count} headers exceed the limit of {max}", max = MAX_HEADERS)]
    TooManyHeaders {
        /// Their count.
        count: usize,
    },
}

impl Frame {
    /// A frame with the given correlation id.
    pub fn new(correlation: u32, body: Body) -> Self {
        Self { correlation, body }
    }

    /// Takes one frame off the front of `buf`; `Ok(None)` means "need more bytes" (and, for a
    /// frame over `READ_CHUNK / 8` bytes, room for the rest of it has been reserved; a smaller
    /// one fits in the room [`reserve_for_read`] or a [`ReadPool`] makes before a read).
    ///
    /// # Errors
    /// [`DecodeError`] for malformed input; the buffer is then in an unspecified state and the
    /// connection should be closed.
    pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Self>, DecodeError> {
        Self::decode_cached(buf, limits, &mut TopicCache::default())
    }

    /// As [`Frame::decode`], sharing the topic of an envelope with the one decoded before it
    /// through the same `topics` when their text is the same (a connection's publisher or
    /// subscription sees one topic over and over): no parse, no allocation. One cache belongs
    /// to one stream decoded under one set of limits.
    ///
    /// # Errors
    /// As [`Frame::decode`].
    pub fn decode_cached(
        buf: &mut BytesMut,
        limits: &Limits,
        topics: &mut TopicCache,
    ) -> Result<Option<Self>, DecodeError> {
        match Self::split(buf, limits)? {
            Some(raw) => raw.decode(limits, topics).map(Some),
            None => Ok(None),
        }
    }
}

/// Spare room a read buffer should have before each read: frames are split off the buffer
/// without copying, so a buffer left to grow by the reader's default (64 bytes at a time) would
/// be reallocated and copied on almost every read.
pub const READ_CHUNK: usize = 64 * 1024;

/// The most a read buffer reserves past a large frame it is completing: see [`room_for`].
const LARGE_AHEAD: usize = 1 << 20;

/// Room to reserve when `have` bytes of a `frame_len`-byte frame are buffered: the rest of it,
/// and, for a frame larger than half a read, room for three more like it (up to
/// `LARGE_AHEAD`). The frames that follow a large one are then read into the same allocation,
/// and the part of a frame read before its buffer runs out is copied to a new one once every
/// few frames instead of for nearly every one (with room for the rest alone, the next read
/// ends inside the next frame, and completing that one copies what came).
fn room_for(frame_len: usize, have: usize) -> usize {
    let rest = frame_len.saturating_sub(have);
    if frame_len <= READ_CHUNK / 2 { rest } else { rest + (3 * frame_len).min(LARGE_AHEAD) }
}

/// Makes sure `buf` has room for a large read, reallocating at most once per `READ_CHUNK`.
/// A connection that reads on and on uses a [`ReadPool`] instead, which reads into earlier
/// allocations again.
pub fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 8 {
        buf.reserve(READ_CHUNK);
    }
}

impl Envelope {
    /// Reads an envelope written by [`Envelope::encode`]; all of `bytes` must be used.
    ///
    /// # Errors
    /// As for a frame: truncation, trailing bytes, invalid topics, too many headers.
    pub fn decode(bytes: Bytes, limits: &Limits) -> Result<Self, DecodeError> {
        let mut reader = Reader { buf: bytes, frame_type: 0, topics: &mut TopicCache::default() };
        let envelope = reader.envelope(limits)?;
        reader.finish()?;
        Ok(envelope)
    }
}

mod compact;
mod pool;
mod raw;
mod reader;
mod writer;

pub use compact::{
    CAP_COMPACT_ACCEPTED, CAP_COMPACT_DELIVER, CAP_COMPACT_PUBLISH, MAX_TOPIC_ALIASES,
    TopicAliases, TopicRef,
};
pub use pool::ReadPool;
pub use raw::{DeliverHead, RawDeliver, RawFrame};
use reader::Reader;
pub use reader::TopicCache;
pub use writer::PlainHead;

#[cfg(test)]
mod compact_publish_tests;
#[cfg(test)]
mod compact_tests;
#[cfg(test)]
mod encode_tests;
#[cfg(test)]
mod tests;
