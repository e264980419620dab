//! `whispeer chat --identity FILE`: this device's identity (made on first use, the file readable
//! by its owner only), published to the server's directory; direct messages sealed to the
//! recipient's devices and opened on arrival; fingerprints; keys remembered per contact, and a
//! changed key reported and refused until `/trust`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use whispeer_client::engines::{Identity, PublicIdentity};
use whispeer_client::{Chat, ChatMessage, GroupKeys, KeyChange, KnownKeys};

/// This device's keys and what it knows of others'.
pub(super) struct Sealing {
    identity: Identity,
    known: KnownKeys,
    /// Changes not yet accepted, by user: sealing to them waits for `/trust`.
    pending: HashMap<String, Vec<KeyChange>>,
    /// The group keys learned or made.
    groups: GroupKeys,
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(text.as_bytes())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, text)
    }
}

impl Sealing {
    /// Reads the identity in `path`, or makes one there.
    pub(super) fn load(path: &Path) -> anyhow::Result<(Self, bool)> {
        let (identity, made) = match std::fs::read_to_string(path) {
            Ok(text) => {
                (Identity::from_text(&text).with_context(|| format!("{}", path.display()))?, false)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let identity = Identity::generate()?;
                write_private(path, &identity.to_text())
                    .with_context(|| format!("writing {}", path.display()))?;
                (identity, true)
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let (known, pending, groups) = (KnownKeys::default(), HashMap::new(), GroupKeys::default());
        Ok((Self { identity, known, pending, groups }, made))
    }

    /// Publishes this device's public identity.
    pub(super) async fn publish(&self, chat: &Chat) -> Result<String, whispeer_client::ChatError> {
        chat.publish_identity(&self.identity).await?;
        Ok(self.identity.public(chat.device()).fingerprint())
    }

    /// `user`'s keys, checked against those seen before; changes are kept and described.
    async fn keys(
        &mut self,
        chat: &Chat,
        user: &str,
    ) -> Result<(Vec<PublicIdentity>, Vec<String>), String> {
        let keys = chat.keys(user).await.map_err(|e| format!("! {e}"))?;
        let changes = self.known.check(user, &keys);
        let lines = changes
            .iter()
            .map(|c| {
                format!(
                    "! {}'s key for {} CHANGED: was {}, now {}; compare it with them, then /trust {}",
                    c.user, c.device, c.was, c.now, c.user
                )
            })
            .collect();
        if !changes.is_empty() {
            self.pending.entry(user.to_string()).or_default().extend(changes);
        }
        Ok((keys, lines))
    }

    /// Sends `text` to `user` sealed; refused while a change of `user`'s keys is not trusted.
    pub(super) async fn send(&mut self, chat: &Chat, user: &str, text: &str) -> Vec<String> {
        let (_, mut lines) = match self.keys(chat, user).await {
            Ok(found) => found,
            Err(line) => return vec![line],
        };
        if self.pending.get(user).is_some_and(|c| !c.is_empty()) {
            lines.push(format!("! not sent: {user}'s keys changed; /trust {user} after checking"));
            return lines;
        }
        if let Err(err) = chat.send_sealed_to(&self.identity, user, text).await {
            lines.push(format!("! {err}"));
        }
        lines
    }

    /// Makes `group`'s next key and sends it sealed to its members' devices.
    pub(super) async fn rotate(&mut self, chat: &Chat, group: &str) -> Vec<String> {
        match chat.rotate_group_key(&self.identity, &mut self.groups, group).await {
            Ok(epoch) => {
                vec![format!("  #{group}: key epoch {epoch} sealed to its members' devices")]
            }
            Err(err) => vec![format!("! {err}")],
        }
    }

    /// Sends `text` to `group` sealed with its current key; refused without one.
    pub(super) async fn send_group(&mut self, chat: &Chat, group: &str, text: &str) -> Vec<String> {
        if self.groups.current(group).is_none() {
            return vec![format!(
                "! not sent: #{group} has no group key yet; /rotate {group} makes one"
            )];
        }
        match chat.send_sealed_group(&self.identity, &self.groups, group, text).await {
            Ok(_) => Vec::new(),
            Err(err) => vec![format!("! {err}")],
        }
    }

    /// A group key message: learned (its sender's keys checked); what to show.
    pub(super) async fn learn(&mut self, chat: &Chat, message: &ChatMessage) -> Vec<String> {
        let (keys, mut lines) = match self.keys(chat, &message.from).await {
            Ok(found) => found,
            Err(line) => return vec![line],
        };
        let group = message.group.clone().unwrap_or_default();
        lines.push(match self.groups.learn(&self.identity, message, &keys) {
            Ok(epoch) => format!("* #{group}: key epoch {epoch} from {}", message.from),
            Err(err) => format!("! #{group}: a key from {} not taken: {err}", message.from),
        });
        lines
    }

    /// Accepts `user`'s changed keys.
    pub(super) fn trust(&mut self, user: &str) -> Vec<String> {
        let changes = self.pending.remove(user).unwrap_or_default();
        changes.iter().for_each(|change| self.known.accept(change));
        vec![format!("  {} change(s) of {user}'s keys accepted", changes.len())]
    }

    /// The fingerprints of `user`'s devices.
    pub(super) async fn fingerprints(&mut self, chat: &Chat, user: &str) -> Vec<String> {
        match self.keys(chat, user).await {
            Ok((keys, mut lines)) => {
                lines.extend(
                    keys.iter().map(|k| format!("  {user} {}: {}", k.device, k.fingerprint())),
                );
                if keys.is_empty() {
                    lines.push(format!("  {user} has published no keys"));
                }
                lines
            }
            Err(line) => vec![line],
        }
    }

    /// Opens a sealed message, direct (`sealed`) or group (`sealed_group`), for showing: its
    /// text, or why not; `None` for a message that is not sealed.
    pub(super) async fn open_message(
        &mut self,
        chat: &Chat,
        message: &ChatMessage,
    ) -> Option<(String, Vec<String>)> {
        let group = message.msg.get("sealed_group").is_some();
        if !group && message.msg.get("sealed").is_none() {
            return None;
        }
        let (keys, lines) = match self.keys(chat, &message.from).await {
            Ok(found) => found,
            Err(line) => {
                return Some(("(sealed; the sender's keys are unavailable)".into(), vec![line]));
            }
        };
        let opened = if group {
            chat.open_group(&self.groups, message, &keys)
        } else {
            chat.open(&self.identity, message, &keys)
        };
        let text = match opened {
            Ok(value) => value.as_str().map_or_else(|| value.to_string(), str::to_string),
            Err(err) => format!("(sealed; does not open: {err})"),
        };
        Some((text, lines))
    }
}
