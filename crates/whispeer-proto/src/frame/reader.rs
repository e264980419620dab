//! The bounds-checked reader behind [`Frame::decode`](super::Frame::decode) and
//! [`Envelope::decode`]: every read checks the bytes left first, so malformed input is a
//! [`DecodeError`], never a panic.

use bytes::{Buf, Bytes};

use super::compact::{MAX_TOPIC_ALIASES, TopicRef};
use super::{Body, DecodeError, MAX_HEADERS, Qos, StartAt};
use crate::{
    Envelope, ErrorCode, Filter, Flags, Headers, Limits, MessageId, Topic, TopicAliases, TopicError,
};

/// The topics a stream named: the last one it decoded (see
/// [`Frame::decode_cached`](super::Frame::decode_cached)), and those its PUBLISH_COMPACT frames
/// numbered (`compact.rs`), which a server reading publishes keeps for the connection.
#[derive(Clone, Debug, Default)]
pub struct TopicCache {
    last: Option<Topic>,
    /// By number less one: the topic a definition gave, or why it was refused (a later frame
    /// naming that number is refused the same way); `None` where nothing was defined.
    numbered: Vec<Option<Result<Topic, TopicError>>>,
}

impl TopicCache {
    /// Sets number `alias` (1 to [`MAX_TOPIC_ALIASES`]; any other is ignored) to `topic`, as
    /// a PUBLISH_COMPACT defining it would have: for a client reading back frames it encoded
    /// after numbers it defined on an earlier batch.
    pub fn define_numbered(&mut self, alias: u16, topic: Topic) {
        if (1..=MAX_TOPIC_ALIASES).contains(&alias) {
            self.define(alias, Ok(topic));
        }
    }

    /// Records what PUBLISH_COMPACT's definition of number `alias` (checked to be in range)
    /// gave.
    fn define(&mut self, alias: u16, topic: Result<Topic, TopicError>) {
        let at = usize::from(alias) - 1;
        if self.numbered.len() <= at {
            self.numbered.resize(at + 1, None);
        }
        self.numbered[at] = Some(topic);
    }

    /// The topic PUBLISH_COMPACT's number `alias` names.
    fn numbered(&self, alias: u16) -> Result<Topic, DecodeError> {
        let defined = usize::from(alias).checked_sub(1).and_then(|at| self.numbered.get(at));
        match defined {
            Some(Some(Ok(topic))) => Ok(topic.clone()),
            Some(Some(Err(refused))) => Err(DecodeError::InvalidTopic(refused.clone())),
            _ => Err(DecodeError::TopicAlias { alias }),
        }
    }
}

/// A bounds-checked cursor over one frame's body.
pub(super) struct Reader<'a> {
    pub(super) buf: Bytes,
    pub(super) frame_type: u8,
    pub(super) topics: &'a mut TopicCache,
}

