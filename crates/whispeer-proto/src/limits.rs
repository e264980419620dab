//! Size limits shared by every reader of outside input.
//!
//! A limit is checked before anything is allocated for the thing it bounds.

/// Bounds on topics and messages.
///
/// The defaults suit most deployments; raise them deliberately.
///
/// ```
/// let mut limits = whispeer_proto::Limits::default();
/// limits.max_topic_depth = 8;
/// assert_eq!(limits.max_topic_len, 1024);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest topic or filter, in bytes of UTF-8.
    pub max_topic_len: usize,
    /// Most `/`-separated segments in a topic or filter.
    pub max_topic_depth: usize,
    /// Largest message payload, in bytes, after decompression.
    pub max_message_bytes: usize,
    /// Largest wire frame, in bytes after the length prefix. Leave room above
    /// `max_message_bytes` for the envelope and the seal (64 KiB by default).
    pub max_frame_bytes: usize,
}

impl Limits {
    /// The default limits: 1 KiB topics, 32 segments, 1 MiB messages, 1 MiB + 64 KiB frames.
    pub const DEFAULT: Self = Self {
        max_topic_len: 1024,
        max_topic_depth: 32,
        max_message_bytes: 1024 * 1024,
        max_frame_bytes: 1024 * 1024 + 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}
