//! The relay's wire: what a peer and a relay (`/relay` on a server's WebSocket listener) say
//! to each other, one WebSocket binary message each. Sans-I/O: [`RelayMessage::encode`] and
//! [`RelayMessage::decode`], bounds-checked, so a bad message is an error, never a panic.
//!
//! A peer joins topics (32-byte hashes) under a peer id; the relay pairs every two peers that
//! joined one topic to be connected, with a *link* each side knows by the same number, and
//! forwards the bytes of [`RelayMessage::Data`] from one end of a link to the other. The peers
//! run Noise end to end inside those bytes: the relay never holds a key.
//!
//! | kind | message | body |
//! |---|---|---|
//! | 1 | `Join` (peer → relay) | topic (32) · connect (1: 0 or 1) · id length (1) · id |
//! | 2 | `Leave` (peer → relay) | topic (32) |
//! | 3 | `Lookup` (peer → relay) | request (u32) · topic (32) |
//! | 4 | `Peers` (relay → peer) | request (u32) · count (u16) · per peer: id length (1) · id |
//! | 5 | `Link` (relay → peer) | link (u64) · topic (32) · initiator (1) · id length (1) · id |
//! | 6 | `Unlink` (both) | link (u64) · reason (UTF-8, the rest) |
//! | 7 | `Data` (both) | link (u64) · bytes (the rest) |
//! | 8 | `Refused` (relay → peer) | topic (32) · reason (UTF-8, the rest) |
//! | 9 | `Joined` (relay → peer) | topic (32) |
//!
//! Integers are big-endian. A peer id is 1 to [`MAX_PEER_ID`] bytes of ASCII letters, digits
//! and `-_.`. A reason is at most [`MAX_REASON`] bytes.

use std::fmt;

/// A topic's hash: what peers meet on.
pub type RelayTopic = [u8; 32];

/// Longest peer id.
pub const MAX_PEER_ID: usize = 64;
/// Longest reason in `Unlink` and `Refused`.
pub const MAX_REASON: usize = 256;
/// Most peers listed in one `Peers`.
pub const MAX_PEERS_LISTED: usize = 1024;
/// Bytes of a `Data` message before its payload.
pub const DATA_HEADER: usize = 9;

/// One relay message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayMessage {
    /// Be found on `topic` as `peer`; with `connect`, be paired with every other peer that
    /// joined it to connect.
    Join {
        /// The topic.
        topic: RelayTopic,
        /// Whether to be paired (a link per other connecting peer), or only listed.
        connect: bool,
        /// Who joins.
        peer: String,
    },
    /// Leave `topic`: no longer listed or paired (existing links stay).
    Leave {
        /// The topic.
        topic: RelayTopic,
    },
    /// Which peers are on `topic`?
    Lookup {
        /// Echoed in the answer.
        request: u32,
        /// The topic.
        topic: RelayTopic,
    },
    /// The answer to `Lookup`.
    Peers {
        /// The lookup's `request`.
        request: u32,
        /// The peers' ids.
        peers: Vec<String>,
    },
    /// A link to `peer` on `topic`: what each side sends as `Data` on `link` reaches the other.
    Link {
        /// The link's number, the same on both sides.
        link: u64,
        /// The topic both joined.
        topic: RelayTopic,
        /// Whether this side starts the end-to-end handshake.
        initiator: bool,
        /// The other side's id, as it claimed it (the handshake proves it).
        peer: String,
    },
    /// The link is closed (by the other side, the relay, or this side), and why.
    Unlink {
        /// The link.
        link: u64,
        /// Why.
        reason: String,
    },
    /// Bytes for the other end of `link`.
    Data {
        /// The link.
        link: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A `Join` was accepted (sent before the links it made).
    Joined {
        /// The topic.
        topic: RelayTopic,
    },
    /// A `Join` was refused, or a link it would have made.
    Refused {
        /// The topic.
        topic: RelayTopic,
        /// Why.
        reason: String,
    },
}

