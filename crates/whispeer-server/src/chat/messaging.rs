//! What the hub does for a request: sending (a conversation's log, then every recipient's
//! inbox, acknowledged once stored), group changes (planned, stored in `chat.db`, applied, then
//! told to the members through their inboxes), history pages, typing and presence.

use bytes::Bytes;
use serde_json::{Value, json};
use whispeer_core::{HistoryError, PublishError, PublishOptions, PublishReceipt, StartAt, Topic};

use super::groups::{Change, Role};
use super::hub::{Hub, broadcast, inbox, lock, now_ms};
use super::shared::Entry;
use super::wire::{Action, ChatError, Delivered, Position, Target};

/// The header that names the session a message came from, so that session skips its own copy.
pub(crate) const ORIGIN: &str = "chat-origin";
/// Headers of a message's inbox copies: its sender, its id, and for a direct message its
/// recipient (what a delivery receipt needs without parsing the payload).
pub(crate) const FROM: &str = "chat-from";
pub(crate) const ID: &str = "chat-id";
pub(crate) const DIRECT: &str = "chat-to";
/// The group of a group message.
pub(crate) const GROUP: &str = "chat-group";

/// Stripes of locks that keep each log's writes in seq order.
pub(crate) const STRIPES: usize = 64;

/// A direct conversation's log: the two names in order, so both sides read the same one.
pub(crate) fn direct_log(a: &str, b: &str) -> String {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    format!("@chat/log/d/{low}/{high}")
}

pub(crate) fn group_log(group: &str) -> String {
    format!("@chat/log/g/{group}")
}

/// A new message id: the time in milliseconds, then 80 random bits; 32 hex digits that sort by
/// time.
pub(crate) fn new_id(time_ms: u64) -> String {
    let mut random = [0u8; 10];
    if getrandom::fill(&mut random).is_err() {
        // No entropy source: the session counter and the time keep ids apart on this node.
        random = [0x5a; 10];
    }
    let tail: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{:012x}{tail}", time_ms & 0xffff_ffff_ffff)
}

/// Copies published and not yet stored: settles once the store has each.
pub(crate) struct Stored {
    broker: whispeer_core::Broker,
    receipts: Vec<PublishReceipt>,
}

impl Stored {
    /// Waits until the store (or, on a cluster, the engine) has every copy.
    pub(crate) async fn settled(self) -> Result<(), ChatError> {
        for receipt in &self.receipts {
            if let Err(err) = self.broker.confirmed(receipt).await {
                let message = format!("the message may not have been kept: {err}");
                return Err(ChatError::new("store_failed", message));
            }
        }
        Ok(())
    }
}

fn unavailable(err: &PublishError) -> ChatError {
    ChatError::new("unavailable", format!("the message could not be stored: {err}"))
}

impl Hub {
    /// Writes one entry to its conversation's `log` (if any) at the next `seq`, then to each of
    /// `inboxes`; gives the seq, and what settles once the store has every copy. `build` makes
    /// the payload for its seq. On one node the log's stripe lock holds while the seq is read
    /// and the log written, so the seq is the log offset the entry gets; on a cluster the
    /// engine gives the offset: the log's entry goes first (without its seq, which history
    /// adds), and the inboxes' once the engine kept it.
    async fn publish(
        &self,
        log: Option<&str>,
        inboxes: &[String],
        headers: &PublishOptions,
        build: impl Fn(Option<u64>) -> Result<Bytes, ChatError>,
    ) -> Result<(Option<u64>, Stored), ChatError> {
        let mut receipts: Vec<PublishReceipt> = Vec::with_capacity(inboxes.len() + 1);
        let (seq, payload) = match log {
            Some(log) if self.shared.is_some() => {
                let receipt = self
                    .broker
                    .publish_bytes_with(log, build(None)?, headers)
                    .map_err(|e| unavailable(&e))?;
                let seq = self.broker.confirmed_at(&receipt).await.map_err(|err| {
                    ChatError::new("store_failed", format!("the cluster did not keep it: {err}"))
                })?;
                (seq, build(seq)?)
            }
            Some(log) => {
                let _in_order = lock(self.stripe(log));
                let seq = Some(self.next_seq(log));
                let payload = build(seq)?;
                let receipt = self
                    .broker
                    .publish_bytes_with(log, payload.clone(), headers)
                    .map_err(|e| unavailable(&e))?;
                receipts.push(receipt);
                (seq, payload)
            }
            None => (None, build(None)?),
        };
        for topic in inboxes {
            let receipt = self
                .broker
                .publish_bytes_with(topic, payload.clone(), headers)
                .map_err(|e| unavailable(&e))?;
            receipts.push(receipt);
        }
        receipts.retain(PublishReceipt::is_durable_pending);
        Ok((seq, Stored { broker: self.broker.clone(), receipts }))
    }

