//! A key policy as one device knows it, with no I/O: the Rust SDK's `KeyPolicy` and the WASM
//! client's share it, so a bundle or a message made by one reads in the other.
//!
//! A policy (`owner`, `name`) covers a topic filter. Its owner makes a group key per epoch and
//! seals it to every device of every member (and its own) with [`seal_for`]: the box is signed
//! by one of the owner's devices and bound to the policy, its filter, its members and the
//! epoch; the bundle is published retained at [`policy_topic`]. Messages under the policy are
//! sealed once with the newest epoch's key and signed by the sending device ([`seal_group`]),
//! the policy and the topic as associated data.
//!
//! The owner's devices are trusted as the directory first lists them, per device, as chat
//! contacts are ([`PolicyKeys::check_owner`]); a device whose key changes afterwards is
//! reported ([`KeyChange`]) and nothing it signs is opened until [`PolicyKeys::trust_owner`].
//! The device keys trusted, and the epochs' keys opened, can be kept in a file
//! ([`PolicyKeys::to_kept`], [`PolicyKeys::read_kept`]), so a restart neither forgets a key nor
//! trusts a swapped directory entry on first sight again.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use whispeer_proto::{Filter, Topic};
use zeroize::Zeroizing;

use super::{
    GroupKey, Identity, IdentityError, KeyChange, PublicIdentity, group_sealed_by, open_group,
    open_sealed, seal_for, seal_group, sealed_sender,
};

/// The first segment of the directory's topics.
pub const DIRECTORY: &str = "@keys";

/// The directory entry of `principal`'s `device`.
pub fn directory_topic(principal: &str, device: &str) -> String {
    format!("{DIRECTORY}/{principal}/{device}")
}

/// The filter of every directory entry of `principal`.
pub fn directory_filter(principal: &str) -> String {
    format!("{DIRECTORY}/{principal}/+")
}

/// The topic a policy's bundle is published on, retained.
pub fn policy_topic(owner: &str, name: &str) -> String {
    format!("{DIRECTORY}/{owner}/policy/{name}")
}

/// Why a key policy operation failed (in the Rust SDK and the WASM client alike).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The connection or the server (from the client that moves the policy's messages).
    #[error(transparent)]
    Connection(Box<dyn std::error::Error + Send + Sync>),
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
    /// A key of the owner's devices changed and the change was not accepted: nothing it
    /// signed is opened, and nothing is sealed under the policy, until it is trusted.
    #[error("{}'s key for device {} changed (was {}, now {}): compare the fingerprint, then trust it", .0[0].user, .0[0].device, .0[0].was, .0[0].now)]
    OwnerKeyChanged(Vec<KeyChange>),
    /// A bundle, message or kept file that does not read.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// What reading a bundle did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleRead {
    /// Opened: this device holds the epoch's key.
    Opened(u32),
    /// Signed by the owner, not sealed to this device (not a member at that epoch).
    NotForMe(u32),
    /// Signed by a key none of the owner's trusted devices has (its epoch counts as seen, so
    /// nothing is sealed with an older key): kept, and read again after
    /// [`PolicyKeys::check_owner`] or [`PolicyKeys::trust_owner`] (read the directory again
    /// first: the owner may have a new device).
    UnknownSigner(u32),
}

/// A policy as one device knows it: the owner's trusted device keys, the filter and members of
/// the newest epoch it opened, and the keys of every epoch it opened.
pub struct PolicyKeys {
    owner: String,
    name: String,
    owner_devices: BTreeMap<String, PublicIdentity>,
    pending: Vec<(KeyChange, PublicIdentity)>,
    /// The newest bundle signed by a key not trusted, to read again once it is.
    unverified: Option<Vec<u8>>,
    filter: Option<Filter>,
    members: Vec<String>,
    keys: BTreeMap<u32, GroupKey>,
    /// The newest epoch seen, opened or not.
    epoch: u32,
    /// Whether keys or trusted devices changed since [`take_changed`](Self::take_changed).
    changed: bool,
}

impl std::fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyKeys")
            .field("owner", &self.owner)
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
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

/// A bundle's fields, read but not opened.
struct Bundle {
    filter: Filter,
    members: Vec<String>,
    epoch: u32,
    sealed: Vec<u8>,
}

