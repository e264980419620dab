//! Topics and filters: parsing, validation and matching of `+`, `*` and `#`.
//!
//! A topic or filter is validated once, at `parse`; matching never fails afterwards.
//! Topics are `/`-separated, non-empty segments. In a filter, `+` and `*` match exactly one
//! segment and `#` matches any number of trailing segments, including zero, so `chat/#` also
//! matches `chat`. A filter that starts with a wildcard does not match topics whose first
//! segment starts with `$` (those are reserved for the broker, as in MQTT).

use std::fmt;

use smol_str::SmolStr;

use crate::Limits;

/// Why a topic or filter was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic or filter is the empty string.
    #[error("topic is empty")]
    Empty,
    /// A segment between two `/` (or at either end) is empty.
    #[error("segment {index} is empty (leading, trailing or doubled '/')")]
    EmptySegment {
        /// Zero-based index of the empty segment.
        index: usize,
    },
    /// A wildcard appears in a topic, which names one concrete destination.
    #[error("wildcard '{wildcard}' in segment {index} of a topic; wildcards belong in filters")]
    WildcardInTopic {
        /// Zero-based index of the offending segment.
        index: usize,
        /// The wildcard character.
        wildcard: char,
    },
    /// A wildcard shares its segment with other characters, as in `a+` or `#b`.
    #[error("wildcard '{wildcard}' must be a whole segment, found in segment {index}")]
    WildcardInSegment {
        /// Zero-based index of the offending segment.
        index: usize,
        /// The wildcard character.
        wildcard: char,
    },
    /// `#` appears before the last segment.
    #[error("'#' must be the last segment, found at segment {index}")]
    HashNotLast {
        /// Zero-based index of the `#` segment.
        index: usize,
    },
    /// The topic has a control character (U+0000 to U+001F or U+007F).
    #[error("control character {code:#04x} at byte {at}")]
    ControlCharacter {
        /// Byte offset of the character.
        at: usize,
        /// The character's code.
        code: u8,
    },
    /// The topic is longer than [`Limits::max_topic_len`].
    #[error("topic of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Length of the refused topic in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The topic has more segments than [`Limits::max_topic_depth`].
    #[error("topic of {depth} segments exceeds the limit of {max}")]
    TooDeep {
        /// Number of segments of the refused topic.
        depth: usize,
        /// The configured limit.
        max: usize,
    },
}

/// What a byte is to [`scan`]: most bytes are `PLAIN` and cost one look-up each.
const PLAIN: u8 = 0;
const SLASH: u8 = 1;
const WILDCARD: u8 = 2;
const CONTROL: u8 = 3;

/// [`scan`]'s class of every byte value. Bytes from 0x80 are parts of multi-byte UTF-8
/// characters: plain.
static CLASS: [u8; 256] = {
    let mut class = [PLAIN; 256];
    let mut b = 0;
    while b < 0x20 {
        class[b] = CONTROL;
        b += 1;
    }
    class[0x7f] = CONTROL;
    class[b'/' as usize] = SLASH;
    class[b'+' as usize] = WILDCARD;
    class[b'*' as usize] = WILDCARD;
    class[b'#' as usize] = WILDCARD;
    class
};

/// Checks what topics and filters have in common in one pass over the bytes; returns the
/// number of segments and the first wildcard character found, with its segment index.
///
/// Runs for every topic published, so a plain byte (most of them) costs one table look-up;
/// only `/`, wildcards and control characters take the longer way.
fn scan(s: &str, limits: &Limits) -> Result<(usize, Option<(usize, char)>), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_topic_len {
        return Err(TopicError::TooLong { len: s.len(), max: limits.max_topic_len });
    }
    let bytes = s.as_bytes();
    let mut index = 0;
    // Where the current segment starts: a `/` there, or the end, makes it empty.
    let mut segment_start = 0;
    let mut wildcard = None;
    for (at, &b) in bytes.iter().enumerate() {
        match CLASS[usize::from(b)] {
            PLAIN => {}
            SLASH => {
                if at == segment_start {
                    return Err(TopicError::EmptySegment { index });
                }
                index += 1;
                segment_start = at + 1;
            }
            WILDCARD => {
                if wildcard.is_none() {
                    wildcard = Some((index, char::from(b)));
                }
            }
            _ => return Err(TopicError::ControlCharacter { at, code: b }),
        }
    }
    if segment_start == bytes.len() {
        return Err(TopicError::EmptySegment { index });
    }
    let depth = index + 1;
    if depth > limits.max_topic_depth {
        return Err(TopicError::TooDeep { depth, max: limits.max_topic_depth });
    }
    Ok((depth, wildcard))
}

