//! `[chat]`: the chat listener (off unless `listen` is set, or `--chat-listen` is given).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use whispeer::server::{ChatConfig, ServerConfig};

/// `[chat]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Chat {
    /// Address of the chat listener (WebSocket, JSON); off while unset.
    pub(crate) listen: Option<String>,
    /// Path of its endpoint.
    pub(crate) path: String,
    /// Directory of `chat.db` (groups, members, device cursors); by default `storage.dir`,
    /// in memory without either.
    pub(crate) dir: Option<PathBuf>,
    /// Messages kept per user for devices that are away.
    pub(crate) inbox_max_messages: usize,
    /// Bytes kept per user for devices that are away.
    pub(crate) inbox_max_bytes: usize,
    /// Milliseconds a message waits for a device that is away.
    pub(crate) inbox_max_age_ms: u64,
    /// Messages kept per conversation for `history`.
    pub(crate) history_max_messages: usize,
    /// Bytes kept per conversation for `history`.
    pub(crate) history_max_bytes: usize,
    /// Largest request, in bytes of JSON.
    pub(crate) max_message_bytes: usize,
    /// Messages per second per user, across its devices.
    pub(crate) max_messages_per_sec: u32,
    /// Groups per user.
    pub(crate) max_groups_per_user: usize,
    /// Members per group.
    pub(crate) max_members_per_group: usize,
    /// Connections per user at once.
    pub(crate) max_connections_per_user: usize,
    /// Directory of the WASM client's web package: serves the chat page at `/`; off if unset.
    pub(crate) page_dir: Option<PathBuf>,
}

impl Default for Chat {
    fn default() -> Self {
        let chat = ChatConfig::default();
        Self {
            listen: None,
            path: chat.path,
            dir: None,
            inbox_max_messages: chat.inbox_max_messages,
            inbox_max_bytes: chat.inbox_max_bytes,
            inbox_max_age_ms: chat.inbox_max_age.as_millis() as u64,
            history_max_messages: chat.history_max_messages,
            history_max_bytes: chat.history_max_bytes,
            max_message_bytes: chat.max_message_bytes,
            max_messages_per_sec: chat.max_messages_per_sec,
            max_groups_per_user: chat.max_groups_per_user,
            max_members_per_group: chat.max_members_per_group,
            max_connections_per_user: chat.max_connections_per_user,
            page_dir: None,
        }
    }
}

impl Chat {
    /// The listener's settings, with the server's authentication and TLS; `storage_dir` keeps
    /// `chat.db` beside the broker's store unless `dir` says otherwise.
    ///
    /// # Errors
    /// A path without its leading `/`; a bound of zero.
    pub(crate) fn settings(
        &self,
        server: ServerConfig,
        storage_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<ChatConfig> {
        anyhow::ensure!(self.path.starts_with('/'), "chat.path {:?} must start with /", self.path);
        let positive = [
            ("inbox_max_messages", self.inbox_max_messages),
            ("inbox_max_bytes", self.inbox_max_bytes),
            ("history_max_bytes", self.history_max_bytes),
            ("history_max_messages", self.history_max_messages),
            ("max_message_bytes", self.max_message_bytes),
            ("max_messages_per_sec", self.max_messages_per_sec as usize),
            ("max_groups_per_user", self.max_groups_per_user),
            ("max_members_per_group", self.max_members_per_group),
            ("max_connections_per_user", self.max_connections_per_user),
        ];
        for (key, value) in positive {
            anyhow::ensure!(value > 0, "chat.{key} must be at least 1");
        }
        anyhow::ensure!(self.inbox_max_age_ms > 0, "chat.inbox_max_age_ms must be at least 1");
        let mut chat = ChatConfig::default();
        chat.path.clone_from(&self.path);
        chat.dir = self.dir.clone().or_else(|| storage_dir.map(std::path::Path::to_path_buf));
        chat.inbox_max_messages = self.inbox_max_messages;
        chat.inbox_max_bytes = self.inbox_max_bytes;
        chat.history_max_bytes = self.history_max_bytes;
        chat.inbox_max_age = Duration::from_millis(self.inbox_max_age_ms);
        chat.history_max_messages = self.history_max_messages;
        chat.max_message_bytes = self.max_message_bytes;
        chat.max_messages_per_sec = self.max_messages_per_sec;
        chat.max_groups_per_user = self.max_groups_per_user;
        chat.max_members_per_group = self.max_members_per_group;
        chat.max_connections_per_user = self.max_connections_per_user;
        chat.page_dir.clone_from(&self.page_dir);
        chat.server = server;
        Ok(chat)
    }
}
