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
    use std::sync::RwLock;

    use chacha20::{R20, hchacha};
    use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
    use zeroize::{Zeroize, Zeroizing};

    use super::{Key, OnceLock, TAG_LEN};

    /// Slots of a key's table of XChaCha20 subkeys: one per nonce prefix seen lately, indexed
    /// by the prefix's first bytes (random), a prefix that lands on a taken slot replacing it.
    /// Every sealer keeps one prefix for its life, so the table serves the few sealers (this
    /// process's and its peers') that share a key; about 800 bytes a key once used.
    const SUBKEY_SLOTS: usize = 16;

    /// A nonce prefix and the subkey it derives (zeroized when dropped, as keys are).
    type Subkey = Option<([u8; 16], Zeroizing<[u8; 32]>)>;

    /// Cipher state kept per key: the AES key schedule, and the XChaCha20 subkeys of the nonce
    /// prefixes seen lately.
    ///
    /// An XChaCha20 subkey is HChaCha20(key, nonce[0..16]), and a sealer's nonces share their
    /// first 16 bytes (a random prefix drawn once, then a counter: `seal.rs`), so one sealer's
    /// messages all use one subkey. Deriving it took about a third of sealing a 128-byte
    /// message; kept here, it is derived once per sealer. The table is taken without waiting:
    /// a thread that finds it locked derives the subkey itself. `Ciphers::default()` keeps no
    /// table, for a key used once (the boxes of `identity`, each under a fresh nonce).
    #[derive(Default)]
    pub(crate) struct Ciphers {
        aes: OnceLock<Option<LessSafeKey>>,
        /// Whether subkeys are kept (`for_key`).
        keep: bool,
        /// Empty until the first subkey kept, then `SUBKEY_SLOTS` long.
        subkeys: RwLock<Vec<Subkey>>,
    }

    impl Ciphers {
        /// The state of a key used for many messages: its XChaCha20 subkeys are kept.
        pub(crate) fn for_key() -> Self {
            Self { keep: true, ..Self::default() }
        }

        /// The subkey of `prefix` under `key`: from the table, or derived (and kept).
        fn subkey(&self, key: &Key, prefix: &[u8; 16]) -> Zeroizing<[u8; 32]> {
            let slot = usize::from(u16::from_le_bytes([prefix[0], prefix[1]])) % SUBKEY_SLOTS;
            let mut subkey = Zeroizing::new([0u8; 32]);
            let kept = self.keep
                && self.subkeys.try_read().is_ok_and(|subkeys| {
                    let Some(Some((seen, kept))) = subkeys.get(slot) else { return false };
                    if seen != prefix {
                        return false;
                    }
                    subkey.copy_from_slice(kept.as_slice());
                    true
                });
            if !kept {
                let prefix = <&chacha20::cipher::Array<u8, _>>::from(prefix);
                let mut raw: [u8; 32] = hchacha::<R20>(key.into(), prefix).into();
                subkey.copy_from_slice(&raw);
                raw.zeroize();
            }
            if !kept
                && self.keep
                && let Ok(mut subkeys) = self.subkeys.try_write()
            {
                if subkeys.is_empty() {
                    subkeys.resize(SUBKEY_SLOTS, None);
                }
                if let Some(entry) = subkeys.get_mut(slot) {
                    *entry = Some((*prefix, subkey.clone()));
                }
            }
            subkey
        }

        /// Tests: how many subkeys the table holds.
        #[cfg(test)]
        pub(crate) fn subkeys_kept(&self) -> usize {
            self.subkeys.read().map_or(0, |subkeys| subkeys.iter().flatten().count())
        }
    }

    fn aes<'a>(key: &Key, ciphers: &'a Ciphers) -> Option<&'a LessSafeKey> {
        let built = ciphers
            .aes
            .get_or_init(|| UnboundKey::new(&AES_256_GCM, key).ok().map(LessSafeKey::new));
        built.as_ref()
    }

    /// Runs `f` with the ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 reduces to.
    /// (The key is built where it is used: it is 544 bytes, and every move copies them.)
    fn with_xchacha<R>(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        f: impl FnOnce(&LessSafeKey, Nonce) -> Option<R>,
    ) -> Option<R> {
        let (prefix, suffix) = nonce.split_at_checked(16)?;
        let (prefix, suffix): (&[u8; 16], &[u8; 8]) =
            (prefix.try_into().ok()?, suffix.try_into().ok()?);
        let mut inner = [0u8; 12];
        inner[4..].copy_from_slice(suffix);
        let subkey = ciphers.subkey(key, prefix);
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).ok()?);
        f(&key, Nonce::assume_unique_for_key(inner))
    }

    fn aes_nonce(nonce: &[u8]) -> Option<Nonce> {
        Nonce::try_assume_unique_for_key(nonce).ok()
    }

    pub(crate) fn encrypt_xchacha(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        with_xchacha(key, ciphers, nonce, |key, nonce| {
            let tag = key.seal_in_place_separate_tag(nonce, Aad::from(aad), buffer).ok()?;
            tag.as_ref().try_into().ok()
        })
    }

    pub(crate) fn decrypt_xchacha(
        key: &Key,
        ciphers: &Ciphers,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let Ok(tag) = Tag::try_from(tag) else { return false };
        with_xchacha(key, ciphers, nonce, |key, nonce| {
            key.open_in_place_separate_tag(nonce, Aad::from(aad), tag, buffer, 0..).ok()
        })
        .is_some()
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

    impl Ciphers {
        /// The state of a key used for many messages (the same as for one here).
        pub(crate) fn for_key() -> Self {
            Self::default()
        }
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

    #[test]
    fn kept_subkeys_seal_and_open_as_subkeys_derived_afresh_also_when_prefixes_share_a_slot() {
        // RustCrypto's XChaCha20-Poly1305 of `plaintext`: ciphertext then tag.
        let theirs = |key: &Key, nonce: &[u8; 24], aad: &[u8], plaintext: &[u8]| {
            let mut sealed = plaintext.to_vec();
            let tag = XChaCha20Poly1305::new(&(*key).into())
                .encrypt_inout_detached(nonce.into(), aad, sealed.as_mut_slice().into())
                .unwrap();
            sealed.extend_from_slice(&tag);
            sealed
        };
        let key: Key = [7; 32];
        let ciphers = Ciphers::for_key();
        // Prefixes that differ only past the bytes that pick a slot share one; the last one
        // differs there, and takes another.
        let prefixes: Vec<[u8; 16]> = (0..4u8)
            .map(|n| {
                let mut prefix = [0xA5; 16];
                prefix[15] = n;
                prefix[0] = if n == 3 { 0x5A } else { 0xA5 };
                prefix
            })
            .collect();
        // Each prefix in turn, twice over, so every seal after the first few finds a slot
        // another prefix took meanwhile, or its own.
        for round in 0..2u64 {
            for (i, prefix) in prefixes.iter().enumerate() {
                for n in 0..3u64 {
                    let mut nonce = [0u8; 24];
                    nonce[..16].copy_from_slice(prefix);
                    nonce[16..].copy_from_slice(&(round * 100 + n).to_be_bytes());
                    let plaintext = format!("message {round} {i} {n}").into_bytes();
                    let mut ours = plaintext.clone();
                    let cipher = CipherAlgorithm::XChaCha20Poly1305;
                    let tag = encrypt(cipher, &key, &ciphers, &nonce, b"aad", &mut ours).unwrap();
                    let mut sealed = ours.clone();
                    sealed.extend_from_slice(&tag);
                    assert_eq!(sealed, theirs(&key, &nonce, b"aad", &plaintext), "{i} {n}");
                    assert!(decrypt(cipher, &key, &ciphers, &nonce, b"aad", &mut ours, &tag));
                    assert_eq!(ours, plaintext);
                }
            }
        }
        assert_eq!(ciphers.subkeys_kept(), 2, "one slot per first bytes, the last prefix kept");
        // A kept subkey is one key's: another key's table derives its own.
        let other = Ciphers::for_key();
        let nonce = [0xA5; 24];
        let mut ours = b"x".to_vec();
        let tag =
            encrypt(CipherAlgorithm::XChaCha20Poly1305, &[9; 32], &other, &nonce, b"", &mut ours)
                .unwrap();
        let mut sealed = ours;
        sealed.extend_from_slice(&tag);
        assert_eq!(sealed, theirs(&[9; 32], &nonce, b"", b"x"));
        // A key used once keeps nothing.
        let once = Ciphers::default();
        let mut ours = b"y".to_vec();
        encrypt(CipherAlgorithm::XChaCha20Poly1305, &key, &once, &nonce, b"", &mut ours).unwrap();
        assert_eq!(once.subkeys_kept(), 0);
    }
}
