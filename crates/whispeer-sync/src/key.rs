//! A peer's key: a 32-byte secret kept in a file, so a node keeps its id across restarts. The
//! relay transport's Noise static key (X25519) is derived from it, and its id is that key's
//! public half in hex.

use std::path::Path;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use zeroize::Zeroizing;

/// A peer's secret; see the module documentation.
pub struct PeerKey {
    seed: Zeroizing<[u8; 32]>,
    noise_private: Zeroizing<Vec<u8>>,
    noise_public: Vec<u8>,
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerKey").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl PeerKey {
    /// A new random key.
    ///
    /// # Panics
    /// If the system has no source of randomness.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).expect("whispeer-sync: the system has no randomness");
        Self::from_seed(*seed)
    }

    /// The key of `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        let mut hash = Blake2b::<U32>::new();
        hash.update(b"whispeer-sync noise static key v1");
        hash.update(seed.as_ref());
        let mut private: [u8; 32] = hash.finalize().into();
        // Clamped as X25519 wants it, so the public half below is the one Noise computes.
        private[0] &= 248;
        private[31] &= 127;
        private[31] |= 64;
        let noise_public = x25519_public(&private);
        Self { seed, noise_private: Zeroizing::new(private.to_vec()), noise_public }
    }

    /// Reads the key in `path` (64 hex digits), or makes one and writes it there (mode 0600 on
    /// Unix), creating the folder.
    ///
    /// # Errors
    /// A file that cannot be read or written, or does not hold a key.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
                    anyhow::anyhow!("{}: not a peer key (64 hex digits)", path.display())
                })?);
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    anyhow::anyhow!("{}: not a peer key (64 hex digits)", path.display())
                })?;
                Ok(Self::from_seed(seed))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let text = Zeroizing::new(format!("{}\n", hex::encode(key.seed.as_ref())));
                write_private(path, text.as_bytes())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok(key)
            }
            Err(err) => Err(anyhow::anyhow!("{}: {err}", path.display())),
        }
    }

    /// The peer's id: its Noise static public key in hex (64 characters).
    pub fn id(&self) -> String {
        hex::encode(&self.noise_public)
    }

    /// The 32-byte secret (for transports that derive their own keys from it).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    pub(crate) fn noise_private(&self) -> &[u8] {
        &self.noise_private
    }
}

fn x25519_public(private: &[u8; 32]) -> Vec<u8> {
    let secret = x25519_dalek::StaticSecret::from(*private);
    x25519_dalek::PublicKey::from(&secret).as_bytes().to_vec()
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
