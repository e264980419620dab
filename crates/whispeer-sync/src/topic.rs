//! Topics: what peers meet on, the 32-byte BLAKE2b-256 hash of a name.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};

/// A topic's hash: 32 bytes.
pub type TopicHash = [u8; 32];

/// The topic of `name`: BLAKE2b with a 32-byte output (BLAKE2b-256) of its UTF-8 bytes. The
/// same name gives the same topic everywhere, so peers that know a name find each other.
pub fn derive_topic(name: &str) -> TopicHash {
    Blake2b::<U32>::digest(name.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from an independent implementation (Python's `hashlib.blake2b(digest_size=32)`).
    #[test]
    fn known_vectors() {
        let cases = [
            ("", "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"),
            ("abc", "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319"),
            ("my-database", "dc365a610d48569b953b16c961389c28ed3d1e7210949dde7a073cc1d1963208"),
        ];
        for (name, hex) in cases {
            assert_eq!(hex::encode(derive_topic(name)), hex, "{name:?}");
        }
        assert_ne!(derive_topic("a"), derive_topic("b"));
    }
}
