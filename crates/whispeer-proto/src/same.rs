//! Comparing short texts (topics) without a call: a publish compares its topic with the one
//! named last once or twice, and glibc's `memcmp`, behind a call through the PLT, cost most of
//! such a compare (36 of the 60 instructions of the SDK's topic numbering under callgrind).

/// Whether `a` and `b` hold the same bytes: texts of 4 to 32 bytes are compared in words
/// (overlapping at the end), others with `==`.
#[inline]
pub fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let len = a.len();
    if len != b.len() {
        return false;
    }
    if (8..=32).contains(&len) {
        // The first word, the last (overlapping the one before it where the length is not a
        // multiple of 8), and those between.
        let same = |at| word(a, at) == word(b, at);
        return same(0) && same(len - 8) && (len <= 16 || same(8)) && (len <= 24 || same(16));
    }
    if (4..8).contains(&len) {
        return half(a, 0) == half(b, 0) && half(a, len - 4) == half(b, len - 4);
    }
    a == b
}

/// The 8 bytes at `at` (within `bytes`, as the callers check).
#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u64 {
    let chunk = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>);
    u64::from_ne_bytes(chunk.copied().unwrap_or_default())
}

/// The 4 bytes at `at` (within `bytes`, as the callers check).
#[inline(always)]
fn half(bytes: &[u8], at: usize) -> u32 {
    let chunk = bytes.get(at..).and_then(<[u8]>::first_chunk::<4>);
    u32::from_ne_bytes(chunk.copied().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn texts_differing_anywhere_are_told_apart() {
        for len in 0..48 {
            let a: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert!(same_text(&a, &a.clone()), "{len}");
            for at in 0..len {
                let mut b = a.clone().into_bytes();
                b[at] = b'Z';
                let b = String::from_utf8(b).unwrap();
                assert!(!same_text(&a, &b), "{len} at {at}");
            }
            assert!(!same_text(&a, &format!("{a}x")));
        }
    }

    proptest! {
        #[test]
        fn same_text_is_equality(a in "[a-c/]{0,40}", b in "[a-c/]{0,40}") {
            prop_assert_eq!(same_text(&a, &b), a == b);
            prop_assert!(same_text(&a, &a.clone()));
        }
    }
}
