//! Operators' access to retained history: read a page of one topic's history
//! ([`Broker::history`]), and move a durable subscription to another position so it delivers
//! again from there ([`Broker::rewind`]), or end one that has no members
//! ([`Broker::end_group`]). The admin API serves the first two.

use whispeer_proto::{Filter, StartAt, Topic};

use crate::Broker;
use crate::delivery::GroupKey;
use crate::error::SubscribeError;
use crate::message::Message;
use crate::retention::lock;
use crate::store::PageBound;

/// Payload bytes past which a page of history ends early (it always holds one message).
pub const HISTORY_PAGE_BYTES: usize = 8 << 20;

/// A page of one topic's history.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The oldest offset the broker holds in memory (the next offset when it holds none).
    pub first_offset: u64,
    /// The offset the next message will get: where history ended when the page was read.
    pub next_offset: u64,
    /// The messages, oldest first; each knows its offset ([`Message::offset`]).
    pub messages: Vec<Message>,
}

impl HistoryPage {
    /// The offset to read the next page from, or `None` when this page reached the end.
    pub fn next_from(&self) -> Option<u64> {
        let last = self.messages.last()?.offset()?;
        (last + 1 < self.next_offset).then_some(last + 1)
    }
}

/// Why history could not be read, or a durable subscription not moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// No retention rule keeps this topic (or no retained topic matches the filter).
    #[error("{0} has no retained history")]
    NotRetained(String),
    /// The offset asked for is older than anything held.
    #[error("offset {requested} is no longer retained; history begins at {first}")]
    OffsetEvicted {
        /// The offset asked for.
        requested: u64,
        /// The oldest offset held.
        first: u64,
    },
    /// A durable subscription can only be moved while it has no members.
    #[error("group {group} has {members} members: stop them before moving it")]
    Active {
        /// The group's name.
        group: String,
        /// Its members now.
        members: usize,
    },
    /// No such durable subscription: it never committed and is not lingering.
    #[error("no durable subscription {group} on {filter}")]
    NoSuchGroup {
        /// The filter.
        filter: String,
        /// The group's name.
        group: String,
    },
    /// The store failed to read.
    #[error("store: {0}")]
    Store(#[from] std::io::Error),
}

impl From<SubscribeError> for HistoryError {
    fn from(err: SubscribeError) -> Self {
        match err {
            SubscribeError::OffsetEvicted { requested, first } => {
                Self::OffsetEvicted { requested, first }
            }
            other => Self::Store(std::io::Error::other(other.to_string())),
        }
    }
}

impl Broker {
    /// Reads up to `max` messages of `topic`'s history from `start` (ending early past
    /// `HISTORY_PAGE_BYTES` of payloads, 8 MiB): from memory, and for a durable topic from its
    /// store where memory no longer reaches (an offset, or
    /// `StartAt::Earliest`, which then means the oldest record stored). A time start is looked
    /// up in memory. Page on with [`HistoryPage::next_from`].
    ///
    /// # Errors
    /// `NotRetained`, `OffsetEvicted` (not for durable topics: the store has the final say), or
    /// the store's error.
    pub fn history(
        &self,
        topic: &Topic,
        start: StartAt,
        max: usize,
    ) -> Result<HistoryPage, HistoryError> {
        let not_retained = || HistoryError::NotRetained(topic.to_string());
        let log = self.inner.history.log(topic).ok_or_else(not_retained)?;
        let bound = PageBound::new(max, HISTORY_PAGE_BYTES);
        let (first_offset, next_offset, durable, from, in_memory) = {
            let log = lock(&log);
            let (first, next) = (log.first_offset(), log.next_offset());
            let from = match (start, log.durable) {
                (StartAt::Earliest, true) => 1,
                (StartAt::Offset(offset), true) => offset,
                _ => log.start_offset(start)?,
            };
            (first, next, log.durable, from, log.read(from, bound))
        };
        let messages = if durable && from < first_offset {
            // Older than memory: the store holds every message of a durable topic, in order, so
            // the page comes from it alone (the next page may come from memory). A store with
            // nothing there (segments removed, or a topic a cluster keeps, whose history is
            // memory's) leaves memory's page.
            let stored = self.stored_page(topic, from, bound)?;
            if stored.is_empty() { in_memory } else { stored }
        } else {
            in_memory
        };
        Ok(HistoryPage { first_offset, next_offset, messages })
    }

