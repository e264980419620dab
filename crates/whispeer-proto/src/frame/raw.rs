//! Frames cut off a stream before their bodies are decoded.
//!
//! A client's connection task reads every delivery of every subscription; what it needs of a
//! DELIVER is where it goes, its id and its size. [`Frame::split`] cuts a whole frame off the
//! buffer (the length checked against the limit, as [`Frame::decode`] does) and
//! [`RawFrame::deliver`] reads a DELIVER's fixed fields, leaving its envelope as bytes for the
//! subscription to decode in its own task ([`RawDeliver::decode`]): the decoding is spread
//! over the tasks that consume, and what moves between them is a few words instead of a
//! decoded envelope. Any other frame is decoded whole ([`RawFrame::decode`]).
//!
//! Deliveries can move in runs, too: [`Frame::peek_deliver`] reads the head of a whole DELIVER
//! where it lies in the buffer, without cutting it off, so a connection task can cut a run of
//! consecutive deliveries to one subscription off in one piece, and the subscription takes
//! them one by one from it ([`RawDeliver::take_from`]).
//!
//! A DELIVER_COMPACT (`compact.rs`) is read the same ways: its head says the same things, its
//! envelope is decoded by the subscription, which finds a numbered topic in the
//! [`TopicAliases`] its run carries.

use bytes::{Buf, Bytes, BytesMut};

use super::compact::{COMPACT_FIXED, DELIVER_COMPACT, PUBLISH_COMPACT, TopicRef};
use super::reader::Reader;
use super::{DecodeError, Frame, HEADER_LEN, READ_CHUNK, room_for};
use crate::{Envelope, Limits, MessageId, Qos, TopicAliases, TopicCache};

/// The type byte of a DELIVER.
const DELIVER: u8 = 0x30;
/// The type byte of a PUBLISH.
const PUBLISH: u8 = 0x20;
/// A DELIVER's fixed fields before its envelope: subscription, attempt, offset.
const DELIVER_HEAD: usize = 4 + 4 + 8;

/// A complete frame whose type and correlation id are read and whose body is not decoded yet.
#[derive(Clone, Debug)]
pub struct RawFrame {
    frame_type: u8,
    correlation: u32,
    body: Bytes,
}

/// A DELIVER (or DELIVER_COMPACT) whose envelope is not decoded yet: its subscription,
/// attempt, offset and message id, and the envelope's bytes (see the module's documentation).
#[derive(Clone, Debug)]
pub struct RawDeliver {
    /// The subscription.
    pub sub: u32,
    /// 1 for a first delivery; more for a redelivery.
    pub attempt: u32,
    /// The message's offset in its topic's retained history; 0 when the topic keeps none.
    pub offset: u64,
    /// The message's id, the envelope's first field.
    pub id: MessageId,
    envelope: Bytes,
    /// A DELIVER_COMPACT's envelope, laid out as `compact.rs` says.
    compact: bool,
}

/// The head of a whole DELIVER (or DELIVER_COMPACT) at the front of a buffer, read where it
/// lies ([`Frame::peek_deliver`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliverHead {
    /// The subscription.
    pub sub: u32,
    /// The message's offset in its topic's retained history; 0 when the topic keeps none.
    pub offset: u64,
    /// The message's id, the envelope's first field.
    pub id: MessageId,
    /// The whole frame's length, its length prefix included.
    pub frame_len: usize,
    /// A DELIVER_COMPACT (attempt 1, offset 0, no headers).
    pub compact: bool,
    /// A DELIVER_COMPACT that numbers its topic: whoever reads the connection learns the
    /// number ([`TopicAliases::learn`]) before any later delivery is decoded.
    pub defines: bool,
}

impl DeliverHead {
    /// The envelope's length, as [`RawDeliver::envelope_len`] gives it.
    #[inline]
    pub fn envelope_len(&self) -> usize {
        let own = if self.compact { 0 } else { DELIVER_HEAD };
        self.frame_len - HEADER_LEN - own
    }
}

impl Frame {
    /// The head of the DELIVER (or DELIVER_COMPACT) at the front of `buf`, if a whole one is
    /// there that [`Frame::split`] and [`RawFrame::deliver`] would take: within the frame limit
    /// and long enough for its fixed fields and an id. `None` otherwise (another frame, a frame not
    /// whole yet, or one that is not valid): `Frame::split` then says what to do with it.
    #[inline]
    pub fn peek_deliver(buf: &[u8], limits: &Limits) -> Option<DeliverHead> {
        peek_deliver(buf, limits.max_frame_bytes)
    }

