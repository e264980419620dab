//! End-to-end sealing on `Chat`, on by default: each connection has a device identity (from a
//! file with [`ChatOptions::identity_file`], given with [`ChatOptions::identity`], or made for
//! the connection), publishes its public half to the server's directory, seals direct messages
//! to the recipient's devices and its own, seals group messages with the group's key (made
//! and sealed to the members' devices when there is none or the membership changed), and
//! opens what arrives before it reaches [`ChatEvents`](super::ChatEvents). The state —
//! contacts' keys seen (a changed one is refused until [`Chat::trust`]) and group keys — is
//! `whispeer_engines::ChatKeys`, kept beside the identity file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use whispeer_engines::{
    ChatKeys, ChatKeysError, Identity, KeyChange, Opened, PublicIdentity, is_sealed,
};
use zeroize::Zeroizing;

use super::{Chat, ChatError, ChatEvent, ChatMessage, ChatOptions, Conversation};

/// Where a connection's identity comes from.
#[derive(Clone, Debug, Default)]
pub(super) enum KeySource {
    /// Made for this connection (kept in memory only).
    #[default]
    Generated,
    /// Given, as `Identity::to_text`.
    Text(Arc<Zeroizing<String>>),
    /// A file, made on first use.
    File(PathBuf),
    /// A file per user and device in a folder.
    Dir(PathBuf),
    /// No sealing.
    Plain,
}

impl ChatOptions {
    /// Seals with this device identity (keep its `to_text()` like a password).
    #[must_use]
    pub fn identity(mut self, identity: &Identity) -> Self {
        self.keys = KeySource::Text(Arc::new(identity.to_text()));
        self
    }

    /// Seals with the identity in `path`, made there (readable by its owner only) on first
    /// use; the keys seen and the group keys are kept beside it, in `<path>.keys`.
    #[must_use]
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.keys = KeySource::File(path.into());
        self
    }

    /// Seals with the identity in `<dir>/<user>.<device>.identity` (the user and device the
    /// server welcomed this connection as), as [`identity_file`](Self::identity_file): one
    /// folder serves every user and device of a program.
    #[must_use]
    pub fn identity_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.keys = KeySource::Dir(dir.into());
        self
    }

    /// Sends and receives without end-to-end sealing (to talk with clients that do not seal,
    /// such as a `websocat` session): the server and its store see the messages.
    #[must_use]
    pub fn plain(mut self) -> Self {
        self.keys = KeySource::Plain;
        self
    }
}

/// A connection's sealing state.
#[derive(Debug)]
pub(super) struct E2e {
    keys: Mutex<ChatKeys>,
    saved_in: Option<PathBuf>,
    rotating: tokio::sync::Mutex<()>,
    /// Users' device keys as the directory gave them lately: dropped when the server says
    /// their devices changed, and after `DEVICES_FOR` in any case; at most `DEVICES_KEPT`
    /// users (emptied when full).
    devices: Mutex<HashMap<String, Fetched>>,
}

/// A user's device keys and when they were fetched.
type Fetched = (Instant, Arc<Vec<PublicIdentity>>);

/// How long fetched device keys are used without asking the directory again.
const DEVICES_FOR: Duration = Duration::from_secs(60);
/// Most users whose device keys a connection keeps.
const DEVICES_KEPT: usize = 4096;

fn keys_error(err: impl std::fmt::Display) -> ChatError {
    ChatError::Keys(err.to_string())
}

fn sealing_error(err: ChatKeysError) -> ChatError {
    match err {
        ChatKeysError::KeyChanged(changes) => ChatError::KeyChanged(changes),
        other => keys_error(other),
    }
}

/// Writes `text` to `path` through a temporary file, readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    #[cfg(unix)]
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    #[cfg(not(unix))]
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Reads the identity in `path`, or makes one there.
fn identity_in(path: &Path) -> Result<Identity, ChatError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Identity::from_text(&text).map_err(|e| keys_error(format!("{}: {e}", path.display())))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| keys_error(format!("{}: {e}", dir.display())))?;
            }
            let identity = Identity::generate().map_err(keys_error)?;
            write_private(path, &identity.to_text())
                .map_err(|e| keys_error(format!("writing {}: {e}", path.display())))?;
            Ok(identity)
        }
        Err(err) => Err(keys_error(format!("reading {}: {e}", path.display(), e = err))),
    }
}

