//! End-to-end keys for pub/sub without a shared secret: device identities in a directory the
//! server keeps, and key policies whose key only their members can open.
//!
//! - **The directory** is retained messages under `@keys/<principal>/<device>`, each a signed
//!   [`PublicIdentity`] ([`Client::publish_identity`], [`Client::identities`]). The server lets a
//!   principal write its own entries only (on a server without keys, anyone's) and everyone read
//!   them; durable when the server has a store.
//! - **A key policy** (`owner`, `name`) covers a topic filter. Its owner makes a group key per
//!   epoch and seals it to every device of every member (and its own) with
//!   [`seal_for`](whispeer_engines::seal_for): the box is signed by the owner and binds the
//!   policy, its filter, its members and the epoch, and is published retained at
//!   `@keys/<owner>/policy/<name>`. Members follow that topic ([`KeyPolicy::follow`]) and keep
//!   the key of every epoch they could open. Changing the members ([`KeyPolicy::set_members`])
//!   makes a new epoch sealed only to the new members: a removed member cannot open what is
//!   sent afterwards, and keeps what it had.
//! - **Messages** under the policy ([`KeyPolicy::publish`]) are sealed once with the latest
//!   epoch's key and signed by the sending device ([`seal_group`](whispeer_engines::seal_group));
//!   the associated data binds the policy and the topic, so a message re-addressed to another
//!   topic does not open. The server, its store, plugins and the cluster's engine see ciphertext.
//!
//! A policy trusts its owner's devices as the directory first lists them, per device, as chat
//! contacts are (compare fingerprints, [`PublicIdentity::fingerprint`], out of band to rule out
//! a directory that lies). A device of the owner whose key changes afterwards is reported
//! ([`KeyPolicy::changes`], [`PolicyError::OwnerKeyChanged`]) and nothing it signs is opened
//! until [`KeyPolicy::trust_owner`]; kept in a file ([`KeyPolicy::follow_kept`]), the trusted
//! keys also catch a directory entry swapped while the device was away. The format and the
//! checks are [`PolicyKeys`]', shared with the WASM client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use whispeer_engines::{
    BundleRead, Codec, Identity, KeyChange, PolicyKeys, PublicIdentity, directory_filter,
    directory_topic, policy_topic,
};
use whispeer_proto::{Filter, Qos};

use crate::{Client, ClientError, ClientSubscription, Delivery, PublishOptions};

pub use whispeer_engines::{DIRECTORY, PolicyError};
/// The header naming the policy (`<owner>/<name>`) a message is sealed under.
pub const POLICY_HEADER: &str = "e2e-policy";
/// How long a read of retained messages waits for more once the server has answered.
const SETTLE: Duration = Duration::from_millis(100);

impl From<ClientError> for PolicyError {
    fn from(err: ClientError) -> Self {
        Self::Connection(Box::new(err))
    }
}

impl Client {
    /// Publishes this device's public identity to the directory, retained at
    /// `@keys/<principal>/<device>` (the server accepts only the principal's own).
    ///
    /// # Errors
    /// The server's refusal (another principal's entry), or the connection.
    pub async fn publish_identity(
        &self,
        principal: &str,
        device: &str,
        identity: &Identity,
    ) -> Result<(), ClientError> {
        let topic = directory_topic(principal, device);
        let text = identity.public(device).to_text();
        let options = PublishOptions::new().qos(Qos::AtLeastOnce).retain();
        self.publish_bytes_with(&topic, Bytes::from(text), &options).await.map(drop)
    }

    /// Removes `principal`'s `device` from the directory (clears its retained entry): key
    /// policies made or changed afterwards do not seal to it. It does not rotate existing
    /// policies by itself: their owners change them (`KeyPolicy::set_members`) to leave the
    /// device out of the next epoch.
    ///
    /// # Errors
    /// The server's refusal (another principal's entry), or the connection.
    pub async fn revoke_identity(&self, principal: &str, device: &str) -> Result<(), ClientError> {
        let topic = directory_topic(principal, device);
        let options = PublishOptions::new().qos(Qos::AtLeastOnce).retain();
        self.publish_bytes_with(&topic, Bytes::new(), &options).await.map(drop)
    }

