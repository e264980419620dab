//! The edge pipeline: `seal` (compress, then encrypt) at the publisher and `open` (decrypt,
//! then decompress) at the subscriber, with defaults and per-topic rules.
//!
//! Sealed payload layout (big-endian), when the flags name a cipher:
//!
//! ```text
//! +-----------+-------------------------+----------------------+----------+
//! | key id u32| nonce (24 or 12 bytes)  | ciphertext           | tag (16) |
//! +-----------+-------------------------+----------------------+----------+
//! ```
//!
//! The associated data binds the flags, key id, message id, timestamp, topic and headers, so a
//! sealed payload moved to another topic or envelope, or sent with edited headers, fails to open.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use whispeer_proto::{
    CipherAlgorithm, CompressionAlgorithm, Envelope, Filter, Flags, Headers, Limits, MessageId,
};

use crate::aead::{self, TAG_LEN, nonce_len};
use crate::compress::{Compression, decompress};
use crate::error::{OpenError, SealError};
use crate::keyring::{KeyError, KeyId, Keyring};

const KEY_ID_LEN: usize = 4;
/// Domain separation for the associated data; a new layout gets a new label.
const AAD_LABEL: &[u8] = b"whispeer/v1/aad";

/// The encryption stage: a keyring and the default cipher.
///
/// ```
/// use whispeer_engines::{CipherAlgorithm, Encryption, Keyring};
/// let encryption = Encryption::with_keyring(Keyring::generate()?).cipher(CipherAlgorithm::Aes256Gcm);
/// # let _ = encryption;
/// # Ok::<(), whispeer_engines::KeyError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Encryption {
    keyring: Keyring,
    cipher: CipherAlgorithm,
}

/// The environment variable [`Encryption::new`] reads keys from, as the CLI does.
pub const KEY_VARIABLE: &str = "WHISPEER_KEY";

impl Default for Encryption {
    fn default() -> Self {
        Self::new()
    }
}

impl Encryption {
    /// XChaCha20-Poly1305 with the keys in `WHISPEER_KEY` when it is set (the text form of
    /// [`Keyring::parse`], as `whispeer keygen` writes it), else with one new random key,
    /// which [`Encryption::keyring`] (or `Broker::encryption_keys`) hands back for sharing.
    ///
    /// # Panics
    /// If `WHISPEER_KEY` is set but holds no valid keyring, or the operating system's random
    /// number generator fails; [`Encryption::try_new`] returns these as errors instead.
    pub fn new() -> Self {
        match Self::try_new() {
            Ok(encryption) => encryption,
            Err(err) => panic!("whispeer: Encryption::new: {err}"),
        }
    }

    /// [`Encryption::new`], with its failures as errors.
    ///
    /// # Errors
    /// As [`Keyring::from_env`] for a `WHISPEER_KEY` that is set; [`KeyError::Random`] if no
    /// key can be generated.
    pub fn try_new() -> Result<Self, KeyError> {
        match std::env::var_os(KEY_VARIABLE) {
            Some(_) => Self::from_env(KEY_VARIABLE),
            None => Self::generated(),
        }
    }

    /// XChaCha20-Poly1305 with the keyring's current key.
    pub fn with_keyring(keyring: Keyring) -> Self {
        Self { keyring, cipher: CipherAlgorithm::XChaCha20Poly1305 }
    }

    /// Encryption with one new random key: for a single process that seals and opens itself.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the generator fails.
    pub fn generated() -> Result<Self, KeyError> {
        Ok(Self::with_keyring(Keyring::generate()?))
    }

    /// Encryption with keys from the environment variable `name` (see [`Keyring::from_env`]).
    ///
    /// # Errors
    /// As [`Keyring::from_env`].
    pub fn from_env(name: &str) -> Result<Self, KeyError> {
        Ok(Self::with_keyring(Keyring::from_env(name)?))
    }

    /// Sets the default cipher.
    pub fn cipher(mut self, cipher: CipherAlgorithm) -> Self {
        self.cipher = cipher;
        self
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }
}

/// Which key seals a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyChoice {
    /// The keyring's current key.
    Current,
    /// A particular key.
    Key(KeyId),
    /// A key derived for each topic from this master key (HKDF-SHA256, info = topic), so that
    /// holders of one topic's derived key cannot open another's.
    DerivedFrom(KeyId),
    /// No encryption: this topic opts out.
    Plaintext,
}

