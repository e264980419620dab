//! One device's end-to-end state in a chat, without I/O (the Rust SDK and the WASM client both
//! drive it): its identity, the keys seen per contact device (trust on first use: a changed key
//! is reported and not used until accepted), the group keys by epoch, and which groups need a
//! new key (a member joined, left or was removed, or changed devices).
//!
//! The sealed forms travel as a chat message's `msg`, each with the sending device's public
//! identity in `key` so a receiver opens it without asking the directory:
//! `{"sealed": …}` (a direct box for the recipient's devices and the sender's), `{"group_key":
//! …}` (a group's next key, a box for its members' devices), `{"sealed_group": …}` (a message
//! sealed with the group's key). Every box names its conversation and sender, so a message
//! moved to another conversation, or re-sent under another name, does not open.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::{
    GroupKey, Identity, IdentityError, PairKeys, PublicIdentity, group_sealed_by, open_group,
    open_pairwise, open_sealed, pairwise_sender, seal_for_verified, seal_group, seal_pairwise,
};

/// A key a contact had before and has no more: its device, and the fingerprints before and now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    /// Whose.
    pub user: String,
    /// Which device.
    pub device: String,
    /// The fingerprint seen before.
    pub was: String,
    /// The fingerprint now.
    pub now: String,
}

/// Why a message could not be sealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatKeysError {
    /// The user has published no device keys (a client that does not seal, say).
    #[error("{0} has published no keys: nothing could open a sealed message")]
    NoKeys(String),
    /// A contact's key changed and the change was not accepted yet.
    #[error("{}'s key for {} changed (was {}, now {}): compare the fingerprint, then trust it", .0[0].user, .0[0].device, .0[0].was, .0[0].now)]
    KeyChanged(Vec<KeyChange>),
    /// The group has no current key here: make one first.
    #[error("no current key for group {0}")]
    NoGroupKey(String),
    /// A key or box could not be made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What a received message turned out to be.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum Opened {
    /// Not sealed: shown as it came.
    Plain,
    /// A sealed message, opened: its content.
    Message(Value),
    /// A group's key, learned.
    GroupKey {
        /// The group.
        group: String,
        /// The key's epoch.
        epoch: u32,
    },
    /// Signed by a key other than the one seen before for that device: not opened.
    KeyChanged(KeyChange),
    /// Sealed, but it does not open here (sent before this device had the key, after this
    /// member was removed, altered or moved): why.
    Unreadable(String),
}

/// A group's keys by epoch (a rare concurrent rotation can give two keys one epoch), and
/// whether its membership changed since the current one was made.
#[derive(Default)]
struct GroupState {
    epochs: BTreeMap<u32, Vec<GroupKey>>,
    stale: bool,
}

/// One device's end-to-end chat state.
pub struct ChatKeys {
    identity: Identity,
    user: String,
    me: PublicIdentity,
    known: BTreeMap<(String, String), PublicIdentity>,
    pending: BTreeMap<String, Vec<(KeyChange, PublicIdentity)>>,
    groups: BTreeMap<String, GroupState>,
    pairs: PairKeys,
    changed: bool,
}

impl std::fmt::Debug for ChatKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatKeys")
            .field("user", &self.user)
            .field("device", &self.me.device)
            .finish()
    }
}

fn direct_context(from: &str, to: &str) -> Vec<u8> {
    format!("whispeer-chat direct\0{from}\0{to}").into_bytes()
}

fn key_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group-key\0{group}\0{from}").into_bytes()
}

fn group_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group\0{group}\0{from}").into_bytes()
}

/// Whether a chat message's `msg` is one of the sealed forms.
pub fn is_sealed(msg: &Value) -> bool {
    ["sealed", "sealed_group", "group_key"].iter().any(|field| msg.get(field).is_some())
}

impl ChatKeys {
    /// The state of `user`'s `device` with `identity`; `saved` is an earlier
    /// [`to_text`](Self::to_text) (keys seen, group keys), or `None` to start empty.
    ///
    /// # Errors
    /// [`IdentityError::Malformed`] when `saved` is not such a text.
    pub fn new(
        identity: Identity,
        user: &str,
        device: &str,
        saved: Option<&str>,
    ) -> Result<Self, IdentityError> {
        let me = identity.public(device);
        let mut keys = Self {
            identity,
            user: user.to_string(),
            me,
            known: BTreeMap::new(),
            pending: BTreeMap::new(),
            groups: BTreeMap::new(),
            pairs: PairKeys::default(),
            changed: false,
        };
        if let Some(text) = saved {
            keys.restore(text)?;
        }
        Ok(keys)
    }

