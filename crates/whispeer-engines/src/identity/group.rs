//! Group keys: a symmetric key per group and epoch, made by the group's owner or an admin and
//! sealed to every member's devices with [`seal_for`](super::seal_for); a new epoch when a
//! member leaves or is removed, sealed only to those who stay, so the removed member cannot open
//! what is sent afterwards (what it had stays readable to it: its keys of old epochs). A group
//! message is encrypted once with the epoch's key (XChaCha20-Poly1305, the context as associated
//! data) and signed by its sender's Ed25519 key, so one member cannot write as another.

use ed25519_dalek::{Signature, Signer, Verifier};
use zeroize::Zeroizing;

use super::{
    Identity, IdentityError, NONCE, Reader, decrypt, encrypt, random, signed_with, verifying_key,
};

const MAGIC: &[u8; 4] = b"WSG1";

/// One epoch's key of a group.
#[derive(Clone)]
pub struct GroupKey {
    /// Which key: every group message names the epoch it was sealed with.
    pub epoch: u32,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupKey").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl GroupKey {
    /// A new random key for `epoch`.
    ///
    /// # Errors
    /// [`IdentityError::Random`].
    pub fn generate(epoch: u32) -> Result<Self, IdentityError> {
        Ok(Self { epoch, key: random::<32>()? })
    }

    /// The key as 36 bytes (epoch, then key), to seal to members with `seal_for`.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(36));
        bytes.extend_from_slice(&self.epoch.to_be_bytes());
        bytes.extend_from_slice(self.key.as_ref());
        bytes
    }

    /// Reads [`to_bytes`](Self::to_bytes)'s form.
    ///
    /// # Errors
    /// [`IdentityError::Malformed`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() != 36 {
            return Err(IdentityError::Malformed("group key"));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes[4..]);
        let epoch = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        Ok(Self { epoch, key })
    }
}

const LABEL: &[u8] = b"whispeer group message v1\0";

/// Seals `plain` with the group `key` for `context`, signed by `sender`.
///
/// # Errors
/// [`IdentityError::Random`].
pub fn seal_group(
    sender: &Identity,
    key: &GroupKey,
    context: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    let nonce = random::<NONCE>()?;
    let ciphertext = encrypt(&key.key, &nonce, context, plain)?;
    let mut body = Vec::with_capacity(4 + 4 + 32 + NONCE + ciphertext.len() + 64);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&key.epoch.to_be_bytes());
    body.extend_from_slice(&sender.signing.verifying_key().to_bytes());
    body.extend_from_slice(nonce.as_ref());
    body.extend_from_slice(&ciphertext);
    let signature = sender.signing.sign(&signed_with(LABEL, context, &body));
    body.extend_from_slice(&signature.to_bytes());
    Ok(body)
}

/// The epoch and the signing key of a group message, without opening it.
///
/// # Errors
/// [`IdentityError::Malformed`].
pub fn group_sealed_by(sealed: &[u8]) -> Result<(u32, [u8; 32]), IdentityError> {
    let mut reader = Reader(sealed);
    if reader.take(4)? != MAGIC {
        return Err(IdentityError::Malformed("group message"));
    }
    let epoch = u32::from_be_bytes(reader.array::<4>()?);
    Ok((epoch, reader.array::<32>()?))
}

/// Opens a group message with `key` (its epoch's), for `context`; with `sender`, it must be
/// signed by that key.
///
/// # Errors
/// [`IdentityError::Malformed`], [`IdentityError::NotForMe`] (another epoch),
/// [`IdentityError::WrongSender`], [`IdentityError::BadSignature`], [`IdentityError::Unopened`].
pub fn open_group(
    key: &GroupKey,
    sealed: &[u8],
    context: &[u8],
    sender: Option<&[u8; 32]>,
) -> Result<Vec<u8>, IdentityError> {
    let signed_len =
        sealed.len().checked_sub(64).ok_or(IdentityError::Malformed("group message"))?;
    let (body, signature) = sealed.split_at(signed_len);
    let (epoch, signer) = group_sealed_by(body)?;
    if epoch != key.epoch {
        return Err(IdentityError::NotForMe);
    }
    if sender.is_some_and(|expected| *expected != signer) {
        return Err(IdentityError::WrongSender);
    }
    let verifying = verifying_key(&signer).ok_or(IdentityError::BadSignature)?;
    let signature = Signature::from_slice(signature).map_err(|_| IdentityError::BadSignature)?;
    verifying
        .verify(&signed_with(LABEL, context, body), &signature)
        .map_err(|_| IdentityError::BadSignature)?;
    let mut reader = Reader(&body[4 + 4 + 32..]);
    let nonce = reader.take(NONCE)?;
    decrypt(&key.key, nonce, context, reader.0)
}