/// Settings for the topics a filter matches, overriding the defaults. The first matching rule
/// applies; what it leaves unset falls back to the defaults.
///
/// ```
/// use whispeer_engines::{Compression, KeyId, TopicRule};
/// use whispeer_proto::Filter;
/// let metrics = TopicRule::new(Filter::parse("metrics/#")?).compression(Compression::lz4()).plaintext();
/// let orders = TopicRule::new(Filter::parse("orders/#")?).key(KeyId(2));
/// # let _ = (metrics, orders);
/// # Ok::<(), whispeer_proto::TopicError>(())
/// ```
#[derive(Clone, Debug)]
pub struct TopicRule {
    filter: Filter,
    compression: Option<Compression>,
    cipher: Option<CipherAlgorithm>,
    key: Option<KeyChoice>,
}

impl TopicRule {
    /// A rule for the topics `filter` matches, overriding nothing yet.
    pub fn new(filter: Filter) -> Self {
        Self { filter, compression: None, cipher: None, key: None }
    }

    /// Uses this compression (`Compression::none()` opts out).
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// Uses this cipher.
    pub fn cipher(mut self, cipher: CipherAlgorithm) -> Self {
        self.cipher = Some(cipher);
        self
    }

    /// Seals with this key.
    pub fn key(mut self, id: KeyId) -> Self {
        self.key = Some(KeyChoice::Key(id));
        self
    }

    /// Seals with a per-topic key derived from master key `id`.
    pub fn derive_from(mut self, id: KeyId) -> Self {
        self.key = Some(KeyChoice::DerivedFrom(id));
        self
    }

    /// Sends these topics unencrypted.
    pub fn plaintext(mut self) -> Self {
        self.key = Some(KeyChoice::Plaintext);
        self
    }
}

/// What the associated data binds besides the flags and key id.
#[derive(Clone, Copy, Debug)]
pub struct Sealing<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The message id.
    pub id: MessageId,
    /// The publish time.
    pub timestamp_ms: u64,
    /// The headers.
    pub headers: &'a Headers,
}

impl<'a> From<&'a Envelope> for Sealing<'a> {
    fn from(envelope: &'a Envelope) -> Self {
        Self {
            topic: envelope.topic.as_str(),
            id: envelope.id,
            timestamp_ms: envelope.timestamp_ms,
            headers: &envelope.headers,
        }
    }
}

/// Nonces: a random start chosen once per sealer, then a counter.
///
/// Uniqueness under one key. Within a sealer, nonce `n` carries `start + n` (mod 2^64) in its
/// last 8 bytes, and a sealer stops after 2^64 nonces, so its nonces never repeat. Across `s`
/// sealers sharing a key (processes, restarts), each draws its prefix and start at random:
/// - XChaCha20-Poly1305 (24 bytes = 16-byte random prefix + 8-byte counter): two sealers can
///   only collide with equal 128-bit prefixes, probability at most s²/2^129 — for a billion
///   sealers, below 2^-69.
/// - AES-256-GCM (12 bytes = 4-byte random prefix + 8-byte counter): two sealers that each seal
///   at most `m` messages collide only with equal 32-bit prefixes (2^-32) and overlapping counter
///   windows (at most 2m/2^64), so at most s²·m/2^96 over all pairs: 65 536 sealers of 2^32
///   messages each stay below 2^-32. Rotate AES keys well before that; prefer the default cipher.
struct Nonces {
    prefix: [u8; 16],
    start: u64,
    used: AtomicU64,
}

impl Nonces {
    fn new() -> Result<Self, SealError> {
        let mut seed = [0u8; 24];
        getrandom::fill(&mut seed).map_err(|e| SealError::Random(e.to_string()))?;
        let (prefix, start) = seed.split_at(16);
        let mut start_bytes = [0u8; 8];
        start_bytes.copy_from_slice(start);
        let mut prefix_bytes = [0u8; 16];
        prefix_bytes.copy_from_slice(prefix);
        Ok(Self {
            prefix: prefix_bytes,
            start: u64::from_be_bytes(start_bytes),
            used: AtomicU64::new(0),
        })
    }

    /// The next nonce for `cipher`, in the first `len` bytes of the array.
    fn next(&self, cipher: CipherAlgorithm) -> Result<([u8; 24], usize), SealError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed);
        if n == u64::MAX {
            return Err(SealError::NoncesExhausted);
        }
        let counter = self.start.wrapping_add(n).to_be_bytes();
        let mut nonce = [0u8; 24];
        let prefix_len = if cipher == CipherAlgorithm::Aes256Gcm { 4 } else { 16 };
        nonce[..prefix_len].copy_from_slice(&self.prefix[..prefix_len]);
        nonce[prefix_len..prefix_len + 8].copy_from_slice(&counter);
        Ok((nonce, prefix_len + 8))
    }
}

