//! The encoder behind [`Frame::encode`](super::Frame::encode): frames are appended to a
//! buffer with their length prefix filled in last, and a frame over the peer's limit (or with a
//! field too long for its length prefix) is removed again, so nothing partial is ever sent.

use bytes::{BufMut, BytesMut};

use super::{Body, EncodeError, Frame, MAX_HEADERS};
use crate::{Envelope, Flags, Headers, MessageId, Qos};

impl Frame {
    /// Appends the encoded frame to `dst`, refusing frames over `max_frame_bytes` (the peer's
    /// limit, as its `Welcome` said). On error nothing is appended.
    ///
    /// # Errors
    /// See [`EncodeError`].
    pub fn encode(&self, dst: &mut BytesMut, max_frame_bytes: usize) -> Result<(), EncodeError> {
        let start = begin_frame(dst, self.body.type_byte(), self.correlation);
        let written = self.encode_body(dst);
        finish_frame(dst, start, written, max_frame_bytes)
    }

    /// Appends a `Deliver` frame for `envelope` without cloning it (the server's hot path).
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_deliver(
        dst: &mut BytesMut,
        sub: u32,
        attempt: u32,
        offset: u64,
        envelope: &Envelope,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        Self::encode_deliver_head(dst, sub, attempt, offset, envelope, max_frame_bytes)?;
        dst.put_slice(&envelope.payload);
        Ok(())
    }

    /// As [`Frame::encode_deliver`] without the payload's bytes, which the caller sends right
    /// after what this appended (a large payload then goes out by a vectored write instead of
    /// being copied). The frame's length and the payload's length prefix count them.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_deliver_head(
        dst: &mut BytesMut,
        sub: u32,
        attempt: u32,
        offset: u64,
        envelope: &Envelope,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        if envelope.headers.is_empty() {
            let mut own = [0; 16];
            own[..4].copy_from_slice(&sub.to_be_bytes());
            own[4..8].copy_from_slice(&attempt.to_be_bytes());
            own[8..].copy_from_slice(&offset.to_be_bytes());
            let head = PlainHead::of(envelope);
            return put_plain_frame_head(dst, 0x30, 0, own, &head, max_frame_bytes);
        }
        let start = begin_frame(dst, 0x30, 0);
        dst.put_u32(sub);
        dst.put_u32(attempt);
        dst.put_u64(offset);
        let written = put_envelope_head(dst, envelope);
        let tail = envelope.payload.len();
        finish_frame_with_tail(dst, start, written, tail, max_frame_bytes)
    }

    /// As [`Frame::encode`] for a `Publish` of `envelope`, without the payload's bytes, which
    /// the caller sends right after what this appended (the SDK sends a large payload by a
    /// vectored write instead of copying it). The frame's length and the payload's length
    /// prefix count them.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_publish_head(
        dst: &mut BytesMut,
        correlation: u32,
        qos: Qos,
        envelope: &Envelope,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        if envelope.headers.is_empty() {
            let head = PlainHead::of(envelope);
            let qos = [qos.to_byte()];
            return put_plain_frame_head(dst, 0x20, correlation, qos, &head, max_frame_bytes);
        }
        let start = begin_frame(dst, 0x20, correlation);
        dst.put_u8(qos.to_byte());
        let written = put_envelope_head(dst, envelope);
        finish_frame_with_tail(dst, start, written, envelope.payload.len(), max_frame_bytes)
    }

    /// As [`Frame::encode_publish_head`] for a message without headers given by its parts,
    /// where a publisher has built no [`Envelope`] (the SDK's plain QoS 0 publish).
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_plain_publish_head(
        dst: &mut BytesMut,
        correlation: u32,
        head: &PlainHead<'_>,
        max_frame_bytes: usize,
    ) -> Result<(), EncodeError> {
        let qos = [Qos::AtMostOnce.to_byte()];
        put_plain_frame_head(dst, 0x20, correlation, qos, head, max_frame_bytes)
    }

    fn encode_body(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match &self.body {
            Body::Hello { version, capabilities, name } => {
                dst.put_u16(*version);
                dst.put_u32(*capabilities);
                put_str(dst, name)?;
            }
            Body::Welcome {
                version,
                capabilities,
                max_frame_bytes,
                max_message_bytes,
                heartbeat_ms,
                name,
            } => {
                dst.put_u16(*version);
                dst.put_u32(*capabilities);
                dst.put_u32(*max_frame_bytes);
                dst.put_u32(*max_message_bytes);
                dst.put_u32(*heartbeat_ms);
                put_str(dst, name)?;
            }
            Body::Auth { key } => put_bytes32(dst, key),
            Body::Ok | Body::PubAck | Body::Ping | Body::Pong => {}
            Body::Subscribe { sub, qos, filter, prefetch, group, start } => {
                dst.put_u32(*sub);
                dst.put_u8(qos.to_byte());
                put_str(dst, filter.as_str())?;
                dst.put_u32(*prefetch);
                put_str(dst, group.as_deref().unwrap_or(""))?;
                let (kind, value) = start.to_wire();
                dst.put_u8(kind);
                dst.put_u64(value);
            }
            Body::Unsubscribe { sub } => dst.put_u32(*sub),
            Body::Publish { qos, envelope } => {
                dst.put_u8(qos.to_byte());
                put_envelope(dst, envelope)?;
            }
            Body::Deliver { sub, attempt, offset, envelope } => {
                dst.put_u32(*sub);
                dst.put_u32(*attempt);
                dst.put_u64(*offset);
                put_envelope(dst, envelope)?;
            }
            Body::Ack { sub, id } => {
                dst.put_u32(*sub);
                dst.put_u128(id.0);
            }
            Body::Nack { sub, id, requeue } => {
                dst.put_u32(*sub);
                dst.put_u128(id.0);
                dst.put_u8(u8::from(*requeue));
            }
            Body::Error { code, message } => {
                dst.put_u16(code.0);
                put_str(dst, message)?;
            }
        }
        Ok(())
    }
}

