//! Keys and the keyring: which key seals, and every key that may still open.
//!
//! A key is 32 random bytes with a numeric [`KeyId`] carried in every sealed message, so that
//! after a rotation the old key still opens old messages. Keys are zeroized when dropped, never
//! printed (`Debug` redacts them) and only leave the process as text through
//! [`Keyring::to_text`], which is what `whispeer keygen` prints.
//!
//! Text form: one key per line, `<id>:<base64url of the 32 bytes, no padding>`; blank lines and
//! lines starting with `#` are ignored. In an environment variable, entries may also be separated
//! by commas. The highest id is the current (sealing) key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::aead::Ciphers;

/// Salt of the per-topic key derivation; changing it changes every derived key.
const DERIVE_SALT: &[u8] = b"whispeer/v1/topic-key";
/// Bound on cached per-topic derived keys; the cache is cleared when full.
const MAX_DERIVED: usize = 4096;

/// Why a key or keyring could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A line is not `<id>:<base64 key>`.
    #[error("line {line}: expected '<id>:<base64url key>'")]
    Syntax {
        /// One-based line (or comma-separated entry) number.
        line: usize,
    },
    /// The key text does not decode to exactly 32 bytes.
    #[error("line {line}: a key must be 32 bytes of base64url, found {len} bytes")]
    KeyLength {
        /// One-based line number.
        line: usize,
        /// Decoded length (0 if the text is not base64url).
        len: usize,
    },
    /// Two keys share an id.
    #[error("key id {0} appears twice")]
    DuplicateId(KeyId),
    /// The keyring has no key with this id.
    #[error("no key with id {0}")]
    UnknownId(KeyId),
    /// The text holds no key.
    #[error("no key found")]
    Empty,
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable {0} is not set")]
    MissingVariable(String),
    /// The key file could not be read.
    #[error("cannot read key file: {0}")]
    Io(#[from] std::io::Error),
    /// The operating system's random number generator failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// Identifies a key; carried in every sealed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A 256-bit secret key. Zeroized on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    /// A new random key from the operating system's generator.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the generator fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn parse(text: &str, line: usize) -> Result<Self, KeyError> {
        let decoded = Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim()).unwrap_or_default());
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::KeyLength { line, len: decoded.len() })?;
        Ok(Self::from_bytes(bytes))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A key with its cipher state, built on first use.
pub(crate) struct KeyMaterial {
    pub(crate) key: Key,
    pub(crate) ciphers: Ciphers,
}

impl KeyMaterial {
    fn new(key: Key) -> Self {
        Self { key, ciphers: Ciphers::for_key() }
    }
}

/// Per-topic keys derived from a master key, by master id and topic.
type DerivedCache = Arc<Mutex<HashMap<(KeyId, Box<str>), Arc<KeyMaterial>>>>;

