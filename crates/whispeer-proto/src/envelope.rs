//! The message envelope: what travels from a publisher to its subscribers.
//!
//! The envelope's `payload` is opaque bytes — encoded, and later compressed and sealed, at the
//! publishing edge. Everything between the edges (router, plugins, storage, servers) handles
//! envelopes without opening them, and shares the payload by reference count.

use std::fmt;

use bytes::Bytes;

use crate::Topic;

/// A message identifier, unique per broker in practice: a random 64-bit prefix chosen when the
/// broker starts and a 64-bit counter.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId(pub u128);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// How the payload's plaintext was encoded; carried in [`Flags`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum ContentType {
    /// Raw bytes chosen by the application.
    Raw = 0,
    /// serde through postcard, the compact binary default.
    Postcard = 1,
    /// serde through JSON.
    Json = 2,
}

impl ContentType {
    /// The content type for a flag value, if it is one this version knows.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Raw),
            1 => Some(Self::Postcard),
            2 => Some(Self::Json),
            _ => None,
        }
    }
}

/// How the payload was compressed; carried in [`Flags`]. Values are wire constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum CompressionAlgorithm {
    /// Not compressed.
    None = 0,
    /// zstd (RFC 8878), one frame.
    Zstd = 1,
    /// LZ4 block format, preceded by the uncompressed length as a little-endian `u32`.
    Lz4 = 2,
}

/// How the payload was encrypted; carried in [`Flags`]. Values are wire constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum CipherAlgorithm {
    /// Not encrypted.
    None = 0,
    /// XChaCha20-Poly1305: 256-bit key, 192-bit nonce, 128-bit tag. The default.
    XChaCha20Poly1305 = 1,
    /// AES-256-GCM: 256-bit key, 96-bit nonce, 128-bit tag.
    Aes256Gcm = 2,
}

/// Envelope flags: what was done to the payload. Bit layout, least significant first:
///
/// | bits | meaning |
/// |---|---|
/// | 0–2 | [`ContentType`] of the plaintext |
/// | 3–4 | [`CompressionAlgorithm`] |
/// | 5–6 | [`CipherAlgorithm`] |
/// | 7 | the key was derived per topic from the key id's master key (HKDF) |
/// | 8–15 | reserved, zero |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u16);

impl Flags {
    const CONTENT_MASK: u16 = 0b111;
    const COMPRESSION_SHIFT: u16 = 3;
    const CIPHER_SHIFT: u16 = 5;
    const TWO_BITS: u16 = 0b11;
    const DERIVED_KEY: u16 = 1 << 7;
    const RESERVED: u16 = 0xff00;

    /// Flags that say only how the payload was encoded.
    pub fn with_content(content: ContentType) -> Self {
        Self(content as u16)
    }

    /// The content type, or `None` if the bits name one this version does not know.
    pub fn content(self) -> Option<ContentType> {
        ContentType::from_bits((self.0 & Self::CONTENT_MASK) as u8)
    }

    /// The compression, or `None` if the bits name one this version does not know.
    pub fn compression(self) -> Option<CompressionAlgorithm> {
        match (self.0 >> Self::COMPRESSION_SHIFT) & Self::TWO_BITS {
            0 => Some(CompressionAlgorithm::None),
            1 => Some(CompressionAlgorithm::Zstd),
            2 => Some(CompressionAlgorithm::Lz4),
            _ => None,
        }
    }

    /// These flags with the compression set.
    pub fn with_compression(self, compression: CompressionAlgorithm) -> Self {
        let cleared = self.0 & !(Self::TWO_BITS << Self::COMPRESSION_SHIFT);
        Self(cleared | (compression as u16) << Self::COMPRESSION_SHIFT)
    }

    /// The cipher, or `None` if the bits name one this version does not know.
    pub fn cipher(self) -> Option<CipherAlgorithm> {
        match (self.0 >> Self::CIPHER_SHIFT) & Self::TWO_BITS {
            0 => Some(CipherAlgorithm::None),
            1 => Some(CipherAlgorithm::XChaCha20Poly1305),
            2 => Some(CipherAlgorithm::Aes256Gcm),
            _ => None,
        }
    }

    /// These flags with the cipher set.
    pub fn with_cipher(self, cipher: CipherAlgorithm) -> Self {
        let cleared = self.0 & !(Self::TWO_BITS << Self::CIPHER_SHIFT);
        Self(cleared | (cipher as u16) << Self::CIPHER_SHIFT)
    }

    /// Whether the key was derived per topic.
    pub fn key_derived(self) -> bool {
        self.0 & Self::DERIVED_KEY != 0
    }

    /// These flags with the derived-key bit set or cleared.
    pub fn with_key_derived(self, derived: bool) -> Self {
        if derived { Self(self.0 | Self::DERIVED_KEY) } else { Self(self.0 & !Self::DERIVED_KEY) }
    }

    /// Whether the payload is the plaintext itself: neither compressed nor encrypted.
    pub fn is_plain(self) -> bool {
        self.compression() == Some(CompressionAlgorithm::None)
            && self.cipher() == Some(CipherAlgorithm::None)
    }