/// Appends a frame's header with its length left at 0 (see `finish_frame`); returns where the
/// frame starts.
fn begin_frame(dst: &mut BytesMut, frame_type: u8, correlation: u32) -> usize {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(frame_type);
    dst.put_u32(correlation);
    start
}

/// Writes the length prefix of the frame starting at `start`, or removes the frame on error.
fn finish_frame(
    dst: &mut BytesMut,
    start: usize,
    written: Result<(), EncodeError>,
    max_frame_bytes: usize,
) -> Result<(), EncodeError> {
    finish_frame_with_tail(dst, start, written, 0, max_frame_bytes)
}

/// A frame's length prefix for `len` bytes after it, if the frame is within `max_frame_bytes`.
#[inline(always)]
pub(super) fn frame_len(len: usize, max_frame_bytes: usize) -> Result<u32, EncodeError> {
    u32::try_from(len)
        .ok()
        .filter(|_| len <= max_frame_bytes)
        .ok_or(EncodeError::FrameTooLarge { len, max: max_frame_bytes })
}

/// As [`finish_frame`] for a frame whose last `tail` bytes are sent separately.
fn finish_frame_with_tail(
    dst: &mut BytesMut,
    start: usize,
    written: Result<(), EncodeError>,
    tail: usize,
    max_frame_bytes: usize,
) -> Result<(), EncodeError> {
    let len = dst.len() - start - 4 + tail;
    let checked = written.and_then(|()| frame_len(len, max_frame_bytes));
    match checked {
        Ok(len) => {
            dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(err) => {
            dst.truncate(start);
            Err(err)
        }
    }
}

/// Appends the head of a frame that carries an envelope without headers, up to its payload:
/// the length prefix, type and correlation, the frame's `own` fields (a PUBLISH's QoS, a
/// DELIVER's subscription, attempt and offset; at most 16 bytes), the envelope's fixed fields,
/// its topic, the header count (none) and the payload's length. Written in three pieces rather
/// than field by field: the head of every message a publisher sends or a subscriber gets costs
/// a check of the buffer's room and a copy for each piece, not for each field. On error nothing
/// is appended.
#[inline(always)]
fn put_plain_frame_head<const OWN: usize>(
    dst: &mut BytesMut,
    frame_type: u8,
    correlation: u32,
    own: [u8; OWN],
    head: &PlainHead<'_>,
    max_frame_bytes: usize,
) -> Result<(), EncodeError> {
    /// Length prefix, type, correlation.
    const FRAME: usize = 4 + 1 + 4;
    /// Id, time stamp, flags and the topic's length.
    const ENVELOPE: usize = 16 + 8 + 2 + 2;
    /// The header count and the payload's length, after the topic.
    const TAIL: usize = 2 + 4;
    const { assert!(OWN <= 16, "a frame's own fields before the envelope: at most 16 bytes") };
    let topic = head.topic.as_bytes();
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| EncodeError::TextTooLong { len: topic.len() })?;
    // A constant for each caller, so the pieces of constant length are copied in place.
    let fixed_len = FRAME + OWN + ENVELOPE;
    let len = fixed_len - 4 + topic.len() + TAIL + head.payload_len;
    let frame_len = frame_len(len, max_frame_bytes)?;
    let mut fixed = [0; FRAME + 16 + ENVELOPE];
    fixed[..4].copy_from_slice(&frame_len.to_be_bytes());
    fixed[4] = frame_type;
    fixed[5..FRAME].copy_from_slice(&correlation.to_be_bytes());
    let (own_fields, envelope) = fixed[FRAME..].split_at_mut(OWN);
    own_fields.copy_from_slice(&own);
    envelope[..16].copy_from_slice(&head.id.0.to_be_bytes());
    envelope[16..24].copy_from_slice(&head.timestamp_ms.to_be_bytes());
    envelope[24..26].copy_from_slice(&head.flags.0.to_be_bytes());
    envelope[26..ENVELOPE].copy_from_slice(&topic_len.to_be_bytes());
    let mut tail = [0; TAIL];
    // Within the frame's length, which fits a u32.
    tail[2..].copy_from_slice(&(head.payload_len as u32).to_be_bytes());
    dst.reserve(fixed_len + topic.len() + TAIL);
    dst.extend_from_slice(&fixed[..fixed_len]);
    dst.extend_from_slice(topic);
    dst.extend_from_slice(&tail);
    Ok(())
}

