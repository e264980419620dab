//! End-to-end keys without a shared secret: each device's [`Identity`] (an X25519 key pair for
//! sealing to it, an Ed25519 key pair for signing), its [`PublicIdentity`] (the public halves,
//! the X25519 key signed by the Ed25519 one, for a directory), a fingerprint people compare, and
//! [`seal_for`] / [`open_sealed`]: a fresh message key encrypts the payload once, and is wrapped
//! for each recipient device with X25519 (an ephemeral key per message) + HKDF-SHA256 +
//! XChaCha20-Poly1305 — the engines' AEAD. The sender signs the whole sealed box and the
//! context it was sealed for (who sends, to whom, on which topic), so a box moved to another
//! context or another sender does not open.
//!
//! Between devices that know each other, [`seal_pairwise`] seals without an ephemeral key or a
//! signature (pair keys derived once; the chat's direct messages); [`ChatKeys`] is one chat
//! device's state over both.
//!
//! Out of scope here: forward secrecy per message (a stolen device key opens what was sealed to
//! it), and deniability of signed boxes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use whispeer_proto::CipherAlgorithm;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::aead::{self, Ciphers};

/// Why an identity or a sealed box could not be made, read or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    /// No entropy from the platform.
    #[error("no random bytes: {0}")]
    Random(String),
    /// Text or bytes that are not an identity, a public identity or a sealed box.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A public identity whose X25519 key is not signed by its Ed25519 key.
    #[error("the public identity's signature does not verify")]
    BadIdentity,
    /// More recipients than a box may have.
    #[error("{0} recipients; a sealed box takes at most {MAX_RECIPIENTS}")]
    TooManyRecipients(usize),
    /// The box's signature does not verify for its context: altered, moved, or forged.
    #[error("the sealed box's signature does not verify (altered, or sealed for another context)")]
    BadSignature,
    /// The box was signed by another key than the expected sender's.
    #[error("the sealed box was signed by another key than the sender's")]
    WrongSender,
    /// Nothing in the box is wrapped for this device.
    #[error("the sealed box is not for this device")]
    NotForMe,
    /// A key or the payload did not decrypt.
    #[error("the sealed box does not open")]
    Unopened,
}

/// Most recipient devices of one box.
pub const MAX_RECIPIENTS: usize = 1024;
const MAGIC: &[u8; 4] = b"WSB1";
const BOX_LABEL: &[u8] = b"whispeer sealed box v1\0";
const IDENTITY_PREFIX: &str = "whispeer-identity-v1:";
const NONCE: usize = 24;
const TAG: usize = 16;
const WRAPPED: usize = 32 + TAG;
const KEY_ID: usize = 8;
const XCHACHA: CipherAlgorithm = CipherAlgorithm::XChaCha20Poly1305;

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, IdentityError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    getrandom::fill(bytes.as_mut()).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(bytes)
}

/// Signing keys decompressed lately on this thread, by their bytes (a group's senders, a
/// conversation's devices); emptied when full.
const VERIFYING_KEYS: usize = 64;

