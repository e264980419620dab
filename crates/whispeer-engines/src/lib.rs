//! whispeer-engines — what happens to a message at the edges.
//!
//! Today: the serde [`Codec`]s that turn typed values into payload bytes and back. Compression
//! and end-to-end encryption join them here, so that everything between the edges only ever
//! handles opaque bytes.
//!
//! No async runtime and no I/O: this crate builds for `wasm32-unknown-unknown`.
//!
//! ```
//! use whispeer_engines::Codec;
//! let bytes = Codec::Postcard.encode(&("Ada", 36u8))?;
//! let back: (String, u8) = Codec::Postcard.decode(&bytes)?;
//! assert_eq!(back, ("Ada".to_string(), 36));
//! # Ok::<(), whispeer_engines::CodecError>(())
//! ```

mod codec;

pub use codec::{Codec, CodecError};
