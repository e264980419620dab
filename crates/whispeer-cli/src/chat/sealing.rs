//! End-to-end keys in `whispeer chat`: where the identity is kept (a file per user and device
//! in the keys folder, made on first use, readable by its owner only), and the lines the
//! terminal shows for keys — fingerprints, a contact's changed key (refused until `/trust`),
//! a group key learned, a message that does not open. The SDK's `Chat` does the sealing.

use std::path::PathBuf;

use whispeer_client::{Chat, ChatError, ChatEvent, ChatOptions, KeyChange};

/// The default keys folder: `$XDG_CONFIG_HOME/whispeer/chat`, else `~/.config/whispeer/chat`.
pub(super) fn default_dir() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config.join("whispeer").join("chat"))
}

/// How this session seals: `--plain`, `--identity FILE`, or the keys folder.
pub(super) fn options(
    options: ChatOptions,
    plain: bool,
    file: Option<&PathBuf>,
    dir: Option<&PathBuf>,
) -> ChatOptions {
    match (plain, file, dir) {
        (true, _, _) => options.plain(),
        (false, Some(file), _) => options.identity_file(file),
        (false, None, Some(dir)) => options.identity_dir(dir),
        // No home folder: an identity for this session only.
        (false, None, None) => options,
    }
}

fn change_line(change: &KeyChange) -> String {
    format!(
        "! {}'s key for {} CHANGED: was {}, now {}; compare it with them, then /trust {}",
        change.user, change.device, change.was, change.now, change.user
    )
}

/// The line for a send that failed.
pub(super) fn refused(err: &ChatError) -> Vec<String> {
    match err {
        ChatError::KeyChanged(changes) => {
            let mut lines: Vec<String> = changes.iter().map(change_line).collect();
            lines.push("! not sent: a key changed".to_string());
            lines
        }
        ChatError::Keys(why) if why.contains("published no keys") => vec![format!(
            "! not sent: {why} (a client that does not seal; `whispeer chat --plain` talks to it)"
        )],
        other => vec![format!("! {other}")],
    }
}

/// The line for a keys event, if it is one.
pub(super) fn describe(event: &ChatEvent) -> Option<String> {
    Some(match event {
        ChatEvent::GroupKey { group, epoch, from } => {
            format!("* #{group}: key epoch {epoch} from {from}")
        }
        ChatEvent::KeyChanged { change, .. } => {
            format!("{} (a message from it was not opened)", change_line(change))
        }
        ChatEvent::KeysChanged { user } => format!("* {user}'s devices changed"),
        _ => return None,
    })
}

/// The fingerprints of `user`'s devices, and their changes.
pub(super) async fn fingerprints(chat: &Chat, user: &str) -> Vec<String> {
    match chat.check_keys(user).await {
        Ok((keys, changes)) => {
            let mut lines: Vec<String> = changes.iter().map(change_line).collect();
            lines
                .extend(keys.iter().map(|k| format!("  {user} {}: {}", k.device, k.fingerprint())));
            if keys.is_empty() {
                lines.push(format!("  {user} has published no keys"));
            }
            lines
        }
        Err(err) => vec![format!("! {err}")],
    }
}

/// `/trust user`.
pub(super) fn trust(chat: &Chat, user: &str) -> Vec<String> {
    vec![format!("  {} change(s) of {user}'s keys accepted", chat.trust(user))]
}

/// `/rotate group`.
pub(super) async fn rotate(chat: &Chat, group: &str) -> Vec<String> {
    match chat.rotate_group_key(group).await {
        Ok(epoch) => vec![format!("  #{group}: key epoch {epoch} sealed to its members' devices")],
        Err(err) => refused(&err),
    }
}