/// A validated topic: the concrete name a message is published to, such as `sensor/k1/temperature`.
///
/// Cloning is cheap: a topic of up to 23 bytes is held in place (a copy of 24 bytes, no
/// allocation and no shared count: a message, the router's table and a connection's last
/// topic each hold their own, so none of them reads another's memory); a longer one shares its
/// text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Topic(SmolStr);

impl std::hash::Hash for Topic {
    /// Hashes as its text, as `str` does (so maps keyed by `Topic` are searched with a `&str`).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Topic {
    /// Parses a topic under the default [`Limits`].
    ///
    /// # Errors
    /// Returns the first rule the text breaks; see [`TopicError`].
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        Self::parse_with(s, &Limits::DEFAULT)
    }

    /// Parses a topic under the given limits.
    ///
    /// # Errors
    /// Returns the first rule the text breaks; see [`TopicError`].
    pub fn parse_with(s: &str, limits: &Limits) -> Result<Self, TopicError> {
        Self::validate(s, limits)?;
        Ok(Self(SmolStr::new(s)))
    }

    /// Checks that `s` is a valid topic under `limits` without allocating.
    ///
    /// # Errors
    /// Returns the first rule the text breaks; see [`TopicError`].
    pub fn validate(s: &str, limits: &Limits) -> Result<(), TopicError> {
        match scan(s, limits)? {
            (_, None) => Ok(()),
            (_, Some((index, wildcard))) => Err(TopicError::WildcardInTopic { index, wildcard }),
        }
    }

    /// The topic's text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The `/`-separated segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.as_str().split('/')
    }

    /// Whether a leading wildcard skips this topic: its first segment starts with `$` (reserved
    /// for the broker) or `@` (addressed to one party, like `@inbox/<id>`).
    pub fn is_hidden(&self) -> bool {
        hidden_from_wildcards(self.as_str())
    }

    /// Whether the topic is reserved for the broker (its first segment starts with `$`).
    pub fn is_reserved(&self) -> bool {
        self.as_str().starts_with('$')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", self.as_str())
    }
}

impl std::borrow::Borrow<str> for Topic {
    /// Lets maps keyed by `Topic` be searched with a `&str` (`Topic` hashes as its text).
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// One segment of a [`Filter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterSegment<'a> {
    /// A segment that must equal this text.
    Literal(&'a str),
    /// `+` or `*`: exactly one segment, whatever it is.
    One,
    /// `#`: any number of trailing segments, including zero. Always last.
    Rest,
}

impl<'a> FilterSegment<'a> {
    fn classify(segment: &'a str) -> Self {
        match segment {
            "+" | "*" => Self::One,
            "#" => Self::Rest,
            literal => Self::Literal(literal),
        }
    }
}

/// A validated subscription filter, such as `sensor/+/temperature` or `chat/#`.
///
/// A filter without wildcards matches exactly one topic (see [`Filter::is_exact`]).
/// Cloning is cheap (as a [`Topic`]'s).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter {
    text: SmolStr,
    exact: bool,
}

