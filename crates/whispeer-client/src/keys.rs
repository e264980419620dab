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
//! A policy is trusted on first sight of its owner's device keys in the directory, as chat
//! contacts are: compare fingerprints ([`PublicIdentity::fingerprint`]) out of band to rule out a
//! directory that lies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use whispeer_engines::{
    Codec, GroupKey, Identity, IdentityError, PublicIdentity, group_sealed_by, open_group,
    open_sealed, seal_for, seal_group, sealed_sender,
};
use whispeer_proto::{Filter, Qos, Topic};

use crate::{Client, ClientError, ClientSubscription, Delivery, PublishOptions};

/// The first segment of the directory's topics.
pub const DIRECTORY: &str = "@keys";
/// The header naming the policy (`<owner>/<name>`) a message is sealed under.
pub const POLICY_HEADER: &str = "e2e-policy";
/// How long a read of retained messages waits for more once the server has answered.
const SETTLE: Duration = Duration::from_millis(100);

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The connection or the server.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Sealing or opening.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A principal with no device in the directory.
    #[error("{0} has no device keys in the directory")]
    NoDevices(String),
    /// This device holds no key of the policy (not a member, or not yet).
    #[error("no key of policy {0} opens for this device: not a member (yet)")]
    NotMember(String),
    /// A message sealed with an epoch whose key this device does not have.
    #[error(
        "no key for epoch {0} of this policy (sealed before this device was a member, or after it was removed)"
    )]
    NoKey(u32),
    /// A topic the policy does not cover.
    #[error("{topic} is outside the policy's filter {filter}")]
    Outside {
        /// The topic.
        topic: String,
        /// The policy's filter.
        filter: String,
    },
    /// A directory entry, bundle or message that does not read.
    #[error("malformed: {0}")]
    Malformed(String),
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
        let topic = format!("{DIRECTORY}/{principal}/{device}");
        let text = identity.public(device).to_text();
        let options = PublishOptions::new().qos(Qos::AtLeastOnce).retain();
        self.publish_bytes_with(&topic, Bytes::from(text), &options).await.map(drop)
    }

    /// The devices of `principal` in the directory, each one's signature checked.
    ///
    /// # Errors
    /// The connection, or the server's refusal.
    pub async fn identities(&self, principal: &str) -> Result<Vec<PublicIdentity>, ClientError> {
        let texts = self.retained(&format!("{DIRECTORY}/{principal}/+")).await?;
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

/// The topic of a policy's bundle.
fn bundle_topic(owner: &str, name: &str) -> String {
    format!("{DIRECTORY}/{owner}/policy/{name}")
}

/// What a bundle's box is bound to.
fn bundle_context(
    owner: &str,
    name: &str,
    filter: &str,
    members: &[String],
    epoch: u32,
) -> Vec<u8> {
    let mut context = b"whispeer key policy v1\0".to_vec();
    for part in [owner, name, filter] {
        context.extend_from_slice(part.as_bytes());
        context.push(0);
    }
    for member in members {
        context.extend_from_slice(member.as_bytes());
        context.push(0);
    }
    context.extend_from_slice(&epoch.to_be_bytes());
    context
}

/// What a message's seal is bound to: the policy and the topic.
fn message_context(owner: &str, name: &str, topic: &str) -> Vec<u8> {
    let mut context = b"whispeer policy message v1\0".to_vec();
    for part in [owner, name, topic] {
        context.extend_from_slice(part.as_bytes());
        context.push(0);
    }
    context
}

/// One policy as a device knows it.
#[derive(Debug, Default)]
struct Known {
    filter: Option<Filter>,
    members: Vec<String>,
    /// The epochs' keys this device opened.
    keys: HashMap<u32, GroupKey>,
    /// The newest epoch seen (opened or not).
    epoch: u32,
    /// Where the keys are kept across restarts, if anywhere.
    saved_in: Option<PathBuf>,
}

/// Reads the keys kept in `path` (one epoch's key a line, base64), if the file exists.
fn read_keys(path: &Path) -> Result<Vec<GroupKey>, PolicyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(PolicyError::Malformed(format!("{}: {err}", path.display()))),
    };
    let bad = |why: String| PolicyError::Malformed(format!("{}: {why}", path.display()));
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let bytes = zeroize::Zeroizing::new(
                BASE64.decode(line.trim()).map_err(|e| bad(e.to_string()))?,
            );
            GroupKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// Writes `keys` to `path`, readable by its owner only: a new file, then renamed over it.
