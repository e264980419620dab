//! Why sealing, opening or receiving failed: [`SealError`], [`OpenError`], [`ReceiveError`].

use whispeer_proto::CompressionAlgorithm;

use crate::keyring::KeyId;

/// Why a payload could not be sealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The rule or default names a key the keyring lacks, or the keyring is empty.
    #[error("no sealing key: {0:?} is not in the keyring")]
    NoKey(Option<KeyId>),
    /// The operating system's random number generator failed while choosing nonces.
    #[error("no randomness for nonces: {0}")]
    Random(String),
    /// This sealer has used all 2^64 of its nonces (unreachable in practice).
    #[error("nonces exhausted; create a new sealer")]
    NoncesExhausted,
    /// The cipher refused the input (longer than it can encrypt).
    #[error("the cipher refused a payload of {len} bytes")]
    Encrypt {
        /// Payload length.
        len: usize,
    },
}

/// Why a payload could not be opened. Each is the failure of one message for one subscriber;
/// none yields bytes that were not authenticated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The sealed payload is shorter than its header and tag.
    #[error("sealed payload of {len} bytes is shorter than the {need} bytes of header and tag")]
    Malformed {
        /// Payload length.
        len: usize,
        /// Minimum length for the cipher.
        need: usize,
    },
    /// The payload was sealed with a key this keyring does not hold.
    #[error("unknown key id {0}")]
    UnknownKeyId(KeyId),
    /// The payload is encrypted and this party has no keyring.
    #[error("payload is encrypted and no keyring is configured")]
    NoKeyring,
    /// Authentication failed: wrong key, tampered bytes, or moved to another topic or envelope.
    #[error("authentication failed: wrong key, or the message was altered")]
    Authentication,
    /// The decrypted payload is not valid for its compression algorithm.
    #[error("corrupt {algorithm:?} payload")]
    Decompress {
        /// The algorithm named by the flags.
        algorithm: CompressionAlgorithm,
    },
    /// The payload would be larger than the maximum message size.
    #[error("payload would exceed the maximum message size of {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The flags name something this build cannot open.
    #[error("unsupported {what}")]
    Unsupported {
        /// What is unsupported.
        what: &'static str,
    },
}

/// Why a received message could not be turned into a value: it did not open, or its plaintext is
/// not the requested type. Receivers skip such a message and count it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The payload could not be decrypted or decompressed: wrong or unknown key, tampering,
    /// corruption, or a payload over the size limit.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The plaintext is not a valid encoding of the requested type.
    #[error(transparent)]
    Decode(#[from] crate::CodecError),
}