fn parse_bundle(payload: &[u8]) -> Result<Bundle, PolicyError> {
    let malformed = |why: &str| PolicyError::Malformed(format!("policy bundle: {why}"));
    let bundle: Value = serde_json::from_slice(payload).map_err(|_| malformed("not JSON"))?;
    let filter = bundle["filter"].as_str().ok_or_else(|| malformed("no filter"))?;
    let filter = Filter::parse(filter).map_err(|_| malformed("bad filter"))?;
    let epoch = bundle["epoch"].as_u64().and_then(|e| u32::try_from(e).ok());
    let epoch = epoch.ok_or_else(|| malformed("no epoch"))?;
    let members = bundle["members"].as_array().ok_or_else(|| malformed("no members"))?;
    let members = members.iter().filter_map(|m| m.as_str().map(str::to_string)).collect();
    let sealed = bundle["sealed"].as_str().ok_or_else(|| malformed("no key"))?;
    let sealed = BASE64.decode(sealed).map_err(|_| malformed("bad key"))?;
    Ok(Bundle { filter, members, epoch, sealed })
}

impl PolicyKeys {
    /// Nothing known yet of `owner`'s policy `name`.
    pub fn new(owner: &str, name: &str) -> Self {
        Self {
            owner: owner.to_string(),
            name: name.to_string(),
            owner_devices: BTreeMap::new(),
            pending: Vec::new(),
            unverified: None,
            filter: None,
            members: Vec::new(),
            keys: BTreeMap::new(),
            epoch: 0,
            changed: false,
        }
    }

    /// The policy's owner.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `owner/name`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Checks the owner's devices as the directory lists them against those trusted: a device
    /// seen for the first time is trusted, a device whose key changed is kept pending (and
    /// returned) until [`trust_owner`](Self::trust_owner). Entries that do not verify are
    /// ignored. Then reads again a bundle that waited for a signer.
    pub fn check_owner(&mut self, me: &Identity, devices: &[PublicIdentity]) -> Vec<KeyChange> {
        let mut changes = Vec::new();
        for device in devices.iter().filter(|d| d.verify().is_ok()) {
            match self.owner_devices.get(&device.device) {
                Some(seen) if seen == device => {}
                Some(seen) => {
                    let change = KeyChange {
                        user: self.owner.clone(),
                        device: device.device.clone(),
                        was: seen.fingerprint(),
                        now: device.fingerprint(),
                    };
                    if !self.pending.iter().any(|(known, _)| *known == change) {
                        self.pending.push((change.clone(), device.clone()));
                    }
                    changes.push(change);
                }
                None => {
                    self.owner_devices.insert(device.device.clone(), device.clone());
                    self.changed = true;
                }
            }
        }
        self.read_unverified(me);
        changes
    }

    /// Whether any device of the owner is trusted.
    pub fn knows_owner(&self) -> bool {
        !self.owner_devices.is_empty()
    }

    /// The owner's key changes not accepted yet.
    pub fn changes(&self) -> Vec<KeyChange> {
        self.pending.iter().map(|(change, _)| change.clone()).collect()
    }

    /// Accepts the owner's pending key changes (after comparing fingerprints), then reads again
    /// a bundle that waited for them. Returns how many were accepted.
    pub fn trust_owner(&mut self, me: &Identity) -> usize {
        let accepted = self.pending.len();
        for (_, device) in self.pending.drain(..) {
            self.owner_devices.insert(device.device.clone(), device);
        }
        self.changed |= accepted > 0;
        self.read_unverified(me);
        accepted
    }

    fn read_unverified(&mut self, me: &Identity) {
        if let Some(payload) = self.unverified.take() {
            // Kept again if its signer is still unknown.
            let _ = self.read_bundle(me, &payload);
        }
    }