thread_local! {
    static DECOMPRESSED: std::cell::RefCell<std::collections::HashMap<[u8; 32], VerifyingKey>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The Ed25519 key of `bytes`, decompressed (a square root, about a tenth of a verification),
/// or from those this thread decompressed lately. `None` for bytes that are no point.
fn verifying_key(bytes: &[u8; 32]) -> Option<VerifyingKey> {
    let kept = DECOMPRESSED.try_with(|keys| keys.try_borrow().ok()?.get(bytes).copied());
    if let Ok(Some(key)) = kept {
        return Some(key);
    }
    let key = VerifyingKey::from_bytes(bytes).ok()?;
    let _ = DECOMPRESSED.try_with(|keys| {
        if let Ok(mut keys) = keys.try_borrow_mut() {
            if keys.len() >= VERIFYING_KEYS {
                keys.clear();
            }
            keys.insert(*bytes, key);
        }
    });
    Some(key)
}

/// What one box draws at random: a message key, then a nonce for each of `nonces`, from one
/// call to the operating system (a system call each cost several µs of a direct message's
/// sealing on a virtual machine).
struct Draw(Zeroizing<Vec<u8>>);

impl Draw {
    fn new(nonces: usize) -> Result<Self, IdentityError> {
        let mut bytes = Zeroizing::new(vec![0u8; 32 + NONCE * nonces]);
        getrandom::fill(bytes.as_mut()).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// The message key.
    fn key(&self) -> Zeroizing<[u8; 32]> {
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&self.0[..32]);
        key
    }

    /// Nonce `i` of those drawn; an error past them (never a nonce not drawn).
    fn nonce(&self, i: usize) -> Result<[u8; NONCE], IdentityError> {
        let drawn = self
            .0
            .get(32 + NONCE * i..32 + NONCE * (i + 1))
            .ok_or_else(|| IdentityError::Random(format!("nonce {i} was not drawn")))?;
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(drawn);
        Ok(nonce)
    }
}

/// A device's secret keys. Kept by its owner only (a file for the CLI, the browser's storage
/// for the WASM client); the crates zeroize them when dropped.
pub struct Identity {
    agreement: StaticSecret,
    /// `agreement`'s public key, derived once (a scalar multiplication).
    agreement_public: [u8; 32],
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.public("").fingerprint()).finish()
    }
}

impl Identity {
    /// A new identity from the platform's entropy.
    ///
    /// # Errors
    /// [`IdentityError::Random`] without entropy.
    pub fn generate() -> Result<Self, IdentityError> {
        let (agreement, signing) = (random::<32>()?, random::<32>()?);
        Ok(Self::from_secrets(StaticSecret::from(*agreement), SigningKey::from_bytes(&signing)))
    }

    /// The identity's text form (a secret: store it like a password).
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new([0u8; 64]);
        bytes[..32].copy_from_slice(self.agreement.as_bytes());
        bytes[32..].copy_from_slice(self.signing.as_bytes());
        Zeroizing::new(format!("{IDENTITY_PREFIX}{}", B64.encode(bytes.as_ref())))
    }

    /// Reads [`to_text`](Self::to_text)'s form (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`IdentityError::Malformed`].
    pub fn from_text(text: &str) -> Result<Self, IdentityError> {
        let encoded = text
            .trim()
            .strip_prefix(IDENTITY_PREFIX)
            .ok_or(IdentityError::Malformed("identity"))?;
        let bytes =
            Zeroizing::new(B64.decode(encoded).map_err(|_| IdentityError::Malformed("identity"))?);
        if bytes.len() != 64 {
            return Err(IdentityError::Malformed("identity"));
        }
        let mut agreement = Zeroizing::new([0u8; 32]);
        let mut signing = Zeroizing::new([0u8; 32]);
        agreement.copy_from_slice(&bytes[..32]);
        signing.copy_from_slice(&bytes[32..]);
        Ok(Self::from_secrets(StaticSecret::from(*agreement), SigningKey::from_bytes(&signing)))
    }

    fn from_secrets(agreement: StaticSecret, signing: SigningKey) -> Self {
        let agreement_public = PublicKey::from(&agreement).to_bytes();
        Self { agreement, agreement_public, signing }
    }

    /// The public identity of this device, named `device`, signed.
    pub fn public(&self, device: &str) -> PublicIdentity {
        let x25519 = self.agreement_public;
        let ed25519 = self.signing.verifying_key().to_bytes();
        let signature = self.signing.sign(&identity_statement(device, &x25519)).to_bytes();
        PublicIdentity { device: device.to_string(), x25519, ed25519, signature }
    }
}

fn identity_statement(device: &str, x25519: &[u8; 32]) -> Vec<u8> {
    let mut statement = b"whispeer identity v1\0".to_vec();
    statement.extend_from_slice(device.as_bytes());
    statement.push(0);
    statement.extend_from_slice(x25519);
    statement
}

