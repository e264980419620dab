//! whispeer-engines — what happens to a message at the edges.
//!
//! - [`Codec`]: typed values to payload bytes and back (postcard or JSON).
//! - [`Engines`]: the edge pipeline. [`Engines::seal`] compresses ([`Compression`]: zstd or lz4)
//!   and then encrypts ([`Encryption`]: XChaCha20-Poly1305 or AES-256-GCM with keys from a
//!   [`Keyring`]); [`Engines::open`] undoes both and authenticates. [`TopicRule`]s change the
//!   settings per topic or filter.
//!
//! Everything between the publishing and the subscribing edge handles sealed bytes only; see
//! [`security`] for what each party can see and the bounds the design relies on.
//!
//! No async runtime: this crate builds for `wasm32-unknown-unknown` (feature `wasm`).
//!
//! ```
//! use whispeer_engines::Codec;
//! let bytes = Codec::Postcard.encode(&("Ada", 36u8))?;
//! let back: (String, u8) = Codec::Postcard.decode(&bytes)?;
//! assert_eq!(back, ("Ada".to_string(), 36));
//! # Ok::<(), whispeer_engines::CodecError>(())
//! ```

mod aead;
mod codec;
mod compress;
mod error;
mod identity;
mod keyring;
mod seal;

#[doc = include_str!("security.md")]
pub mod security {}

pub use codec::{Codec, CodecError};
pub use compress::{Compression, DEFAULT_THRESHOLD, DEFAULT_ZSTD_LEVEL};
pub use error::{OpenError, ReceiveError, SealError};
pub use identity::{
    BundleRead, ChatKeys, ChatKeysError, DIRECTORY, GroupKey, Identity, IdentityError, KeyChange,
    MAX_RECIPIENTS, Opened, PairKeys, PolicyError, PolicyKeys, PublicIdentity, directory_filter,
    directory_topic, fingerprint_of, group_sealed_by, is_sealed, open_group, open_pairwise,
    open_sealed, pairwise_sender, policy_topic, seal_for, seal_group, seal_pairwise, sealed_sender,
};
pub use keyring::{Key, KeyError, KeyId, Keyring};
pub use seal::{Encryption, Engines, KEY_VARIABLE, KeyChoice, Sealing, TopicRule};
pub use whispeer_proto::{CipherAlgorithm, CompressionAlgorithm};