    /// This device's public identity, to publish to the directory.
    pub fn public(&self) -> &PublicIdentity {
        &self.me
    }

    /// Whose device this is.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// This device's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether something worth saving changed since the last call (then save
    /// [`to_text`](Self::to_text)).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Checks `user`'s keys against those seen: new devices are remembered, changed keys are
    /// kept pending (and returned) until [`trust`](Self::trust).
    pub fn check(&mut self, user: &str, keys: &[PublicIdentity]) -> Vec<KeyChange> {
        let mut changes = Vec::new();
        for key in keys {
            if let Some(change) = self.check_one(user, key) {
                changes.push(change);
            }
        }
        changes
    }

    fn check_one(&mut self, user: &str, key: &PublicIdentity) -> Option<KeyChange> {
        let slot = (user.to_string(), key.device.clone());
        match self.known.get(&slot) {
            // Verified when first seen.
            Some(seen) if seen == key => None,
            Some(_) if key.verify().is_err() => None,
            Some(seen) => {
                let change = KeyChange {
                    user: user.to_string(),
                    device: key.device.clone(),
                    was: seen.fingerprint(),
                    now: key.fingerprint(),
                };
                let pending = self.pending.entry(user.to_string()).or_default();
                if !pending.iter().any(|(seen, _)| *seen == change) {
                    pending.push((change.clone(), key.clone()));
                }
                Some(change)
            }
            None => {
                // A key that does not verify is not remembered, so nothing is sealed to it.
                if key.verify().is_ok() {
                    self.known.insert(slot, key.clone());
                    self.changed = true;
                }
                None
            }
        }
    }

    /// The key changes of `user` not accepted yet.
    pub fn pending(&self, user: &str) -> Vec<KeyChange> {
        self.pending.get(user).into_iter().flatten().map(|(change, _)| change.clone()).collect()
    }

    /// Accepts `user`'s pending key changes (after comparing fingerprints); gives how many.
    pub fn trust(&mut self, user: &str) -> usize {
        let changes = self.pending.remove(user).unwrap_or_default();
        for (change, key) in &changes {
            self.known.insert((user.to_string(), change.device.clone()), key.clone());
        }
        self.changed |= !changes.is_empty();
        changes.len()
    }

    /// Refuses while one of `users` has key changes not accepted.
    fn refuse_pending(&self, users: &[&str]) -> Result<(), ChatKeysError> {
        let changes: Vec<KeyChange> = users.iter().flat_map(|user| self.pending(user)).collect();
        if changes.is_empty() { Ok(()) } else { Err(ChatKeysError::KeyChanged(changes)) }
    }

    /// Those of `user`'s `keys` that are the ones remembered (checked when first seen).
    fn trusted(&self, user: &str, keys: &[PublicIdentity]) -> Vec<PublicIdentity> {
        let known = |k: &&PublicIdentity| {
            self.known.get(&(user.to_string(), k.device.clone())).is_some_and(|seen| seen == *k)
        };
        keys.iter().filter(known).cloned().collect()
    }

    fn with_key(&self, name: &str, sealed: &[u8]) -> Value {
        json!({ name: B64.encode(sealed), "key": self.me.to_text() })
    }

    /// Seals `plain` to `to`: for `to_keys` (its devices) and `own_keys` (this user's, this
    /// device always among them), all checked as by [`check`](Self::check).
    ///
    /// # Errors
    /// [`ChatKeysError::NoKeys`] when `to` has no device, [`ChatKeysError::KeyChanged`].
    pub fn seal_direct(
        &mut self,
        to: &str,
        to_keys: &[PublicIdentity],
        own_keys: &[PublicIdentity],
        plain: &Value,
    ) -> Result<Value, ChatKeysError> {
        let user = self.user.clone();
        self.check(to, to_keys);
        if to != user {
            self.check(&user, own_keys);
        }
        self.refuse_pending(&[to, &user])?;
        let mut devices = self.trusted(to, to_keys);
        if devices.is_empty() {
            return Err(ChatKeysError::NoKeys(to.to_string()));
        }
        if to != user {
            devices.extend(self.trusted(&user, own_keys));
        }
        let me = self.me.clone();
        devices.retain(|d| d.x25519 != me.x25519);
        devices.push(me);
        let bytes = serde_json::to_vec(plain).map_err(|_| IdentityError::Malformed("message"))?;
        let context = direct_context(&self.user, to);
        let sealed = seal_pairwise(&self.identity, &mut self.pairs, &devices, &context, &bytes)?;
        Ok(self.with_key("sealed", &sealed))
    }

    /// Whether `group` needs a new key before this device seals to it: none yet, or its
    /// membership changed since.
    pub fn needs_group_key(&self, group: &str) -> bool {
        self.groups.get(group).is_none_or(|state| state.stale || state.epochs.is_empty())
    }

