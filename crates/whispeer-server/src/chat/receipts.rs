//! Receipts and unread counts. A direct message written to a recipient's device sends the
//! sender a `delivered` receipt through its inbox (stored like a message, so an offline sender
//! gets it later); a group message sends its sender one `delivered` receipt once it was written
//! to a device of every other member (members who leave before are not waited for); a `read`
//! request moves the reader's read position in a conversation (kept in `chat.db`), tells the
//! other side of a direct conversation, and the reader's other devices. Unread counts are the
//! messages of others after the read position.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use serde_json::{Value, json};
use whispeer_core::{PublishOptions, StartAt, Topic};

use super::hub::{Hub, inbox, lock, now_ms};
use super::messaging::{ORIGIN, direct_log, group_log};
use super::shared::Entry;
use super::wire::{ChatError, Position, Target};

/// Most users whose directory entries the server keeps in memory (emptied when full).
const DIRECTORY_CACHE: usize = 65_536;

/// How many of the latest group messages are followed until every member has them; an older
/// one still waiting is forgotten (its sender gets no receipt for it).
const GROUP_RECEIPTS: usize = 100_000;

/// Group messages not yet written to a device of every member, in memory (a restart forgets
/// them).
#[derive(Debug, Default)]
pub(crate) struct GroupReceipts {
    waiting: HashMap<String, Waiting>,
    /// The ids followed, oldest first; those done are left here until they come off the front
    /// (no search on the delivery path).
    order: VecDeque<String>,
}

/// One group message's wait: its sender, its group, the members it still waits for, how many
/// it was sent to.
#[derive(Debug)]
struct Waiting {
    from: String,
    group: String,
    members: HashSet<String>,
    total: usize,
}

impl GroupReceipts {
    /// Follows message `id` of `from` to `group`, sent to `members` (the sender's own left out).
    fn expect(&mut self, id: &str, from: &str, group: &str, members: &[String]) {
        let members: HashSet<String> = members.iter().filter(|m| *m != from).cloned().collect();
        if members.is_empty() {
            return;
        }
        while self.order.len() >= GROUP_RECEIPTS
            && let Some(oldest) = self.order.pop_front()
        {
            self.waiting.remove(&oldest);
        }
        let (from, group, total) = (from.to_string(), group.to_string(), members.len());
        self.waiting.insert(id.to_string(), Waiting { from, group, members, total });
        self.order.push_back(id.to_string());
    }

    /// `user` has message `id`: the wait, when it was the last one waited for.
    fn delivered(&mut self, id: &str, user: &str) -> Option<(String, Waiting)> {
        let waiting = self.waiting.get_mut(id)?;
        waiting.members.remove(user);
        if !waiting.members.is_empty() {
            return None;
        }
        self.waiting.remove(id).map(|done| (id.to_string(), done))
    }

    /// `user` left `group`: no longer waited for; the waits that ends.
    fn gone(&mut self, group: &str, user: &str) -> Vec<(String, Waiting)> {
        let ended: Vec<String> = self
            .waiting
            .iter_mut()
            .filter_map(|(id, w)| {
                let done = w.group == group && w.members.remove(user) && w.members.is_empty();
                done.then(|| id.clone())
            })
            .collect();
        ended.into_iter().filter_map(|id| self.waiting.remove(&id).map(|w| (id, w))).collect()
    }

    /// Forgets message `id` (it was not sent after all).
    fn forget(&mut self, id: &str) {
        self.waiting.remove(id);
    }
}

impl Hub {
    /// `user`'s device `device` was written direct messages: (sender, id) of each.
    pub(crate) fn delivered(&self, user: &str, device: &str, messages: &[(String, String)]) {
        let time = now_ms();
        for (from, id) in messages {
            let receipt = json!({
                "type": "receipt", "status": "delivered", "id": id, "by": user,
                "device": device, "time": time,
            });
            let sent = self.broker.publish_bytes_with(
                &inbox(from),
                Bytes::from(receipt.to_string()),
                &PublishOptions::new(),
            );
            if let Err(err) = sent {
                tracing::debug!(%err, "delivery receipt not stored");
            }
        }
    }

    /// Follows group message `id` until every member of `group` but `from` has it.
    pub(crate) fn expect_group_receipt(&self, id: &str, from: &str, group: &str, to: &[String]) {
        lock(&self.group_receipts).expect(id, from, group, to);
    }

    /// Group message `id` was not sent: not followed.
    pub(crate) fn forget_group_receipt(&self, id: &str) {
        lock(&self.group_receipts).forget(id);
    }

    /// `user`'s device was written group messages: (group, sender, id) of each; a sender
    /// whose message every member now has gets its receipt.
    pub(crate) fn delivered_group(&self, user: &str, messages: &[(String, String, String)]) {
        let ids: Vec<String> = messages.iter().map(|(_, _, id)| id.clone()).collect();
        if self.shared.is_some() {
            // The receipt waits on the node the message was sent from.
            return self.share_group_delivery(user, ids);
        }
        self.delivered_group_here(user, &ids);
    }

