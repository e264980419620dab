//! The records of the log: a message at an offset, a durable subscription's commit, and a
//! checkpoint (a commit repeated at a segment's start), each framed with its length and CRC32C.

use bytes::{BufMut, Bytes, BytesMut};
use std::io;
use whispeer_proto::{Envelope, Topic};

use super::{HEADER, KIND_CHECKPOINT, KIND_CLOSE, KIND_COMMIT, KIND_MARK, KIND_MESSAGE, unlimited};
use crate::store::{Commit, GroupKey, Record};

/// Frames the record of `envelope` at `offset`.
pub(crate) fn encode_record(
    offset: u64,
    accepted_ms: u64,
    envelope: &Envelope,
) -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 64 + envelope.payload.len());
    framed.put_u64(0);
    framed.put_u8(KIND_MESSAGE);
    framed.put_u64(offset);
    framed.put_u64(accepted_ms);
    envelope.encode(&mut framed).map_err(io::Error::other)?;
    seal(framed)
}

/// Fills in the length and checksum of a record written after `HEADER` placeholder bytes.
fn seal(mut framed: BytesMut) -> io::Result<Bytes> {
    let len = u32::try_from(framed.len() - HEADER).map_err(io::Error::other)?;
    let crc = crc32c::crc32c(&framed[HEADER..]);
    framed[..4].copy_from_slice(&len.to_be_bytes());
    framed[4..HEADER].copy_from_slice(&crc.to_be_bytes());
    Ok(framed.freeze())
}

/// Frames the record of a durable subscription's commit: group `key` has settled everything up
/// to `offset` of `topic`.
pub(crate) fn encode_commit(key: &GroupKey, topic: &str, offset: u64) -> io::Result<Bytes> {
    encode_commit_as(KIND_COMMIT, key, topic, offset)
}

pub(super) fn encode_commit_as(
    kind: u8,
    key: &GroupKey,
    topic: &str,
    offset: u64,
) -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 64);
    framed.put_u64(0);
    framed.put_u8(kind);
    framed.put_u64(offset);
    for text in [&*key.0, &*key.1, topic] {
        let len = u16::try_from(text.len()).map_err(io::Error::other)?;
        framed.put_u16(len);
        framed.put_slice(text.as_bytes());
    }
    seal(framed)
}

/// Frames the mark of `topic`'s latest offset.
pub(super) fn encode_mark(topic: &Topic, offset: u64) -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 32);
    framed.put_u64(0);
    framed.put_u8(KIND_MARK);
    framed.put_u64(offset);
    let len = u16::try_from(topic.as_str().len()).map_err(io::Error::other)?;
    framed.put_u16(len);
    framed.put_slice(topic.as_str().as_bytes());
    seal(framed)
}

/// Frames the close mark.
pub(super) fn encode_close() -> io::Result<Bytes> {
    let mut framed = BytesMut::with_capacity(HEADER + 1);
    framed.put_u64(0);
    framed.put_u8(KIND_CLOSE);
    seal(framed)
}

fn decode_mark(body: &[u8]) -> Option<(Topic, u64)> {
    let offset = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let len = usize::from(u16::from_be_bytes(body.get(8..10)?.try_into().ok()?));
    let text = body.get(10..)?;
    if text.len() != len {
        return None;
    }
    let topic = Topic::parse_with(std::str::from_utf8(text).ok()?, &unlimited()).ok()?;
    Some((topic, offset))
}

impl Commit {
    fn decode(mut body: &[u8]) -> Option<Self> {
        let offset = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
        body = &body[8..];
        let mut text = || -> Option<String> {
            let len = usize::from(u16::from_be_bytes(body.get(..2)?.try_into().ok()?));
            let value = std::str::from_utf8(body.get(2..2 + len)?).ok()?.to_string();
            body = &body[2 + len..];
            Some(value)
        };
        let (filter, group, topic) = (text()?, text()?, text()?);
        let topic = Topic::parse_with(&topic, &unlimited()).ok()?;
        body.is_empty().then(|| Self { key: (filter.into(), group.into()), topic, offset })
    }
}

/// One record of the log.
pub(super) enum Logged {
    Message(Record),
    Commit(Commit),
    /// A commit repeated at the start of a segment; not a numbered record.
    Checkpoint(Commit),
    /// A topic's latest offset at the start of a segment; not a numbered record.
    Mark(Topic, u64),
    /// The log was closed cleanly; not a numbered record.
    Close,
}

impl Logged {
    /// Whether the record has a number (messages and commits do, checkpoints not).
    pub(super) fn is_numbered(&self) -> bool {
        !matches!(self, Self::Checkpoint(_) | Self::Mark(..) | Self::Close)
    }
}

pub(super) fn decode_logged(body: Bytes) -> Option<Logged> {
    match *body.first()? {
        KIND_MESSAGE => Record::decode(body).map(Logged::Message),
        KIND_COMMIT => Commit::decode(&body[1..]).map(Logged::Commit),
        KIND_CHECKPOINT => Commit::decode(&body[1..]).map(Logged::Checkpoint),
        KIND_CLOSE => (body.len() == 1).then_some(Logged::Close),
        KIND_MARK => decode_mark(&body[1..]).map(|(topic, offset)| Logged::Mark(topic, offset)),
        _ => None,
    }
}

impl Record {
    /// The framed record.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> io::Result<Bytes> {
        encode_record(self.offset, self.accepted_ms, &self.envelope)
    }

    fn decode(body: Bytes) -> Option<Self> {
        let (&kind, rest) = body.split_first()?;
        if kind != KIND_MESSAGE || rest.len() < 16 {
            return None;
        }
        let offset = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let accepted_ms = u64::from_be_bytes(rest[8..16].try_into().ok()?);
        let envelope = Envelope::decode(body.slice(17..), &unlimited()).ok()?;
        Some(Self { offset, accepted_ms, envelope })
    }
}
