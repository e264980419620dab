//! Topic and filter parsing: never panics; what parses keeps its text; a parsed topic used as a
//! filter matches itself; a filter agrees with `matches_str`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_proto::{Filter, Topic};

fuzz_target!(|data: (&str, &str)| {
    let (a, b) = data;
    if let Ok(topic) = Topic::parse(a) {
        assert_eq!(topic.as_str(), a);
        let filter = Filter::from(topic.clone());
        assert!(filter.matches(&topic));
    }
    if let Ok(filter) = Filter::parse(b) {
        assert_eq!(filter.as_str(), b);
        if let Ok(topic) = Topic::parse(a) {
            assert_eq!(filter.matches(&topic), filter.matches_str(a));
        }
        if let Some(topic) = filter.as_topic() {
            assert!(filter.matches(&topic));
        }
    }
});