impl Filter {
    /// Parses a filter under the default [`Limits`].
    ///
    /// # Errors
    /// Returns the first rule the text breaks; see [`TopicError`].
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        Self::parse_with(s, &Limits::DEFAULT)
    }

    /// Parses a filter under the given limits.
    ///
    /// # Errors
    /// Returns the first rule the text breaks; see [`TopicError`].
    pub fn parse_with(s: &str, limits: &Limits) -> Result<Self, TopicError> {
        let (depth, first_wildcard) = scan(s, limits)?;
        if first_wildcard.is_none() {
            return Ok(Self { text: SmolStr::new(s), exact: true });
        }
        let mut exact = true;
        for (index, segment) in s.split('/').enumerate() {
            match FilterSegment::classify(segment) {
                FilterSegment::Literal(text) => {
                    if let Some(wildcard) = text.chars().find(|c| matches!(c, '+' | '*' | '#')) {
                        return Err(TopicError::WildcardInSegment { index, wildcard });
                    }
                }
                FilterSegment::One => exact = false,
                FilterSegment::Rest => {
                    if index + 1 != depth {
                        return Err(TopicError::HashNotLast { index });
                    }
                    exact = false;
                }
            }
        }
        Ok(Self { text: SmolStr::new(s), exact })
    }

    /// The filter's text, as given.
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    /// Whether the filter has no wildcard and so matches exactly one topic.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// The one topic an exact filter matches; `None` for a filter with wildcards.
    pub fn as_topic(&self) -> Option<Topic> {
        self.exact.then(|| Topic(self.text.clone()))
    }

    /// The segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = FilterSegment<'_>> {
        self.text.split('/').map(FilterSegment::classify)
    }

    /// Whether `topic` matches this filter.
    pub fn matches(&self, topic: &Topic) -> bool {
        self.matches_str(topic.as_str())
    }

    /// Whether the topic text `topic` matches this filter. The text is not validated: use it
    /// for topics validated elsewhere (an invalid one gets an answer, never a panic).
    pub fn matches_str(&self, topic: &str) -> bool {
        if self.exact {
            return self.text.as_str() == topic;
        }
        if self.text.as_str() == "#" {
            // Every topic but those a leading wildcard skips (a grant of everything is checked
            // for each publish to a topic other than the connection's last).
            return !hidden_from_wildcards(topic);
        }
        let mut filter = self.segments();
        let mut topic_segments = topic.split('/');
        // A leading wildcard never matches a reserved (`$`) or addressed (`@`) topic.
        let mut first = true;
        loop {
            match (filter.next(), topic_segments.next()) {
                (Some(FilterSegment::Rest), next) => {
                    return !(first && next.is_some_and(hidden_from_wildcards));
                }
                (Some(FilterSegment::One), Some(segment)) => {
                    if first && hidden_from_wildcards(segment) {
                        return false;
                    }
                }
                (Some(FilterSegment::Literal(want)), Some(segment)) => {
                    if want != segment {
                        return false;
                    }
                }
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }
}

/// Whether a topic whose first segment is `first` is skipped by filters that begin with a
/// wildcard: `$` topics are reserved for the broker, `@` topics are addressed to one party
/// (`@inbox/<id>`). Such topics are reached only by filters that name their first segment.
pub fn hidden_from_wildcards(first: &str) -> bool {
    first.starts_with('$') || first.starts_with('@')
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", self.as_str())
    }
}

