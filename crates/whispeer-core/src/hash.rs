//! The hash maps of the hot paths.

use std::collections::HashMap;

/// A hash map for keys looked up per message (topic text, message ids, members). foldhash
/// rather than SipHash: a fraction of the cost on short keys, and randomly seeded per map, so
/// that clients choosing topic names or message ids cannot aim collisions at it.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
