//! Sealed group messages on `Chat`: a group key per epoch, made by a member (the owner or an
//! admin, by the app's rule) and sent to the group sealed to the devices of its members at that
//! moment (`{"group_key":"…"}`); messages sealed with the current epoch's key
//! (`{"sealed_group":"…"}`) and signed by their sender. After a member leaves or is removed, a
//! new epoch (`rotate_group_key`) keeps everything sent afterwards from it; old epochs stay
//! readable to those who had them.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use whispeer_engines::{
    GroupKey, Identity, PublicIdentity, group_sealed_by, open_group, open_sealed, seal_for,
    seal_group, sealed_sender,
};

use super::{Chat, ChatError, ChatMessage};

fn keys_error(err: impl std::fmt::Display) -> ChatError {
    ChatError::Keys(err.to_string())
}

fn key_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group-key\0{group}\0{from}").into_bytes()
}

fn message_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group\0{group}\0{from}").into_bytes()
}

/// The group keys this device holds, by group and epoch.
#[derive(Debug, Default)]
pub struct GroupKeys {
    keys: HashMap<String, BTreeMap<u32, GroupKey>>,
}

impl GroupKeys {
    /// `group`'s newest key.
    pub fn current(&self, group: &str) -> Option<&GroupKey> {
        self.keys.get(group)?.values().next_back()
    }

    fn insert(&mut self, group: &str, key: GroupKey) {
        self.keys.entry(group.to_string()).or_default().insert(key.epoch, key);
    }

    /// Learns the key a `{"group_key"}` message carries (sealed to this device by one of
    /// `sender_keys`); gives its epoch.
    ///
    /// # Errors
    /// [`ChatError::Keys`]: not a group key message, not for this device, another signer.
    pub fn learn(
        &mut self,
        identity: &Identity,
        message: &ChatMessage,
        sender_keys: &[PublicIdentity],
    ) -> Result<u32, ChatError> {
        let group = message.group.as_deref().ok_or_else(|| keys_error("not a group message"))?;
        let encoded =
            message.msg["group_key"].as_str().ok_or_else(|| keys_error("not a group key"))?;
        let sealed = B64.decode(encoded).map_err(keys_error)?;
        let signer = sealed_sender(&sealed).map_err(keys_error)?;
        if !sender_keys.iter().any(|key| key.ed25519 == signer) {
            return Err(keys_error(format!("signed by a key that is not {}'s", message.from)));
        }
        let context = key_context(group, &message.from);
        let bytes = open_sealed(identity, &sealed, &context, Some(&signer)).map_err(keys_error)?;
        let key = GroupKey::from_bytes(&bytes).map_err(keys_error)?;
        let epoch = key.epoch;
        self.insert(group, key);
        Ok(epoch)
    }
}

impl Chat {
    /// Makes `group`'s next key, seals it to the devices of its members now (from the
    /// directory) and sends it to the group; gives the epoch.
    ///
    /// # Errors
    /// [`ChatError::Keys`] when a member has no keys or an entry does not verify; the server's
    /// refusal (`not_member`, …).
    pub async fn rotate_group_key(
        &self,
        identity: &Identity,
        keys: &mut GroupKeys,
        group: &str,
    ) -> Result<u32, ChatError> {
        let epoch = keys.current(group).map_or(1, |key| key.epoch + 1);
        let mut devices = Vec::new();
        for member in self.members(group).await? {
            if member.role.as_deref() == Some("invited") {
                continue;
            }
            let found = self.keys(&member.user).await?;
            if found.is_empty() {
                return Err(keys_error(format!("{} has published no keys", member.user)));
            }
            devices.extend(found);
        }
        let key = GroupKey::generate(epoch).map_err(keys_error)?;
        let context = key_context(group, self.user());
        let sealed = seal_for(identity, &devices, &context, &key.to_bytes()).map_err(keys_error)?;
        self.send_group(group, json!({ "group_key": B64.encode(sealed) })).await?;
        keys.insert(group, key);
        Ok(epoch)
    }

    /// Sends `msg` to `group` sealed with its current key, signed by `identity`.
    ///
    /// # Errors
    /// [`ChatError::Keys`] when no key is known for the group yet; then as
    /// [`send_group`](Self::send_group).
    pub async fn send_sealed_group(
        &self,
        identity: &Identity,
        keys: &GroupKeys,
        group: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        let key = keys.current(group).ok_or_else(|| keys_error(format!("no key for {group}")))?;
        let plain = serde_json::to_vec(&msg.into()).map_err(keys_error)?;
        let context = message_context(group, self.user());
        let sealed = seal_group(identity, key, &context, &plain).map_err(keys_error)?;
        self.send_group(group, json!({ "sealed_group": B64.encode(sealed) })).await
    }

    /// Opens a sealed group message with the key of its epoch, if this device has it; it must
    /// be signed by one of `sender_keys`.
    ///
    /// # Errors
    /// [`ChatError::Keys`]: no key of that epoch (sent after this member was removed, or
    /// before it joined), another signer, altered.
    pub fn open_group(
        &self,
        keys: &GroupKeys,
        message: &ChatMessage,
        sender_keys: &[PublicIdentity],
    ) -> Result<Value, ChatError> {
        let group = message.group.as_deref().ok_or_else(|| keys_error("not a group message"))?;
        let encoded = message.msg["sealed_group"]
            .as_str()
            .ok_or_else(|| keys_error("not a sealed group message"))?;
        let sealed = B64.decode(encoded).map_err(keys_error)?;
        let (epoch, signer) = group_sealed_by(&sealed).map_err(keys_error)?;
        if !sender_keys.iter().any(|key| key.ed25519 == signer) {
            return Err(keys_error(format!("signed by a key that is not {}'s", message.from)));
        }
        let key = keys
            .keys
            .get(group)
            .and_then(|epochs| epochs.get(&epoch))
            .ok_or_else(|| keys_error(format!("no key of epoch {epoch} for {group}")))?;
        let context = message_context(group, &message.from);
        let plain = open_group(key, &sealed, &context, Some(&signer)).map_err(keys_error)?;
        serde_json::from_slice(&plain).map_err(keys_error)
    }
}