/// Every key this party knows, and which one seals.
///
/// ```
/// use whispeer_engines::{Key, KeyId, Keyring};
/// let mut keyring = Keyring::generate()?;            // key 1, current
/// let new = keyring.rotate(Key::generate()?);        // key 2, current; key 1 still opens
/// assert_eq!((new, keyring.current()), (KeyId(2), Some(KeyId(2))));
/// let copy = Keyring::parse(&keyring.to_text())?;    // what `whispeer keygen` prints
/// assert_eq!(copy.ids().collect::<Vec<_>>(), [KeyId(1), KeyId(2)]);
/// # Ok::<(), whispeer_engines::KeyError>(())
/// ```
#[derive(Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<KeyId, Arc<KeyMaterial>>,
    current: Option<KeyId>,
    derived: DerivedCache,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// A keyring with one new random key, id 1, current.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the generator fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut keyring = Self::new();
        keyring.insert(KeyId(1), Key::generate()?)?;
        Ok(keyring)
    }

    /// Adds a key. The key with the highest id becomes current.
    ///
    /// # Errors
    /// [`KeyError::DuplicateId`] if the id is taken.
    pub fn insert(&mut self, id: KeyId, key: Key) -> Result<(), KeyError> {
        if self.keys.contains_key(&id) {
            return Err(KeyError::DuplicateId(id));
        }
        self.keys.insert(id, Arc::new(KeyMaterial::new(key)));
        self.current = self.keys.keys().next_back().copied();
        Ok(())
    }

    /// Adds `key` under the next free id and makes it current; older keys still open.
    pub fn rotate(&mut self, key: Key) -> KeyId {
        let id = KeyId(self.keys.keys().next_back().map_or(1, |last| last.0.saturating_add(1)));
        self.keys.insert(id, Arc::new(KeyMaterial::new(key)));
        self.current = Some(id);
        id
    }

    /// Makes `id` the sealing key.
    ///
    /// # Errors
    /// [`KeyError::UnknownId`] if there is no such key.
    pub fn set_current(&mut self, id: KeyId) -> Result<(), KeyError> {
        if !self.keys.contains_key(&id) {
            return Err(KeyError::UnknownId(id));
        }
        self.current = Some(id);
        Ok(())
    }

    /// Removes a key: messages sealed with it can no longer be opened.
    pub fn remove(&mut self, id: KeyId) {
        self.keys.remove(&id);
        if self.current == Some(id) {
            self.current = self.keys.keys().next_back().copied();
        }
        self.derived.lock().unwrap_or_else(PoisonError::into_inner).retain(|(k, _), _| *k != id);
    }

    /// The sealing key's id.
    pub fn current(&self) -> Option<KeyId> {
        self.current
    }

    /// The ids of every key, in order.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    /// Reads keys in the text form (see the module documentation).
    ///
    /// # Errors
    /// [`KeyError`] naming the first bad line, a duplicate id, or [`KeyError::Empty`].
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keyring = Self::new();
        let entries = text.split(['\n', ',']).map(str::trim);
        for (index, entry) in entries.enumerate() {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let line = index + 1;
            let (id, key) = entry.split_once(':').ok_or(KeyError::Syntax { line })?;
            let id = id.trim().parse().map(KeyId).map_err(|_| KeyError::Syntax { line })?;
            keyring.insert(id, Key::parse(key, line)?)?;
        }
        if keyring.keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(keyring)
    }

    /// Reads keys from the environment variable `name` (for example `WHISPEER_KEY`).
    ///
    /// # Errors
    /// [`KeyError::MissingVariable`], or as [`Keyring::parse`].
    pub fn from_env(name: &str) -> Result<Self, KeyError> {
        let text = Zeroizing::new(
            std::env::var(name).map_err(|_| KeyError::MissingVariable(name.to_string()))?,
        );
        Self::parse(&text)
    }

    /// Reads keys from a file in the text form.
    ///
    /// # Errors
    /// [`KeyError::Io`], or as [`Keyring::parse`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Self::parse(&text)
    }

    /// The keys in the text form, one per line. This is secret material: store it like a
    /// password. The returned string is zeroized when dropped.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::new());
        for (id, material) in &self.keys {
            let encoded = Zeroizing::new(URL_SAFE_NO_PAD.encode(material.key.bytes()));
            text.push_str(&format!("{id}:{}\n", encoded.as_str()));
        }
        text
    }

    pub(crate) fn material(&self, id: KeyId) -> Option<&Arc<KeyMaterial>> {
        self.keys.get(&id)
    }

    /// The key for `topic` derived from master key `id` with HKDF-SHA256 (salt
    /// `whispeer/v1/topic-key`, info = the topic's bytes). Cached, boundedly.
    pub(crate) fn derived(&self, id: KeyId, topic: &str) -> Option<Arc<KeyMaterial>> {
        let master = self.keys.get(&id)?;
        let mut cache = self.derived.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(material) = cache.get(&(id, topic.into())) {
            return Some(Arc::clone(material));
        }
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(DERIVE_SALT), master.key.bytes())
            .expand(topic.as_bytes(), okm.as_mut())
            .ok()?;
        let material = Arc::new(KeyMaterial::new(Key(okm)));
        if cache.len() >= MAX_DERIVED {
            cache.clear();
        }
        cache.insert((id, topic.into()), Arc::clone(&material));
        Some(material)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = Key::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "Key(<redacted>)");
        let mut ring = Keyring::new();
        ring.insert(KeyId(7), key).unwrap();
        let shown = format!("{ring:?}");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab"), "{shown}");
    }

    #[test]
    fn text_form_round_trips_and_highest_id_is_current() {
        let text = "# production keys\n1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n\n5:_____________________________________________w\n";
        let text = text.replace(
            "_____________________________________________w",
            &URL_SAFE_NO_PAD.encode([0xff; 32]),
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.current(), Some(KeyId(5)));
        assert_eq!(Keyring::parse(&ring.to_text()).unwrap().to_text(), ring.to_text());
        let env_style = ring.to_text().replace('\n', ",");
        assert_eq!(Keyring::parse(&env_style).unwrap().current(), Some(KeyId(5)));
    }

    #[test]
    fn bad_text_names_the_line() {
        assert!(matches!(Keyring::parse("nonsense"), Err(KeyError::Syntax { line: 1 })));
        assert!(matches!(Keyring::parse("\nx:abc"), Err(KeyError::Syntax { line: 2 })));
        assert!(matches!(
            Keyring::parse("1:c2hvcnQ"),
            Err(KeyError::KeyLength { line: 1, len: 5 })
        ));
        assert!(matches!(Keyring::parse("# only a comment"), Err(KeyError::Empty)));
        let key = URL_SAFE_NO_PAD.encode([1; 32]);
        assert!(matches!(
            Keyring::parse(&format!("1:{key}\n1:{key}")),
            Err(KeyError::DuplicateId(KeyId(1)))
        ));
    }

    #[test]
    fn derived_keys_differ_per_topic_and_are_stable() {
        let ring = Keyring::generate().unwrap();
        let a = ring.derived(KeyId(1), "tenant/a").unwrap();
        let b = ring.derived(KeyId(1), "tenant/b").unwrap();
        assert_ne!(a.key.bytes(), b.key.bytes());
        assert_eq!(ring.derived(KeyId(1), "tenant/a").unwrap().key.bytes(), a.key.bytes());
        assert!(ring.derived(KeyId(9), "tenant/a").is_none());
    }

    #[test]
    fn keys_load_from_a_file_and_a_missing_variable_is_named() {
        let ring = Keyring::generate().unwrap();
        let path = std::env::temp_dir().join(format!("whispeer-keys-{}.txt", std::process::id()));
        std::fs::write(&path, ring.to_text().as_bytes()).unwrap();
        let loaded = Keyring::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap().to_text(), ring.to_text());
        assert!(
            matches!(Keyring::from_file(&path), Err(KeyError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound)
        );
        let missing = "WHISPEER_TEST_VARIABLE_THAT_IS_NEVER_SET";
        assert!(
            matches!(Keyring::from_env(missing), Err(KeyError::MissingVariable(name)) if name == missing)
        );
    }

    #[test]
    fn rotation_keeps_old_keys() {
        let mut ring = Keyring::generate().unwrap();
        assert_eq!(ring.rotate(Key::generate().unwrap()), KeyId(2));
        assert!(ring.material(KeyId(1)).is_some());
        ring.remove(KeyId(2));
        assert_eq!(ring.current(), Some(KeyId(1)));
        assert!(matches!(ring.set_current(KeyId(2)), Err(KeyError::UnknownId(KeyId(2)))));
    }
}
