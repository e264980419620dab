//! whispeer — an embeddable publish/subscribe broker.
//!
//! Start with [`Broker::builder`] (or [`Broker::build_default`]). Messages are typed at the
//! edges and bytes inside: a value is encoded once, and every subscriber shares the same bytes.
//!
//! - Publish any `serde` value with [`Broker::publish`]; raw bytes with [`Broker::publish_bytes`].
//! - Subscribe with a callback ([`Broker::subscribe`]), an `async` callback
//!   ([`Broker::subscribe_async`]), or pull messages from a [`Subscription`] (`recv().await`, or
//!   as a `Stream`).
//! - Filters: `+` or `*` match one segment, `#` any number of trailing segments (also none).
//! - Every subscriber has a bounded queue and a [`SlowConsumer`] policy; drops are counted in
//!   [`BrokerStats`] and [`SubscriptionStats`]. Under `SlowConsumer::BackPressure` nothing is
//!   dropped: the publisher waits for room ([`Broker::room`]) instead.
//! - Bind a topic to one type with [`Broker::topic`]; extend the broker with [`Plugin`]s.
//! - Compress and encrypt at the edges: `.with(Compression::new()).with(Encryption::with_keyring(keyring))`,
//!   or [`Broker::build_default`] for both with a generated key. Plugins and everything between
//!   publisher and subscriber see only ciphertext; see [`engines::security`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), whispeer_core::Error> {
//! use serde::{Deserialize, Serialize};
//! use whispeer_core::{Broker, BrokerOptions};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! struct Reading { sensor: String, celsius: f32 }
//!
//! let broker = Broker::builder(BrokerOptions::default()).build();
//! let mut readings = broker.subscription::<Reading>("sensor/+/temperature")?;
//! let _log = broker.subscribe("sensor/#", |r: Reading| println!("{r:?}"));
//!
//! let reading = Reading { sensor: "kitchen".into(), celsius: 21.5 };
//! broker.publish("sensor/kitchen/temperature", &reading)?;
//! assert_eq!(readings.recv().await, Some(reading));
//! # Ok(()) }
//! ```

mod bridge;
mod broker;
mod budget;
mod delivery;
mod dispatch;
mod error;
mod hash;
mod message;
mod options;
mod plugin;
mod publish;
mod queue;
mod retention;
mod room;
mod router;
mod runtime;
mod shared;
mod staging;
mod stats;
mod store;
mod subscription;
mod wakeups;

pub use bridge::{Bridge, BridgeFuture, Forwarded, Interest};
pub use broker::{
    Broker, BrokerBuilder, DurableInfo, Extension, HISTORY_PAGE_BYTES, HistoryError, HistoryPage,
    Persistence, Service, SubscriptionInfo, TopicInfo, TypedTopic, Unconfirmed,
};
pub use budget::ByteBudget;
pub use delivery::Redelivery;
pub use dispatch::Drained;
pub use error::{BindError, BuildError, Error, PublishError, SubscribeError};
pub use message::{DeadLetter, Message};
pub use options::{BrokerOptions, SubscribeOptions};
pub use plugin::{LoggingPlugin, Plugin, Rejection};
pub use publish::{PublishOptions, PublishReceipt};
pub use queue::SlowConsumer;
pub use retention::Retention;
pub use room::Room;
pub use shared::{MAX_QUEUE_CAPACITY, Running};
pub use staging::PushBatch;
pub use stats::{BrokerStats, SubscriptionStats};
pub use store::wal::{FsyncPolicy, WalOptions};
pub use store::{
    Durability, PersistenceType, STORE_BATCH_RECORDS, STORE_FSYNC_SECONDS, STORE_WRITE_SECONDS,
};
pub use subscription::{Acker, Delivery};
pub use subscription::{Subscriber, Subscription};
pub use whispeer_engines::{
    CipherAlgorithm, Codec, CodecError, Compression, CompressionAlgorithm, Encryption, Key,
    KeyError, KeyId, Keyring, OpenError, ReceiveError, SealError, TopicRule,
};
pub use whispeer_proto::{Filter, MessageId, Qos, StartAt, Topic, TopicError};

/// The wire vocabulary: envelopes, flags, limits. Re-exported for plugin authors.
pub mod proto {
    pub use whispeer_proto::*;
}

/// The edge pipeline (codecs, compression, encryption, keys), including its security model.
pub mod engines {
    pub use whispeer_engines::*;
}

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the parsers of input from
/// the disk that live in this crate. Not for applications.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Reads `bytes` as a write-ahead log segment: the valid records' count, and the length of
    /// the valid prefix when a bad record ended it.
    pub fn wal_segment(bytes: &[u8]) -> (usize, Option<u64>) {
        crate::store::wal::scan_bytes(bytes)
    }
}