    /// The devices of `principal` in the directory, each one's signature checked.
    ///
    /// # Errors
    /// The connection, or the server's refusal.
    pub async fn identities(&self, principal: &str) -> Result<Vec<PublicIdentity>, ClientError> {
        let texts = self.retained(&directory_filter(principal)).await?;
        let mut found = Vec::new();
        for delivery in texts {
            let text = String::from_utf8_lossy(delivery.payload());
            match PublicIdentity::from_text(&text).and_then(|p| p.verify().map(|()| p)) {
                Ok(public) => found.push(public),
                Err(err) => {
                    tracing::warn!(%err, topic = %delivery.topic(), "directory entry skipped")
                }
            }
        }
        Ok(found)
    }

    /// The retained messages `filter` matches now.
    async fn retained(&self, filter: &str) -> Result<Vec<Delivery>, ClientError> {
        let mut sub = self.messages(filter).await?;
        // Retained messages follow the subscription's acceptance; a flush's answer follows them.
        self.flush().await?;
        Ok(drain(&mut sub, SETTLE).await)
    }
}

async fn drain(sub: &mut ClientSubscription<Delivery>, quiet: Duration) -> Vec<Delivery> {
    let mut got = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(quiet, sub.recv()).await {
        got.push(delivery);
    }
    got
}

/// Writes `text` to `path`, readable by its owner only: a new file, then renamed over it.
fn write_kept(path: &Path, text: &str) -> std::io::Result<()> {
    let next = path.with_extension("keys-new");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&next)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&next, path)
}

/// Reads the file `path`, empty if it does not exist.
fn read_kept(path: &Path) -> Result<zeroize::Zeroizing<String>, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(zeroize::Zeroizing::new(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(err) => Err(PolicyError::Malformed(format!("{}: {err}", path.display()))),
    }
}

/// What a device knows of a policy, and where it keeps it.
#[derive(Debug)]
struct State {
    keys: PolicyKeys,
    saved_in: Option<PathBuf>,
}

impl State {
    /// Keeps keys and trusted devices in their file, when they have one and changed (a
    /// failure is logged: they stay in memory).
    fn save(&mut self) {
        if !self.keys.take_changed() {
            return;
        }
        if let Some(path) = &self.saved_in
            && let Err(err) = write_kept(path, &self.keys.to_kept())
        {
            tracing::warn!(%err, path = %path.display(), "policy keys not saved");
        }
    }

    fn report(&self, changes: &[KeyChange]) {
        for change in changes {
            tracing::warn!(
                policy = %self.keys.label(), device = %change.device, was = %change.was,
                now = %change.now, "the policy owner's device key changed: not trusted"
            );
        }
    }
}

/// A key policy, as one device uses it: its owner's to change, every member's to publish and
/// read under.
#[derive(Clone)]
pub struct KeyPolicy {
    client: Client,
    identity: Arc<Identity>,
    owner: String,
    name: String,
    state: Arc<Mutex<State>>,
    _follow: Arc<Following>,
}

/// The task reading the policy's bundles: it ends with the last handle.
#[derive(Debug)]
struct Following(tokio::task::JoinHandle<()>);

