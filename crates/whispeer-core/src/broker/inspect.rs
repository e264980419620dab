//! What a broker holds right now, for operators: retained topics, subscriptions (a queue group
//! counts once, with its members), and durable subscriptions with their lag. Each call takes a
//! snapshot under the locks involved, one at a time; figures may move between calls.

use std::collections::HashMap;

use whispeer_proto::{Filter, Topic};

use crate::Broker;
use crate::router::SubId;
use crate::stats::SubscriptionStats;

/// A retained topic.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic.
    pub topic: Topic,
    /// The oldest offset retained (the next offset when nothing is).
    pub first_offset: u64,
    /// The offset the next message gets.
    pub next_offset: u64,
    /// Messages retained in memory.
    pub messages: usize,
    /// Their bytes (payloads plus 256 per message).
    pub bytes: usize,
    /// Whether the topic goes through the store.
    pub durable: bool,
}

/// A subscription: its own queue, or a queue group's.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionInfo {
    /// The filter.
    pub filter: Filter,
    /// The group's name and member count, for a queue group.
    pub group: Option<(String, usize)>,
    /// Its counters (queued, received, drops, …; `unacked` for a QoS 1 group).
    pub stats: SubscriptionStats,
}

/// A durable subscription's position in one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DurableInfo {
    /// The group's filter.
    pub filter: String,
    /// The group's name.
    pub group: String,
    /// The topic.
    pub topic: Topic,
    /// Everything up to this offset is settled.
    pub committed: u64,
    /// Messages published after it (0 when the topic is no longer retained).
    pub lag: u64,
}

impl Broker {
    /// The retained topics, sorted by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut topics: Vec<TopicInfo> = self
            .inner
            .history
            .topics()
            .into_iter()
            .map(|(topic, first_offset, next_offset, messages, bytes, durable)| TopicInfo {
                topic,
                first_offset,
                next_offset,
                messages,
                bytes,
                durable,
            })
            .collect();
        topics.sort_by(|a, b| a.topic.as_str().cmp(b.topic.as_str()));
        topics
    }

    /// How many subscriptions (a queue group counting once) a message on `topic` reaches now.
    pub fn subscribers(&self, topic: &Topic) -> usize {
        self.inner.router.with_matches(topic.as_str(), |matches| matches.map_or(0, |m| m.len()))
    }

    /// Every subscription, sorted by filter.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let groups: HashMap<SubId, (String, usize, usize)> = self
            .inner
            .groups
            .list()
            .into_iter()
            .map(|(key, members, group)| {
                let unacked = group.tracker.as_ref().map_or(0, |t| t.unacked());
                (group.id, (key.1.to_string(), members, unacked))
            })
            .collect();
        let mut subscriptions: Vec<SubscriptionInfo> = self
            .inner
            .router
            .routes()
            .into_iter()
            .map(|route| {
                let group = groups.get(&route.id);
                let unacked = group.map_or(0, |(_, _, unacked)| *unacked);
                SubscriptionInfo {
                    filter: route.queue.filter.clone(),
                    group: group.map(|(name, members, _)| (name.clone(), *members)),
                    stats: route.queue.counters.snapshot(route.queue.len(), unacked),
                }
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.as_str().cmp(b.filter.as_str()));
        subscriptions
    }

    /// Every durable subscription's committed offset per topic, and its lag.
    pub fn durable_subscriptions(&self) -> Vec<DurableInfo> {
        let mut durable: Vec<DurableInfo> = self
            .inner
            .commits
            .all()
            .into_iter()
            .map(|(key, topic, committed)| {
                let next = self.inner.history.next_offset(&topic);
                let lag = next.map_or(0, |next| next.saturating_sub(committed + 1));
                DurableInfo {
                    filter: key.0.to_string(),
                    group: key.1.to_string(),
                    topic,
                    committed,
                    lag,
                }
            })
            .collect();
        durable.sort_by(|a, b| (&a.group, a.topic.as_str()).cmp(&(&b.group, b.topic.as_str())));
        durable
    }
}

#[cfg(test)]
mod tests {
    use crate::{Broker, BrokerOptions, Filter, Qos, Retention, SubscribeOptions};

    #[tokio::test]
    async fn the_snapshot_shows_topics_subscriptions_groups_and_lag() {
        let retention = vec![(Filter::parse("jobs/#").unwrap(), Retention::messages(100))];
        let options = BrokerOptions { retention, ..BrokerOptions::default() };
        let broker = Broker::builder(options).build();
        let group = SubscribeOptions::new("jobs/#").qos(Qos::AtLeastOnce).group("workers");
        let mut a = broker.subscription::<u32>(group.clone()).unwrap();
        let _b = broker.subscription::<u32>(group).unwrap();
        let _plain = broker.messages("other").unwrap();
        for n in 0..5u32 {
            broker.publish("jobs/x", &n).unwrap();
        }
        for _ in 0..2 {
            assert!(a.recv_delivery().await.unwrap().ack());
        }
        let _held = a.recv_delivery().await.unwrap();

        let topics = broker.topics();
        assert_eq!(topics.len(), 1);
        let jobs = &topics[0];
        assert_eq!(
            (jobs.topic.as_str(), jobs.first_offset, jobs.next_offset, jobs.messages),
            ("jobs/x", 1, 6, 5)
        );
        let subs = broker.subscriptions();
        assert_eq!(subs.len(), 2, "the group counts once");
        assert_eq!(subs[0].filter.as_str(), "jobs/#");
        assert_eq!(subs[0].group, Some(("workers".to_string(), 2)));
        assert_eq!((subs[0].stats.queued, subs[0].stats.unacked), (2, 1));
        assert_eq!((subs[1].filter.as_str(), subs[1].group.clone()), ("other", None));
        let durable = broker.durable_subscriptions();
        assert_eq!(durable.len(), 1);
        assert_eq!((durable[0].committed, durable[0].lag), (2, 3));
    }
}
