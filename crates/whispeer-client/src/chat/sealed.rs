//! End-to-end sealed direct messages on `Chat`: each device publishes its public identity to
//! the server's directory; a sealed message is a box (`whispeer_engines::seal_for`) for every
//! device of the recipient and of the sender, sent as `{"sealed": "<base64url>"}` — the server,
//! its store and its plugins see only that. [`KnownKeys`] remembers the keys seen per user and
//! device and reports a change instead of accepting it silently.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use whispeer_engines::{Identity, PublicIdentity, open_sealed, seal_for, sealed_sender};

use super::{Chat, ChatError, ChatMessage};

fn keys_error(err: impl std::fmt::Display) -> ChatError {
    ChatError::Keys(err.to_string())
}

/// What a direct box is sealed for: sender and recipient, so it opens in no other conversation.
fn context(from: &str, to: &str) -> Vec<u8> {
    format!("whispeer-chat direct\0{from}\0{to}").into_bytes()
}

impl Chat {
    /// Publishes this device's public identity (of `identity`, named as this connection's
    /// device) to the server's directory.
    ///
    /// # Errors
    /// The server's refusal, or [`ChatError::Closed`].
    pub async fn publish_identity(&self, identity: &Identity) -> Result<(), ChatError> {
        let public = identity.public(self.device());
        self.request(json!({ "type": "keys", "publish": public.to_text() })).await.map(drop)
    }

    /// Removes one of this user's devices from the directory (lost or retired): nothing is
    /// sealed to it afterwards; rotate the keys of its groups so it cannot open what follows.
    ///
    /// # Errors
    /// `no_such_device`, or [`ChatError::Closed`].
    pub async fn revoke_device(&self, device: &str) -> Result<(), ChatError> {
        self.request(json!({ "type": "keys", "revoke": device })).await.map(drop)
    }

    /// The public identities of `user`'s devices, each checked (its X25519 key signed by its
    /// Ed25519 key).
    ///
    /// # Errors
    /// [`ChatError::Keys`] when an entry does not verify (a directory that swapped a key).
    pub async fn keys(&self, user: &str) -> Result<Vec<PublicIdentity>, ChatError> {
        let reply = self.request(json!({ "type": "keys", "user": user })).await?;
        let devices = reply["devices"].as_array().cloned().unwrap_or_default();
        devices
            .iter()
            .map(|entry| {
                let text = entry.as_str().unwrap_or_default();
                PublicIdentity::from_text(text).map_err(|e| keys_error(format!("{user}: {e}")))
            })
            .collect()
    }

    /// Sends `msg` to `user` sealed for `user`'s devices and this user's own (from the
    /// directory, fetched now), signed by `identity`.
    ///
    /// # Errors
    /// [`ChatError::Keys`] when `user` has no published device, or an entry does not verify;
    /// then as [`send_to`](Self::send_to).
    pub async fn send_sealed_to(
        &self,
        identity: &Identity,
        user: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        let mut recipients = self.keys(user).await?;
        if recipients.is_empty() {
            return Err(keys_error(format!("{user} has published no keys")));
        }
        if user != self.user() {
            recipients.extend(self.keys(self.user()).await?);
        }
        let plain = serde_json::to_vec(&msg.into()).map_err(keys_error)?;
        let sealed = seal_for(identity, &recipients, &context(self.user(), user), &plain)
            .map_err(keys_error)?;
        self.send_to(user, json!({ "sealed": B64.encode(sealed) })).await
    }

    /// Opens a sealed direct message with this device's `identity`; `sender_keys` are the
    /// sender's devices (from [`keys`](Self::keys)), one of which must have signed it.
    ///
    /// # Errors
    /// [`ChatError::Keys`]: not sealed, not for this device, signed by another key, altered.
    pub fn open(
        &self,
        identity: &Identity,
        message: &ChatMessage,
        sender_keys: &[PublicIdentity],
    ) -> Result<Value, ChatError> {
        let encoded =
            message.msg["sealed"].as_str().ok_or_else(|| keys_error("not a sealed message"))?;
        let sealed = B64.decode(encoded).map_err(keys_error)?;
        let to = message.to.as_deref().ok_or_else(|| keys_error("not a direct message"))?;
        let signer = sealed_sender(&sealed).map_err(keys_error)?;
        if !sender_keys.iter().any(|key| key.ed25519 == signer) {
            return Err(keys_error(format!("signed by a key that is not {}'s", message.from)));
        }
        let plain = open_sealed(identity, &sealed, &context(&message.from, to), Some(&signer))
            .map_err(keys_error)?;
        serde_json::from_slice(&plain).map_err(keys_error)
    }
}

/// A key a user had before and has no more: its device, and the fingerprints before and now.
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

/// The keys seen per user and device (trust on first use): a device seen the first time is
/// remembered; a changed key is reported by [`check`](Self::check) and not remembered until
/// [`accept`](Self::accept).
#[derive(Clone, Debug, Default)]
pub struct KnownKeys {
    seen: HashMap<(String, String), String>,
}

impl KnownKeys {
    /// The changes in `keys` (of `user`) since they were seen; new devices are remembered.
    pub fn check(&mut self, user: &str, keys: &[PublicIdentity]) -> Vec<KeyChange> {
        let mut changes = Vec::new();
        for key in keys {
            let now = key.fingerprint();
            match self.seen.get(&(user.to_string(), key.device.clone())) {
                Some(was) if *was != now => changes.push(KeyChange {
                    user: user.into(),
                    device: key.device.clone(),
                    was: was.clone(),
                    now,
                }),
                Some(_) => {}
                None => {
                    self.seen.insert((user.to_string(), key.device.clone()), now);
                }
            }
        }
        changes
    }

    /// Accepts a change (after the user compared the fingerprint).
    pub fn accept(&mut self, change: &KeyChange) {
        self.seen.insert((change.user.clone(), change.device.clone()), change.now.clone());
    }
}