    /// Group messages `ids` reached a device of `user`: those sent from here that every member
    /// now has get their receipts.
    pub(crate) fn delivered_group_here(&self, user: &str, ids: &[String]) {
        let done: Vec<(String, Waiting)> = {
            let mut receipts = lock(&self.group_receipts);
            ids.iter().filter_map(|id| receipts.delivered(id, user)).collect()
        };
        self.group_receipts_done(done);
    }

    /// `user` left `group` (or was removed): messages that waited only for it are delivered.
    pub(crate) fn left_group(&self, group: &str, user: &str) {
        let done = lock(&self.group_receipts).gone(group, user);
        self.group_receipts_done(done);
    }

    fn group_receipts_done(&self, done: Vec<(String, Waiting)>) {
        let time = now_ms();
        for (id, waiting) in done {
            let receipt = json!({
                "type": "receipt", "status": "delivered", "id": id, "group": waiting.group,
                "members": waiting.total, "time": time,
            });
            let receipt = Bytes::from(receipt.to_string());
            let sent = self.broker.publish_bytes_with(
                &inbox(&waiting.from),
                receipt,
                &PublishOptions::new(),
            );
            if let Err(err) = sent {
                tracing::debug!(%err, "group delivery receipt not stored");
            }
        }
    }

    /// The log of a conversation `user` takes part in.
    fn log_of(&self, user: &str, with: &Target) -> Result<String, ChatError> {
        match with {
            Target::User(peer) => Ok(direct_log(user, peer)),
            Target::Group(group) if self.groups().is_member(group, user) => Ok(group_log(group)),
            Target::Group(group) => Err(ChatError::new(
                "not_member",
                format!("you are not a member of group {group:?}"),
            )),
            Target::Topic(_) => Err(ChatError::new("malformed", "topics keep no read position")),
        }
    }

    /// `user` read `with` up to `upto` (a seq or an id): stored, and told.
    pub(crate) async fn read(
        &self,
        user: &str,
        origin: u64,
        with: &Target,
        upto: &Position,
    ) -> Result<u64, ChatError> {
        let log = self.log_of(user, with)?;
        let topic =
            Topic::parse(&log).map_err(|e| ChatError::new("invalid_name", e.to_string()))?;
        let (first, next) = self
            .broker
            .history(&topic, StartAt::Latest, 0)
            .map_or((1, 1), |page| (page.first_offset, page.next_offset));
        let seq = self.seq_of(&topic, upto, first, next)?.min(next.saturating_sub(1));
        if let Some(shared) = &self.shared {
            shared.put(&[Entry::Read { user: user.into(), log: log.clone(), seq }]).await?;
        } else {
            let store = std::sync::Arc::clone(&self.store);
            let (who, at) = (user.to_string(), log.clone());
            let saved = tokio::task::spawn_blocking(move || store.save_read(&who, &at, seq)).await;
            let failed = |e: String| ChatError::new("store_failed", format!("chat.db: {e}"));
            saved.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        }
        {
            let mut reads = lock(&self.reads);
            let read = reads.entry((user.to_string(), log)).or_default();
            *read = (*read).max(seq);
        }
        let time = now_ms();
        let mut mine =
            json!({ "type": "receipt", "status": "read", "by": user, "seq": seq, "time": time });
        match with {
            Target::User(peer) if peer != user => {
                let theirs = Bytes::from(mine.to_string());
                mine["with"] = peer.as_str().into();
                let _ =
                    self.broker.publish_bytes_with(&inbox(peer), theirs, &PublishOptions::new());
            }
            Target::Group(group) => mine["group"] = group.as_str().into(),
            _ => mine["with"] = user.into(),
        }
        // The reader's other devices learn it too; this one knows.
        let own = PublishOptions::new().header(ORIGIN, origin.to_string());
        let _ = self.broker.publish_bytes_with(&inbox(user), Bytes::from(mine.to_string()), &own);
        Ok(seq)
    }