    /// [`publish`](Self::publish), then waits until the store has every copy.
    async fn post(
        &self,
        log: Option<&str>,
        inboxes: &[String],
        headers: &PublishOptions,
        build: impl Fn(Option<u64>) -> Result<Bytes, ChatError>,
    ) -> Result<(), ChatError> {
        self.publish(log, inboxes, headers, build).await?.1.settled().await
    }

    /// The offset the next entry of `log` gets.
    fn next_seq(&self, log: &str) -> u64 {
        let Ok(topic) = Topic::parse(log) else { return 1 };
        self.broker.history(&topic, StartAt::Latest, 0).map_or(1, |page| page.next_offset)
    }

    /// Sends `msg` from `from`: to a user (both sides' inboxes), a group (every member's), or a
    /// topic (its live subscribers). Gives the message's id, time and seq, published; the
    /// [`Stored`] settles once the store has it.
    pub(crate) async fn send(
        &self,
        from: &str,
        origin: u64,
        target: &Target,
        msg: &Value,
    ) -> Result<(String, u64, Option<u64>, Stored), ChatError> {
        let time = now_ms();
        let id = new_id(time);
        let mut delivered =
            Delivered { from, to: None, group: None, topic: None, msg, id: &id, time, seq: None };
        let (log, inboxes) = match target {
            Target::User(to) => {
                delivered.to = Some(to);
                self.remember_contact(from, to);
                let mut inboxes = vec![inbox(to)];
                if to != from {
                    inboxes.push(inbox(from));
                }
                (Some(direct_log(from, to)), inboxes)
            }
            Target::Group(group) => {
                delivered.group = Some(group);
                let groups = self.groups();
                if !groups.is_member(group, from) {
                    let message = format!("you are not a member of group {group:?}");
                    return Err(ChatError::new("not_member", message));
                }
                let members = groups.members(group);
                drop(groups);
                self.expect_group_receipt(&id, from, group, &members);
                (Some(group_log(group)), members.iter().map(|m| inbox(m)).collect())
            }
            Target::Topic(topic) => {
                delivered.topic = Some(topic);
                (None, vec![broadcast(topic)])
            }
        };
        let mut headers = PublishOptions::new()
            .header(ORIGIN, origin.to_string())
            .header(FROM, from.to_string())
            .header(ID, id.clone());
        match target {
            Target::User(to) => headers = headers.header(DIRECT, to.clone()),
            Target::Group(group) => headers = headers.header(GROUP, group.clone()),
            Target::Topic(_) => {}
        }
        let build = |seq| {
            serde_json::to_vec(&Delivered { seq, ..delivered })
                .map(Bytes::from)
                .map_err(|e| ChatError::new("malformed", format!("message not encodable: {e}")))
        };
        let published = self.publish(log.as_deref(), &inboxes, &headers, build).await;
        let (seq, stored) = published.inspect_err(|_| self.forget_group_receipt(&id))?;
        Ok((id, time, seq, stored))
    }