    /// Reads a bundle of the policy and opens its key with `me`, if it is signed by a trusted
    /// device of the owner and sealed to `me`.
    ///
    /// # Errors
    /// A bundle that does not read, or whose box does not open though sealed to `me`.
    pub fn read_bundle(
        &mut self,
        me: &Identity,
        payload: &[u8],
    ) -> Result<BundleRead, PolicyError> {
        let bundle = parse_bundle(payload)?;
        let epoch = bundle.epoch;
        let signer = sealed_sender(&bundle.sealed)?;
        // Seen, opened or not: no message is sealed with an older epoch's key afterwards (a
        // member removed at this epoch may hold the older ones).
        self.epoch = self.epoch.max(epoch);
        if !self.owner_devices.values().any(|device| device.ed25519 == signer) {
            if self
                .unverified
                .as_ref()
                .is_none_or(|kept| parse_bundle(kept).map_or(true, |k| k.epoch <= epoch))
            {
                self.unverified = Some(payload.to_vec());
            }
            return Ok(BundleRead::UnknownSigner(epoch));
        }
        let context =
            bundle_context(&self.owner, &self.name, bundle.filter.as_str(), &bundle.members, epoch);
        let bytes = match open_sealed(me, &bundle.sealed, &context, Some(&signer)) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(IdentityError::NotForMe) => return Ok(BundleRead::NotForMe(epoch)),
            Err(err) => return Err(err.into()),
        };
        let key = GroupKey::from_bytes(&bytes)?;
        if key.epoch != epoch {
            return Err(PolicyError::Malformed("the key's epoch is not the bundle's".into()));
        }
        self.learn(bundle.filter, bundle.members, key);
        Ok(BundleRead::Opened(epoch))
    }

    fn learn(&mut self, filter: Filter, members: Vec<String>, key: GroupKey) {
        self.epoch = self.epoch.max(key.epoch);
        if key.epoch == self.epoch {
            self.filter = Some(filter);
            self.members = members;
        }
        // An epoch keeps the first key this device opened for it.
        if let std::collections::btree_map::Entry::Vacant(slot) = self.keys.entry(key.epoch) {
            slot.insert(key);
            self.changed = true;
        }
    }

    /// Owner: a new epoch for `filter` and `members` (the owner always belongs; sorted), its key
    /// sealed by `me` to `devices` (every device of every member, and the owner's); gives the
    /// bundle to publish retained at [`policy_topic`], and keeps the key.
    ///
    /// # Errors
    /// More devices than a box takes, or no entropy.
    pub fn make_bundle(
        &mut self,
        me: &Identity,
        filter: &Filter,
        mut members: Vec<String>,
        devices: &[PublicIdentity],
    ) -> Result<Vec<u8>, PolicyError> {
        if !members.contains(&self.owner) {
            members.push(self.owner.clone());
        }
        members.sort();
        members.dedup();
        let epoch = self.epoch + 1;
        let key = GroupKey::generate(epoch)?;
        let context = bundle_context(&self.owner, &self.name, filter.as_str(), &members, epoch);
        let sealed = seal_for(me, devices, &context, &key.to_bytes())?;
        let bundle = json!({
            "filter": filter.as_str(), "members": members, "epoch": epoch,
            "sealed": BASE64.encode(sealed),
        });
        self.learn(filter.clone(), members, key);
        Ok(bundle.to_string().into_bytes())
    }

    fn refuse_changed(&self) -> Result<(), PolicyError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::OwnerKeyChanged(self.changes()))
        }
    }

    /// Seals `plain` for `topic` (inside the filter) with the newest epoch's key, signed by
    /// `me`.
    ///
    /// # Errors
    /// [`PolicyError::Outside`]; [`PolicyError::NotMember`] when this device cannot open
    /// the newest epoch (removed, or never a member); [`PolicyError::OwnerKeyChanged`]
    /// while an owner's key change waits to be trusted.
    pub fn seal(&self, me: &Identity, topic: &str, plain: &[u8]) -> Result<Vec<u8>, PolicyError> {
        self.refuse_changed()?;
        let parsed = Topic::parse(topic).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let filter = self.filter.as_ref().ok_or_else(|| self.not_member())?;
        if !filter.matches(&parsed) {
            let filter = filter.to_string();
            return Err(PolicyError::Outside { topic: topic.to_string(), filter });
        }
        // The newest epoch's key: a device that could not open it was removed.
        let key = self.keys.get(&self.epoch).ok_or_else(|| self.not_member())?;
        let context = message_context(&self.owner, &self.name, topic);
        Ok(seal_group(me, key, &context, plain)?)
    }

    /// Opens a message sealed under the policy and received on `topic`: its plaintext, and the
    /// Ed25519 key of the device that sealed it.
    ///
    /// # Errors
    /// [`PolicyError::NoKey`] for an epoch this device has no key of
    /// ([`PolicyError::OwnerKeyChanged`] when that may be why), or the seal's failure (a
    /// message altered, or re-addressed to another topic).
    pub fn open(&self, topic: &str, sealed: &[u8]) -> Result<(Vec<u8>, [u8; 32]), PolicyError> {
        let (epoch, signer) = group_sealed_by(sealed)?;
        let Some(key) = self.keys.get(&epoch) else {
            self.refuse_changed()?;
            return Err(PolicyError::NoKey(epoch));
        };
        let context = message_context(&self.owner, &self.name, topic);
        Ok((open_group(key, sealed, &context, None)?, signer))
    }

    /// The epoch a sealed message names, without opening it.
    ///
    /// # Errors
    /// Not a policy message.
    pub fn epoch_of(sealed: &[u8]) -> Result<u32, PolicyError> {
        Ok(group_sealed_by(sealed)?.0)
    }

    /// The newest epoch seen, opened or not.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The filter and members of the newest epoch opened, and the newest epoch seen.
    pub fn state(&self) -> Option<(String, Vec<String>, u32)> {
        self.filter.as_ref().map(|f| (f.to_string(), self.members.clone(), self.epoch))
    }

    /// Whether this device holds `epoch`'s key.
    pub fn has_key(&self, epoch: u32) -> bool {
        self.keys.contains_key(&epoch)
    }

    /// Whether the key of `epoch` (the newest seen when `None`) is missing but may still come:
    /// its bundle not read yet, or one waiting while its signer is looked up in the directory
    /// (no key change pending). A caller about to seal or open waits a little while it is.
    pub fn awaits_key(&self, epoch: Option<u32>) -> bool {
        let epoch = epoch.unwrap_or(self.epoch);
        let waiting = self.unverified.is_some() && self.pending.is_empty();
        !self.has_key(epoch) && (self.epoch < epoch || waiting)
    }

    /// The filter of the newest epoch opened.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }

    fn not_member(&self) -> PolicyError {
        PolicyError::NotMember(self.label())
    }

    /// Whether keys or trusted devices were added since the last call (to save them).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// What to keep in a file (readable by its owner only): a line per epoch key (base64), and
    /// a line `owner <public identity>` per trusted device of the owner.
    pub fn to_kept(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::new());
        for key in self.keys.values() {
            text.push_str(&BASE64.encode(key.to_bytes().as_slice()));
            text.push('\n');
        }
        for device in self.owner_devices.values() {
            text.push_str("owner ");
            text.push_str(&device.to_text());
            text.push('\n');
        }
        text
    }

    /// Takes what [`to_kept`](Self::to_kept) wrote: the keys, and the owner's devices as they
    /// were trusted then. A device the directory gave another key since is reported as a change
    /// (the kept key stays trusted).
    ///
    /// # Errors
    /// A line that does not read.
    pub fn read_kept(&mut self, text: &str) -> Result<Vec<KeyChange>, PolicyError> {
        let bad = |why: String| PolicyError::Malformed(format!("kept policy keys: {why}"));
        let mut changes = Vec::new();
        for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if let Some(device) = line.strip_prefix("owner ") {
                let kept = PublicIdentity::from_text(device).map_err(|e| bad(e.to_string()))?;
                if let Some(change) = self.pin(kept) {
                    changes.push(change);
                }
                continue;
            }
            let bytes = Zeroizing::new(BASE64.decode(line).map_err(|e| bad(e.to_string()))?);
            let key = GroupKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
            self.epoch = self.epoch.max(key.epoch);
            self.keys.entry(key.epoch).or_insert(key);
        }
        Ok(changes)
    }

    /// Trusts `kept` for its device; a different key trusted for it until now becomes a pending
    /// change.
    fn pin(&mut self, kept: PublicIdentity) -> Option<KeyChange> {
        let now = self.owner_devices.insert(kept.device.clone(), kept.clone())?;
        if now == kept {
            return None;
        }
        let change = KeyChange {
            user: self.owner.clone(),
            device: kept.device.clone(),
            was: kept.fingerprint(),
            now: now.fingerprint(),
        };
        self.pending.push((change.clone(), now));
        Some(change)
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