    /// Stores the public identity of `user`'s `device`; its text must name that device. A new
    /// or changed key is told to the members of `user`'s groups (`"event":"keys"`).
    pub(crate) async fn publish_key(
        &self,
        user: &str,
        device: &str,
        identity: &str,
    ) -> Result<(), ChatError> {
        if identity.split_once(':').map(|(named, _)| named) != Some(device) {
            let message = format!("the identity must be this device's: \"{device}:…\"");
            return Err(ChatError::new("malformed", message));
        }
        if let Some(shared) = &self.shared {
            let known = self.store.keys(user).is_ok_and(|keys| keys.iter().any(|k| k == identity));
            if !known {
                let identity = Some(identity.to_string());
                let entry = Entry::Key { user: user.into(), device: device.into(), identity };
                shared.put(std::slice::from_ref(&entry)).await?;
                self.apply_shared(entry);
                self.devices_changed(user).await?;
            }
            return Ok(());
        }
        let store = std::sync::Arc::clone(&self.store);
        let (who, which, text) = (user.to_string(), device.to_string(), identity.to_string());
        let saved =
            tokio::task::spawn_blocking(move || store.set_key(&who, &which, &text, now_ms())).await;
        let failed = |e: String| ChatError::new("store_failed", format!("chat.db: {e}"));
        if saved.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))? {
            self.devices_changed(user).await?;
        }
        Ok(())
    }

    /// Removes `user`'s `device` from the directory: nothing is sealed to it from now on (group
    /// keys rotated afterwards leave it out).
    pub(crate) async fn revoke_key(&self, user: &str, device: &str) -> Result<(), ChatError> {
        if let Some(shared) = &self.shared {
            let named = format!("{device}:");
            let known =
                self.store.keys(user).is_ok_and(|k| k.iter().any(|k| k.starts_with(&named)));
            if !known {
                let message = format!("{user} has no device {device:?} in the directory");
                return Err(ChatError::new("no_such_device", message));
            }
            let entry = Entry::Key { user: user.into(), device: device.into(), identity: None };
            shared.put(std::slice::from_ref(&entry)).await?;
            self.apply_shared(entry);
            return self.devices_changed(user).await;
        }
        let store = std::sync::Arc::clone(&self.store);
        let (who, which) = (user.to_string(), device.to_string());
        let removed = tokio::task::spawn_blocking(move || store.remove_key(&who, &which)).await;
        let failed = |e: String| ChatError::new("store_failed", format!("chat.db: {e}"));
        match removed.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))? {
            true => self.devices_changed(user).await,
            false => Err(ChatError::new(
                "no_such_device",
                format!("{user} has no device {device:?} in the directory"),
            )),
        }
    }

    /// The public identities of `user`'s devices (from the directory cache, else `chat.db`).
    pub(crate) async fn keys(&self, user: &str) -> Result<Value, ChatError> {
        let (generation, cached) = {
            let directory = lock(&self.directory);
            (directory.0, directory.1.get(user).cloned())
        };
        let devices = match cached {
            Some(devices) => devices,
            None => {
                let store = std::sync::Arc::clone(&self.store);
                let who = user.to_string();
                let found = tokio::task::spawn_blocking(move || store.keys(&who)).await;
                let failed = |e: String| ChatError::new("store_failed", format!("chat.db: {e}"));
                let devices = std::sync::Arc::new(
                    found.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?,
                );
                let mut directory = lock(&self.directory);
                if directory.0 == generation {
                    if directory.1.len() >= DIRECTORY_CACHE {
                        directory.1.clear();
                    }
                    directory.1.insert(user.to_string(), std::sync::Arc::clone(&devices));
                }
                devices
            }
        };
        Ok(json!({ "type": "keys", "user": user, "devices": *devices }))
    }

    /// Unread messages per conversation of `user`: others' messages after its read position.
    pub(crate) fn unread(&self, user: &str) -> Value {
        let mut conversations: Vec<(Value, String)> = lock(&self.contacts)
            .get(user)
            .map(|peers| {
                peers.iter().map(|p| (json!({ "with": p }), direct_log(user, p))).collect()
            })
            .unwrap_or_default();
        for (group, _) in self.groups().of(user) {
            if self.groups().is_member(&group, user) {
                let log = group_log(&group);
                conversations.push((json!({ "group": group }), log));
            }
        }
        let mine = format!("{{\"from\":\"{user}\"");
        let list: Vec<Value> = conversations
            .into_iter()
            .map(|(mut entry, log)| {
                let read =
                    lock(&self.reads).get(&(user.to_string(), log.clone())).copied().unwrap_or(0);
                let (unread, last) = self.count_after(&log, read, &mine);
                entry["unread"] = unread.into();
                entry["read"] = read.into();
                entry["last"] = last.into();
                entry
            })
            .collect();
        json!({ "type": "unread", "conversations": list })
    }

    /// Messages of `log` after `read` whose payload does not start with `mine`, and the last
    /// seq.
    fn count_after(&self, log: &str, read: u64, mine: &str) -> (u64, u64) {
        let Ok(topic) = Topic::parse(log) else { return (0, 0) };
        let Ok(bounds) = self.broker.history(&topic, StartAt::Latest, 0) else { return (0, 0) };
        let (mut from, next) = ((read + 1).max(bounds.first_offset), bounds.next_offset);
        let mut unread = 0;
        while from < next {
            let Ok(page) = self.broker.history(&topic, StartAt::Offset(from), 1024) else { break };
            for message in &page.messages {
                let payload = message.payload();
                if payload.starts_with(b"{\"from\":") && !payload.starts_with(mine.as_bytes()) {
                    unread += 1;
                }
            }
            match page.next_from() {
                Some(more) => from = more,
                None => break,
            }
        }
        (unread, next.saturating_sub(1))
    }
}