/// An owner's watch on its members' devices ([`KeyPolicy::renew_on_device_changes`]): it stops
/// when dropped.
#[derive(Debug)]
pub struct Renewal {
    _watch: Following,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for KeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPolicy")
            .field("owner", &self.owner)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads one bundle; one signed by a key the owner's trusted devices lack sends the device to
/// the directory again (the owner may have a new device, or a changed key, which is reported).
async fn read_bundle(client: &Client, identity: &Identity, state: &Mutex<State>, payload: &[u8]) {
    let read = lock(state).keys.read_bundle(identity, payload);
    match read {
        Ok(BundleRead::UnknownSigner(epoch)) => {
            let owner = lock(state).keys.owner().to_string();
            match client.identities(&owner).await {
                Ok(devices) => {
                    let mut state = lock(state);
                    let changes = state.keys.check_owner(identity, &devices);
                    state.report(&changes);
                    if state.keys.epoch() < epoch && changes.is_empty() {
                        tracing::warn!(epoch, policy = %state.keys.label(),
                            "policy bundle signed by no device of its owner: not opened");
                    }
                }
                Err(err) => tracing::warn!(%err, "directory not read: policy bundle not opened"),
            }
        }
        Ok(BundleRead::NotForMe(epoch)) => {
            tracing::debug!(epoch, "policy bundle not sealed to this device");
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "policy bundle not read"),
    }
    lock(state).save();
}

impl KeyPolicy {
    /// Follows the policy `name` of `owner` with this device's `identity`: every bundle the
    /// owner publishes (the current one first) is opened, and its epoch's key kept. Returns
    /// once the current bundle, if any, was read. The owner's devices are trusted as the
    /// directory lists them now; see [`KeyPolicy::follow_kept`] to keep them.
    ///
    /// # Errors
    /// The connection, the server's refusal, or the owner's devices missing from the directory.
    pub async fn follow(
        client: &Client,
        identity: Arc<Identity>,
        owner: &str,
        name: &str,
    ) -> Result<Self, PolicyError> {
        Self::start(client, identity, owner, name, None).await
    }

    /// [`KeyPolicy::follow`], keeping the epochs' keys this device opens and the owner's device
    /// keys it trusts in `path` (readable by its owner only; keep it like the identity file),
    /// read first: messages of epochs opened once still open after a restart, and an owner's
    /// device whose key in the directory is not the one kept is reported
    /// ([`KeyPolicy::changes`]) rather than trusted.
    ///
    /// # Errors
    /// As [`KeyPolicy::follow`], or the file cannot be read.
    pub async fn follow_kept(
        client: &Client,
        identity: Arc<Identity>,
        owner: &str,
        name: &str,
        path: impl Into<PathBuf>,
    ) -> Result<Self, PolicyError> {
        Self::start(client, identity, owner, name, Some(path.into())).await
    }

    async fn start(
        client: &Client,
        identity: Arc<Identity>,
        owner: &str,
        name: &str,
        kept: Option<PathBuf>,
    ) -> Result<Self, PolicyError> {
        let mut keys = PolicyKeys::new(owner, name);
        if let Some(path) = &kept {
            keys.read_kept(&read_kept(path)?)?;
        }
        let directory = client.identities(owner).await?;
        let changes = keys.check_owner(&identity, &directory);
        if !keys.knows_owner() {
            return Err(PolicyError::NoDevices(owner.to_string()));
        }
        let state = State { keys, saved_in: kept };
        state.report(&changes);
        let state = Arc::new(Mutex::new(state));
        let mut bundles = client.messages(policy_topic(owner, name).as_str()).await?;
        client.flush().await?;
        for delivery in drain(&mut bundles, SETTLE).await {
            read_bundle(client, &identity, &state, delivery.payload()).await;
        }
        lock(&state).save();
        let (client_later, state_later, identity_later) =
            (client.clone(), Arc::clone(&state), Arc::clone(&identity));
        let follow = tokio::spawn(async move {
            while let Some(delivery) = bundles.recv().await {
                read_bundle(&client_later, &identity_later, &state_later, delivery.payload()).await;
            }
        });
        Ok(Self {
            client: client.clone(),
            identity,
            owner: owner.to_string(),
            name: name.to_string(),
            state,
            _follow: Arc::new(Following(follow)),
        })
    }

    /// Makes (or replaces) the policy `name` of `owner` — this device's principal — for
    /// `filter`, with `members` (principals; the owner always belongs): a new epoch's key,
    /// sealed to all their devices in the directory and this one's, published. Then follows it.
    ///
    /// # Errors
    /// A member without devices, the server's refusal, or the connection.
    pub async fn create(
        client: &Client,
        identity: Arc<Identity>,
        owner: &str,
        name: &str,
        filter: &str,
        members: &[&str],
    ) -> Result<Self, PolicyError> {
        let filter = Filter::parse(filter).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let policy = Self::follow(client, identity, owner, name).await?;
        let members: Vec<String> = members.iter().map(|m| (*m).to_string()).collect();
        policy.publish_epoch(&filter, members).await?;
        Ok(policy)
    }

