//! Pairwise boxes: a message between devices that know each other's public identities (the
//! chat's direct messages), sealed without an ephemeral key or a signature. A fresh message key
//! encrypts the payload once (XChaCha20-Poly1305, the context as associated data); each
//! recipient's copy of it is wrapped with the *pair key* of sender and recipient — X25519 between
//! their static keys, HKDF-SHA256 — together with the SHA-256 of the encrypted payload, so a
//! recipient (who learns the message key) cannot alter the payload for the others. Pair keys
//! are derived once per peer device and kept ([`PairKeys`]): sealing and opening cost an AEAD
//! and a hash per recipient instead of a Diffie-Hellman and a signature.
//!
//! What it gives up against [`seal_for`](super::seal_for): a recipient can be shown a box as
//! coming from the sender only by the sender's static key, which the recipient's own key also
//! derives — the box proves nothing to a third party (deniable), and a thief of a device's key
//! can make boxes that device accepts as coming from anyone it knows (key-compromise
//! impersonation).

use std::collections::HashMap;

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use super::{
    Draw, Identity, IdentityError, KEY_ID, MAX_RECIPIENTS, NONCE, PublicIdentity, TAG, after_magic,
    decrypt, encrypt, key_id,
};

const MAGIC: &[u8; 4] = b"WSP1";
const PAIR_LABEL: &[u8] = b"whispeer pair key v1";
const WRAP_LABEL: &[u8] = b"whispeer pairwise box v1\0";
/// Most pair keys kept; emptied when full.
const PAIR_KEYS: usize = 4096;

/// The pair keys of one device with the devices it talks to, derived once each.
#[derive(Default)]
pub struct PairKeys {
    keys: HashMap<[u8; 32], Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKeys").field("peers", &self.keys.len()).finish()
    }
}

impl PairKeys {
    /// The key `me` shares with the device whose X25519 key is `peer`.
    fn key(&mut self, me: &Identity, peer: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        if let Some(key) = self.keys.get(peer) {
            return key.clone();
        }
        let mine = me.agreement_public;
        let shared =
            Zeroizing::new(me.agreement.diffie_hellman(&PublicKey::from(*peer)).to_bytes());
        // The same salt on both sides: the two public keys, lower first.
        let (low, high) = if mine <= *peer { (mine, *peer) } else { (*peer, mine) };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&low);
        salt[32..].copy_from_slice(&high);
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = Hkdf::<Sha256>::new(Some(&salt), shared.as_ref()).expand(PAIR_LABEL, key.as_mut());
        if self.keys.len() >= PAIR_KEYS {
            self.keys.clear();
        }
        self.keys.insert(*peer, key.clone());
        key
    }
}

/// What a wrap is bound to: the label, the context, the sender and the recipient.
fn wrap_aad(context: &[u8], sender: &[u8; 32], recipient: &[u8; KEY_ID]) -> Vec<u8> {
    let mut aad = WRAP_LABEL.to_vec();
    aad.extend_from_slice(&(context.len() as u64).to_be_bytes());
    aad.extend_from_slice(context);
    aad.extend_from_slice(sender);
    aad.extend_from_slice(recipient);
    aad
}

/// Seals `plain` from `me` to `recipients` (public identities already checked) for `context`.
///
/// # Errors
/// [`IdentityError::TooManyRecipients`], [`IdentityError::Random`].
pub fn seal_pairwise(
    me: &Identity,
    pairs: &mut PairKeys,
    recipients: &[PublicIdentity],
    context: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    if recipients.len() > MAX_RECIPIENTS {
        return Err(IdentityError::TooManyRecipients(recipients.len()));
    }
    let sender = me.agreement_public;
    let draw = Draw::new(recipients.len() + 1)?;
    let message_key = draw.key();
    let payload_nonce = draw.nonce(recipients.len())?;
    let ciphertext = encrypt(&message_key, &payload_nonce, context, plain)?;
    let mut digest = Sha256::new();
    digest.update(payload_nonce.as_ref());
    digest.update(&ciphertext);
    let digest = digest.finalize();
    let mut wrapped = Zeroizing::new([0u8; 64]);
    wrapped[..32].copy_from_slice(message_key.as_ref());
    wrapped[32..].copy_from_slice(&digest);
    let mut body = Vec::with_capacity(
        4 + 32 + 2 + recipients.len() * (KEY_ID + NONCE + 64 + TAG) + NONCE + 4 + ciphertext.len(),
    );
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&sender);
    body.extend_from_slice(&(recipients.len() as u16).to_be_bytes());
    for (i, recipient) in recipients.iter().enumerate() {
        let key = pairs.key(me, &recipient.x25519);
        let id = key_id(&recipient.x25519);
        let nonce = draw.nonce(i)?;
        body.extend_from_slice(&id);
        body.extend_from_slice(nonce.as_ref());
        body.extend_from_slice(&encrypt(
            &key,
            &nonce,
            &wrap_aad(context, &sender, &id),
            wrapped.as_ref(),
        )?);
    }
    body.extend_from_slice(payload_nonce.as_ref());
    body.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    body.extend_from_slice(&ciphertext);
    Ok(body)
}

/// The X25519 key of a pairwise box's sender (check it is the claimed sender's), without
/// opening it.
///
/// # Errors
/// [`IdentityError::Malformed`].
pub fn pairwise_sender(sealed: &[u8]) -> Result<[u8; 32], IdentityError> {
    after_magic(sealed, MAGIC, "pairwise box")?.array::<32>()
}