    /// Records that `a` and `b` talk (for presence): at once in memory, in `chat.db` behind.
    fn remember_contact(&self, a: &str, b: &str) {
        {
            let mut contacts = lock(&self.contacts);
            if a == b || contacts.get(a).is_some_and(|peers| peers.contains(b)) {
                return;
            }
            contacts.entry(a.to_string()).or_default().insert(b.to_string());
            contacts.entry(b.to_string()).or_default().insert(a.to_string());
        }
        if let Some(shared) = &self.shared {
            let shared = std::sync::Arc::clone(shared);
            let entry = Entry::Contact { a: a.to_string(), b: b.to_string() };
            let spawned = self.broker.spawn(async move {
                if let Err(err) = shared.put(&[entry]).await {
                    tracing::warn!(err = err.message, "chat: contact not shared");
                }
            });
            if let Err(err) = spawned {
                tracing::warn!(%err, "chat: contact not shared");
            }
            return;
        }
        let store = std::sync::Arc::clone(&self.store);
        let (x, y) = (a.to_string(), b.to_string());
        tokio::task::spawn_blocking(move || {
            if let Err(err) = store.add_contact(&x, &y) {
                tracing::warn!(%err, "chat.db: contact not saved");
            }
        });
    }

    /// A group request by `user`: create, join, invite, leave, remove, admin.
    pub(crate) async fn change_group(&self, user: &str, action: &Action) -> Result<(), ChatError> {
        let _one_at_a_time = self.changes.lock().await;
        let limits = self.limits();
        let (group, event, subject, planned) = {
            let groups = self.groups();
            match action {
                Action::Create { group, open } => {
                    (group, "created", user, groups.plan_create(group, user, *open, limits))
                }
                Action::Join { group } => {
                    (group, "joined", user, groups.plan_join(group, user, limits))
                }
                Action::Invite { group, user: invitee } => {
                    (group, "invited", invitee.as_str(), groups.plan_invite(group, user, invitee))
                }
                Action::Leave { group } => (group, "left", user, groups.plan_leave(group, user)),
                Action::Remove { group, user: removed } => {
                    (group, "removed", removed.as_str(), groups.plan_remove(group, user, removed))
                }
                Action::Admin { group, user: named } => {
                    (group, "admin", named.as_str(), groups.plan_admin(group, user, named))
                }
                _ => return Err(ChatError::new("malformed", "not a group request")),
            }
        };
        let changes = planned?;
        if changes.is_empty() {
            return Ok(());
        }
        // Told before the change (a member who leaves hears of it), and after (who joins).
        let before = self.groups().members(group);
        self.store_changes(changes).await?;
        let mut told = before;
        told.extend(self.groups().members(group));
        told.push(subject.to_string());
        self.tell_group(group, event, subject, user, told).await
    }

    /// Tells the members of each of `user`'s groups that its devices changed (`"event":"keys"`,
    /// stored in the group's log): their clients make the group a new key before sealing to it
    /// again; and tells `user`'s contacts and own devices now (`{"type":"keys","user"}`, live
    /// only), so clients that keep its keys fetch them again.
    pub(crate) async fn devices_changed(&self, user: &str) -> Result<(), ChatError> {
        {
            let mut directory = lock(&self.directory);
            directory.0 += 1;
            directory.1.remove(user);
        }
        let notice = Bytes::from(json!({ "type": "keys", "user": user }).to_string());
        let mut told = self.watched(user);
        told.insert(user.to_string());
        for peer in told {
            self.tell(&peer, notice.clone());
        }
        let groups = self.groups().of(user);
        for (group, _) in groups {
            let members = self.groups().members(&group);
            self.tell_group(&group, "keys", user, user, members).await?;
        }
        Ok(())
    }

    /// Writes a group event to the group's log and the inboxes of `told`.
    async fn tell_group(
        &self,
        group: &str,
        event: &str,
        subject: &str,
        user: &str,
        mut told: Vec<String>,
    ) -> Result<(), ChatError> {
        told.sort();
        told.dedup();
        let time = now_ms();
        let id = new_id(time);
        let inboxes: Vec<String> = told.iter().map(|u| inbox(u)).collect();
        let build = |seq: Option<u64>| {
            let notice = json!({
                "type": "group", "group": group, "event": event, "user": subject, "by": user,
                "id": id, "time": time, "seq": seq,
            });
            Ok(Bytes::from(notice.to_string()))
        };
        self.post(Some(&group_log(group)), &inboxes, &PublishOptions::new(), build).await
    }

