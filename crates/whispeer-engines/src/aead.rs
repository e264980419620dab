//! The two AEADs behind one interface, with two wire-identical backends.
//!
//! - Feature `ring` (default, native): ring's assembly for ChaCha20-Poly1305 and AES-256-GCM,
//!   which picks AVX2/AES-NI at run time. XChaCha20-Poly1305 is built from it as the XChaCha
//!   draft defines it: the subkey is HChaCha20(key, nonce[0..16]) (RustCrypto's `hchacha`), and
//!   ChaCha20-Poly1305 runs under that subkey with nonce `0000 || nonce[16..24]`.
//! - Otherwise (and in wasm32): RustCrypto's `chacha20poly1305` and `aes-gcm`, pure Rust.
//!
//! RustCrypto's SIMD backends lose most of their speed unless the whole program is built with
//! `-C target-cpu` set (their intrinsics are not inlined under run-time detection): about 2 µs
//! per 128-byte XChaCha message here, against well under 1 µs with ring. A library cannot choose
//! its users' compiler flags, hence the ring backend. A test checks both backends agree byte
//! for byte.

use std::sync::OnceLock;

use whispeer_proto::CipherAlgorithm;

/// Authentication tag length of both ciphers.
pub(crate) const TAG_LEN: usize = 16;

/// Nonce length of a cipher.
pub(crate) fn nonce_len(cipher: CipherAlgorithm) -> usize {
    if cipher == CipherAlgorithm::Aes256Gcm { 12 } else { 24 }
}

#[cfg(feature = "ring")]
mod backend {
    use chacha20::{R20, hchacha};
    use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
    use zeroize::{Zeroize, Zeroizing};

    use super::{Key, OnceLock, TAG_LEN};

    /// Cipher state kept per key: the AES key schedule. ChaCha needs none (its subkey changes
    /// with every nonce).
    #[derive(Default)]
    pub(crate) struct Ciphers {
        aes: OnceLock<Option<LessSafeKey>>,
    }

    fn aes<'a>(key: &Key, ciphers: &'a Ciphers) -> Option<&'a LessSafeKey> {
        let built = ciphers
            .aes
            .get_or_init(|| UnboundKey::new(&AES_256_GCM, key).ok().map(LessSafeKey::new));
        built.as_ref()
    }

    /// The ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 reduces to.
    fn xchacha(key: &Key, nonce: &[u8]) -> Option<(LessSafeKey, Nonce)> {
        let (prefix, suffix) = nonce.split_at_checked(16)?;
        let prefix = <&chacha20::cipher::Array<u8, _>>::try_from(prefix).ok()?;
        let mut raw: [u8; 32] = hchacha::<R20>(key.into(), prefix).into();
        let subkey = Zeroizing::new(raw);
        raw.zeroize();
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).ok()?;
        let mut inner = [0u8; 12];
        inner[4..].copy_from_slice(suffix);
        Some((LessSafeKey::new(unbound), Nonce::assume_unique_for_key(inner)))
    }

    fn aes_nonce(nonce: &[u8]) -> Option<Nonce> {
        Nonce::try_assume_unique_for_key(nonce).ok()
    }

    pub(crate) fn encrypt_xchacha(
        key: &Key,
        _ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let (key, nonce) = xchacha(key, nonce)?;
        let tag = key.seal_in_place_separate_tag(nonce, Aad::from(aad), buffer).ok()?;
        tag.as_ref().try_into().ok()
    }

    pub(crate) fn decrypt_xchacha(
        key: &Key,
        _ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let (Some((key, nonce)), Ok(tag)) = (xchacha(key, nonce), Tag::try_from(tag)) else {
            return false;
        };
        key.open_in_place_separate_tag(nonce, Aad::from(aad), tag, buffer, 0..).is_ok()
    }

    pub(crate) fn encrypt_aes(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let tag = aes(key, ciphers)?
            .seal_in_place_separate_tag(aes_nonce(nonce)?, Aad::from(aad), buffer)
            .ok()?;
        tag.as_ref().try_into().ok()
    }

    pub(crate) fn decrypt_aes(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let (Some(cipher), Some(nonce), Ok(tag)) =
            (aes(key, ciphers), aes_nonce(nonce), Tag::try_from(tag))
        else {
            return false;
        };
        cipher.open_in_place_separate_tag(nonce, Aad::from(aad), tag, buffer, 0..).is_ok()
    }
}

