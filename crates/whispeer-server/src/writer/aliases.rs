//! The topics a connection's compact deliveries name by number (`whispeer_proto`'s
//! DELIVER_COMPACT): the first [`MAX_TOPIC_ALIASES`] distinct topics the writer delivers,
//! numbered in the order they first go out; a topic beyond them is named in full each time.

use std::collections::HashMap;

use whispeer_proto::{MAX_TOPIC_ALIASES, Topic, TopicRef};

#[derive(Debug, Default)]
pub(super) struct Aliases {
    numbers: HashMap<Topic, u16, foldhash::fast::RandomState>,
    /// The topic named last and its number: most deliveries name the topic of the one before.
    last: Option<(Topic, u16)>,
}

impl Aliases {
    /// How the next delivery names `topic`: by its number, or defining the next number while
    /// there are numbers left, or in full. A definition counts once the delivery is written
    /// ([`Aliases::sent`]): one that is not written defines nothing.
    #[inline]
    pub(super) fn name(&mut self, topic: &Topic) -> TopicRef {
        match &self.last {
            Some((last, number)) if last == topic => TopicRef::Alias(*number),
            _ => self.name_anew(topic),
        }
    }

    #[inline(never)]
    fn name_anew(&mut self, topic: &Topic) -> TopicRef {
        if let Some(&number) = self.numbers.get(topic) {
            self.last = Some((topic.clone(), number));
            return TopicRef::Alias(number);
        }
        match u16::try_from(self.numbers.len() + 1) {
            Ok(next) if next <= MAX_TOPIC_ALIASES => TopicRef::Define(next),
            _ => TopicRef::Given,
        }
    }

    /// Whether `topic` is numbered `number` (what a subscription to one topic kept).
    pub(super) fn names(&self, topic: &Topic, number: u16) -> bool {
        self.numbers.get(topic) == Some(&number)
    }

    /// A delivery naming `topic` as `named` was written: a number it defined holds from now on.
    #[inline]
    pub(super) fn sent(&mut self, topic: &Topic, named: TopicRef) {
        if let TopicRef::Define(number) = named {
            self.numbers.insert(topic.clone(), number);
            self.last = Some((topic.clone(), number));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(text: &str) -> Topic {
        Topic::parse(text).unwrap()
    }

    #[test]
    fn topics_are_numbered_in_order_once_written_and_named_in_full_past_the_limit() {
        let mut aliases = Aliases::default();
        let (a, b) = (topic("a"), topic("b"));
        assert_eq!(aliases.name(&a), TopicRef::Define(1));
        // Not written: the number is offered again.
        assert_eq!(aliases.name(&a), TopicRef::Define(1));
        aliases.sent(&a, TopicRef::Define(1));
        assert_eq!(aliases.name(&a), TopicRef::Alias(1));
        assert_eq!(aliases.name(&b), TopicRef::Define(2));
        aliases.sent(&b, TopicRef::Define(2));
        assert_eq!((aliases.name(&a), aliases.name(&b)), (TopicRef::Alias(1), TopicRef::Alias(2)));
        for n in 3..=MAX_TOPIC_ALIASES {
            let next = topic(&format!("t/{n}"));
            assert_eq!(aliases.name(&next), TopicRef::Define(n));
            aliases.sent(&next, TopicRef::Define(n));
        }
        assert_eq!(aliases.name(&topic("one/more")), TopicRef::Given);
        assert_eq!(aliases.name(&topic("t/1024")), TopicRef::Alias(1024));
    }
}
