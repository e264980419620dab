//! A node of a cluster keeping its copy of chat's state: the engine's entries
//! (`shared.rs`) applied to the hub as they come, its own included; and group deliveries
//! passed to the node that sent the message (its receipt waits there), through the live topic
//! `@chat/delivered` every node reads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::{Value, json};
use whispeer_core::{PublishOptions, SubscribeOptions};

use super::groups::Change;
use super::hub::{Hub, lock, now_ms};
use super::shared::Entry;

/// The live topic of group deliveries, on a cluster.
const DELIVERED: &str = "@chat/delivered";

impl Hub {
    /// On a node of a cluster: follows the engine's entries, and the group deliveries of
    /// every node.
    pub(crate) fn follow_cluster(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(shared) = self.shared.clone() else { return Ok(()) };
        let weak = Arc::downgrade(self);
        let limits = self.broker.options().limits.clone();
        self.broker.spawn(async move {
            let apply = |entry| weak.upgrade().map(|hub| hub.apply_shared(entry)).is_some();
            shared.follow(limits, apply).await;
        })?;
        let mut delivered = self
            .broker
            .messages(SubscribeOptions::new(DELIVERED))
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        let weak = Arc::downgrade(self);
        self.broker.spawn(async move {
            while let Some(message) = delivered.recv_message().await {
                let Some(hub) = weak.upgrade() else { return };
                let Ok(value) = serde_json::from_slice::<Value>(message.payload()) else {
                    continue;
                };
                let user = value["user"].as_str().unwrap_or_default();
                let ids = value["ids"].as_array().cloned().unwrap_or_default();
                let ids: Vec<String> =
                    ids.iter().filter_map(Value::as_str).map(str::to_string).collect();
                hub.delivered_group_here(user, &ids);
            }
        })?;
        Ok(())
    }

    /// Group messages `ids` reached a device of `user`, somewhere in the cluster.
    pub(crate) fn share_group_delivery(&self, user: &str, ids: Vec<String>) {
        let notice = Bytes::from(json!({ "user": user, "ids": ids }).to_string());
        if let Err(err) = self.broker.publish_bytes_with(DELIVERED, notice, &PublishOptions::new())
        {
            tracing::debug!(%err, "chat: a group delivery not passed on");
        }
    }

    /// Applies one entry of the cluster's state (idempotent: its own come back too).
    pub(crate) fn apply_shared(&self, entry: Entry) {
        match entry {
            Entry::Group { group, open: Some(open) } => self.groups_mut().set_open(&group, open),
            Entry::Group { group, open: None } => self.groups_mut().drop_if_empty(&group),
            Entry::Member { group, user, role: Some(role) } => {
                self.groups_mut().apply(&Change::Set { group, user, role });
            }
            Entry::Member { group, user, role: None } => {
                self.groups_mut()
                    .apply(&Change::Remove { group: group.clone(), user: user.clone() });
                self.left_group(&group, &user);
            }
            Entry::Device { user, device, cursor, last_seen_ms } => {
                let (place, _) = self.cursor(&user, &device);
                place.advance(cursor);
                place.saved.fetch_max(cursor, Ordering::AcqRel);
                let mut last_seen = lock(&self.last_seen);
                let seen = last_seen.entry(user).or_default();
                *seen = (*seen).max(last_seen_ms);
            }
            Entry::Read { user, log, seq } => {
                let mut reads = lock(&self.reads);
                let read = reads.entry((user, log)).or_default();
                *read = (*read).max(seq);
            }
            Entry::Contact { a, b } => {
                let mut contacts = lock(&self.contacts);
                contacts.entry(a.clone()).or_default().insert(b.clone());
                contacts.entry(b).or_default().insert(a);
            }
            Entry::Key { user, device, identity } => {
                let kept = match identity {
                    Some(identity) => self.store.set_key(&user, &device, &identity, now_ms()),
                    None => self.store.remove_key(&user, &device),
                };
                if let Err(err) = kept {
                    tracing::warn!(%err, "chat: a device key not kept");
                }
                let mut directory = lock(&self.directory);
                directory.0 += 1;
                directory.1.remove(&user);
            }
            Entry::Online { user, node, devices } => self.online_on(&user, node, devices),
        }
    }

    /// `user`'s devices on `node` are `devices` now: its followers hear when that takes it
    /// online or offline everywhere.
    fn online_on(&self, user: &str, node: String, devices: Vec<String>) {
        if self.shared.as_ref().is_some_and(|shared| shared.node() == node) {
            return;
        }
        let before = !self.local_devices(user).is_empty() || self.online_elsewhere(user);
        {
            let mut remote = lock(&self.remote_online);
            let nodes = remote.entry(user.to_string()).or_default();
            if devices.is_empty() {
                nodes.remove(&node);
            } else {
                nodes.insert(node, (devices, std::time::Instant::now()));
            }
            if nodes.is_empty() {
                remote.remove(user);
            }
        }
        let after = !self.local_devices(user).is_empty() || self.online_elsewhere(user);
        if before != after {
            let now = now_ms();
            if !after {
                lock(&self.last_seen).insert(user.to_string(), now);
            }
            self.announce(user, after, (!after).then_some(now));
        }
    }

    fn groups_mut(&self) -> std::sync::RwLockWriteGuard<'_, super::groups::Groups> {
        self.groups.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