    async fn store_changes(&self, changes: Vec<Change>) -> Result<(), ChatError> {
        if let Some(shared) = &self.shared {
            let entries: Vec<Entry> = changes
                .iter()
                .flat_map(|change| match change {
                    Change::Create { group, owner, open } => vec![
                        Entry::Group { group: group.clone(), open: Some(*open) },
                        Entry::Member {
                            group: group.clone(),
                            user: owner.clone(),
                            role: Some(Role::Owner),
                        },
                    ],
                    Change::Set { group, user, role } => {
                        vec![Entry::Member {
                            group: group.clone(),
                            user: user.clone(),
                            role: Some(*role),
                        }]
                    }
                    Change::Remove { group, user } => {
                        vec![Entry::Member { group: group.clone(), user: user.clone(), role: None }]
                    }
                })
                .collect();
            shared.put(&entries).await?;
            let mut gone = Vec::new();
            for entry in entries {
                if let Entry::Member { group, role: None, .. } = &entry {
                    gone.push(group.clone());
                }
                self.apply_shared(entry);
            }
            // A group goes with its last member: its entry too.
            let emptied: Vec<Entry> = gone
                .into_iter()
                .filter(|group| !self.groups().exists(group))
                .map(|group| Entry::Group { group, open: None })
                .collect();
            return shared.put(&emptied).await;
        }
        let store = std::sync::Arc::clone(&self.store);
        let now = now_ms();
        let to_store = changes.clone();
        let stored = tokio::task::spawn_blocking(move || {
            for change in &to_store {
                match change {
                    Change::Create { group, owner, open } => {
                        store.create_group(group, owner, *open, now)?;
                    }
                    Change::Set { group, user, role } => store.set_member(group, user, *role)?,
                    Change::Remove { group, user } => store.remove_member(group, user)?,
                }
            }
            Ok::<(), rusqlite::Error>(())
        })
        .await;
        let failed = |err: String| ChatError::new("store_failed", format!("chat.db: {err}"));
        stored.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        {
            let mut groups = self.groups.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            changes.iter().for_each(|change| groups.apply(change));
        }
        for change in &changes {
            if let Change::Remove { group, user } = change {
                self.left_group(group, user);
            }
        }
        Ok(())
    }