fn write_keys<'a>(path: &Path, keys: impl Iterator<Item = &'a GroupKey>) -> std::io::Result<()> {
    let mut text = zeroize::Zeroizing::new(String::new());
    for key in keys {
        text.push_str(&BASE64.encode(key.to_bytes().as_slice()));
        text.push('\n');
    }
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

impl Known {
    /// Keeps the keys in their file, when they have one (a failure is logged: the keys stay
    /// in memory).
    fn save(&self) {
        if let Some(path) = &self.saved_in
            && let Err(err) = write_keys(path, self.keys.values())
        {
            tracing::warn!(%err, path = %path.display(), "policy keys not saved");
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
    known: Arc<Mutex<Known>>,
    _follow: Arc<Following>,
}

/// The task reading the policy's bundles: it ends with the last handle.
#[derive(Debug)]
struct Following(tokio::task::JoinHandle<()>);

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

impl KeyPolicy {
    /// Follows the policy `name` of `owner` with this device's `identity`: every bundle the
    /// owner publishes (the current one first) is opened, and its epoch's key kept. Returns
    /// once the current bundle, if any, was read.
    ///
    /// # Errors
    /// The connection, the server's refusal, or the owner's devices missing from the directory.
    pub async fn follow(
        client: &Client,
        identity: Arc<Identity>,
        owner: &str,
        name: &str,
    ) -> Result<Self, PolicyError> {
        let owner_keys: Vec<[u8; 32]> =
            client.identities(owner).await?.iter().map(|p| p.ed25519).collect();
        if owner_keys.is_empty() {
            return Err(PolicyError::NoDevices(owner.to_string()));
        }
        let mut bundles = client.messages(bundle_topic(owner, name).as_str()).await?;
        client.flush().await?;
        let known = Arc::new(Mutex::new(Known::default()));
        let read = |delivery: &Delivery| {
            let opened = open_bundle(&identity, owner, name, &owner_keys, delivery.payload());
            learn(&known, opened);
        };
        for delivery in drain(&mut bundles, SETTLE).await {
            read(&delivery);
        }
        let (known_later, identity_later) = (Arc::clone(&known), Arc::clone(&identity));
        let (owner_later, name_later) = (owner.to_string(), name.to_string());
        let follow = tokio::spawn(async move {
            while let Some(delivery) = bundles.recv().await {
                let opened = open_bundle(
                    &identity_later,
                    &owner_later,
                    &name_later,
                    &owner_keys,
                    delivery.payload(),
                );
                learn(&known_later, opened);
            }
        });
        Ok(Self {
            client: client.clone(),
            identity,
            owner: owner.to_string(),
            name: name.to_string(),
            known,
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

    /// Owner: the members become `members` (the owner always belongs): a new epoch sealed to
    /// their devices only, so a removed member cannot open what is sent afterwards.
    ///
    /// # Errors
    /// As [`KeyPolicy::create`]; [`PolicyError::NotMember`] before the policy was read.
    pub async fn set_members(&self, members: &[&str]) -> Result<(), PolicyError> {
        let filter = self.lock().filter.clone().ok_or_else(|| self.not_member())?;
        let members: Vec<String> = members.iter().map(|m| (*m).to_string()).collect();
        self.publish_epoch(&filter, members).await
    }

    async fn publish_epoch(
        &self,
        filter: &Filter,
        mut members: Vec<String>,
    ) -> Result<(), PolicyError> {
        if !members.contains(&self.owner) {
            members.push(self.owner.clone());
        }
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
        let epoch = self.lock().epoch + 1;
        let key = GroupKey::generate(epoch)?;
        let context = bundle_context(&self.owner, &self.name, filter.as_str(), &members, epoch);
        let sealed = seal_for(&self.identity, &devices, &context, &key.to_bytes())?;
        let bundle = json!({
            "filter": filter.as_str(), "members": members, "epoch": epoch,
            "sealed": BASE64.encode(sealed),
        });
        let options = PublishOptions::new().qos(Qos::AtLeastOnce).retain();
        let topic = bundle_topic(&self.owner, &self.name);
        self.client.publish_bytes_with(&topic, Bytes::from(bundle.to_string()), &options).await?;
        // This device is among the recipients: keep the key now rather than when it echoes.
        learn(&self.known, Ok(OpenedBundle { filter: filter.clone(), members, key }));
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn not_member(&self) -> PolicyError {
        PolicyError::NotMember(format!("{}/{}", self.owner, self.name))
    }

    /// Keeps the epochs' keys this device opens in `path` (readable by its owner only; keep it
    /// like the identity file), and takes those kept there before: messages of epochs this
    /// device opened once still open after a restart.
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn save_keys_in(&self, path: impl Into<PathBuf>) -> Result<(), PolicyError> {
        let path = path.into();
        let kept = read_keys(&path)?;
        let mut known = self.lock();
        for key in kept {
            known.keys.entry(key.epoch).or_insert(key);
        }
        write_keys(&path, known.keys.values())
            .map_err(|e| PolicyError::Malformed(format!("{}: {e}", path.display())))?;
        known.saved_in = Some(path);
        Ok(())
    }

    /// The policy's filter and members, and its newest epoch, as this device read them.
    pub fn state(&self) -> Option<(String, Vec<String>, u32)> {
        let known = self.lock();
        known.filter.as_ref().map(|f| (f.to_string(), known.members.clone(), known.epoch))
    }

    /// Publishes `value` on `topic` (inside the policy's filter) sealed with the newest epoch's
    /// key this device holds, at QoS 1.
    ///
    /// # Errors
    /// [`PolicyError::Outside`], [`PolicyError::NotMember`], encoding, or the connection.
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
    ///
    /// # Errors
    /// As [`KeyPolicy::publish`].
    pub async fn publish_bytes(&self, topic: &str, plain: &[u8]) -> Result<(), PolicyError> {
        let parsed = Topic::parse(topic).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let key = {
            let known = self.lock();
            let filter = known.filter.as_ref().ok_or_else(|| self.not_member())?;
            if !filter.matches(&parsed) {
                let filter = filter.to_string();
                return Err(PolicyError::Outside { topic: topic.to_string(), filter });
            }
            // The newest epoch's key: a device that could not open it was removed.
            known.keys.get(&known.epoch).cloned().ok_or_else(|| self.not_member())?
        };
        let context = message_context(&self.owner, &self.name, topic);
        let sealed = seal_group(&self.identity, &key, &context, plain)?;
        let options = PublishOptions::new()
            .qos(Qos::AtLeastOnce)
            .header(POLICY_HEADER, format!("{}/{}", self.owner, self.name));
        self.client.publish_bytes_with(topic, Bytes::from(sealed), &options).await?;
        Ok(())
    }

    /// Opens a message sealed under this policy: its plaintext, and the Ed25519 key of the
    /// device that sealed it. A message of an epoch newer than any this device has read waits
    /// (up to 2 s) for that epoch's bundle, which may still be on its way.
    ///
    /// # Errors
    /// [`PolicyError::NoKey`] for an epoch this device has no key of, or the seal's failure (a
    /// message altered, or re-addressed to another topic).
    pub async fn open(&self, delivery: &Delivery) -> Result<(Vec<u8>, [u8; 32]), PolicyError> {
        let sealed = delivery.payload();
        let (epoch, signer) = group_sealed_by(sealed)?;
        for _ in 0..100 {
            if self.lock().epoch >= epoch {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let key = self.lock().keys.get(&epoch).cloned().ok_or(PolicyError::NoKey(epoch))?;
        let context = message_context(&self.owner, &self.name, delivery.topic().as_str());
        let plain = open_group(&key, sealed, &context, None)?;
        Ok((plain, signer))
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

/// A bundle this device opened.
struct OpenedBundle {
    filter: Filter,
    members: Vec<String>,
    key: GroupKey,
}

/// Reads a bundle of policy (`owner`, `name`) and opens its key with `me`; it must be signed
/// by one of the owner's devices. `Err(epoch)`-like outcomes are reported as errors.
fn open_bundle(
    me: &Identity,
    owner: &str,
    name: &str,
    owner_keys: &[[u8; 32]],
    payload: &[u8],
) -> Result<OpenedBundle, (u32, PolicyError)> {
    let malformed = |why: &str| (0, PolicyError::Malformed(format!("policy bundle: {why}")));
    let bundle: Value = serde_json::from_slice(payload).map_err(|_| malformed("not JSON"))?;
    let filter = bundle["filter"].as_str().ok_or_else(|| malformed("no filter"))?;
    let filter = Filter::parse(filter).map_err(|_| malformed("bad filter"))?;
    let epoch = bundle["epoch"].as_u64().and_then(|e| u32::try_from(e).ok());
    let epoch = epoch.ok_or_else(|| malformed("no epoch"))?;
    let members: Vec<String> = bundle["members"]
        .as_array()
        .ok_or_else(|| malformed("no members"))?
        .iter()
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect();
    let sealed = bundle["sealed"].as_str().ok_or_else(|| malformed("no key"))?;
    let sealed = BASE64.decode(sealed).map_err(|_| malformed("bad key"))?;
    let signer = sealed_sender(&sealed).map_err(|e| (epoch, e.into()))?;
    if !owner_keys.contains(&signer) {
        let why = format!("policy bundle of {owner}/{name} not signed by a device of {owner}");
        return Err((epoch, PolicyError::Malformed(why)));
    }
    let context = bundle_context(owner, name, filter.as_str(), &members, epoch);
    let bytes = open_sealed(me, &sealed, &context, Some(&signer)).map_err(|e| (epoch, e.into()))?;
    let key = GroupKey::from_bytes(&bytes).map_err(|e| (epoch, e.into()))?;
    if key.epoch != epoch {
        return Err(malformed("the key's epoch is not the bundle's"));
    }
    Ok(OpenedBundle { filter, members, key })
}

/// Keeps what a bundle gave (or notes its epoch when it did not open for this device).
fn learn(known: &Mutex<Known>, opened: Result<OpenedBundle, (u32, PolicyError)>) {
    let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
    match opened {
        Ok(OpenedBundle { filter, members, key }) => {
            known.epoch = known.epoch.max(key.epoch);
            known.filter = Some(filter);
            known.members = members;
            if known.keys.insert(key.epoch, key).is_none() {
                known.save();
            }
        }
        Err((epoch, err)) => {
            known.epoch = known.epoch.max(epoch);
            tracing::debug!(%err, epoch, "policy bundle not opened on this device");
        }
    }
}
