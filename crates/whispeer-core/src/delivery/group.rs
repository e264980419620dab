//! Queue groups: subscribers that share one filter's messages, each message going to one member.
//!
//! A group is one route and one queue, keyed by filter and name; its members are consumers of
//! that queue, and for QoS 1 they share one [`Tracker`], so a message a member leaves
//! unacknowledged goes to another member. When the last member leaves, a QoS 1 group lingers
//! for the broker's `group_linger` (or its own, `SubscribeOptions::linger`), still queueing (within its bounds), so a member that
//! reconnects under the same name gets what it missed and what it left unacknowledged; after
//! that the group is removed. A QoS 0 group is removed with its last member.
//!
//! A group whose queue its slow-consumer policy closed (`Disconnect`, or back-pressure's
//! timeout) is over: the next member to join under its name starts a new group, and the old
//! one is retired, removed when its last member leaves (at once if it had none left).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use whispeer_proto::Qos;

use crate::delivery::Commits;
use crate::delivery::Tracker;
use crate::error::SubscribeError;
use crate::queue::Queue;
use crate::router::SubId;

pub(crate) use crate::store::GroupKey;

/// Longest group name, in bytes.
pub(crate) const MAX_GROUP_NAME: usize = 255;

/// The shared parts of one group.
#[derive(Debug)]
pub(crate) struct Group {
    /// The group's route.
    pub(crate) id: SubId,
    pub(crate) queue: Arc<Queue>,
    pub(crate) tracker: Option<Arc<Tracker>>,
    pub(crate) qos: Qos,
    /// QoS 1 on retained topics: the committed offsets (a durable subscription).
    pub(crate) commits: Option<Arc<Commits>>,
    /// How long the group outlives its last member (QoS 1 only; zero: not at all).
    pub(crate) linger: Duration,
}

#[derive(Debug)]
struct Slot {
    group: Arc<Group>,
    members: usize,
    /// Raised by every join, so a linger timer knows whether the group was rejoined meanwhile.
    generation: u64,
}

/// What the last member's departure means for the group.
#[derive(Debug)]
pub(crate) enum Left {
    /// Other members remain.
    Stays,
    /// No member remains: remove the group now.
    Remove(Arc<Group>),
    /// No member remains: remove the group if nobody joins before the linger (the group's
    /// generation, and the linger) ends.
    Linger(u64, Duration),
}

/// Every group of a broker.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    slots: Mutex<HashMap<GroupKey, Slot>>,
    /// Groups closed by their policy and replaced under their name while members remained:
    /// each removed when its last member leaves. Locked after `slots`.
    retired: Mutex<Vec<Slot>>,
}

/// A member's joining: its group, and a closed group it replaced that had no member left, for
/// the caller to unroute.
pub(crate) struct Joined {
    pub(crate) group: Arc<Group>,
    pub(crate) replaced: Option<Arc<Group>>,
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, HashMap<GroupKey, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retired(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the group `key`, creating it with `create` if it does not exist, or if its queue
    /// was closed by its policy (the old group is then retired). All members must ask for the
    /// same QoS.
    pub(crate) fn join(
        &self,
        key: GroupKey,
        qos: Qos,
        create: impl FnOnce() -> Result<Arc<Group>, SubscribeError>,
    ) -> Result<Joined, SubscribeError> {
        let mut slots = self.lock();
        if slots.get(&key).is_some_and(|slot| slot.group.queue.is_closed()) {
            let group = create()?;
            let (mut generation, mut replaced) = (0, None);
            if let Some(old) = slots.remove(&key) {
                // Raised past the old one's, so a linger timer of the old one leaves it be.
                generation = old.generation + 1;
                if old.members > 0 {
                    self.retired().push(old);
                } else {
                    replaced = Some(old.group);
                }
            }
            slots.insert(key, Slot { group: Arc::clone(&group), members: 1, generation });
            return Ok(Joined { group, replaced });
        }
        if let Some(slot) = slots.get_mut(&key) {
            if slot.group.qos != qos {
                return Err(SubscribeError::GroupMismatch {
                    group: key.1.into(),
                    existing: slot.group.qos,
                    requested: qos,
                });
            }
            slot.members += 1;
            slot.generation += 1;
            return Ok(Joined { group: Arc::clone(&slot.group), replaced: None });
        }
        let group = create()?;
        slots.insert(key, Slot { group: Arc::clone(&group), members: 1, generation: 0 });
        Ok(Joined { group, replaced: None })
    }

    /// A member of the group `key` whose queue is `queue` leaves; the last one starts its
    /// linger, if it has one (a retired group's last member removes it).
    pub(crate) fn leave(&self, key: &GroupKey, queue: &Arc<Queue>) -> Left {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(key).filter(|slot| Arc::ptr_eq(&slot.group.queue, queue))
        else {
            let mut retired = self.retired();
            let Some(at) = retired.iter().position(|s| Arc::ptr_eq(&s.group.queue, queue)) else {
                return Left::Stays;
            };
            retired[at].members = retired[at].members.saturating_sub(1);
            if retired[at].members > 0 {
                return Left::Stays;
            }
            return Left::Remove(retired.swap_remove(at).group);
        };
        slot.members = slot.members.saturating_sub(1);
        if slot.members > 0 {
            return Left::Stays;
        }
        if !slot.group.linger.is_zero() && slot.group.qos == Qos::AtLeastOnce {
            return Left::Linger(slot.generation, slot.group.linger);
        }
        slots.remove(key).map_or(Left::Stays, |slot| Left::Remove(slot.group))
    }

    /// Runs `f` while group `key` has no members, holding the groups so nobody joins meanwhile.
    /// A lingering group is removed first and returned, for the caller to unroute. `Err` with
    /// the member count when the group has members.
    pub(crate) fn while_idle<R>(
        &self,
        key: &GroupKey,
        f: impl FnOnce() -> R,
    ) -> Result<(R, Option<Arc<Group>>), usize> {
        let mut slots = self.lock();
        match slots.get(key) {
            Some(slot) if slot.members > 0 => Err(slot.members),
            _ => {
                let removed = slots.remove(key).map(|slot| slot.group);
                Ok((f(), removed))
            }
        }
    }

    /// Group `key`, if it exists (with members, or lingering).
    pub(crate) fn get(&self, key: &GroupKey) -> Option<Arc<Group>> {
        self.lock().get(key).map(|slot| Arc::clone(&slot.group))
    }

    /// Whether group `key` exists (with members, or lingering).
    pub(crate) fn contains(&self, key: &GroupKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Every group with its member count.
    pub(crate) fn list(&self) -> Vec<(GroupKey, usize, Arc<Group>)> {
        let slots = self.lock();
        slots
            .iter()
            .map(|(key, slot)| (key.clone(), slot.members, Arc::clone(&slot.group)))
            .collect()
    }

    /// Removes the group `key` if it is still empty and nobody joined since `generation`.
    pub(crate) fn expire(&self, key: &GroupKey, generation: u64) -> Option<Arc<Group>> {
        let mut slots = self.lock();
        let slot = slots.get(key)?;
        if slot.members > 0 || slot.generation != generation {
            return None;
        }
        slots.remove(key).map(|slot| slot.group)
    }
}
