//! whispeer-proto — the vocabulary every whispeer crate shares.
//!
//! Topics and filters ([`Topic`], [`Filter`]), the message [`Envelope`] that travels between
//! publisher and subscriber, the wire [`Frame`]s with their [`ErrorCode`]s, and the [`Limits`]
//! that bound everything read from outside.
//!
//! This crate performs no I/O and knows no async runtime, so it builds for
//! `wasm32-unknown-unknown` and can be shared by the broker, the clients and the browser.
//!
//! ```
//! use whispeer_proto::{Filter, Topic};
//! let filter = Filter::parse("sensor/+/temperature")?;
//! assert!(filter.matches(&Topic::parse("sensor/kitchen/temperature")?));
//! assert!(!filter.matches(&Topic::parse("sensor/kitchen/humidity")?));
//! # Ok::<(), whispeer_proto::TopicError>(())
//! ```

#[cfg(not(target_family = "wasm"))]
pub mod clock;
mod code;
mod envelope;
mod frame;
mod limits;
mod out;
mod relation;
pub mod relay;
mod same;
mod topic;

pub use code::ErrorCode;
pub use envelope::{
    CipherAlgorithm, CompressionAlgorithm, ContentType, Envelope, Flags, Headers, MessageId, header,
};
pub use frame::{
    Body, CAP_COMPACT_ACCEPTED, CAP_COMPACT_DELIVER, CAP_COMPACT_PUBLISH, DecodeError, DeliverHead,
    EncodeError, Frame, MAX_HEADERS, MAX_TOPIC_ALIASES, PROTOCOL_VERSION, PlainHead, Qos,
    READ_CHUNK, RawDeliver, RawFrame, ReadPool, StartAt, TopicAliases, TopicCache, TopicRef,
    reserve_for_read,
};
pub use limits::Limits;
pub use out::{BY_REFERENCE, OutBuf};
pub use same::same_text;
pub use topic::{Filter, FilterSegment, Topic, TopicError, hidden_from_wildcards};