    /// Whether every bit has a meaning this version knows.
    pub fn is_known(self) -> bool {
        self.0 & Self::RESERVED == 0
            && self.content().is_some()
            && self.compression().is_some()
            && self.cipher().is_some()
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({:#06x})", self.0)
    }
}

/// Application headers: short name/value pairs that travel beside the payload, in order.
///
/// Headers are not encrypted by the engines, but they are authenticated: a sealed message whose
/// headers were edited fails to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Bytes)>);

impl Headers {
    /// No headers; does not allocate.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Appends a header; names may repeat.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        self.0.push((name.into(), value.into()));
    }

    /// The first value for `name`.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// All headers, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Header names the broker itself reads or writes. Like every header they travel in the clear
/// and are authenticated by the seal, so they must be set before sealing.
pub mod header {
    /// Time to live in milliseconds, as ASCII decimal digits: the broker never delivers the
    /// message once this long has passed since it accepted it.
    pub const TTL_MS: &str = "ttl-ms";
    /// A publisher's idempotency key: a second publish with the same key to the same topic
    /// within the broker's de-duplication window is acknowledged but not delivered.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// On a dead letter: why the message was given up (`max-attempts`, `rejected`,
    /// `undecodable`).
    pub const DEAD_LETTER_REASON: &str = "dead-letter-reason";
    /// On a dead letter: how many times the message was delivered, as ASCII decimal digits.
    pub const DEAD_LETTER_ATTEMPTS: &str = "dead-letter-attempts";
    /// `1` on a publish: the server keeps the message as its topic's retained message (an
    /// empty payload clears it) and gives it first to each new subscription that matches.
    pub const RETAIN: &str = "retain";
    /// `1` on a delivery: a retained message, given to a new subscription.
    pub const RETAINED: &str = "retained";
    /// On a request: the topic to publish the reply to (MQTT 5's response topic). A QoS 1
    /// request that no subscriber takes is refused with `NO_RESPONDERS`.
    pub const RESPONSE_TOPIC: &str = "response-topic";
    /// On a request and its reply: what ties them together (MQTT 5's correlation data).
    pub const CORRELATION_DATA: &str = "correlation-data";
}

impl Headers {
    /// Sets the `ttl-ms` header (whole milliseconds).
    pub fn set_ttl(&mut self, ttl: std::time::Duration) {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.insert(header::TTL_MS, millis.to_string());
    }

    /// The `ttl-ms` header, if present and a valid number of milliseconds.
    pub fn ttl_ms(&self) -> Option<u64> {
        let value = self.get(header::TTL_MS)?;
        std::str::from_utf8(value).ok()?.parse().ok()
    }
}

/// One message as the broker sees it: addressing and metadata in the clear, payload opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Unique identifier, assigned by the publishing edge.
    pub id: MessageId,
    /// Where the message was published.
    pub topic: Topic,
    /// Publish time, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// What was done to the payload.
    pub flags: Flags,
    /// Application headers.
    pub headers: Headers,
    /// The payload, shared rather than copied between subscribers.
    pub payload: Bytes,
}

impl Envelope {
    /// An envelope with no headers.
    pub fn new(
        id: MessageId,
        topic: Topic,
        timestamp_ms: u64,
        flags: Flags,
        payload: Bytes,
    ) -> Self {
        Self { id, topic, timestamp_ms, flags, headers: Headers::new(), payload }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_content_type() {
        for ct in [ContentType::Raw, ContentType::Postcard, ContentType::Json] {
            assert_eq!(Flags::with_content(ct).content(), Some(ct));
        }
        assert_eq!(Flags(0b111).content(), None);
    }

    #[test]
    fn flag_fields_are_independent() {
        let flags = Flags::with_content(ContentType::Json)
            .with_compression(CompressionAlgorithm::Lz4)
            .with_cipher(CipherAlgorithm::Aes256Gcm)
            .with_key_derived(true);
        assert_eq!(flags.content(), Some(ContentType::Json));
        assert_eq!(flags.compression(), Some(CompressionAlgorithm::Lz4));
        assert_eq!(flags.cipher(), Some(CipherAlgorithm::Aes256Gcm));
        assert!(flags.key_derived() && flags.is_known());
        let flags = flags.with_compression(CompressionAlgorithm::None).with_key_derived(false);
        assert_eq!(flags.compression(), Some(CompressionAlgorithm::None));
        assert_eq!(flags.cipher(), Some(CipherAlgorithm::Aes256Gcm));
        assert!(!flags.key_derived());
        assert!(!Flags(0x0100).is_known());
        assert!(Flags::with_content(ContentType::Json).is_plain());
        assert!(!flags.is_plain(), "still encrypted");
        assert!(!Flags(0b11 << 3).is_plain(), "unknown compression is not plain");
        assert_eq!(Flags(0b11 << 3).compression(), None);
    }

    #[test]
    fn headers_keep_order_and_find_first() {
        let mut h = Headers::new();
        h.insert("a", "1");
        h.insert("b", "2");
        h.insert("a", "3");
        assert_eq!(h.get("a").map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(h.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["a", "b", "a"]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn ttl_header_is_read_only_when_it_is_a_number() {
        let mut h = Headers::new();
        assert_eq!(h.ttl_ms(), None);
        h.set_ttl(std::time::Duration::from_millis(1500));
        assert_eq!(h.ttl_ms(), Some(1500));
        let mut bad = Headers::new();
        bad.insert(header::TTL_MS, "soon");
        assert_eq!(bad.ttl_ms(), None);
    }

    #[test]
    fn message_id_displays_as_fixed_width_hex() {
        assert_eq!(MessageId(255).to_string(), format!("{:0>32}", "ff"));
    }
}