    /// Moves the durable subscription (`filter`, `group`) to `start` in every retained topic
    /// its filter matches, so it delivers again from there (or skips ahead, with
    /// `StartAt::Latest`); returns each topic and the offset it now starts at.
    ///
    /// As with resetting a consumer group's offsets elsewhere, the group must have no members:
    /// a lingering group is removed (what it had queued is in the retained history it replays
    /// from). The new position is remembered, and stored for durable topics, so it holds
    /// across a restart; the next member to join starts there.
    ///
    /// # Errors
    /// `Active` while the group has members, `NoSuchGroup` for a group that never committed
    /// and is not lingering, `NotRetained`, or `OffsetEvicted`.
    pub fn rewind(
        &self,
        filter: &Filter,
        group: &str,
        start: StartAt,
    ) -> Result<Vec<(Topic, u64)>, HistoryError> {
        let key: GroupKey = (filter.as_str().into(), group.into());
        if self.inner.commits.get(&key).is_none() && !self.inner.groups.contains(&key) {
            let (filter, group) = (filter.to_string(), group.to_string());
            return Err(HistoryError::NoSuchGroup { filter, group });
        }
        let mut positions = Vec::new();
        for (topic, log) in self.inner.history.matching(filter) {
            let log = lock(&log);
            positions.push((topic, log.start_offset(start)?, log.durable));
        }
        if positions.is_empty() {
            return Err(HistoryError::NotRetained(filter.to_string()));
        }
        let shared = &self.inner;
        let moved = shared.groups.while_idle(&key, || {
            for (topic, from, durable) in &positions {
                shared.record_commit(&key, topic, from.saturating_sub(1), *durable);
            }
        });
        let ((), removed) =
            moved.map_err(|members| HistoryError::Active { group: group.to_string(), members })?;
        if let Some(removed) = removed {
            shared.unsubscribe(removed.id, &removed.queue);
            tracing::info!(%filter, group, "lingering group removed to move it");
        }
        tracing::info!(%filter, group, ?start, "durable subscription moved");
        Ok(positions.into_iter().map(|(topic, from, _)| (topic, from)).collect())
    }

    /// Ends the queue group (`filter`, `group`) while it has no members: a lingering group is
    /// removed with what it queued, and a durable subscription's position moves to the end of
    /// its topics, so the next member to join starts with the next message (an MQTT clean
    /// start does this to the session it replaces). Returns whether there was a group to end.
    ///
    /// # Errors
    /// `Active` while the group has members.
    pub fn end_group(&self, filter: &Filter, group: &str) -> Result<bool, HistoryError> {
        let key: GroupKey = (filter.as_str().into(), group.into());
        if self.inner.commits.get(&key).is_some() {
            match self.rewind(filter, group, StartAt::Latest) {
                Ok(_) => return Ok(true),
                // Its topics keep no history now: what remains is the group itself.
                Err(HistoryError::NotRetained(_)) => {}
                Err(err) => return Err(err),
            }
        }
        let idle = self.inner.groups.while_idle(&key, || ());
        let ((), removed) =
            idle.map_err(|members| HistoryError::Active { group: group.to_string(), members })?;
        if let Some(removed) = &removed {
            self.inner.unsubscribe(removed.id, &removed.queue);
            tracing::debug!(%filter, group, "idle group ended");
        }
        Ok(removed.is_some())
    }
}

#[cfg(test)]
mod tests;