/// What a directory holds for one device: its name, its X25519 key (signed) and its Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicIdentity {
    /// The device's name.
    pub device: String,
    /// The key boxes are sealed to.
    pub x25519: [u8; 32],
    /// The key the device signs with; its fingerprint is what people compare.
    pub ed25519: [u8; 32],
    /// The Ed25519 key's signature of the device name and the X25519 key.
    pub signature: [u8; 64],
}

impl PublicIdentity {
    /// Whether the X25519 key is the Ed25519 key's (the signature verifies).
    pub fn verify(&self) -> Result<(), IdentityError> {
        let key =
            VerifyingKey::from_bytes(&self.ed25519).map_err(|_| IdentityError::BadIdentity)?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify(&identity_statement(&self.device, &self.x25519), &signature)
            .map_err(|_| IdentityError::BadIdentity)
    }

    /// The fingerprint of the signing key: 60 digits in 12 groups, for people to compare (a
    /// "safety number"). A changed key gives another fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.ed25519)
    }

    /// The text form, `<device>:<base64url of x25519, ed25519, signature>`.
    pub fn to_text(&self) -> String {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&self.x25519);
        bytes.extend_from_slice(&self.ed25519);
        bytes.extend_from_slice(&self.signature);
        format!("{}:{}", self.device, B64.encode(bytes))
    }

    /// Reads [`to_text`](Self::to_text)'s form and checks the signature.
    ///
    /// # Errors
    /// [`IdentityError::Malformed`], [`IdentityError::BadIdentity`].
    pub fn from_text(text: &str) -> Result<Self, IdentityError> {
        let (device, encoded) =
            text.trim().rsplit_once(':').ok_or(IdentityError::Malformed("public identity"))?;
        let bytes = B64.decode(encoded).map_err(|_| IdentityError::Malformed("public identity"))?;
        if bytes.len() != 128 || device.is_empty() || device.len() > 64 {
            return Err(IdentityError::Malformed("public identity"));
        }
        let mut identity = Self {
            device: device.to_string(),
            x25519: [0; 32],
            ed25519: [0; 32],
            signature: [0; 64],
        };
        identity.x25519.copy_from_slice(&bytes[..32]);
        identity.ed25519.copy_from_slice(&bytes[32..64]);
        identity.signature.copy_from_slice(&bytes[64..]);
        identity.verify()?;
        Ok(identity)
    }

    fn key_id(&self) -> [u8; KEY_ID] {
        key_id(&self.x25519)
    }
}

/// 60 digits in 12 groups of 5 from SHA-256 of a signing key.
pub fn fingerprint_of(ed25519: &[u8; 32]) -> String {
    let digest =
        Sha256::new_with_prefix(b"whispeer fingerprint v1\0").chain_update(ed25519).finalize();
    // Group i: 24 bits (bytes 2i, 2i + 1 and 24 + i mod 8), shown as 5 digits.
    let groups: Vec<String> = (0..12)
        .map(|i| {
            let bits = u32::from(digest[2 * i]) << 16
                | u32::from(digest[2 * i + 1]) << 8
                | u32::from(digest[24 + i % 8]);
            format!("{:05}", bits % 100_000)
        })
        .collect();
    groups.join(" ")
}

fn key_id(x25519: &[u8; 32]) -> [u8; KEY_ID] {
    let digest = Sha256::digest(x25519);
    let mut id = [0u8; KEY_ID];
    id.copy_from_slice(&digest[..KEY_ID]);
    id
}

/// The key that wraps the message key for one recipient.
fn wrap_key(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(b"whispeer sealed box v1 wrap", key.as_mut());
    key
}

/// What the sender signs: a label naming the kind of box, the context, then the box up to its
/// signature.
fn signed_with(label: &[u8], context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut message = label.to_vec();
    message.extend_from_slice(&(context.len() as u64).to_be_bytes());
    message.extend_from_slice(context);
    message.extend_from_slice(body);
    message
}