fn put_str(dst: &mut BytesMut, text: &str) -> Result<(), EncodeError> {
    let len =
        u16::try_from(text.len()).map_err(|_| EncodeError::TextTooLong { len: text.len() })?;
    dst.put_u16(len);
    dst.put_slice(text.as_bytes());
    Ok(())
}

fn put_bytes32(dst: &mut BytesMut, bytes: &[u8]) {
    // Frames are limited far below 4 GiB, so a longer field fails the frame length check.
    dst.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    dst.put_slice(bytes);
}

fn put_envelope(dst: &mut BytesMut, envelope: &Envelope) -> Result<(), EncodeError> {
    put_envelope_head(dst, envelope)?;
    dst.put_slice(&envelope.payload);
    Ok(())
}

/// An envelope's fields before its headers, and its payload's length: what
/// [`Frame::encode_plain_publish_head`] encodes where no [`Envelope`] was built.
#[derive(Clone, Copy, Debug)]
pub struct PlainHead<'a> {
    /// The message's id.
    pub id: MessageId,
    /// Publish time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Content type and engine bits.
    pub flags: Flags,
    /// The topic, already checked to be one.
    pub topic: &'a str,
    /// The payload's length (its bytes follow the head).
    pub payload_len: usize,
}

impl<'a> PlainHead<'a> {
    /// `envelope`'s head (its headers left out).
    pub fn of(envelope: &'a Envelope) -> Self {
        Self {
            id: envelope.id,
            timestamp_ms: envelope.timestamp_ms,
            flags: envelope.flags,
            topic: envelope.topic.as_str(),
            payload_len: envelope.payload.len(),
        }
    }
}

/// The envelope up to its payload's length prefix.
fn put_envelope_head(dst: &mut BytesMut, envelope: &Envelope) -> Result<(), EncodeError> {
    put_head_parts(dst, &PlainHead::of(envelope), &envelope.headers)
}

/// An envelope up to its payload's length prefix, from its parts.
fn put_head_parts(
    dst: &mut BytesMut,
    head: &PlainHead<'_>,
    headers: &Headers,
) -> Result<(), EncodeError> {
    dst.put_u128(head.id.0);
    dst.put_u64(head.timestamp_ms);
    dst.put_u16(head.flags.0);
    put_str(dst, head.topic)?;
    let count = headers.len();
    let count16 = u16::try_from(count).ok().filter(|c| *c <= MAX_HEADERS);
    dst.put_u16(count16.ok_or(EncodeError::TooManyHeaders { count })?);
    for (name, value) in headers.iter() {
        put_str(dst, name)?;
        put_bytes32(dst, value);
    }
    // Frames are limited far below 4 GiB, so a longer payload fails the frame length check.
    dst.put_u32(u32::try_from(head.payload_len).unwrap_or(u32::MAX));
    Ok(())
}

impl Envelope {
    /// Appends the envelope in its wire layout (the layout inside `PUBLISH` and `DELIVER`), for
    /// carrying one envelope inside another's payload (dead letters) or storing it.
    ///
    /// # Errors
    /// A text field over 65 535 bytes or more than [`MAX_HEADERS`] headers.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let start = dst.len();
        put_envelope(dst, self).inspect_err(|_| dst.truncate(start))
    }
}
