//! Entry ids and offsets, and channel globs.

use super::*;

#[test]
fn entry_ids_and_offsets_map_both_ways_in_order() {
    let a = id_to_offset("1796054870877-0").unwrap();
    let b = id_to_offset("1796054870877-1").unwrap();
    let c = id_to_offset("1796054870878-0").unwrap();
    assert!(a < b && b < c);
    assert_eq!(offset_to_id(b), "1796054870877-1");
    assert_eq!(id_to_offset("x-1"), None);
    assert_eq!(id_to_offset(&format!("1-{}", 1u64 << 20)), None, "too many in one millisecond");
    assert_eq!(glob("w.a.*.>"), "w.a.*.*");
}
