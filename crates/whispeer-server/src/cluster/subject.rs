//! Topics and filters as NATS subjects.
//!
//! A topic `a/b c` becomes `<prefix>.a.b~20c`: each `/`-separated segment is one subject token,
//! and every byte outside `A-Z a-z 0-9 - _` is written `~` and two hex digits, so any topic
//! crosses NATS and comes back the same (the mapping is one-to-one, and never produces a NATS
//! wildcard or separator). A filter maps segment by segment: `+` / `*` to `*`, and a trailing
//! `#` to two subjects — the parent itself and `>` below it — because whispeer's `#` also
//! matches zero segments, and NATS's `>` does not.
//!
//! A topic of 1,024 bytes (the default limit) is at most 3,072 bytes as a subject, within
//! nats-server's default 4 KiB control line.

use std::fmt::Write as _;

use whispeer_core::proto::{Filter, FilterSegment, Topic};

/// Appends `segment` escaped.
pub(crate) fn push_token(out: &mut String, segment: &str) {
    for &byte in segment.as_bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "~{byte:02X}");
        }
    }
}

/// The subject carrying `topic`.
pub(crate) fn topic_subject(prefix: &str, topic: &Topic) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.as_str().len() + 8);
    out.push_str(prefix);
    for segment in topic.segments() {
        out.push('.');
        push_token(&mut out, segment);
    }
    out
}

/// The subjects whose union is what `filter` matches (one, or two for a trailing `#`).
pub(crate) fn filter_subjects(prefix: &str, filter: &Filter) -> Vec<String> {
    let mut out = String::from(prefix);
    for segment in filter.segments() {
        match segment {
            FilterSegment::Literal(text) => {
                out.push('.');
                push_token(&mut out, text);
            }
            FilterSegment::One => out.push_str(".*"),
            FilterSegment::Rest => {
                // `#` alone matches every topic, and a topic has at least one segment.
                let zero = (out != prefix).then(|| out.clone());
                out.push_str(".>");
                return zero.into_iter().chain(std::iter::once(out)).collect();
            }
        }
    }
    vec![out]
}

/// The topic a subject carries, if it is one of [`topic_subject`]'s.
#[cfg(test)]
fn subject_topic(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = Vec::with_capacity(rest.len());
    let mut bytes = rest.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'.' => topic.push(b'/'),
            b'~' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                topic.push(u8::from_str_radix(hex, 16).ok()?);
            }
            byte => topic.push(byte),
        }
    }
    String::from_utf8(topic).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subjects(filter: &str) -> Vec<String> {
        filter_subjects("w", &Filter::parse(filter).expect("valid filter"))
    }

    #[test]
    fn filters_map_to_nats_wildcards_and_hash_also_matches_the_parent() {
        assert_eq!(subjects("a/b"), ["w.a.b"]);
        assert_eq!(subjects("a/+/c"), ["w.a.*.c"]);
        assert_eq!(subjects("a/*"), ["w.a.*"]);
        assert_eq!(subjects("a/#"), ["w.a", "w.a.>"]);
        assert_eq!(subjects("#"), ["w.>"]);
        assert_eq!(subjects("+/#"), ["w.*", "w.*.>"]);
    }

    #[test]
    fn separators_wildcards_and_spaces_in_topics_are_escaped() {
        let topic = Topic::parse("a.b/c d/~/ü/>").expect("valid topic");
        let subject = topic_subject("w", &topic);
        assert_eq!(subject, "w.a~2Eb.c~20d.~7E.~C3~BC.~3E");
        assert_eq!(subject_topic("w", &subject).as_deref(), Some(topic.as_str()));
    }

    /// What a NATS subject pattern matches (`*` one token, `>` one or more), for the test.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    proptest! {
        /// Round trip, and: a filter's subjects match a topic's subject exactly when the filter
        /// matches the topic (hidden topics aside, which the router filters), and never twice.
        #[test]
        fn subjects_match_like_filters(
            topic in "[a-c.~ ]{1,3}(/[a-c.~ ]{1,3}){0,3}",
            filter in "([a-c.~ ]{1,3}|\\+)(/([a-c.~ ]{1,3}|\\+)){0,2}(/#)?",
        ) {
            let topic = Topic::parse(&topic).expect("valid topic");
            let filter = Filter::parse(&filter).expect("valid filter");
            let subject = topic_subject("w", &topic);
            let back = subject_topic("w", &subject);
            prop_assert_eq!(back.as_deref(), Some(topic.as_str()));
            let hits = filter_subjects("w", &filter)
                .iter()
                .filter(|pattern| nats_matches(pattern, &subject))
                .count();
            prop_assert_eq!(hits, usize::from(filter.matches(&topic)));
        }
    }
}