    /// Records that `group`'s membership changed (a member joined, left, was removed, or
    /// changed devices): the next message sealed to it waits for a new key.
    pub fn group_changed(&mut self, group: &str) {
        self.groups.entry(group.to_string()).or_default().stale = true;
    }

    fn current(&self, group: &str) -> Option<&GroupKey> {
        self.groups.get(group)?.epochs.values().next_back()?.last()
    }

    /// Makes `group`'s next key and seals it to `members`' devices (each user's keys, checked);
    /// gives the message to send to the group and the epoch. The key is current here at once.
    ///
    /// # Errors
    /// [`ChatKeysError::NoKeys`] for a member without devices, [`ChatKeysError::KeyChanged`].
    pub fn new_group_key(
        &mut self,
        group: &str,
        members: &[(String, Vec<PublicIdentity>)],
    ) -> Result<(Value, u32), ChatKeysError> {
        for (user, keys) in members {
            self.check(user, keys);
        }
        let users: Vec<&str> = members.iter().map(|(user, _)| user.as_str()).collect();
        self.refuse_pending(&users)?;
        let mut devices = Vec::new();
        for (user, keys) in members {
            let trusted = self.trusted(user, keys);
            if trusted.is_empty() {
                return Err(ChatKeysError::NoKeys(user.clone()));
            }
            devices.extend(trusted);
        }
        let me = self.me.clone();
        devices.retain(|d| d.x25519 != me.x25519);
        devices.push(me);
        let state = self.groups.entry(group.to_string()).or_default();
        let epoch = state.epochs.keys().next_back().map_or(1, |e| e.saturating_add(1));
        let key = GroupKey::generate(epoch)?;
        let context = key_context(group, &self.user);
        let sealed = seal_for_verified(&self.identity, &devices, &context, &key.to_bytes())?;
        state.epochs.entry(epoch).or_default().push(key);
        state.stale = false;
        self.changed = true;
        Ok((self.with_key("group_key", &sealed), epoch))
    }

    /// Seals `plain` with `group`'s current key.
    ///
    /// # Errors
    /// [`ChatKeysError::NoGroupKey`].
    pub fn seal_group(&self, group: &str, plain: &Value) -> Result<Value, ChatKeysError> {
        let key = self.current(group).ok_or_else(|| ChatKeysError::NoGroupKey(group.into()))?;
        let bytes = serde_json::to_vec(plain).map_err(|_| IdentityError::Malformed("message"))?;
        let sealed = seal_group(&self.identity, key, &group_context(group, &self.user), &bytes)?;
        Ok(self.with_key("sealed_group", &sealed))
    }

    /// Opens a received message: `from` (its sender, as the server says), `to` or `group` (its
    /// conversation) and its `msg`.
    pub fn open(
        &mut self,
        from: &str,
        to: Option<&str>,
        group: Option<&str>,
        msg: &Value,
    ) -> Opened {
        if !is_sealed(msg) {
            return Opened::Plain;
        }
        let sender = match self.sender(from, msg) {
            Ok(sender) => sender,
            Err(opened) => return opened,
        };
        let field = |name: &str| msg.get(name).and_then(Value::as_str);
        let unreadable = |err: IdentityError| Opened::Unreadable(err.to_string());
        let decode = |text: &str| B64.decode(text).map_err(|_| IdentityError::Malformed("box"));
        match (field("sealed"), field("group_key"), field("sealed_group"), to, group) {
            (Some(text), _, _, Some(to), None) => {
                let context = direct_context(from, to);
                let opened = decode(text).and_then(|sealed| {
                    if pairwise_sender(&sealed)? != sender.x25519 {
                        return Err(IdentityError::WrongSender);
                    }
                    open_pairwise(&self.identity, &mut self.pairs, &sealed, &context)
                });
                match opened {
                    Ok(bytes) => content(&bytes),
                    Err(err) => unreadable(err),
                }
            }
            (_, Some(text), _, None, Some(group)) => {
                let learned = decode(text)
                    .and_then(|sealed| {
                        let context = key_context(group, from);
                        open_sealed(&self.identity, &sealed, &context, Some(&sender.ed25519))
                    })
                    .and_then(|bytes| GroupKey::from_bytes(&bytes));
                match learned {
                    Ok(key) => self.learn(group, key),
                    Err(err) => unreadable(err),
                }
            }
            (_, _, Some(text), None, Some(group)) => match decode(text) {
                Ok(sealed) => self.open_in_group(group, from, &sender.ed25519, &sealed),
                Err(err) => unreadable(err),
            },
            _ => Opened::Unreadable("a sealed form in the wrong kind of conversation".into()),
        }
    }