impl E2e {
    /// The state for `user`'s `device` from `source`; `None` for a plain connection.
    pub(super) fn open(
        source: &KeySource,
        user: &str,
        device: &str,
    ) -> Result<Option<Self>, ChatError> {
        let (identity, saved_in) = match source {
            KeySource::Plain => return Ok(None),
            KeySource::Generated => (Identity::generate().map_err(keys_error)?, None),
            KeySource::Text(text) => (Identity::from_text(text).map_err(keys_error)?, None),
            KeySource::File(path) => Self::file(path.clone())?,
            KeySource::Dir(dir) => {
                let plain_name = |name: &str| {
                    !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                };
                if !plain_name(user) || !plain_name(device) {
                    return Err(keys_error(format!("no file name for {user:?} on {device:?}")));
                }
                Self::file(dir.join(format!("{user}.{device}.identity")))?
            }
        };
        let saved = match &saved_in {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(Zeroizing::new(text)),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(err) => return Err(keys_error(format!("reading {}: {err}", path.display()))),
            },
            None => None,
        };
        let keys = ChatKeys::new(identity, user, device, saved.as_deref().map(String::as_str))
            .map_err(|e| keys_error(format!("the saved keys: {e}")))?;
        Ok(Some(Self {
            keys: Mutex::new(keys),
            saved_in,
            rotating: tokio::sync::Mutex::new(()),
            devices: Mutex::new(HashMap::new()),
        }))
    }

    /// The identity in `path` and where its state is kept.
    fn file(path: PathBuf) -> Result<(Identity, Option<PathBuf>), ChatError> {
        let mut saved_in = path.as_os_str().to_owned();
        saved_in.push(".keys");
        Ok((identity_in(&path)?, Some(PathBuf::from(saved_in))))
    }

    /// Runs `f` on the state, then saves it if it changed.
    fn with<T>(&self, f: impl FnOnce(&mut ChatKeys) -> T) -> T {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let result = f(&mut keys);
        if keys.take_changed()
            && let Some(path) = &self.saved_in
            && let Err(err) = write_private(path, &keys.to_text())
        {
            tracing::warn!(%err, path = %path.display(), "chat keys not saved");
        }
        result
    }

    pub(super) fn public(&self) -> PublicIdentity {
        self.with(|keys| keys.public().clone())
    }

    /// A message as it arrived or as history gives it: opened or marked unreadable, a group
    /// key learned, or a key change.
    fn open_message(&self, mut message: ChatMessage) -> ChatEvent {
        if !is_sealed(&message.msg) {
            return ChatEvent::Message(message);
        }
        let (to, group) = (message.to.as_deref(), message.group.as_deref());
        let opened = self.with(|keys| keys.open(&message.from, to, group, &message.msg));
        message.sealed = true;
        match opened {
            Opened::Message(value) => message.msg = value,
            Opened::GroupKey { group, epoch } => {
                return ChatEvent::GroupKey { group, epoch, from: message.from };
            }
            Opened::KeyChanged(change) => return ChatEvent::KeyChanged { change, message },
            Opened::Unreadable(reason) => message.unreadable = Some(reason),
            Opened::Plain => message.sealed = false,
            _ => message.unreadable = Some("an unknown sealed form".into()),
        }
        ChatEvent::Message(message)
    }

    /// An event as the connection's task received it, opened; a group's membership change
    /// marks its key for renewal.
    pub(super) fn process(&self, event: ChatEvent) -> ChatEvent {
        match event {
            ChatEvent::Message(message) => self.open_message(message),
            ChatEvent::Group { group, event, user, by } => {
                if matches!(event.as_str(), "joined" | "left" | "removed" | "keys") {
                    self.with(|keys| keys.group_changed(&group));
                }
                if event == "keys" {
                    self.forget_devices(&user);
                }
                ChatEvent::Group { group, event, user, by }
            }
            ChatEvent::KeysChanged { user } => {
                self.forget_devices(&user);
                ChatEvent::KeysChanged { user }
            }
            other => other,
        }
    }

    fn forget_devices(&self, user: &str) {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner).remove(user);
    }

    fn known_devices(&self, user: &str) -> Option<Arc<Vec<PublicIdentity>>> {
        let devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        let (fetched, keys) = devices.get(user)?;
        (fetched.elapsed() < DEVICES_FOR).then(|| Arc::clone(keys))
    }

    fn remember_devices(&self, user: &str, keys: Vec<PublicIdentity>) -> Arc<Vec<PublicIdentity>> {
        let keys = Arc::new(keys);
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        if devices.len() >= DEVICES_KEPT {
            devices.clear();
        }
        devices.insert(user.to_string(), (Instant::now(), Arc::clone(&keys)));
        keys
    }

    /// History entries, opened; group keys among them are learned and left out.
    pub(super) fn open_history(&self, messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
        let opened = messages.into_iter().map(|message| self.open_message(message));
        opened
            .filter_map(|event| match event {
                ChatEvent::Message(message) => Some(message),
                ChatEvent::KeyChanged { change, mut message } => {
                    let why =
                        format!("signed by a changed key of {}'s {}", change.user, change.device);
                    message.unreadable = Some(why);
                    Some(message)
                }
                _ => None,
            })
            .collect()
    }
}