#[cfg(not(feature = "ring"))]
mod backend {
    use aes_gcm::Aes256Gcm;
    use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305};

    use super::{Key, OnceLock, TAG_LEN};

    /// Cipher instances kept per key.
    #[derive(Default)]
    pub(crate) struct Ciphers {
        xchacha: OnceLock<XChaCha20Poly1305>,
        aes: OnceLock<Aes256Gcm>,
    }

    fn tag_array(tag: &[u8]) -> Option<[u8; TAG_LEN]> {
        tag.try_into().ok()
    }

    pub(crate) fn encrypt_xchacha(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let cipher = ciphers.xchacha.get_or_init(|| XChaCha20Poly1305::new(key.into()));
        let nonce = <&chacha20poly1305::XNonce>::try_from(nonce).ok()?;
        tag_array(&cipher.encrypt_inout_detached(nonce, aad, buffer.into()).ok()?)
    }

    pub(crate) fn decrypt_xchacha(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let cipher = ciphers.xchacha.get_or_init(|| XChaCha20Poly1305::new(key.into()));
        let (Ok(nonce), Ok(tag)) =
            (<&chacha20poly1305::XNonce>::try_from(nonce), <&chacha20poly1305::Tag>::try_from(tag))
        else {
            return false;
        };
        cipher.decrypt_inout_detached(nonce, aad, buffer.into(), tag).is_ok()
    }

    pub(crate) fn encrypt_aes(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let cipher = ciphers.aes.get_or_init(|| Aes256Gcm::new(key.into()));
        let nonce = <&aes_gcm::Nonce<aes_gcm::aead::consts::U12>>::try_from(nonce).ok()?;
        tag_array(&cipher.encrypt_inout_detached(nonce, aad, buffer.into()).ok()?)
    }

    pub(crate) fn decrypt_aes(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let cipher = ciphers.aes.get_or_init(|| Aes256Gcm::new(key.into()));
        let (Ok(nonce), Ok(tag)) = (
            <&aes_gcm::Nonce<aes_gcm::aead::consts::U12>>::try_from(nonce),
            <&aes_gcm::Tag>::try_from(tag),
        ) else {
            return false;
        };
        cipher.decrypt_inout_detached(nonce, aad, buffer.into(), tag).is_ok()
    }
}

pub(crate) use backend::Ciphers;

/// A 256-bit key's bytes (the keyring's `Key` hands them out; the ciphers need nothing else).
pub(crate) type Key = [u8; 32];

/// Encrypts `buffer` in place; returns the tag, or `None` if the cipher refused.
pub(crate) fn encrypt(
    cipher: CipherAlgorithm,
    key: &Key,
    ciphers: &Ciphers,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut [u8],
) -> Option<[u8; TAG_LEN]> {
    match cipher {
        CipherAlgorithm::XChaCha20Poly1305 => {
            backend::encrypt_xchacha(key, ciphers, nonce, aad, buffer)
        }
        CipherAlgorithm::Aes256Gcm => backend::encrypt_aes(key, ciphers, nonce, aad, buffer),
        _ => None,
    }
}

/// Decrypts `buffer` in place; returns whether the tag verified.
pub(crate) fn decrypt(
    cipher: CipherAlgorithm,
    key: &Key,
    ciphers: &Ciphers,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut [u8],
    tag: &[u8],
) -> bool {
    match cipher {
        CipherAlgorithm::XChaCha20Poly1305 => {
            backend::decrypt_xchacha(key, ciphers, nonce, aad, buffer, tag)
        }
        CipherAlgorithm::Aes256Gcm => backend::decrypt_aes(key, ciphers, nonce, aad, buffer, tag),
        _ => false,
    }
}

/// The ring backend must produce exactly what RustCrypto produces, and open what it seals.
#[cfg(all(test, feature = "ring"))]
mod tests {
    use aes_gcm::Aes256Gcm;
    use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn ring_and_rustcrypto_agree(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 24]>(),
            aad in prop::collection::vec(any::<u8>(), 0..64),
            plaintext in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let ring_key: Key = key;
            let ciphers = Ciphers::default();
            for cipher in [CipherAlgorithm::XChaCha20Poly1305, CipherAlgorithm::Aes256Gcm] {
                let nonce = &nonce[..nonce_len(cipher)];
                let mut ours = plaintext.clone();
                let tag = encrypt(cipher, &ring_key, &ciphers, nonce, &aad, &mut ours).unwrap();

                let mut theirs = plaintext.clone();
                let their_tag = match cipher {
                    CipherAlgorithm::XChaCha20Poly1305 => XChaCha20Poly1305::new(&key.into())
                        .encrypt_inout_detached(nonce.try_into().unwrap(), &aad, theirs.as_mut_slice().into())
                        .unwrap()
                        .to_vec(),
                    _ => Aes256Gcm::new(&key.into())
                        .encrypt_inout_detached(nonce.try_into().unwrap(), &aad, theirs.as_mut_slice().into())
                        .unwrap()
                        .to_vec(),
                };
                prop_assert_eq!(&ours, &theirs);
                prop_assert_eq!(&tag[..], &their_tag[..]);
                prop_assert!(decrypt(cipher, &ring_key, &ciphers, nonce, &aad, &mut ours, &tag));
                prop_assert_eq!(ours, plaintext.clone());
            }
        }
    }
}