    /// Owner: renews the policy's key whenever a member's devices change in the directory — a
    /// device revoked ([`Client::revoke_identity`]), added, or given another key — so a revoked
    /// device opens nothing sealed afterwards and a new one opens what follows; for as long as
    /// the returned [`Renewal`] lives (and this process runs: a policy changed while no owner
    /// device watches is renewed at its next change).
    ///
    /// # Errors
    /// The connection, or the server's refusal.
    pub async fn renew_on_device_changes(&self) -> Result<Renewal, PolicyError> {
        let mut directory = self.client.messages(format!("{DIRECTORY}/+/+").as_str()).await?;
        self.client.flush().await?;
        let mut seen: HashMap<String, Bytes> = HashMap::new();
        for entry in drain(&mut directory, SETTLE).await {
            seen.insert(entry.topic().to_string(), entry.payload().clone());
        }
        let policy = self.clone();
        let task = tokio::spawn(async move {
            while let Some(entry) = directory.recv().await {
                let topic = entry.topic().to_string();
                let changed = match seen.get(&topic) {
                    Some(before) => before != entry.payload(),
                    None => !entry.payload().is_empty(),
                };
                seen.insert(topic.clone(), entry.payload().clone());
                let principal = topic.split('/').nth(1).unwrap_or_default();
                let Some((_, members, _)) = policy.state() else { continue };
                if !changed || !members.iter().any(|m| m == principal) {
                    continue;
                }
                let members: Vec<&str> = members.iter().map(String::as_str).collect();
                match policy.set_members(&members).await {
                    Ok(()) => {
                        tracing::info!(%topic, "policy key renewed: a member's devices changed")
                    }
                    Err(err) => tracing::warn!(%err, %topic, "policy key not renewed"),
                }
            }
        });
        Ok(Renewal { _watch: Following(task) })
    }

    /// Owner: the members become `members` (the owner always belongs): a new epoch sealed to
    /// their devices only, so a removed member cannot open what is sent afterwards.
    ///
    /// # Errors
    /// As [`KeyPolicy::create`]; [`PolicyError::NotMember`] before the policy was read.
    pub async fn set_members(&self, members: &[&str]) -> Result<(), PolicyError> {
        let filter = self.lock().keys.filter().cloned().ok_or_else(|| self.not_member())?;
        let members: Vec<String> = members.iter().map(|m| (*m).to_string()).collect();
        self.publish_epoch(&filter, members).await
    }

