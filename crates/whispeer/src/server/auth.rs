//! API keys: configured as SHA-256 digests (or plain, hashed on load), checked by digest.
//!
//! Storing digests means a leaked configuration does not leak usable keys. Comparing digests
//! rather than keys means timing reveals nothing an attacker can steer toward a valid key.

use sha2::{Digest, Sha256};

/// The configured API keys. Empty means the server is open (and then binds loopback only).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} configured)", self.digests.len())
    }
}

/// Why an API key entry was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    /// A `sha256:` entry is not 64 hexadecimal digits.
    #[error("api key entry {index}: 'sha256:' must be followed by 64 hex digits")]
    BadDigest {
        /// Zero-based index in the list.
        index: usize,
    },
    /// An entry is empty.
    #[error("api key entry {index} is empty")]
    Empty {
        /// Zero-based index in the list.
        index: usize,
    },
}

/// The digest form of a key, as written in configuration: `sha256:<64 hex digits>`.
pub fn digest_of(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

impl ApiKeys {
    /// Reads entries: `sha256:<hex>` digests, or plain keys (hashed here).
    ///
    /// # Errors
    /// [`ApiKeyError`] naming the first bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, ApiKeyError> {
        let mut digests = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                return Err(ApiKeyError::Empty { index });
            }
            let digest = match entry.strip_prefix("sha256:") {
                Some(hexits) => {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(hexits, &mut digest)
                        .map_err(|_| ApiKeyError::BadDigest { index })?;
                    digest
                }
                None => Sha256::digest(entry.as_bytes()).into(),
            };
            digests.push(digest);
        }
        Ok(Self { digests })
    }

    /// Whether any key is configured.
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `key` is one of the configured keys.
    pub fn accepts(&self, key: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.digests.contains(&digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_digest_entries_accept_the_same_key() {
        let keys = ApiKeys::parse(&["alpha", &digest_of("beta")]).unwrap();
        assert!(keys.required());
        assert!(keys.accepts(b"alpha") && keys.accepts(b"beta"));
        assert!(!keys.accepts(b"gamma") && !keys.accepts(b""));
        assert!(!ApiKeys::default().required());
    }

    #[test]
    fn bad_entries_are_named() {
        assert!(matches!(
            ApiKeys::parse(&["ok", "sha256:xyz"]),
            Err(ApiKeyError::BadDigest { index: 1 })
        ));
        assert!(matches!(ApiKeys::parse(&[" "]), Err(ApiKeyError::Empty { index: 0 })));
        assert!(!format!("{:?}", ApiKeys::parse(&["secret"]).unwrap()).contains("secret"));
    }
}