    /// The sending device's public identity, from the message's `key`, checked as seen before.
    fn sender(&mut self, from: &str, msg: &Value) -> Result<PublicIdentity, Opened> {
        let text = msg.get("key").and_then(Value::as_str).unwrap_or_default();
        // The key seen before, as it was sent before: no need to check its signature again.
        let device = text.rsplit_once(':').map_or("", |(device, _)| device);
        if let Some(seen) = self.known.get(&(from.to_string(), device.to_string()))
            && seen.to_text() == text
        {
            return Ok(seen.clone());
        }
        let key = PublicIdentity::from_text(text)
            .map_err(|e| Opened::Unreadable(format!("the sender's key: {e}")))?;
        if from == self.user && key.device == self.me.device && key != self.me {
            return Err(Opened::Unreadable("signed as this device by another key".into()));
        }
        if let Some(change) = self.check_one(from, &key) {
            return Err(Opened::KeyChanged(change));
        }
        Ok(key)
    }

    fn learn(&mut self, group: &str, key: GroupKey) -> Opened {
        let epoch = key.epoch;
        let state = self.groups.entry(group.to_string()).or_default();
        let newest = state.epochs.keys().next_back().is_none_or(|&e| epoch >= e);
        let same =
            state.epochs.get(&epoch).into_iter().flatten().any(|k| k.to_bytes() == key.to_bytes());
        if !same {
            state.epochs.entry(epoch).or_default().push(key);
            self.changed = true;
        }
        if newest {
            state.stale = false;
        }
        Opened::GroupKey { group: group.to_string(), epoch }
    }

    fn open_in_group(&self, group: &str, from: &str, sender: &[u8; 32], sealed: &[u8]) -> Opened {
        let epoch = match group_sealed_by(sealed) {
            Ok((epoch, _)) => epoch,
            Err(err) => return Opened::Unreadable(err.to_string()),
        };
        let keys = self.groups.get(group).and_then(|state| state.epochs.get(&epoch));
        let Some(keys) = keys else {
            return Opened::Unreadable(format!("no key of epoch {epoch} for group {group} here"));
        };
        let context = group_context(group, from);
        let mut last = IdentityError::Unopened;
        for key in keys {
            match open_group(key, sealed, &context, Some(sender)) {
                Ok(bytes) => return content(&bytes),
                Err(err) => last = err,
            }
        }
        Opened::Unreadable(last.to_string())
    }

    /// The keys seen and the group keys, as text to keep beside the identity (it holds group
    /// keys: a secret like the identity).
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut known = Map::new();
        for ((user, _), key) in &self.known {
            let entry = known.entry(user.clone()).or_insert_with(|| json!([]));
            if let Some(list) = entry.as_array_mut() {
                list.push(key.to_text().into());
            }
        }
        let mut groups = Map::new();
        for (group, state) in &self.groups {
            let keys: Vec<Value> = state
                .epochs
                .values()
                .flatten()
                .map(|key| B64.encode(key.to_bytes().as_slice()).into())
                .collect();
            groups.insert(group.clone(), json!({ "keys": keys, "stale": state.stale }));
        }
        Zeroizing::new(json!({ "v": 1, "known": known, "groups": groups }).to_string())
    }

    fn restore(&mut self, text: &str) -> Result<(), IdentityError> {
        let malformed = || IdentityError::Malformed("saved chat keys");
        let value: Value = serde_json::from_str(text).map_err(|_| malformed())?;
        for (user, keys) in value["known"].as_object().ok_or_else(malformed)? {
            for key in keys.as_array().ok_or_else(malformed)? {
                let key = PublicIdentity::from_text(key.as_str().ok_or_else(malformed)?)?;
                self.known.insert((user.clone(), key.device.clone()), key);
            }
        }
        for (group, saved) in value["groups"].as_object().ok_or_else(malformed)? {
            let state = self.groups.entry(group.clone()).or_default();
            state.stale = saved["stale"].as_bool().unwrap_or(true);
            for key in saved["keys"].as_array().ok_or_else(malformed)? {
                let bytes = Zeroizing::new(
                    B64.decode(key.as_str().ok_or_else(malformed)?).map_err(|_| malformed())?,
                );
                let key = GroupKey::from_bytes(&bytes)?;
                state.epochs.entry(key.epoch).or_default().push(key);
            }
        }
        Ok(())
    }
}

fn content(bytes: &[u8]) -> Opened {
    match serde_json::from_slice(bytes) {
        Ok(value) => Opened::Message(value),
        Err(err) => Opened::Unreadable(format!("opened, but not JSON: {err}")),
    }
}