    /// Cuts the next whole frame off the front of `buf` without decoding its body; `Ok(None)`
    /// means "need more bytes" (and, for a frame over `READ_CHUNK / 8` bytes, room for the
    /// rest of it has been reserved).
    ///
    /// # Errors
    /// A length prefix over the limit or too short for a frame's head; the connection should
    /// be closed.
    #[inline]
    pub fn split(buf: &mut BytesMut, limits: &Limits) -> Result<Option<RawFrame>, DecodeError> {
        let Some(prefix) = buf.first_chunk::<4>() else { return Ok(None) };
        let len = u32::from_be_bytes(*prefix);
        let body_len = len as usize;
        if body_len > limits.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge { len, max: limits.max_frame_bytes });
        }
        if body_len < HEADER_LEN - 4 {
            return Err(DecodeError::Truncated { frame_type: buf.get(4).copied().unwrap_or(0) });
        }
        if buf.len() < 4 + body_len {
            // A small frame fits in the room a reader makes before each read
            // (`reserve_for_read`, `ReadPool`), which may read into an earlier allocation.
            if 4 + body_len > READ_CHUNK / 8 {
                buf.reserve(room_for(4 + body_len, buf.len()));
            }
            return Ok(None);
        }
        let mut body = buf.split_to(4 + body_len).freeze();
        body.advance(4);
        let frame_type = body.get_u8();
        let correlation = body.get_u32();
        Ok(Some(RawFrame { frame_type, correlation, body }))
    }
}

impl RawFrame {
    /// The frame as a DELIVER (or a DELIVER_COMPACT) with its envelope left undecoded; the
    /// frame itself when it is another type, or a DELIVER too short to hold its fixed fields
    /// and an id (decoding it then says what is wrong).
    ///
    /// # Errors
    /// The frame, unchanged, when it is not such a DELIVER.
    #[inline]
    pub fn deliver(self) -> Result<RawDeliver, Self> {
        let (compact, least) = match self.frame_type {
            DELIVER => (false, DELIVER_HEAD + 16),
            DELIVER_COMPACT => (true, COMPACT_FIXED),
            _ => return Err(self),
        };
        if self.body.len() < least {
            return Err(self);
        }
        let mut body = self.body;
        let (sub, attempt, offset) = match compact {
            true => (self.correlation, 1, 0),
            false => (body.get_u32(), body.get_u32(), body.get_u64()),
        };
        let id = MessageId(u128::from_be_bytes(*body.first_chunk::<16>().unwrap_or(&[0; 16])));
        Ok(RawDeliver { sub, attempt, offset, id, envelope: body, compact })
    }

    /// The frame's correlation id.
    #[inline]
    pub fn correlation(&self) -> u32 {
        self.correlation
    }

    /// The frame's type byte.
    #[inline]
    pub fn frame_type(&self) -> u8 {
        self.frame_type
    }

    /// The frame as a PUBLISH (or a PUBLISH_COMPACT, whose numbered topics `topics` keeps for
    /// the stream): its QoS and envelope, decoded as [`RawFrame::decode`] would decode them
    /// but without wrapping them in a [`Frame`], which a server moves for each of the frames
    /// it reads most. `Ok(Err(frame))`, the frame given back, when it is another type.
    ///
    /// # Errors
    /// As [`RawFrame::decode`], for a PUBLISH that does not decode; for a PUBLISH_COMPACT,
    /// also a number over [`MAX_TOPIC_ALIASES`](crate::MAX_TOPIC_ALIASES) or not defined
    /// ([`DecodeError::TopicAlias`], the stream is beyond repair), and a number whose
    /// definition gave an invalid topic (answerable, as an invalid topic given in full).
    #[inline]
    pub fn publish(
        self,
        limits: &Limits,
        topics: &mut TopicCache,
    ) -> Result<Result<(Qos, Envelope), Self>, DecodeError> {
        let compact = match self.frame_type {
            PUBLISH => false,
            PUBLISH_COMPACT => true,
            _ => return Ok(Err(self)),
        };
        let Self { frame_type, correlation, body } = self;
        let mut reader = Reader { buf: body, frame_type, topics };
        let decoded = match compact {
            true => reader.compact_publish(limits),
            false => reader.publish(limits),
        };
        let decoded = decoded.map_err(answerable(correlation))?;
        reader.finish()?;
        Ok(Ok(decoded))
    }

    /// Decodes the body, sharing a repeated topic through `topics` as
    /// [`Frame::decode_cached`] does.
    ///
    /// # Errors
    /// As [`Frame::decode`].
    pub fn decode(self, limits: &Limits, topics: &mut TopicCache) -> Result<Frame, DecodeError> {
        let Self { frame_type, correlation, body } = self;
        let mut reader = Reader { buf: body, frame_type, topics };
        let body = reader.body(limits).map_err(answerable(correlation))?;
        reader.finish()?;
        Ok(Frame { correlation, body })
    }
}

/// An invalid topic in a whole frame, as an error that names the request (so a server can
/// refuse that one and go on); other errors as they are.
#[inline]
fn answerable(correlation: u32) -> impl Fn(DecodeError) -> DecodeError {
    move |err| match err {
        DecodeError::InvalidTopic(error) => DecodeError::RequestTopic { correlation, error },
        other => other,
    }
}

