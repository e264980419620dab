//! API keys: configured as SHA-256 digests (or plain, hashed on load), checked by digest.
//!
//! Storing digests means a leaked configuration does not leak usable keys. Comparing digests
//! rather than keys means timing reveals nothing an attacker can steer toward a valid key.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::acl::{Permissions, Principal};

/// The configured API keys, each standing for a principal. Empty means the server is open (and
/// then binds loopback only).
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], Arc<Principal>)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} configured)", self.keys.len())
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
    /// Reads entries: `sha256:<hex>` digests, or plain keys (hashed here). Each key's principal
    /// is named `key-<n>` and may use every ordinary topic.
    ///
    /// # Errors
    /// [`ApiKeyError`] naming the first bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, ApiKeyError> {
        let mut keys = Self::default();
        for (index, entry) in entries.iter().enumerate() {
            let principal = Principal::new(format!("key-{index}"), Permissions::everything());
            keys.add(index, entry.as_ref(), principal)?;
        }
        Ok(keys)
    }

    /// Adds a key (a `sha256:` digest or a plain key) for `principal`; `index` names the entry
    /// in errors.
    ///
    /// # Errors
    /// [`ApiKeyError`] for an empty entry or a bad digest.
    pub fn add(
        &mut self,
        index: usize,
        entry: &str,
        principal: Principal,
    ) -> Result<(), ApiKeyError> {
        let entry = entry.trim();
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
        self.keys.push((digest, Arc::new(principal)));
        Ok(())
    }

    /// Whether any key is configured.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether `key` is one of the configured keys.
    pub fn accepts(&self, key: &[u8]) -> bool {
        self.principal(key).is_some()
    }

    /// The principal `key` stands for, if it is a configured key.
    pub fn principal(&self, key: &[u8]) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.keys.iter().find(|(d, _)| *d == digest).map(|(_, p)| Arc::clone(p))
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
