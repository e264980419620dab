//! Error codes carried in `Error` frames: one table, append only, never renumbered.

use std::fmt;

/// An error code from an `Error` frame. Codes this version does not know are kept as numbers,
/// so a newer peer's codes pass through unharmed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $name:ident = $value:literal, $text:literal;)*) => {
        impl ErrorCode {
            $($(#[doc = $doc])* pub const $name: Self = Self($value);)*

            /// The code's name and what to do about it, or `None` for a code this version lacks.
            pub fn describe(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some($text),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// The frame could not be parsed. Workaround: check that client and server versions match.
    MALFORMED = 1, "malformed frame: check client and server versions";
    /// The frame exceeds `max_frame_bytes`. Workaround: send smaller messages or raise the limit.
    TOO_LARGE = 2, "frame too large: send smaller messages or raise the limit";
    /// The connection has not authenticated and the server requires it.
    UNAUTHENTICATED = 3, "not authenticated: send AUTH with an API key first";
    /// The credentials are wrong, or do not allow this action on this topic.
    FORBIDDEN = 4, "forbidden: wrong credentials or no permission for this topic";
    /// The topic or filter is invalid, or reserved for the broker.
    INVALID_TOPIC = 5, "invalid or reserved topic or filter";
    /// No subscription has this id on this connection.
    UNKNOWN_SUBSCRIPTION = 6, "unknown subscription id";
    /// The peer speaks a protocol version this one cannot.
    UNSUPPORTED_VERSION = 7, "unsupported protocol version";
    /// The server failed; the request may be retried.
    INTERNAL = 8, "internal server error: retry later";
    /// The server is shutting down; reconnect later or elsewhere.
    SHUTTING_DOWN = 9, "server shutting down: reconnect later";
    /// A server plugin refused the message or subscription.
    REJECTED = 10, "rejected by a server plugin";
    /// A subscriber's queue was full and its policy refused the message.
    QUEUE_FULL = 11, "subscriber queue full";
    /// Nothing was received within the idle timeout.
    IDLE_TIMEOUT = 12, "idle timeout: nothing received in time";
    /// The subscription id is already in use on this connection.
    DUPLICATE_SUBSCRIPTION = 13, "subscription id already in use";
    /// The request came before HELLO, or HELLO came twice.
    PROTOCOL_VIOLATION = 14, "protocol violation: frame out of order";
    /// A limit (connections, subscriptions, rate) was reached.
    LIMIT_REACHED = 15, "limit reached";
    /// The requested history offset was evicted; the message says where history begins now.
    OFFSET_EVICTED = 16, "history offset evicted: start where the message says history begins";
    /// A cluster node could not hand the message to the other nodes (its engine is
    /// unreachable or behind); local subscribers may have it. Retry, here or on another node.
    CLUSTER_UNAVAILABLE = 17, "cluster unavailable: the message did not reach the other nodes; retry";
    /// A QoS 1 request (a publish with `response-topic`) that no subscriber took.
    NO_RESPONDERS = 18, "no responders: nothing subscribes to the request's topic";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.describe() {
            Some(text) => write!(f, "{} ({text})", self.0),
            None => write!(f, "{} (unknown code)", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorCode({})", self.0)
    }
}