    /// A page of a conversation's history, oldest first, each message with its `seq`.
    pub(crate) fn history(
        &self,
        user: &str,
        with: &Target,
        before: Option<&Position>,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Value, ChatError> {
        let (topic, mut reply) = match with {
            Target::User(peer) => {
                (direct_log(user, peer), json!({ "type": "history", "with": peer }))
            }
            Target::Group(group) => {
                if !self.groups().is_member(group, user) {
                    let message = format!("you are not a member of group {group:?}");
                    return Err(ChatError::new("not_member", message));
                }
                (group_log(group), json!({ "type": "history", "group": group }))
            }
            Target::Topic(_) => return Err(ChatError::new("malformed", "topics keep no history")),
        };
        let topic =
            Topic::parse(&topic).map_err(|e| ChatError::new("invalid_name", e.to_string()))?;
        let (first, next) = match self.broker.history(&topic, StartAt::Latest, 0) {
            Ok(page) => (page.first_offset, page.next_offset),
            Err(HistoryError::NotRetained(_)) => (1, 1),
            Err(err) => return Err(ChatError::new("unavailable", err.to_string())),
        };
        let seq = |position: &Position| self.seq_of(&topic, position, first, next);
        let page = match (before, after) {
            (_, Some(after)) => {
                let start = seq(after)?.saturating_add(1).max(first);
                self.page_from(&topic, start, next, limit)?
            }
            (Some(before), None) => {
                self.page_before(&topic, first, seq(before)?.min(next), limit)?
            }
            (None, None) => self.page_before(&topic, first, next, limit)?,
        };
        let mut messages = Vec::new();
        for message in page {
            let Ok(mut value) = serde_json::from_slice::<Value>(message.payload()) else {
                continue;
            };
            if let (Some(object), Some(offset)) = (value.as_object_mut(), message.offset()) {
                object.insert("seq".into(), offset.into());
            }
            messages.push(value);
        }
        if let Some(object) = reply.as_object_mut() {
            object.insert("messages".into(), messages.into());
            object.insert("first".into(), first.into());
            object.insert("next".into(), next.into());
        }
        Ok(reply)
    }

    /// Up to `limit` entries of `topic` from offset `start`, before `end`. In a cluster a
    /// conversation's offsets have gaps (one sequence across topics): a count of entries, not
    /// of offsets.
    fn page_from(
        &self,
        topic: &Topic,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<whispeer_core::Message>, ChatError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let page = self
            .broker
            .history(topic, StartAt::Offset(start), limit)
            .map_err(|e| ChatError::new("unavailable", e.to_string()))?;
        Ok(page.messages.into_iter().filter(|m| m.offset().is_some_and(|o| o < end)).collect())
    }

    /// The last `limit` entries of `topic` before offset `end`: read at once where offsets
    /// are dense (one node), else found by reading from `first` (a cluster's gaps; bounded by
    /// `history_max_messages`).
    fn page_before(
        &self,
        topic: &Topic,
        first: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<whispeer_core::Message>, ChatError> {
        let guess = end.saturating_sub(limit as u64).max(first);
        let page = self.page_from(topic, guess, end, limit)?;
        if page.len() >= limit || guess <= first {
            return Ok(page);
        }
        let mut last = std::collections::VecDeque::with_capacity(limit);
        let mut from = first;
        while from < end {
            let page = self
                .broker
                .history(topic, StartAt::Offset(from), 1024)
                .map_err(|e| ChatError::new("unavailable", e.to_string()))?;
            let next_from = page.next_from();
            for message in page.messages {
                if message.offset().is_none_or(|o| o >= end) {
                    return Ok(last.into());
                }
                if last.len() == limit {
                    last.pop_front();
                }
                last.push_back(message);
            }
            match next_from {
                Some(more) if more > from => from = more,
                _ => break,
            }
        }
        Ok(last.into())
    }

    /// The `seq` a position names: itself, or the message with that id (looked for through
    /// the retained history, which `history_max_messages` bounds).
    pub(crate) fn seq_of(
        &self,
        topic: &Topic,
        position: &Position,
        first: u64,
        next: u64,
    ) -> Result<u64, ChatError> {
        let id = match position {
            Position::Seq(seq) => return Ok(*seq),
            Position::Id(id) => id,
        };
        let needle = format!("\"id\":\"{id}\"");
        let mut from = first;
        while from < next {
            let page = self
                .broker
                .history(topic, StartAt::Offset(from), 1024)
                .map_err(|e| ChatError::new("unavailable", e.to_string()))?;
            for message in &page.messages {
                let text = std::str::from_utf8(message.payload()).unwrap_or_default();
                if text.contains(&needle) {
                    return message
                        .offset()
                        .ok_or_else(|| ChatError::new("unavailable", "no offset"));
                }
            }
            match page.next_from() {
                Some(more) => from = more,
                None => break,
            }
        }
        Err(ChatError::new("no_such_message", format!("no message {id:?} in this conversation")))
    }

    /// Tells a user, or the other members of a group, that `user` is typing. Never stored.
    pub(crate) fn typing(&self, user: &str, target: &Target) -> Result<(), ChatError> {
        match target {
            Target::User(peer) => {
                self.tell(peer, Bytes::from(json!({ "type": "typing", "from": user }).to_string()));
            }
            Target::Group(group) => {
                let members = {
                    let groups = self.groups();
                    if !groups.is_member(group, user) {
                        let message = format!("you are not a member of group {group:?}");
                        return Err(ChatError::new("not_member", message));
                    }
                    groups.members(group)
                };
                let event = json!({ "type": "typing", "from": user, "group": group }).to_string();
                let event = Bytes::from(event);
                for member in members.iter().filter(|m| *m != user) {
                    self.tell(member, event.clone());
                }
            }
            Target::Topic(_) => {
                return Err(ChatError::new("malformed", "typing is to a user or a group"));
            }
        }
        Ok(())
    }

    /// A group's members with their roles and presence.
    pub(crate) fn members(&self, user: &str, group: &str) -> Result<Value, ChatError> {
        let roster = self.groups().roster(group, user)?;
        let members: Vec<Value> = roster
            .into_iter()
            .map(|(member, role)| {
                let mut presence = self.presence(&member);
                if let Some(object) = presence.as_object_mut() {
                    object.insert("role".into(), role.name().into());
                }
                presence
            })
            .collect();
        Ok(json!({ "type": "members", "group": group, "members": members }))
    }
}