/// Why a relay message could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayError(&'static str);

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad relay message: {}", self.0)
    }
}

impl std::error::Error for RelayError {}

/// Whether `id` can be a peer id.
pub fn valid_peer_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_PEER_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Cuts `reason` to [`MAX_REASON`] bytes on a character boundary.
fn clip(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Writes a `Data` message's header for `link` into `out` (cleared first); the payload follows.
pub fn data_header(link: u64, out: &mut Vec<u8>) {
    out.clear();
    out.push(7);
    out.extend_from_slice(&link.to_be_bytes());
}

impl RelayMessage {
    /// The message's bytes.
    ///
    /// # Panics
    /// Never for ids made by [`valid_peer_id`]; an id longer than 255 bytes is cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        let put_id = |out: &mut Vec<u8>, id: &str| {
            let id = &id.as_bytes()[..id.len().min(255)];
            out.push(id.len() as u8);
            out.extend_from_slice(id);
        };
        match self {
            Self::Join { topic, connect, peer } => {
                out.push(1);
                out.extend_from_slice(topic);
                out.push(u8::from(*connect));
                put_id(&mut out, peer);
            }
            Self::Leave { topic } => {
                out.push(2);
                out.extend_from_slice(topic);
            }
            Self::Lookup { request, topic } => {
                out.push(3);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(topic);
            }
            Self::Peers { request, peers } => {
                out.push(4);
                out.extend_from_slice(&request.to_be_bytes());
                let listed = &peers[..peers.len().min(MAX_PEERS_LISTED)];
                out.extend_from_slice(&(listed.len() as u16).to_be_bytes());
                for peer in listed {
                    put_id(&mut out, peer);
                }
            }
            Self::Link { link, topic, initiator, peer } => {
                out.push(5);
                out.extend_from_slice(&link.to_be_bytes());
                out.extend_from_slice(topic);
                out.push(u8::from(*initiator));
                put_id(&mut out, peer);
            }
            Self::Unlink { link, reason } => {
                out.push(6);
                out.extend_from_slice(&link.to_be_bytes());
                out.extend_from_slice(clip(reason).as_bytes());
            }
            Self::Data { link, bytes } => {
                data_header(*link, &mut out);
                out.extend_from_slice(bytes);
            }
            Self::Joined { topic } => {
                out.push(9);
                out.extend_from_slice(topic);
            }
            Self::Refused { topic, reason } => {
                out.push(8);
                out.extend_from_slice(topic);
                out.extend_from_slice(clip(reason).as_bytes());
            }
        }
        out
    }

    /// Reads one message.
    ///
    /// # Errors
    /// A message too short, of an unknown kind, or with a bad peer id, flag or reason.
    pub fn decode(bytes: &[u8]) -> Result<Self, RelayError> {
        let mut r = Reader(bytes);
        let message = match r.u8()? {
            1 => Self::Join { topic: r.topic()?, connect: r.flag()?, peer: r.id()? },
            2 => Self::Leave { topic: r.topic()? },
            3 => Self::Lookup { request: r.u32()?, topic: r.topic()? },
            4 => {
                let request = r.u32()?;
                let count = usize::from(r.u16()?);
                if count > MAX_PEERS_LISTED {
                    return Err(RelayError("too many peers"));
                }
                // Each id takes at least two bytes: bound the allocation by what is there.
                let mut peers = Vec::with_capacity(count.min(r.0.len() / 2));
                for _ in 0..count {
                    peers.push(r.id()?);
                }
                Self::Peers { request, peers }
            }
            5 => Self::Link {
                link: r.u64()?,
                topic: r.topic()?,
                initiator: r.flag()?,
                peer: r.id()?,
            },
            6 => Self::Unlink { link: r.u64()?, reason: r.reason()? },
            7 => Self::Data { link: r.u64()?, bytes: std::mem::take(&mut r.0).to_vec() },
            8 => Self::Refused { topic: r.topic()?, reason: r.reason()? },
            9 => Self::Joined { topic: r.topic()? },
            _ => return Err(RelayError("unknown kind")),
        };
        if !r.0.is_empty() {
            return Err(RelayError("bytes after the message"));
        }
        Ok(message)
    }
}