impl Reader<'_> {
    #[inline]
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated { frame_type: self.frame_type });
        }
        Ok(())
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    #[inline]
    fn u128(&mut self) -> Result<u128, DecodeError> {
        self.need(16)?;
        Ok(self.buf.get_u128())
    }

    #[inline]
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        self.need(len)?;
        // The frame's last field (a payload) is the rest of the buffer: moved out whole, it
        // takes no reference on the bytes read (which another thread drops) and gives none back.
        if self.buf.len() == len {
            return Ok(std::mem::take(&mut self.buf));
        }
        Ok(self.buf.split_to(len))
    }

    /// The length of a u16-prefixed text, checked to be in the buffer; the caller reads it
    /// as `self.buf[..len]` and advances past it.
    #[inline]
    fn text(&mut self) -> Result<usize, DecodeError> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        Ok(len)
    }

    #[inline]
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.text()?;
        let text = std::str::from_utf8(&self.buf[..len]).map_err(|_| DecodeError::InvalidUtf8)?;
        let string = text.to_owned();
        self.buf.advance(len);
        Ok(string)
    }

    /// A topic: the cached one when the text is the same, else parsed (and cached).
    #[inline]
    fn topic(&mut self, limits: &Limits) -> Result<Topic, DecodeError> {
        let len = self.text()?;
        let text = &self.buf[..len];
        let topic = match &self.topics.last {
            Some(topic) if topic.as_str().as_bytes() == text => topic.clone(),
            _ => {
                let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8)?;
                let topic = Topic::parse_with(text, limits)?;
                self.topics.last = Some(topic.clone());
                topic
            }
        };
        self.buf.advance(len);
        Ok(topic)
    }

    /// A filter, parsed straight from the buffer.
    fn filter(&mut self, limits: &Limits) -> Result<Filter, DecodeError> {
        let len = self.text()?;
        let text = std::str::from_utf8(&self.buf[..len]).map_err(|_| DecodeError::InvalidUtf8)?;
        let filter = Filter::parse_with(text, limits)?;
        self.buf.advance(len);
        Ok(filter)
    }

    #[inline]
    fn bytes32(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        self.bytes(len)
    }

    #[inline]
    fn qos(&mut self) -> Result<Qos, DecodeError> {
        Qos::try_from(self.u8()?)
    }

    #[inline]
    pub(super) fn envelope(&mut self, limits: &Limits) -> Result<Envelope, DecodeError> {
        self.envelope_then(limits, |_| Ok(()))
    }

    /// An envelope that ends the frame (a DELIVER's, decoded on its own): bytes after it are an
    /// error, found before the envelope is put together, so that it is built where its caller
    /// wants it rather than moved out of one `Result` into another (a copy of 112 bytes
    /// written piecewise, which the processor reads back slowly).
    #[inline]
    pub(super) fn last_envelope(&mut self, limits: &Limits) -> Result<Envelope, DecodeError> {
        self.envelope_then(limits, Self::ended)
    }

    #[inline(always)]
    fn envelope_then(
        &mut self,
        limits: &Limits,
        check: impl FnOnce(&Self) -> Result<(), DecodeError>,
    ) -> Result<Envelope, DecodeError> {
        // What passes this look passes every check below, and ends the frame.
        if let Some(envelope) = self.plain_envelope() {
            return Ok(envelope);
        }
        let id = MessageId(self.u128()?);
        let timestamp_ms = self.u64()?;
        let flags = Flags(self.u16()?);
        let topic = self.topic(limits)?;
        let count = self.u16()?;
        if count > MAX_HEADERS {
            return Err(DecodeError::TooManyHeaders { count, max: MAX_HEADERS });
        }
        let mut headers = Headers::new();
        for _ in 0..count {
            let name = self.string()?;
            headers.insert(name, self.bytes32()?);
        }
        let payload = self.bytes32()?;
        check(self)?;
        Ok(Envelope { id, topic, timestamp_ms, flags, headers, payload })
    }

    /// The envelope most frames of a stream carry, read in one look at the buffer rather than
    /// field by field: its topic the one the stream decoded last, no headers, its payload the
    /// rest of the frame (moved out whole). `None`, having read nothing, for any other, which
    /// the field-by-field reading then decodes or refuses. The topic was checked against the
    /// limits when it was cached, and the payload's length is the bytes left, so nothing is
    /// accepted here that the field-by-field reading would refuse.
    #[inline(always)]
    fn plain_envelope(&mut self) -> Option<Envelope> {
        /// Id, time stamp, flags and the topic's length.
        const FIXED: usize = 16 + 8 + 2 + 2;
        /// The header count (zero) and the payload's length, after the topic.
        const TAIL: usize = 2 + 4;
        let cached = self.topics.last.as_ref()?;
        let text = cached.as_str().as_bytes();
        let buf: &[u8] = &self.buf;
        let fixed = buf.first_chunk::<FIXED>()?;
        if usize::from(u16::from_be_bytes([fixed[26], fixed[27]])) != text.len() {
            return None;
        }
        let (topic, rest) = buf[FIXED..].split_at_checked(text.len())?;
        let tail = rest.first_chunk::<TAIL>()?;
        let payload_len = u32::from_be_bytes([tail[2], tail[3], tail[4], tail[5]]) as usize;
        if tail[..2] != [0, 0] || rest.len() - TAIL != payload_len || topic != text {
            return None;
        }
        let (id, rest) = fixed.split_first_chunk::<16>()?;
        let (timestamp, flags) = rest.split_first_chunk::<8>()?;
        let id = MessageId(u128::from_be_bytes(*id));
        let timestamp_ms = u64::from_be_bytes(*timestamp);
        let flags = Flags(u16::from_be_bytes([flags[0], flags[1]]));
        let topic = cached.clone();
        self.buf.advance(FIXED + text.len() + TAIL);
        let payload = std::mem::take(&mut self.buf);
        Some(Envelope { id, topic, timestamp_ms, flags, headers: Headers::new(), payload })
    }

    /// A DELIVER_COMPACT's envelope (`compact.rs`), which ends the frame: a numbered topic is
    /// found in `aliases`; a topic given in full (also where it is numbered) is read as in
    /// any envelope.
    #[inline]
    pub(super) fn compact_envelope(
        &mut self,
        limits: &Limits,
        aliases: &TopicAliases,
    ) -> Result<Envelope, DecodeError> {
        let id = MessageId(self.u128()?);
        let timestamp_ms = self.u64()?;
        let flags = Flags(self.u16()?);
        let topic = match TopicRef::from_wire(self.u16()?) {
            TopicRef::Alias(alias) => {
                aliases.get(alias).cloned().ok_or(DecodeError::TopicAlias { alias })?
            }
            TopicRef::Given | TopicRef::Define(_) => self.topic(limits)?,
        };
        let payload = std::mem::take(&mut self.buf);
        Ok(Envelope { id, topic, timestamp_ms, flags, headers: Headers::new(), payload })
    }

    /// A PUBLISH_COMPACT's body (`compact.rs`): its QoS and envelope, which ends the frame.
    /// A definition (numbers 1 to [`MAX_TOPIC_ALIASES`], in any order, a later one replacing
    /// an earlier) is recorded in the stream's [`TopicCache`] also when its topic is refused,
    /// so that frames naming that number are refused the same way.
    #[inline]
    pub(super) fn compact_publish(
        &mut self,
        limits: &Limits,
    ) -> Result<(Qos, Envelope), DecodeError> {
        let qos = self.qos()?;
        let id = MessageId(self.u128()?);
        let timestamp_ms = self.u64()?;
        let flags = Flags(self.u16()?);
        let topic = match TopicRef::from_wire(self.u16()?) {
            TopicRef::Alias(alias) => self.topics.numbered(alias)?,
            TopicRef::Given => self.topic(limits)?,
            TopicRef::Define(alias) => {
                if alias == 0 || alias > MAX_TOPIC_ALIASES {
                    return Err(DecodeError::TopicAlias { alias });
                }
                match self.topic(limits) {
                    Ok(topic) => {
                        self.topics.define(alias, Ok(topic.clone()));
                        topic
                    }
                    Err(DecodeError::InvalidTopic(refused)) => {
                        self.topics.define(alias, Err(refused.clone()));
                        return Err(DecodeError::InvalidTopic(refused));
                    }
                    Err(other) => return Err(other),
                }
            }
        };
        let payload = std::mem::take(&mut self.buf);
        Ok((qos, Envelope { id, topic, timestamp_ms, flags, headers: Headers::new(), payload }))
    }

    /// A PUBLISH's body: its QoS and envelope.
    #[inline]
    pub(super) fn publish(&mut self, limits: &Limits) -> Result<(Qos, Envelope), DecodeError> {
        Ok((self.qos()?, self.envelope(limits)?))
    }

    #[inline]
    pub(super) fn body(&mut self, limits: &Limits) -> Result<Body, DecodeError> {
        Ok(match self.frame_type {
            0x01 => Body::Hello {
                version: self.u16()?,
                capabilities: self.u32()?,
                name: self.string()?,
            },
            0x02 => Body::Welcome {
                version: self.u16()?,
                capabilities: self.u32()?,
                max_frame_bytes: self.u32()?,
                max_message_bytes: self.u32()?,
                heartbeat_ms: self.u32()?,
                name: self.string()?,
            },
            0x03 => Body::Auth { key: self.bytes32()? },
            0x04 => Body::Ok,
            0x10 => Body::Subscribe {
                sub: self.u32()?,
                qos: self.qos()?,
                filter: self.filter(limits)?,
                prefetch: self.u32()?,
                group: Some(self.string()?).filter(|g| !g.is_empty()),
                start: StartAt::from_wire(self.u8()?, self.u64()?)?,
            },
            0x11 => Body::Unsubscribe { sub: self.u32()? },
            0x20 => {
                let (qos, envelope) = self.publish(limits)?;
                Body::Publish { qos, envelope }
            }
            0x21 => Body::PubAck,
            0x30 => Body::Deliver {
                sub: self.u32()?,
                attempt: self.u32()?,
                offset: self.u64()?,
                envelope: self.envelope(limits)?,
            },
            0x31 => Body::Ack { sub: self.u32()?, id: MessageId(self.u128()?) },
            0x32 => Body::Nack {
                sub: self.u32()?,
                id: MessageId(self.u128()?),
                requeue: self.u8()? != 0,
            },
            0x40 => Body::Ping,
            0x41 => Body::Pong,
            0x7f => Body::Error { code: ErrorCode(self.u16()?), message: self.string()? },
            other => return Err(DecodeError::UnknownType(other)),
        })
    }

    #[inline]
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        self.ended()
    }

    /// Nothing is left: bytes after the body are an error.
    #[inline]
    fn ended(&self) -> Result<(), DecodeError> {
        match self.buf.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { frame_type: self.frame_type, extra }),
        }
    }
}