impl From<Topic> for Filter {
    /// A topic is a filter that matches only itself.
    fn from(topic: Topic) -> Self {
        Self { text: topic.0, exact: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(filter: &str, topic: &str, matches: bool) {
        let f = Filter::parse(filter).unwrap();
        let t = Topic::parse(topic).unwrap();
        assert_eq!(f.matches(&t), matches, "{filter} vs {topic}");
    }

    #[test]
    fn exact_filter_matches_only_itself() {
        check("a/b", "a/b", true);
        check("a/b", "a/b/c", false);
        check("a/b", "a", false);
        assert!(Filter::parse("a/b").unwrap().is_exact());
    }

    #[test]
    fn plus_and_star_match_exactly_one_segment() {
        check("sensor/+/temperature", "sensor/kitchen/temperature", true);
        check("sensor/*/temperature", "sensor/kitchen/temperature", true);
        check("sensor/+/temperature", "sensor/temperature", false);
        check("sensor/+/temperature", "sensor/a/b/temperature", false);
        check("+", "a", true);
        check("+", "a/b", false);
        assert!(!Filter::parse("a/+").unwrap().is_exact());
    }

    #[test]
    fn hash_matches_parent_and_any_depth() {
        check("chat/#", "chat", true);
        check("chat/#", "chat/room", true);
        check("chat/#", "chat/room/1/2", true);
        check("chat/#", "chatter", false);
        check("#", "anything/at/all", true);
        check("a/+/#", "a/b", true);
        check("a/+/#", "a", false);
    }

    #[test]
    fn leading_wildcard_skips_reserved_topics() {
        check("#", "$sys/clients", false);
        check("#", "@inbox/alice", false);
        check("#", "x/@inbox", true);
        check("#", "x", true);
        check("+/clients", "$sys/clients", false);
        check("$sys/#", "$sys/clients", true);
        check("a/#", "a/$b", true);
    }

    #[test]
    fn topic_refuses_malformed_text() {
        let limits = Limits::DEFAULT;
        let cases: &[(&str, TopicError)] = &[
            ("", TopicError::Empty),
            ("/a", TopicError::EmptySegment { index: 0 }),
            ("a/", TopicError::EmptySegment { index: 1 }),
            ("a//b", TopicError::EmptySegment { index: 1 }),
            ("a/+", TopicError::WildcardInTopic { index: 1, wildcard: '+' }),
            ("a/b#", TopicError::WildcardInTopic { index: 1, wildcard: '#' }),
            ("a\0b", TopicError::ControlCharacter { at: 1, code: 0 }),
        ];
        for (text, err) in cases {
            assert_eq!(Topic::validate(text, &limits), Err(err.clone()), "{text:?}");
        }
    }

    #[test]
    fn filter_refuses_malformed_wildcards() {
        let cases: &[(&str, TopicError)] = &[
            ("a/b+", TopicError::WildcardInSegment { index: 1, wildcard: '+' }),
            ("#a", TopicError::WildcardInSegment { index: 0, wildcard: '#' }),
            ("a/*b", TopicError::WildcardInSegment { index: 1, wildcard: '*' }),
            ("#/a", TopicError::HashNotLast { index: 0 }),
            ("a/#/b", TopicError::HashNotLast { index: 1 }),
            ("a//#", TopicError::EmptySegment { index: 1 }),
        ];
        for (text, err) in cases {
            assert_eq!(Filter::parse(text), Err(err.clone()), "{text:?}");
        }
    }

    /// `scan` as it was written first, a `match` on every byte: the reference the table-driven
    /// one must agree with.
    fn scan_byte_by_byte(
        s: &str,
        limits: &Limits,
    ) -> Result<(usize, Option<(usize, char)>), TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > limits.max_topic_len {
            return Err(TopicError::TooLong { len: s.len(), max: limits.max_topic_len });
        }
        let (mut index, mut segment_len, mut wildcard) = (0, 0, None);
        for (at, &b) in s.as_bytes().iter().enumerate() {
            match b {
                b'/' => {
                    if segment_len == 0 {
                        return Err(TopicError::EmptySegment { index });
                    }
                    index += 1;
                    segment_len = 0;
                    continue;
                }
                0..0x20 | 0x7f => return Err(TopicError::ControlCharacter { at, code: b }),
                b'+' | b'*' | b'#' if wildcard.is_none() => {
                    wildcard = Some((index, char::from(b)));
                }
                _ => {}
            }
            segment_len += 1;
        }
        if segment_len == 0 {
            return Err(TopicError::EmptySegment { index });
        }
        let depth = index + 1;
        if depth > limits.max_topic_depth {
            return Err(TopicError::TooDeep { depth, max: limits.max_topic_depth });
        }
        Ok((depth, wildcard))
    }

    proptest::proptest! {
        /// Texts drawn mostly from the bytes `scan` treats apart (`/`, wildcards, control
        /// characters, DEL, a multi-byte character) give the same result, error or depth and
        /// first wildcard, as the byte-by-byte reference, under tight limits and the defaults.
        #[test]
        fn scan_agrees_with_the_byte_by_byte_reference(
            text in "[a/+*#\\x00\\x1f\\x7fé$@ ]{0,24}",
            max_len in 1usize..30,
            max_depth in 1usize..8,
        ) {
            let tight = Limits { max_topic_len: max_len, max_topic_depth: max_depth, ..Limits::DEFAULT };
            for limits in [&tight, &Limits::DEFAULT] {
                proptest::prop_assert_eq!(scan(&text, limits), scan_byte_by_byte(&text, limits));
            }
        }
    }

    #[test]
    fn topics_are_equal_by_text_whether_shared_or_not() {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        // Held in place up to 23 bytes, shared beyond: equal and hashed by text either way.
        for (text, changed) in
            [("a/b", "a/c"), ("sensors/0001/temperature", "sensors/0001/temperaturf")]
        {
            let a = Topic::parse(text).unwrap();
            let copy = a.clone();
            let separate = Topic::parse(text).unwrap();
            let other = Topic::parse(changed).unwrap();
            let shares = a.as_str().as_ptr() == copy.as_str().as_ptr();
            assert_eq!(shares, text.len() > 23, "{text}");
            assert_ne!(a.as_str().as_ptr(), separate.as_str().as_ptr());
            assert_eq!(a, copy);
            assert_eq!(a, separate);
            assert_ne!(a, other);
            assert_eq!(hasher.hash_one(&a), hasher.hash_one(text));
            assert_eq!(hasher.hash_one(&a), hasher.hash_one(&separate));
            let filter = Filter::parse(text).unwrap();
            assert_eq!(filter.as_topic(), Some(a));
        }
    }

    #[test]
    fn limits_bound_length_and_depth() {
        let limits = Limits { max_topic_len: 8, max_topic_depth: 3, ..Limits::DEFAULT };
        assert_eq!(
            Topic::parse_with("abcdefghi", &limits),
            Err(TopicError::TooLong { len: 9, max: 8 })
        );
        assert_eq!(
            Topic::parse_with("a/b/c/d", &limits),
            Err(TopicError::TooDeep { depth: 4, max: 3 })
        );
        assert!(Filter::parse_with("a/b/#", &limits).is_ok());
    }
}
