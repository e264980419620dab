//! serde codecs: typed values to payload bytes and back.
//!
//! A codec is chosen by the publisher and recorded in the envelope's content type, so a
//! subscriber always decodes with the codec the bytes were written in, whatever its own default.

use std::cell::RefCell;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use whispeer_proto::ContentType;

/// Why a value could not be encoded or a payload decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// serde could not encode the value in this format.
    #[error("cannot encode value as {content:?}: {source}")]
    Encode {
        /// The format asked for.
        content: ContentType,
        /// What the format reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The payload is not a valid encoding of the requested type.
    #[error("cannot decode {content:?} payload of {len} bytes as {type_name}: {source}")]
    Decode {
        /// The payload's format.
        content: ContentType,
        /// Payload length in bytes.
        len: usize,
        /// The type that was asked for.
        type_name: &'static str,
        /// What the format reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The payload's content type has no serde codec (raw bytes, or a type this version lacks).
    #[error("payload content type {0:?} cannot be decoded into a typed value")]
    NotTyped(Option<ContentType>),
}

/// Scratch space kept above this size after an encode is released, so one large message does
/// not pin its buffer for the life of the thread.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// Per-thread encode buffer: values are written here, then copied once into a payload of
    /// exactly the right size (instead of growing a fresh `Vec` by reallocation every time).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A serde format for typed payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// Compact binary through postcard (varint integers, no field names). The default.
    #[default]
    Postcard,
    /// JSON through serde_json: larger and slower, readable by any client.
    Json,
}

impl Codec {
    /// The codec that reads payloads of `content`, if there is one.
    pub fn for_content(content: Option<ContentType>) -> Result<Self, CodecError> {
        match content {
            Some(ContentType::Postcard) => Ok(Self::Postcard),
            Some(ContentType::Json) => Ok(Self::Json),
            other => Err(CodecError::NotTyped(other)),
        }
    }

    /// The content type recorded in envelopes this codec writes.
    pub fn content_type(self) -> ContentType {
        match self {
            Self::Postcard => ContentType::Postcard,
            Self::Json => ContentType::Json,
        }
    }

    /// Encodes `value`.
    ///
    /// # Errors
    /// [`CodecError::Encode`] when serde refuses the value (a map with non-string keys in JSON,
    /// a sequence of unknown length in postcard).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        self.encode_with(value, Bytes::copy_from_slice)
    }

    /// Encodes `value` like [`Codec::encode`], with `keep` making the payload out of the
    /// encoding (a buffer of this thread's, borrowed meanwhile): where it lives is the
    /// caller's choice, such as an allocation kept from an earlier message.
    ///
    /// # Errors
    /// As [`Codec::encode`].
    pub fn encode_with<T: Serialize + ?Sized>(
        self,
        value: &T,
        keep: impl FnOnce(&[u8]) -> Bytes,
    ) -> Result<Bytes, CodecError> {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                let written = self.encode_into(value, &mut buffer);
                let bytes = written.map(|()| keep(&buffer));
                if buffer.capacity() > SCRATCH_KEEP {
                    *buffer = Vec::new();
                }
                bytes
            }
            // Re-entered from inside a `Serialize` impl: use a buffer of its own.
            Err(_) => {
                let mut buffer = Vec::new();
                self.encode_into(value, &mut buffer).map(|()| Bytes::from(buffer))
            }
        })
    }

    fn encode_into<T: Serialize + ?Sized>(
        self,
        value: &T,
        buffer: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        match self {
            Self::Postcard => {
                postcard::to_io(value, buffer).map(drop).map_err(|e| self.encode_error(e))
            }
            Self::Json => serde_json::to_writer(buffer, value).map_err(|e| self.encode_error(e)),
        }
    }

    /// Decodes a `T` from `bytes`.
    ///
    /// # Errors
    /// [`CodecError::Decode`] when the bytes are not a valid encoding of `T`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let wrap = |source: Box<dyn std::error::Error + Send + Sync>| CodecError::Decode {
            content: self.content_type(),
            len: bytes.len(),
            type_name: std::any::type_name::<T>(),
            source,
        };
        match self {
            Self::Postcard => postcard::from_bytes(bytes).map_err(|e| wrap(Box::new(e))),
            Self::Json => serde_json::from_slice(bytes).map_err(|e| wrap(Box::new(e))),
        }
    }

    fn encode_error(self, e: impl std::error::Error + Send + Sync + 'static) -> CodecError {
        CodecError::Encode { content: self.content_type(), source: Box::new(e) }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        id: i32,
        tags: Vec<u8>,
        nested: Option<(u64, bool)>,
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (any::<String>(), any::<i32>(), any::<Vec<u8>>(), any::<Option<(u64, bool)>>())
            .prop_map(|(name, id, tags, nested)| Sample { name, id, tags, nested })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(value in sample()) {
            for codec in [Codec::Postcard, Codec::Json] {
                let bytes = codec.encode(&value).unwrap();
                prop_assert_eq!(codec.decode::<Sample>(&bytes).unwrap(), value.clone());
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in any::<Vec<u8>>()) {
            let _ = Codec::Postcard.decode::<Sample>(&bytes);
            let _ = Codec::Json.decode::<Sample>(&bytes);
        }
    }

    #[test]
    fn wrong_type_is_a_decode_error() {
        let bytes = Codec::Json.encode(&"text").unwrap();
        let err = Codec::Json.decode::<u32>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode { content: ContentType::Json, len: 6, .. }));
    }

    #[test]
    fn raw_content_has_no_codec() {
        assert!(matches!(
            Codec::for_content(Some(ContentType::Raw)),
            Err(CodecError::NotTyped(Some(ContentType::Raw)))
        ));
        assert_eq!(Codec::for_content(Some(ContentType::Json)).unwrap(), Codec::Json);
    }
}