impl Chat {
    fn e2e(&self) -> Result<&E2e, ChatError> {
        self.e2e.as_deref().ok_or_else(|| keys_error("this connection does not seal (plain)"))
    }

    /// Sends `msg` to `user`, sealed for `user`'s devices and this user's other devices (keys
    /// from the directory, checked against those seen before); returns the message once the
    /// server stored it. On a [`plain`](ChatOptions::plain) connection, as
    /// [`send_plain_to`](Self::send_plain_to).
    ///
    /// # Errors
    /// [`ChatError::KeyChanged`] while a change of `user`'s keys is not trusted;
    /// [`ChatError::Keys`] when `user` has published no keys (a client that does not seal:
    /// [`send_plain_to`](Self::send_plain_to) reaches it); the server's refusal
    /// (`rate_limited`, `too_large`, …), or [`ChatError::Closed`].
    pub async fn send_to(
        &self,
        user: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        let msg = msg.into();
        let Some(e2e) = self.e2e.as_deref() else { return self.send_plain_to(user, msg).await };
        let (theirs, ours) =
            tokio::try_join!(self.devices(e2e, user), self.devices(e2e, self.user()))?;
        let sealed = e2e.with(|keys| keys.seal_direct(user, &theirs, &ours, &msg));
        let mut sent =
            self.send(Conversation::User(user.into()), sealed.map_err(sealing_error)?).await?;
        (sent.msg, sent.sealed) = (msg, true);
        Ok(sent)
    }

    /// Sends `msg` to every member of `group`, sealed with the group's key; a new key is made
    /// first (and sealed to the members' devices) when there is none here or the membership
    /// changed since. On a [`plain`](ChatOptions::plain) connection, as
    /// [`send_plain_group`](Self::send_plain_group).
    ///
    /// # Errors
    /// As [`send_to`](Self::send_to) (for any member); `not_member` when this user is not in
    /// the group.
    pub async fn send_group(
        &self,
        group: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        let msg = msg.into();
        let Some(e2e) = self.e2e.as_deref() else {
            return self.send_plain_group(group, msg).await;
        };
        if e2e.with(|keys| keys.needs_group_key(group)) {
            let _one_at_a_time = e2e.rotating.lock().await;
            if e2e.with(|keys| keys.needs_group_key(group)) {
                self.new_group_key(e2e, group).await?;
            }
        }
        let sealed = e2e.with(|keys| keys.seal_group(group, &msg)).map_err(sealing_error)?;
        let mut sent = self.send(Conversation::Group(group.into()), sealed).await?;
        (sent.msg, sent.sealed) = (msg, true);
        Ok(sent)
    }

    /// Makes `group`'s next key now and sends it sealed to its members' devices; gives its
    /// epoch. [`send_group`](Self::send_group) does this by itself when needed.
    ///
    /// # Errors
    /// As [`send_group`](Self::send_group).
    pub async fn rotate_group_key(&self, group: &str) -> Result<u32, ChatError> {
        let e2e = self.e2e()?;
        let _one_at_a_time = e2e.rotating.lock().await;
        self.new_group_key(e2e, group).await
    }

    async fn new_group_key(&self, e2e: &E2e, group: &str) -> Result<u32, ChatError> {
        let members = self.members(group).await?;
        let joined = members.iter().filter(|m| m.role.as_deref() != Some("invited"));
        let lookups = joined.map(|member| async move {
            let devices = self.devices(e2e, &member.user).await?;
            Ok::<_, ChatError>((member.user.clone(), devices.to_vec()))
        });
        let devices = futures_util::future::try_join_all(lookups).await?;
        let (message, epoch) =
            e2e.with(|keys| keys.new_group_key(group, &devices)).map_err(sealing_error)?;
        self.send(Conversation::Group(group.into()), message).await?;
        Ok(epoch)
    }

