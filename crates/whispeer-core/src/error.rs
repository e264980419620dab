//! Errors, one enum per operation family, and the umbrella [`Error`] they convert into.

use whispeer_engines::{CodecError, ReceiveError, SealError};
use whispeer_proto::{Qos, Topic, TopicError};

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is not a valid topic.
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] TopicError),
    /// The topic starts with `$`, which is reserved for the broker's own messages.
    #[error("topic {0} is reserved for the broker")]
    ReservedTopic(Topic),
    /// The topic is bound to another message type (see `Broker::topic`).
    #[error("topic {topic} carries {expected}, not {found}")]
    WrongType {
        /// The bound topic.
        topic: Topic,
        /// The type the topic is bound to.
        expected: &'static str,
        /// The type that was published.
        found: &'static str,
    },
    /// The value could not be encoded.
    #[error(transparent)]
    Encode(#[from] CodecError),
    /// The payload could not be sealed (no key for the topic, no randomness).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The message could not be written to the write-ahead log (its writer has stopped, or the
    /// envelope does not encode).
    #[error("message not stored: {0}")]
    Storage(String),
    /// The encoded message is larger than `Limits::max_message_bytes`.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Encoded length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A plugin refused the message.
    #[error("plugin {plugin} rejected the message: {reason}")]
    Rejected {
        /// The refusing plugin's name.
        plugin: &'static str,
        /// The plugin's reason.
        reason: String,
    },
    /// Subscribers whose policy is `SlowConsumer::FailPublish` had full queues. The message
    /// was still queued for the other `delivered` subscribers.
    #[error("{full} subscriber queue(s) full; delivered to {delivered} other(s)")]
    QueueFull {
        /// Subscribers that did not get the message.
        full: usize,
        /// Subscribers that did.
        delivered: usize,
    },
}

/// Why a subscription was not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The filter is not a valid filter.
    #[error("invalid filter: {0}")]
    InvalidFilter(#[from] TopicError),
    /// The filter names a topic bound to another message type (see `Broker::topic`).
    #[error("topic {topic} carries {expected}, not {found}")]
    WrongType {
        /// The bound topic.
        topic: Topic,
        /// The type the topic is bound to.
        expected: &'static str,
        /// The type the subscriber asked for.
        found: &'static str,
    },
    /// A plugin refused the subscription.
    #[error("plugin {plugin} rejected the subscription: {reason}")]
    Rejected {
        /// The refusing plugin's name.
        plugin: &'static str,
        /// The plugin's reason.
        reason: String,
    },
    /// The queue capacity is zero or above the maximum.
    #[error("queue capacity {capacity} is outside 1..={max}")]
    InvalidCapacity {
        /// The requested capacity.
        capacity: usize,
        /// The largest capacity allowed.
        max: usize,
    },
    /// The prefetch (QoS 1 credit window) is zero or above the maximum.
    #[error("prefetch {prefetch} is outside 1..={max}")]
    InvalidPrefetch {
        /// The requested prefetch.
        prefetch: usize,
        /// The largest prefetch allowed.
        max: usize,
    },
    /// A group name is empty, longer than 255 bytes, or has control characters.
    #[error("invalid group name {name:?}")]
    InvalidGroup {
        /// The name.
        name: String,
    },
    /// The group exists with another QoS; all members must ask for the same.
    #[error("group {group} delivers {existing:?}, not {requested:?}")]
    GroupMismatch {
        /// The group's name.
        group: String,
        /// The group's QoS.
        existing: Qos,
        /// The QoS asked for.
        requested: Qos,
    },
    /// The requested offset is no longer retained; history begins at `first`.
    #[error("offset {requested} was evicted; history begins at offset {first}")]
    OffsetEvicted {
        /// The offset asked for.
        requested: u64,
        /// The oldest offset retained (the next offset when nothing is).
        first: u64,
    },
    /// The start position does not fit the subscription.
    #[error("cannot start there: {reason}")]
    InvalidStart {
        /// Why.
        reason: &'static str,
    },
    /// No tokio runtime was available and the broker could not start its own.
    #[error("cannot start the delivery runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Why a topic could not be bound to a type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The topic is not a valid topic.
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] TopicError),
    /// The topic is already bound to another type.
    #[error("topic {topic} is already bound to {bound}, not {requested}")]
    AlreadyBound {
        /// The topic.
        topic: Topic,
        /// The type it is bound to.
        bound: &'static str,
        /// The type that was asked for.
        requested: &'static str,
    },
}

/// Why a broker could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A service (a network listener, an admin port) could not start.
    #[error("{service}: {source}")]
    Service {
        /// Which service (e.g. `tcp 127.0.0.1:7450`).
        service: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// The store of durable topics could not be opened or repaired.
    #[error("store at {}: {source}", dir.display())]
    Storage {
        /// The store's directory or file.
        dir: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Any whispeer error; each operation's own error converts into it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`PublishError`].
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// See [`SubscribeError`].
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// See [`BindError`].
    #[error(transparent)]
    Bind(#[from] BindError),
    /// See [`ReceiveError`].
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// See [`whispeer_engines::KeyError`].
    #[error(transparent)]
    Key(#[from] whispeer_engines::KeyError),
}
