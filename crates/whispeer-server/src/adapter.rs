//! What a transport adapter (the WebSocket reader) tells the connection beyond bytes.

use whispeer_proto::ErrorCode;

/// What a transport adapter (WebSocket) reports through its reader's `io::Error`, beyond a
/// plain refusal of its input (`InvalidData`, answered with `MALFORMED` and a close).
#[derive(Debug)]
#[cfg_attr(
    not(feature = "websocket"),
    expect(dead_code, reason = "only the WebSocket adapter reports these")
)]
pub(super) enum AdapterError {
    /// One request refused alone (e.g. a JSON request naming an invalid topic); the connection
    /// goes on.
    Refused { correlation: u32, code: ErrorCode, message: String },
    /// The connection ends with this error (e.g. a WebSocket message over the size limit).
    Fatal { code: ErrorCode, message: String },
}

impl std::fmt::Display for AdapterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused { message, .. } | Self::Fatal { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for AdapterError {}

#[cfg(feature = "websocket")]
impl AdapterError {
    pub(super) fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}