fn encrypt(
    key: &[u8; 32],
    nonce: &[u8; NONCE],
    aad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    let mut buffer = plain.to_vec();
    let tag = aead::encrypt(XCHACHA, key, &Ciphers::default(), nonce, aad, &mut buffer)
        .ok_or(IdentityError::Unopened)?;
    buffer.extend_from_slice(&tag);
    Ok(buffer)
}

fn decrypt(
    key: &[u8; 32],
    nonce: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    let split = sealed.len().checked_sub(TAG).ok_or(IdentityError::Unopened)?;
    let (body, tag) = sealed.split_at(split);
    let mut buffer = body.to_vec();
    if aead::decrypt(XCHACHA, key, &Ciphers::default(), nonce, aad, &mut buffer, tag) {
        Ok(buffer)
    } else {
        Err(IdentityError::Unopened)
    }
}

/// Seals `plain` so that only `recipients` open it, signed by `sender`, for `context` (bytes
/// naming what the box is for — sender, recipient or group, topic; [`open_sealed`] needs the
/// same). The sender's own other devices belong among the recipients.
///
/// # Errors
/// [`IdentityError::TooManyRecipients`], [`IdentityError::BadIdentity`] for a recipient whose
/// signature does not verify, [`IdentityError::Random`].
pub fn seal_for(
    sender: &Identity,
    recipients: &[PublicIdentity],
    context: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    for recipient in recipients {
        recipient.verify()?;
    }
    seal_for_verified(sender, recipients, context, plain)
}

/// [`seal_for`] to recipients whose signatures were checked already (an Ed25519 verification
/// each: the larger part of sealing's cost per device).
pub(crate) fn seal_for_verified(
    sender: &Identity,
    recipients: &[PublicIdentity],
    context: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    if recipients.len() > MAX_RECIPIENTS {
        return Err(IdentityError::TooManyRecipients(recipients.len()));
    }
    let draw = Draw::new(recipients.len() + 1)?;
    let message_key = draw.key();
    let ephemeral = StaticSecret::from(*random::<32>()?);
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let mut body =
        Vec::with_capacity(4 + 64 + 2 + recipients.len() * 80 + NONCE + 4 + plain.len() + TAG);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&sender.signing.verifying_key().to_bytes());
    body.extend_from_slice(&ephemeral_public);
    body.extend_from_slice(&(recipients.len() as u16).to_be_bytes());
    for (i, recipient) in recipients.iter().enumerate() {
        let shared =
            Zeroizing::new(ephemeral.diffie_hellman(&PublicKey::from(recipient.x25519)).to_bytes());
        let wrap = wrap_key(&shared, &ephemeral_public, &recipient.x25519);
        let nonce = draw.nonce(i)?;
        body.extend_from_slice(&recipient.key_id());
        body.extend_from_slice(nonce.as_ref());
        body.extend_from_slice(&encrypt(&wrap, &nonce, context, message_key.as_ref())?);
    }
    let nonce = draw.nonce(recipients.len())?;
    let ciphertext = encrypt(&message_key, &nonce, context, plain)?;
    body.extend_from_slice(nonce.as_ref());
    body.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    body.extend_from_slice(&ciphertext);
    let signature = sender.signing.sign(&signed_with(BOX_LABEL, context, &body));
    body.extend_from_slice(&signature.to_bytes());
    Ok(body)
}

/// A bounds-checked reader over a sealed box.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IdentityError> {
        if self.0.len() < n {
            return Err(IdentityError::Malformed("sealed box"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], IdentityError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

/// The Ed25519 key that signed a sealed box (check it against the sender's directory entry),
/// without opening it.
///
/// # Errors
/// [`IdentityError::Malformed`].
pub fn sealed_sender(sealed: &[u8]) -> Result<[u8; 32], IdentityError> {
    after_magic(sealed, MAGIC, "sealed box")?.array::<32>()
}

/// A reader past the four bytes that name the kind of box (`what`, in errors).
fn after_magic<'a>(
    sealed: &'a [u8],
    magic: &[u8; 4],
    what: &'static str,
) -> Result<Reader<'a>, IdentityError> {
    let mut reader = Reader(sealed);
    if reader.take(4).map_err(|_| IdentityError::Malformed(what))? != magic {
        return Err(IdentityError::Malformed(what));
    }
    Ok(reader)
}