    /// `user`'s device keys: those fetched lately, else from the directory.
    async fn devices(&self, e2e: &E2e, user: &str) -> Result<Arc<Vec<PublicIdentity>>, ChatError> {
        match e2e.known_devices(user) {
            Some(keys) => Ok(keys),
            None => Ok(e2e.remember_devices(user, self.keys(user).await?)),
        }
    }

    /// Sends `msg` to `user` unsealed: the server and its store see it.
    ///
    /// # Errors
    /// The server's refusal (`rate_limited`, `too_large`, …), or [`ChatError::Closed`].
    pub async fn send_plain_to(
        &self,
        user: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        self.send(Conversation::User(user.into()), msg.into()).await
    }

    /// Sends `msg` to `group` unsealed: the server and its store see it.
    ///
    /// # Errors
    /// As [`send_plain_to`](Self::send_plain_to); `not_member`.
    pub async fn send_plain_group(
        &self,
        group: &str,
        msg: impl Into<Value>,
    ) -> Result<ChatMessage, ChatError> {
        self.send(Conversation::Group(group.into()), msg.into()).await
    }

    /// Publishes this device's key as the connection opens, and waits for the reply unless the
    /// events queue fills first: a device that was away may have more waiting in its inbox
    /// than the queue holds, which the application can take only once `connect` returned, and
    /// the reply comes behind them. Then the reply is waited for beside, and a refusal logged.
    pub(super) async fn publish_identity_at_connect(&self, full: &Notify) -> Result<(), ChatError> {
        let public = self.e2e()?.public().to_text();
        let request = json!({ "type": "keys", "publish": public });
        let (reply, mut answer) = oneshot::channel();
        self.requests.send((request, Some(reply))).await.map_err(|_| ChatError::Closed)?;
        tokio::select! {
            answer = &mut answer => answer.map_err(|_| ChatError::Closed)?.map(drop),
            () = full.notified() => {
                tokio::spawn(async move {
                    if let Ok(Err(err)) = answer.await {
                        tracing::warn!(%err, "chat: this device's key was not published");
                    }
                });
                Ok(())
            }
        }
    }

    /// What `message` (fetched some other way: a plain connection's history, say) is on this
    /// device, as the events would have given it: opened, a group key learned, a key change,
    /// or marked unreadable.
    pub fn open(&self, message: ChatMessage) -> ChatEvent {
        match self.e2e.as_deref() {
            Some(e2e) => e2e.process(ChatEvent::Message(message)),
            None => ChatEvent::Message(message),
        }
    }

    /// This device's fingerprint, for people to compare (60 digits); `None` on a plain
    /// connection.
    pub fn fingerprint(&self) -> Option<String> {
        self.e2e.as_deref().map(|e2e| e2e.public().fingerprint())
    }

    /// `user`'s devices from the directory, checked against the keys seen before: the devices,
    /// and the changes (not used for sealing until [`trust`](Self::trust)).
    ///
    /// # Errors
    /// As [`keys`](Self::keys); [`ChatError::Keys`] on a plain connection.
    pub async fn check_keys(
        &self,
        user: &str,
    ) -> Result<(Vec<PublicIdentity>, Vec<KeyChange>), ChatError> {
        let e2e = self.e2e()?;
        let keys = self.keys(user).await?;
        let changes = e2e.with(|known| known.check(user, &keys));
        e2e.remember_devices(user, keys.clone());
        Ok((keys, changes))
    }

    /// Accepts the changes of `user`'s keys seen so far (after comparing fingerprints with
    /// them); gives how many.
    pub fn trust(&self, user: &str) -> usize {
        self.e2e.as_deref().map_or(0, |e2e| e2e.with(|keys| keys.trust(user)))
    }

    /// Removes one of this user's devices from the directory (lost or retired): nothing is
    /// sealed to it afterwards, and the members of this user's groups are told, so each
    /// group gets a new key before the next sealed message.
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

    /// Marks `group`'s key for renewal here (after this user removed a member or left).
    pub(super) fn group_changed(&self, group: &str) {
        if let Some(e2e) = self.e2e.as_deref() {
            e2e.with(|keys| keys.group_changed(group));
        }
    }
}