/// Reads a `Data` message's link and payload without copying; `None` if it is not one.
pub fn decode_data(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (&7, rest) = bytes.split_first()? else {
        return None;
    };
    let (link, payload) = rest.split_at_checked(8)?;
    Some((u64::from_be_bytes(link.try_into().ok()?), payload))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RelayError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(RelayError("too short"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RelayError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RelayError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, RelayError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
    fn u64(&mut self) -> Result<u64, RelayError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn topic(&mut self) -> Result<RelayTopic, RelayError> {
        let mut topic = [0; 32];
        topic.copy_from_slice(self.take(32)?);
        Ok(topic)
    }
    fn flag(&mut self) -> Result<bool, RelayError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RelayError("a flag is 0 or 1")),
        }
    }
    fn id(&mut self) -> Result<String, RelayError> {
        let len = usize::from(self.u8()?);
        let id = std::str::from_utf8(self.take(len)?).map_err(|_| RelayError("bad peer id"))?;
        if !valid_peer_id(id) {
            return Err(RelayError("bad peer id"));
        }
        Ok(id.to_owned())
    }
    fn reason(&mut self) -> Result<String, RelayError> {
        let rest = std::mem::take(&mut self.0);
        if rest.len() > MAX_REASON {
            return Err(RelayError("reason too long"));
        }
        let reason = std::str::from_utf8(rest).map_err(|_| RelayError("reason is not UTF-8"))?;
        Ok(reason.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let topic = [7; 32];
        let messages = [
            RelayMessage::Join { topic, connect: true, peer: "a1".into() },
            RelayMessage::Leave { topic },
            RelayMessage::Lookup { request: 9, topic },
            RelayMessage::Peers { request: 9, peers: vec!["a".into(), "b-c.d_e".into()] },
            RelayMessage::Link { link: u64::MAX - 1, topic, initiator: false, peer: "z".into() },
            RelayMessage::Unlink { link: 3, reason: "gone".into() },
            RelayMessage::Data { link: 4, bytes: vec![0, 1, 2] },
            RelayMessage::Refused { topic, reason: "full".into() },
            RelayMessage::Joined { topic },
        ];
        for message in messages {
            assert_eq!(RelayMessage::decode(&message.encode()), Ok(message));
        }
        assert_eq!(
            decode_data(&RelayMessage::Data { link: 5, bytes: vec![9] }.encode()),
            Some((5, &[9u8][..]))
        );
    }

    #[test]
    fn bad_messages_are_errors() {
        let mut join =
            RelayMessage::Join { topic: [1; 32], connect: true, peer: "a".into() }.encode();
        assert!(RelayMessage::decode(&join[..join.len() - 1]).is_err(), "cut short");
        join.push(0);
        assert!(RelayMessage::decode(&join).is_err(), "trailing bytes");
        let bad_id = RelayMessage::Join { topic: [1; 32], connect: true, peer: "a b".into() };
        assert!(RelayMessage::decode(&bad_id.encode()).is_err(), "space in an id");
        assert!(RelayMessage::decode(&[99]).is_err(), "unknown kind");
        assert!(RelayMessage::decode(&[]).is_err(), "empty");
        let mut peers = vec![4, 0, 0, 0, 1, 0xff, 0xff];
        peers.extend_from_slice(&[1, b'a']);
        assert!(RelayMessage::decode(&peers).is_err(), "count past the limit");
        let long = RelayMessage::Unlink { link: 1, reason: "é".repeat(200) }.encode();
        assert!(RelayMessage::decode(&long).is_ok(), "a long reason is cut on a boundary");
    }
}