/// Opens a box sealed by [`seal_for`] for `context`, on device `me`. With `sender`, the box
/// must be signed by that Ed25519 key (the sender's, from the directory).
///
/// # Errors
/// [`IdentityError::Malformed`], [`IdentityError::BadSignature`],
/// [`IdentityError::WrongSender`], [`IdentityError::NotForMe`], [`IdentityError::Unopened`].
pub fn open_sealed(
    me: &Identity,
    sealed: &[u8],
    context: &[u8],
    sender: Option<&[u8; 32]>,
) -> Result<Vec<u8>, IdentityError> {
    let signed_len = sealed.len().checked_sub(64).ok_or(IdentityError::Malformed("sealed box"))?;
    let (body, signature) = sealed.split_at(signed_len);
    let mut reader = Reader(body);
    if reader.take(4)? != MAGIC {
        return Err(IdentityError::Malformed("sealed box"));
    }
    let signer = reader.array::<32>()?;
    if sender.is_some_and(|expected| *expected != signer) {
        return Err(IdentityError::WrongSender);
    }
    let key = verifying_key(&signer).ok_or(IdentityError::BadSignature)?;
    let signature = Signature::from_slice(signature).map_err(|_| IdentityError::BadSignature)?;
    key.verify(&signed_with(BOX_LABEL, context, body), &signature)
        .map_err(|_| IdentityError::BadSignature)?;
    let ephemeral = reader.array::<32>()?;
    let count = usize::from(u16::from_be_bytes(reader.array::<2>()?));
    if count > MAX_RECIPIENTS {
        return Err(IdentityError::TooManyRecipients(count));
    }
    let mine = me.agreement_public;
    let my_id = key_id(&mine);
    let mut message_key = None;
    for _ in 0..count {
        let id = reader.take(KEY_ID)?;
        let nonce = reader.take(NONCE)?;
        let wrapped = reader.take(WRAPPED)?;
        if id != my_id || message_key.is_some() {
            continue;
        }
        let shared =
            Zeroizing::new(me.agreement.diffie_hellman(&PublicKey::from(ephemeral)).to_bytes());
        let wrap = wrap_key(&shared, &ephemeral, &mine);
        let key = Zeroizing::new(decrypt(&wrap, nonce, context, wrapped)?);
        let mut fixed = Zeroizing::new([0u8; 32]);
        if key.len() != 32 {
            return Err(IdentityError::Unopened);
        }
        fixed.copy_from_slice(&key);
        message_key = Some(fixed);
    }
    let message_key = message_key.ok_or(IdentityError::NotForMe)?;
    let nonce = reader.take(NONCE)?;
    let len = u32::from_be_bytes(reader.array::<4>()?) as usize;
    let ciphertext = reader.take(len)?;
    if !reader.0.is_empty() {
        return Err(IdentityError::Malformed("sealed box"));
    }
    decrypt(&message_key, nonce, context, ciphertext)
}

mod chat;
mod group;
mod pairwise;
mod policy;

pub use chat::{ChatKeys, ChatKeysError, KeyChange, Opened, is_sealed};
pub use group::{GroupKey, group_sealed_by, open_group, seal_group};
pub use pairwise::{PairKeys, open_pairwise, pairwise_sender, seal_pairwise};
pub use policy::{
    BundleRead, DIRECTORY, PolicyError, PolicyKeys, directory_filter, directory_topic, policy_topic,
};

#[cfg(test)]
mod chat_tests;
#[cfg(test)]
mod tests;