/// Opens a box sealed by [`seal_pairwise`] for `context`, on device `me`.
///
/// # Errors
/// [`IdentityError::Malformed`], [`IdentityError::NotForMe`], [`IdentityError::Unopened`]
/// (altered, moved, or another sender).
pub fn open_pairwise(
    me: &Identity,
    pairs: &mut PairKeys,
    sealed: &[u8],
    context: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    let mut reader = after_magic(sealed, MAGIC, "pairwise box")?;
    let sender = reader.array::<32>()?;
    let count = u16::from_be_bytes(reader.array::<2>()?) as usize;
    let mine = key_id(&me.agreement_public);
    let mut candidates = Vec::new();
    for _ in 0..count {
        let id = reader.array::<KEY_ID>()?;
        let nonce = reader.take(NONCE)?;
        let wrap = reader.take(64 + TAG)?;
        if id == mine {
            candidates.push((id, nonce, wrap));
        }
    }
    let payload_nonce = reader.take(NONCE)?;
    let length = u32::from_be_bytes(reader.array::<4>()?) as usize;
    let ciphertext = reader.take(length)?;
    if !reader.0.is_empty() {
        return Err(IdentityError::Malformed("pairwise box"));
    }
    if candidates.is_empty() {
        return Err(IdentityError::NotForMe);
    }
    let mut digest = Sha256::new();
    digest.update(payload_nonce);
    digest.update(ciphertext);
    let digest = digest.finalize();
    let key = pairs.key(me, &sender);
    for (id, nonce, wrap) in candidates {
        let Ok(opened) = decrypt(&key, nonce, &wrap_aad(context, &sender, &id), wrap) else {
            continue;
        };
        let opened = Zeroizing::new(opened);
        if opened[32..] != digest[..] {
            return Err(IdentityError::Unopened);
        }
        let mut message_key = Zeroizing::new([0u8; 32]);
        message_key.copy_from_slice(&opened[..32]);
        return decrypt(&message_key, payload_nonce, context, ciphertext);
    }
    Err(IdentityError::Unopened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::device;

    #[test]
    fn each_recipient_opens_and_nothing_moved_or_altered_does() {
        let (alice, alice_pub) = device("laptop");
        let (bob, bob_pub) = device("phone");
        let (carol, _) = device("phone");
        let mut pairs = PairKeys::default();
        let sealed =
            seal_pairwise(&alice, &mut pairs, &[bob_pub, alice_pub.clone()], b"a->b", b"hi")
                .unwrap();
        assert_eq!(pairwise_sender(&sealed).unwrap(), alice_pub.x25519);
        for me in [&bob, &alice] {
            let opened = open_pairwise(me, &mut PairKeys::default(), &sealed, b"a->b").unwrap();
            assert_eq!(opened, b"hi");
        }
        let mut carols = PairKeys::default();
        assert_eq!(
            open_pairwise(&carol, &mut carols, &sealed, b"a->b"),
            Err(IdentityError::NotForMe)
        );
        let mut bobs = PairKeys::default();
        assert_eq!(open_pairwise(&bob, &mut bobs, &sealed, b"a->c"), Err(IdentityError::Unopened));
        for at in [40, 60, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[at] ^= 1;
            assert!(open_pairwise(&bob, &mut bobs, &altered, b"a->b").is_err(), "byte {at}");
        }
        // Claiming another sender's key: the pair key differs, nothing opens.
        let mut moved = sealed.clone();
        moved[4..36].copy_from_slice(&carol.public("x").x25519);
        assert_eq!(open_pairwise(&bob, &mut bobs, &moved, b"a->b"), Err(IdentityError::Unopened));
        assert!(open_pairwise(&bob, &mut bobs, &sealed[..sealed.len() - 1], b"a->b").is_err());
    }

    #[test]
    fn a_recipient_cannot_swap_the_payload_for_the_others() {
        let (alice, _) = device("laptop");
        let (bob, bob_pub) = device("phone");
        let (carol, carol_pub) = device("phone");
        let sealed =
            seal_pairwise(&alice, &mut PairKeys::default(), &[bob_pub, carol_pub], b"g", b"pay 1")
                .unwrap();
        // Bob unwraps his copy of the message key (as his client does) and re-encrypts another
        // payload with it, keeping every wrap.
        let sender = pairwise_sender(&sealed).unwrap();
        let key = PairKeys::default().key(&bob, &sender);
        let wrap_at = 4 + 32 + 2;
        let id: [u8; KEY_ID] = sealed[wrap_at..wrap_at + KEY_ID].try_into().unwrap();
        let nonce = &sealed[wrap_at + KEY_ID..wrap_at + KEY_ID + NONCE];
        let wrap = &sealed[wrap_at + KEY_ID + NONCE..wrap_at + KEY_ID + NONCE + 64 + TAG];
        let opened = decrypt(&key, nonce, &wrap_aad(b"g", &sender, &id), wrap).unwrap();
        let mut message_key = [0u8; 32];
        message_key.copy_from_slice(&opened[..32]);
        let payload_at = wrap_at + 2 * (KEY_ID + NONCE + 64 + TAG);
        let payload_nonce = [7u8; NONCE];
        let forged = encrypt(&message_key, &payload_nonce, b"g", b"pay 1000").unwrap();
        let mut swapped = sealed[..payload_at].to_vec();
        swapped.extend_from_slice(&payload_nonce);
        swapped.extend_from_slice(&(forged.len() as u32).to_be_bytes());
        swapped.extend_from_slice(&forged);
        let mut carols = PairKeys::default();
        assert_eq!(
            open_pairwise(&carol, &mut carols, &swapped, b"g"),
            Err(IdentityError::Unopened)
        );
        assert_eq!(open_pairwise(&carol, &mut carols, &sealed, b"g").unwrap(), b"pay 1");
    }
}