thread_local! {
    /// Reused buffer for associated data.
    static AAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with the associated data of one message.
fn with_aad<R>(flags: Flags, key: KeyId, meta: &Sealing<'_>, f: impl FnOnce(&[u8]) -> R) -> R {
    let write = |aad: &mut Vec<u8>| {
        aad.clear();
        aad.extend_from_slice(AAD_LABEL);
        aad.extend_from_slice(&flags.0.to_be_bytes());
        aad.extend_from_slice(&key.0.to_be_bytes());
        aad.extend_from_slice(&meta.id.0.to_be_bytes());
        aad.extend_from_slice(&meta.timestamp_ms.to_be_bytes());
        // Every variable-length field is length-prefixed, so no two envelopes share an encoding.
        let mut field = |bytes: &[u8]| {
            aad.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            aad.extend_from_slice(bytes);
        };
        field(meta.topic.as_bytes());
        field(&(meta.headers.len() as u64).to_be_bytes());
        for (name, value) in meta.headers.iter() {
            field(name.as_bytes());
            field(value);
        }
    };
    AAD.with(|cell| match cell.try_borrow_mut() {
        Ok(mut aad) => {
            write(&mut aad);
            f(&aad)
        }
        Err(_) => {
            let mut aad = Vec::new();
            write(&mut aad);
            f(&aad)
        }
    })
}

/// The compression and encryption pipeline with its per-topic rules. Shared by every publish
/// and every subscriber of a broker or client.
pub struct Engines {
    compression: Option<Compression>,
    encryption: Option<Encryption>,
    rules: Vec<TopicRule>,
    max_message_bytes: usize,
    nonces: OnceLock<Nonces>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("compression", &self.compression)
            .field("encryption", &self.encryption)
            .field("rules", &self.rules)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl Default for Engines {
    fn default() -> Self {
        Self::new()
    }
}

impl Engines {
    /// A pipeline that does nothing until configured.
    pub fn new() -> Self {
        Self {
            compression: None,
            encryption: None,
            rules: Vec::new(),
            max_message_bytes: Limits::DEFAULT.max_message_bytes,
            nonces: OnceLock::new(),
        }
    }

    /// Sets the default compression.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// Sets the encryption.
    pub fn with_encryption(mut self, encryption: Encryption) -> Self {
        self.encryption = Some(encryption);
        self
    }

    /// Adds a per-topic rule after the existing ones.
    pub fn with_rule(mut self, rule: TopicRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Sets the largest payload `open` will produce.
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Whether sealing can change a payload (any compression, encryption or rule is set).
    pub fn is_active(&self) -> bool {
        self.compression.is_some() || self.encryption.is_some() || !self.rules.is_empty()
    }

    /// The encryption, if configured.
    pub fn encryption(&self) -> Option<&Encryption> {
        self.encryption.as_ref()
    }

    /// Compresses and encrypts `plaintext` as the settings for `meta.topic` say; returns the
    /// flags (with the content bits of `content` kept) and the payload to send.
    ///
    /// # Errors
    /// See [`SealError`].
    pub fn seal(
        &self,
        meta: &Sealing<'_>,
        content: Flags,
        plaintext: Bytes,
    ) -> Result<(Flags, Bytes), SealError> {
        self.seal_in(meta, content, plaintext, Vec::with_capacity)
    }

    /// Seals like [`Engines::seal`], with `buffer` giving the empty buffer an encrypted
    /// payload is written in, given its exact length: where it lives is the caller's choice,
    /// such as an allocation kept from an earlier message.
    ///
    /// # Errors
    /// See [`SealError`].
    pub fn seal_in(
        &self,
        meta: &Sealing<'_>,
        content: Flags,
        plaintext: Bytes,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<(Flags, Bytes), SealError> {
        let rule = self.rules.iter().find(|rule| rule.filter.matches_str(meta.topic));
        let mut flags = content
            .with_compression(CompressionAlgorithm::None)
            .with_cipher(CipherAlgorithm::None)
            .with_key_derived(false);
        let compression = rule.and_then(|r| r.compression).or(self.compression);
        let body = match compression.and_then(|c| c.compress(&plaintext).map(|out| (c, out))) {
            Some((c, compressed)) => {
                flags = flags.with_compression(c.algorithm());
                Bytes::from(compressed)
            }
            None => plaintext,
        };
        let Some(encryption) = &self.encryption else { return Ok((flags, body)) };
        let cipher = rule.and_then(|r| r.cipher).unwrap_or(encryption.cipher);
        let choice = rule.and_then(|r| r.key).unwrap_or(KeyChoice::Current);
        let keyring = &encryption.keyring;
        let (key_id, material, derived) = match choice {
            KeyChoice::Plaintext => return Ok((flags, body)),
            _ if cipher == CipherAlgorithm::None => return Ok((flags, body)),
            KeyChoice::Current => {
                let id = keyring.current().ok_or(SealError::NoKey(None))?;
                (id, keyring.material(id).cloned().ok_or(SealError::NoKey(Some(id)))?, false)
            }
            KeyChoice::Key(id) => {
                (id, keyring.material(id).cloned().ok_or(SealError::NoKey(Some(id)))?, false)
            }
            KeyChoice::DerivedFrom(id) => {
                (id, keyring.derived(id, meta.topic).ok_or(SealError::NoKey(Some(id)))?, true)
            }
        };
        let flags = flags.with_cipher(cipher).with_key_derived(derived);
        let nonces = match self.nonces.get() {
            Some(nonces) => nonces,
            None => {
                let fresh = Nonces::new()?;
                self.nonces.get_or_init(|| fresh)
            }
        };
        let (nonce, nonce_len) = nonces.next(cipher)?;
        let header = KEY_ID_LEN + nonce_len;
        let mut out = buffer(header + body.len() + TAG_LEN);
        out.extend_from_slice(&key_id.0.to_be_bytes());
        out.extend_from_slice(&nonce[..nonce_len]);
        out.extend_from_slice(&body);
        let sealed = with_aad(flags, key_id, meta, |aad| {
            let (key, ciphers) = (&material.key, &material.ciphers);
            aead::encrypt(
                cipher,
                key.bytes(),
                ciphers,
                &nonce[..nonce_len],
                aad,
                &mut out[header..],
            )
        });
        let tag = sealed.ok_or(SealError::Encrypt { len: body.len() })?;
        out.extend_from_slice(&tag);
        Ok((flags, Bytes::from(out)))
    }

    /// Opens an envelope's payload: decrypts and decompresses as its flags say. A payload that
    /// was neither compressed nor encrypted is returned as is, without copying.
    ///
    /// # Errors
    /// See [`OpenError`].
    pub fn open(&self, envelope: &Envelope) -> Result<Bytes, OpenError> {
        let flags = envelope.flags;
        if !flags.is_known() {
            return Err(OpenError::Unsupported { what: "envelope flags" });
        }
        let (Some(cipher), Some(compression)) = (flags.cipher(), flags.compression()) else {
            return Err(OpenError::Unsupported { what: "envelope flags" });
        };
        let max = self.max_message_bytes;
        let decrypted = match cipher {
            CipherAlgorithm::None => None,
            cipher => Some(self.decrypt(cipher, envelope)?),
        };
        let body = decrypted.as_deref().unwrap_or(&envelope.payload);
        let plaintext = match (compression, decrypted.as_ref()) {
            (CompressionAlgorithm::None, None) => envelope.payload.clone(),
            (CompressionAlgorithm::None, Some(_)) => Bytes::from(decrypted.unwrap_or_default()),
            (algorithm, _) => Bytes::from(decompress(algorithm, body, max)?),
        };
        if plaintext.len() > max {
            return Err(OpenError::TooLarge { max });
        }
        Ok(plaintext)
    }

    fn decrypt(&self, cipher: CipherAlgorithm, envelope: &Envelope) -> Result<Vec<u8>, OpenError> {
        let keyring = &self.encryption.as_ref().ok_or(OpenError::NoKeyring)?.keyring;
        let payload = &envelope.payload[..];
        let nonce_len = nonce_len(cipher);
        let need = KEY_ID_LEN + nonce_len + TAG_LEN;
        if payload.len() < need {
            return Err(OpenError::Malformed { len: payload.len(), need });
        }
        let (key_id, rest) = payload.split_at(KEY_ID_LEN);
        let key_id = KeyId(u32::from_be_bytes([key_id[0], key_id[1], key_id[2], key_id[3]]));
        let (nonce, rest) = rest.split_at(nonce_len);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let material = if envelope.flags.key_derived() {
            keyring.derived(key_id, envelope.topic.as_str())
        } else {
            keyring.material(key_id).cloned()
        }
        .ok_or(OpenError::UnknownKeyId(key_id))?;
        let mut buffer = ciphertext.to_vec();
        let meta = Sealing::from(envelope);
        let opened = with_aad(envelope.flags, key_id, &meta, |aad| {
            aead::decrypt(
                cipher,
                material.key.bytes(),
                &material.ciphers,
                nonce,
                aad,
                &mut buffer,
                tag,
            )
        });
        opened.then_some(buffer).ok_or(OpenError::Authentication)
    }
}