impl RawDeliver {
    /// The envelope's length as it came (payload, topic, headers and fixed fields), known
    /// without reading it: what a client's buffer weighs a delivery by, before decoding it.
    #[inline]
    pub fn envelope_len(&self) -> usize {
        self.envelope.len()
    }

    /// Cuts the DELIVER at the front of `frames` (whole frames, length prefixes included, as
    /// [`Frame::peek_deliver`] found them: their frame limit is not applied again, so what it
    /// took is taken) off it. `None`, taking nothing, when `frames` is empty or does not start
    /// with a whole DELIVER long enough for its fixed fields and an id.
    #[inline]
    pub fn take_from(frames: &mut Bytes) -> Option<Self> {
        let head = peek_deliver(frames, usize::MAX)?;
        let mut body = frames.split_to(head.frame_len);
        body.advance(HEADER_LEN);
        let (sub, id, compact) = (head.sub, head.id, head.compact);
        if compact {
            return Some(Self { sub, attempt: 1, offset: 0, id, envelope: body, compact });
        }
        let (_, attempt, offset) = (body.get_u32(), body.get_u32(), body.get_u64());
        Some(Self { sub, attempt, offset, id, envelope: body, compact })
    }

    /// Decodes the envelope, sharing a repeated topic through `topics` (and, for a
    /// DELIVER_COMPACT, finding a numbered topic in `aliases`: the table as it was when the
    /// delivery was read, or later); its payload is a slice of the bytes read, not a copy.
    ///
    /// # Errors
    /// As for a frame: truncation, trailing bytes, invalid topics, too many headers; a topic
    /// number not in `aliases`.
    #[inline]
    pub fn decode(
        self,
        limits: &Limits,
        topics: &mut TopicCache,
        aliases: &TopicAliases,
    ) -> Result<Envelope, DecodeError> {
        let frame_type = if self.compact { DELIVER_COMPACT } else { DELIVER };
        let mut reader = Reader { buf: self.envelope, frame_type, topics };
        if self.compact {
            reader.compact_envelope(limits, aliases)
        } else {
            reader.last_envelope(limits)
        }
    }
}

/// [`Frame::peek_deliver`] under a frame limit of `max_frame_bytes`: a DELIVER, or a
/// DELIVER_COMPACT long enough for its fixed fields.
#[inline]
fn peek_deliver(buf: &[u8], max_frame_bytes: usize) -> Option<DeliverHead> {
    let head = buf.first_chunk::<HEADER_LEN>()?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > max_frame_bytes || buf.len() < 4 + len {
        return None;
    }
    match head[4] {
        DELIVER => peek_plain(buf, len),
        DELIVER_COMPACT => peek_compact(buf, len),
        _ => None,
    }
}

/// The big-endian u64 at `at` in a head read whole (`at + 8` within it).
#[inline(always)]
fn u64_at(head: &[u8], at: usize) -> u64 {
    let bytes: [u8; 8] = head[at..at + 8].try_into().unwrap_or_default();
    u64::from_be_bytes(bytes)
}

/// The message id at `at` in a head read whole (`at + 16` within it).
#[inline(always)]
fn id_at(head: &[u8], at: usize) -> MessageId {
    MessageId(u128::from(u64_at(head, at)) << 64 | u128::from(u64_at(head, at + 8)))
}

/// The head of a whole DELIVER of `len` bytes (after its length prefix) at the front of `buf`.
#[inline(always)]
fn peek_plain(buf: &[u8], len: usize) -> Option<DeliverHead> {
    let head = buf.first_chunk::<{ HEADER_LEN + DELIVER_HEAD + 16 }>()?;
    if len < HEADER_LEN - 4 + DELIVER_HEAD + 16 {
        return None;
    }
    let sub = u32::from_be_bytes([head[9], head[10], head[11], head[12]]);
    let (id, offset, frame_len) = (id_at(head, 25), u64_at(head, 17), 4 + len);
    Some(DeliverHead { sub, offset, id, frame_len, compact: false, defines: false })
}

/// The head of a whole DELIVER_COMPACT of `len` bytes (after its length prefix) at the front
/// of `buf`.
#[inline(always)]
fn peek_compact(buf: &[u8], len: usize) -> Option<DeliverHead> {
    let head = buf.first_chunk::<{ HEADER_LEN + COMPACT_FIXED }>()?;
    if len < HEADER_LEN - 4 + COMPACT_FIXED {
        return None;
    }
    let sub = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    let id = id_at(head, 9);
    let topic = TopicRef::from_wire(u16::from_be_bytes([head[35], head[36]]));
    let defines = matches!(topic, TopicRef::Define(_));
    Some(DeliverHead { sub, offset: 0, id, frame_len: 4 + len, compact: true, defines })
}
