//! How two filters relate: whether one covers the other (every topic the second matches, the
//! first matches too) and whether they overlap (some topic matches both). Access control is
//! built on these, so that no wildcard can widen a grant: holding `a/+` covers `a/b` and `a/+`,
//! but not `a/#` or `#`.
//!
//! Both follow the matching rules exactly, including the reserved-topic rule: a filter whose
//! first segment is a wildcard matches no `$` topic, so it neither covers nor overlaps a filter
//! that names one.

use crate::{Filter, FilterSegment, hidden_from_wildcards};

/// Whether the filter's first segment is a literal naming a topic hidden from wildcards (`$`
/// reserved, `@` addressed).
fn names_reserved(filter: &Filter) -> bool {
    matches!(filter.segments().next(), Some(FilterSegment::Literal(s)) if hidden_from_wildcards(s))
}

/// Whether the filter's first segment is a wildcard (`+`, `*` or `#`).
fn leads_with_wildcard(filter: &Filter) -> bool {
    !matches!(filter.segments().next(), Some(FilterSegment::Literal(_)))
}

impl Filter {
    /// Whether every topic `other` matches is matched by `self` too.
    ///
    /// ```
    /// use whispeer_proto::Filter;
    /// let grant = Filter::parse("chat/+")?;
    /// assert!(grant.covers(&Filter::parse("chat/lobby")?));
    /// assert!(grant.covers(&Filter::parse("chat/*")?));
    /// assert!(!grant.covers(&Filter::parse("chat/#")?));
    /// assert!(!grant.covers(&Filter::parse("#")?));
    /// # Ok::<(), whispeer_proto::TopicError>(())
    /// ```
    pub fn covers(&self, other: &Self) -> bool {
        // `other` may match `$` topics that a leading wildcard of `self` never matches.
        if leads_with_wildcard(self) && names_reserved(other) {
            return false;
        }
        let mut mine = self.segments();
        let mut theirs = other.segments();
        loop {
            match (mine.next(), theirs.next()) {
                (Some(FilterSegment::Rest), _) => return true,
                (None, None) => return true,
                // `other` ends (or goes on) where `self` does not: only `#` (zero or more) left
                // in `self` would still match, handled above.
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(_), Some(FilterSegment::Rest)) => return false,
                (Some(FilterSegment::One), Some(_)) => {}
                (Some(FilterSegment::Literal(a)), Some(FilterSegment::Literal(b))) if a == b => {}
                (Some(FilterSegment::Literal(_)), Some(_)) => return false,
            }
        }
    }

    /// Whether some topic matches both filters.
    ///
    /// ```
    /// use whispeer_proto::Filter;
    /// let denied = Filter::parse("admin/#")?;
    /// assert!(denied.overlaps(&Filter::parse("+/secrets")?));
    /// assert!(!denied.overlaps(&Filter::parse("chat/+")?));
    /// # Ok::<(), whispeer_proto::TopicError>(())
    /// ```
    pub fn overlaps(&self, other: &Self) -> bool {
        if (leads_with_wildcard(self) && names_reserved(other))
            || (leads_with_wildcard(other) && names_reserved(self))
        {
            return false;
        }
        let mut mine = self.segments();
        let mut theirs = other.segments();
        loop {
            match (mine.next(), theirs.next()) {
                (Some(FilterSegment::Rest), _) | (_, Some(FilterSegment::Rest)) => return true,
                (None, None) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(FilterSegment::Literal(a)), Some(FilterSegment::Literal(b))) if a != b => {
                    return false;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::{Filter, Topic};

    fn filter() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            3 => prop_oneof![Just("a"), Just("b"), Just("$s"), Just("@i")].prop_map(str::to_string),
            1 => Just("+".to_string()),
        ];
        (prop::collection::vec(segment, 1..4), any::<bool>()).prop_map(|(mut s, hash)| {
            if hash {
                s.push("#".into());
            }
            s.join("/")
        })
    }

    /// Every topic of up to five segments over the alphabet the filters use, plus one more.
    fn topics() -> Vec<Topic> {
        let alphabet = ["a", "b", "$s", "@i", "c"];
        let mut all: Vec<Vec<&str>> = vec![vec![]];
        let mut topics = Vec::new();
        for _ in 0..5 {
            all = all
                .iter()
                .flat_map(|prefix| {
                    alphabet.iter().map(move |s| {
                        let mut next = prefix.clone();
                        next.push(*s);
                        next
                    })
                })
                .collect();
            topics.extend(all.iter().filter_map(|s| Topic::parse(&s.join("/")).ok()));
        }
        topics
    }

    proptest! {
        #[test]
        fn covers_and_overlaps_agree_with_matching_every_topic(a in filter(), b in filter()) {
            let (a, b) = (Filter::parse(&a).unwrap(), Filter::parse(&b).unwrap());
            let topics = topics();
            let covered = topics.iter().all(|t| !b.matches(t) || a.matches(t));
            let overlap = topics.iter().any(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(a.covers(&b), covered, "{} covers {}", a, b);
            prop_assert_eq!(a.overlaps(&b), overlap, "{} overlaps {}", a, b);
        }
    }
}
