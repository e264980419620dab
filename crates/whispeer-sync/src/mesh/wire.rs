//! What mesh nodes say on a connection: a `Hello` first (who, which filters, how far it has
//! got with each publisher), then `Message`s. Integers big-endian; bounds checked before
//! allocating.
//!
//! | kind | message | body |
//! |---|---|---|
//! | `H` | `Hello` | version (1) · node (u8 length, bytes) · filters (u8 count; u16 length, bytes each) · cursors (u32 count; node (u8 length, bytes), seq (u64) each) |
//! | `M` | `Message` | origin (u8 length, bytes) · seq (u64) · the envelope in its wire layout |

use bytes::{Bytes, BytesMut};
use whispeer_core::proto::{Envelope, Limits};

/// The mesh protocol's version.
pub(crate) const VERSION: u8 = 1;
/// Most filters in a `Hello`.
pub(crate) const MAX_FILTERS: usize = 64;
/// Most cursors in a `Hello`.
pub(crate) const MAX_CURSORS: usize = 4096;

/// One mesh message.
#[derive(Debug, PartialEq)]
pub(crate) enum MeshMessage {
    Hello { node: String, filters: Vec<String>, cursors: Vec<(String, u64)> },
    Message { origin: String, seq: u64, envelope: Envelope },
}

/// Why a mesh message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("bad mesh message: {0}")]
pub(crate) struct MeshError(&'static str);

impl MeshMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, MeshError> {
        let mut out = BytesMut::new();
        let put_short = |out: &mut BytesMut, text: &str| -> Result<(), MeshError> {
            let len =
                u8::try_from(text.len()).map_err(|_| MeshError("a node id over 255 bytes"))?;
            out.extend_from_slice(&[len]);
            out.extend_from_slice(text.as_bytes());
            Ok(())
        };
        match self {
            Self::Hello { node, filters, cursors } => {
                out.extend_from_slice(&[b'H', VERSION]);
                put_short(&mut out, node)?;
                if filters.len() > MAX_FILTERS || cursors.len() > MAX_CURSORS {
                    return Err(MeshError("too many filters or cursors"));
                }
                out.extend_from_slice(&[filters.len() as u8]);
                for filter in filters {
                    let len =
                        u16::try_from(filter.len()).map_err(|_| MeshError("a long filter"))?;
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(filter.as_bytes());
                }
                out.extend_from_slice(&(cursors.len() as u32).to_be_bytes());
                for (node, seq) in cursors {
                    put_short(&mut out, node)?;
                    out.extend_from_slice(&seq.to_be_bytes());
                }
            }
            Self::Message { origin, seq, envelope } => {
                out.extend_from_slice(b"M");
                put_short(&mut out, origin)?;
                out.extend_from_slice(&seq.to_be_bytes());
                envelope
                    .encode(&mut out)
                    .map_err(|_| MeshError("the envelope cannot be encoded"))?;
            }
        }
        Ok(out.to_vec())
    }

    pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, MeshError> {
        let mut r = Reader(bytes);
        match r.u8()? {
            b'H' => {
                if r.u8()? != VERSION {
                    return Err(MeshError("another version of the mesh protocol"));
                }
                let node = r.short()?;
                let count = usize::from(r.u8()?);
                if count > MAX_FILTERS {
                    return Err(MeshError("too many filters"));
                }
                let mut filters = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = usize::from(u16::from_be_bytes([r.u8()?, r.u8()?]));
                    filters.push(r.text(len)?);
                }
                let count = r.u64_from(4)? as usize;
                if count > MAX_CURSORS {
                    return Err(MeshError("too many cursors"));
                }
                let mut cursors = Vec::with_capacity(count.min(r.0.len() / 9));
                for _ in 0..count {
                    cursors.push((r.short()?, r.u64_from(8)?));
                }
                if !r.0.is_empty() {
                    return Err(MeshError("bytes after the hello"));
                }
                Ok(Self::Hello { node, filters, cursors })
            }
            b'M' => {
                let origin = r.short()?;
                let seq = r.u64_from(8)?;
                let envelope = Envelope::decode(Bytes::copy_from_slice(r.0), limits)
                    .map_err(|_| MeshError("a bad envelope"))?;
                Ok(Self::Message { origin, seq, envelope })
            }
            _ => Err(MeshError("unknown kind")),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MeshError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(MeshError("too short"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, MeshError> {
        Ok(self.take(1)?[0])
    }
    fn u64_from(&mut self, n: usize) -> Result<u64, MeshError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    fn text(&mut self, len: usize) -> Result<String, MeshError> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| MeshError("text is not UTF-8"))
    }
    fn short(&mut self) -> Result<String, MeshError> {
        let len = usize::from(self.u8()?);
        self.text(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whispeer_core::proto::{Flags, MessageId, Topic};

    #[test]
    fn messages_read_back_and_bad_ones_are_errors() {
        let limits = Limits::default();
        let hello = MeshMessage::Hello {
            node: "n1".into(),
            filters: vec!["docs/#".into()],
            cursors: vec![("n2".into(), 7), ("n3".into(), u64::MAX)],
        };
        let bytes = hello.encode().expect("encodes");
        assert_eq!(MeshMessage::decode(&bytes, &limits).expect("decodes"), hello);
        for cut in 0..bytes.len() {
            assert!(MeshMessage::decode(&bytes[..cut], &limits).is_err(), "cut at {cut}");
        }
        let topic = Topic::parse("docs/a").expect("topic");
        let envelope =
            Envelope::new(MessageId(42), topic, 5, Flags::default(), Bytes::from_static(b"x"));
        let message = MeshMessage::Message { origin: "n1".into(), seq: 9, envelope };
        let bytes = message.encode().expect("encodes");
        assert_eq!(MeshMessage::decode(&bytes, &limits).expect("decodes"), message);
        assert!(MeshMessage::decode(b"Z", &limits).is_err());
        assert!(MeshMessage::decode(&[b'H', 2], &limits).is_err(), "another version");
    }
}