    async fn publish_epoch(
        &self,
        filter: &Filter,
        mut members: Vec<String>,
    ) -> Result<(), PolicyError> {
        members.push(self.owner.clone());
        members.sort();
        members.dedup();
        // Every member's devices, read at once (each read waits for the directory to settle).
        let reads = members.iter().map(|member| self.client.identities(member));
        let found = futures_util::future::try_join_all(reads).await?;
        let mut devices = Vec::new();
        for (member, found) in members.iter().zip(found) {
            if found.is_empty() {
                return Err(PolicyError::NoDevices(member.clone()));
            }
            devices.extend(found);
        }
        let bundle = {
            let mut state = self.lock();
            let bundle = state.keys.make_bundle(&self.identity, filter, members, &devices)?;
            state.save();
            bundle
        };
        let options = PublishOptions::new().qos(Qos::AtLeastOnce).retain();
        let topic = policy_topic(&self.owner, &self.name);
        self.client.publish_bytes_with(&topic, Bytes::from(bundle), &options).await?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn not_member(&self) -> PolicyError {
        PolicyError::NotMember(format!("{}/{}", self.owner, self.name))
    }

    /// Keeps the epochs' keys this device opens, and the owner's device keys it trusts, in
    /// `path` (readable by its owner only), and takes those kept there before: messages of
    /// epochs this device opened once still open after a restart. (To check the owner's keys
    /// against the file before trusting the directory, follow with
    /// [`KeyPolicy::follow_kept`].)
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn save_keys_in(&self, path: impl Into<PathBuf>) -> Result<(), PolicyError> {
        let path = path.into();
        let kept = read_kept(&path)?;
        let mut state = self.lock();
        let changes = state.keys.read_kept(&kept)?;
        state.report(&changes);
        write_kept(&path, &state.keys.to_kept())
            .map_err(|e| PolicyError::Malformed(format!("{}: {e}", path.display())))?;
        state.saved_in = Some(path);
        Ok(())
    }

    /// The owner's device key changes seen and not trusted yet.
    pub fn changes(&self) -> Vec<KeyChange> {
        self.lock().keys.changes()
    }

    /// Trusts the owner's changed device keys (after comparing fingerprints), and opens the
    /// bundle that waited for them. Returns how many changes were accepted.
    pub fn trust_owner(&self) -> usize {
        let mut state = self.lock();
        let accepted = state.keys.trust_owner(&self.identity);
        state.save();
        accepted
    }

    /// The policy's filter and members, and its newest epoch, as this device read them.
    pub fn state(&self) -> Option<(String, Vec<String>, u32)> {
        self.lock().keys.state()
    }

    /// Publishes `value` on `topic` (inside the policy's filter) sealed with the newest epoch's
    /// key this device holds, at QoS 1.
    ///
    /// # Errors
    /// [`PolicyError::Outside`], [`PolicyError::NotMember`], [`PolicyError::OwnerKeyChanged`],
    /// encoding, or the connection.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), PolicyError> {
        let plain =
            Codec::Postcard.encode(value).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        self.publish_bytes(topic, &plain).await
    }

    /// Publishes `plain` bytes on `topic` sealed under the policy; see [`KeyPolicy::publish`].
    /// While the newest epoch's key may still come (its signer looked up in the directory), it
    /// waits up to 2 s for it.
    ///
    /// # Errors
    /// As [`KeyPolicy::publish`].
    pub async fn publish_bytes(&self, topic: &str, plain: &[u8]) -> Result<(), PolicyError> {
        self.settle(None).await;
        let sealed = self.lock().keys.seal(&self.identity, topic, plain)?;
        let options = PublishOptions::new()
            .qos(Qos::AtLeastOnce)
            .header(POLICY_HEADER, format!("{}/{}", self.owner, self.name));
        self.client.publish_bytes_with(topic, Bytes::from(sealed), &options).await?;
        Ok(())
    }

    /// Opens a message sealed under this policy: its plaintext, and the Ed25519 key of the
    /// device that sealed it. A message of an epoch whose key this device may still get waits
    /// (up to 2 s) for it: the bundle may be on its way, or its signer looked up.
    ///
    /// # Errors
    /// [`PolicyError::NoKey`] for an epoch this device has no key of
    /// ([`PolicyError::OwnerKeyChanged`] when a change waits to be trusted), or the seal's
    /// failure (a message altered, or re-addressed to another topic).
    pub async fn open(&self, delivery: &Delivery) -> Result<(Vec<u8>, [u8; 32]), PolicyError> {
        let sealed = delivery.payload();
        self.settle(Some(PolicyKeys::epoch_of(sealed)?)).await;
        self.lock().keys.open(delivery.topic().as_str(), sealed)
    }

    /// Waits (up to 2 s) while the key of `epoch` (the newest seen when `None`) may still come:
    /// its bundle on its way, or a bundle whose signer is being looked up in the directory.
    async fn settle(&self, epoch: Option<u32>) {
        for _ in 0..100 {
            if !self.lock().keys.awaits_key(epoch) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens and decodes a message published with [`KeyPolicy::publish`].
    ///
    /// # Errors
    /// As [`KeyPolicy::open`], or a value that does not decode as `T`.
    pub async fn open_value<T: DeserializeOwned>(
        &self,
        delivery: &Delivery,
    ) -> Result<T, PolicyError> {
        let (plain, _) = self.open(delivery).await?;
        Codec::Postcard.decode(&plain).map_err(|e| PolicyError::Malformed(e.to_string()))
    }
}
