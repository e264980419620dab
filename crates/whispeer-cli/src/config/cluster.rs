//! `[cluster]`: this node's place in a cluster of `whispeer serve` nodes (off unless `urls`
//! is set).

use serde::{Deserialize, Serialize};
use whispeer::server::ClusterConfig;

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Cluster {
    /// The engine the nodes share: `nats` or `redis`.
    pub(crate) engine: String,
    /// The engine's servers, e.g. `["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]`; the
    /// cluster is off while this is empty.
    pub(crate) urls: Vec<String>,
    /// This node's name; by default the host name and the listen port.
    pub(crate) node: Option<String>,
    /// The first token of every subject whispeer uses on the engine.
    pub(crate) prefix: String,
    /// The engine's user name (with `password`).
    pub(crate) user: Option<String>,
    /// The engine's password.
    pub(crate) password: Option<String>,
    /// The engine's token (instead of a user).
    pub(crate) token: Option<String>,
    /// Messages the engine keeps per durable topic (`[storage] durable`).
    pub(crate) history_messages: u64,
    /// Milliseconds the engine keeps durable topics' messages; 0: no age limit.
    pub(crate) history_max_age_ms: u64,
    /// Copies of the history in the engine; 0: three when its cluster has three servers or
    /// more, else one.
    pub(crate) replicas: usize,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            engine: "nats".into(),
            urls: Vec::new(),
            node: None,
            prefix: "whispeer".into(),
            user: None,
            password: None,
            token: None,
            history_messages: 10_000,
            history_max_age_ms: 0,
            replicas: 0,
        }
    }
}

impl Cluster {
    /// The cluster's settings, or `None` when it is off; `listen` names the node by default.
    ///
    /// # Errors
    /// An unknown engine; a user without a password.
    pub(crate) fn settings(&self, listen: &str) -> anyhow::Result<Option<ClusterConfig>> {
        if self.urls.is_empty() {
            return Ok(None);
        }
        anyhow::ensure!(
            self.engine == "nats" || self.engine == "redis",
            "cluster.engine {:?}: the engines are \"nats\" and \"redis\"",
            self.engine
        );
        anyhow::ensure!(
            self.user.is_some() == self.password.is_some(),
            "cluster: set both user and password, or neither"
        );
        let node = self.node.clone().unwrap_or_else(|| default_node(listen));
        let mut config = if self.engine == "redis" {
            anyhow::ensure!(self.urls.len() == 1, "cluster.urls: Redis takes one server");
            ClusterConfig::redis(self.urls[0].clone(), node)
        } else {
            ClusterConfig::nats(self.urls.clone(), node)
        };
        config.prefix.clone_from(&self.prefix);
        config.user.clone_from(&self.user);
        config.password.clone_from(&self.password);
        config.token.clone_from(&self.token);
        anyhow::ensure!(self.history_messages > 0, "cluster.history_messages must be at least 1");
        config.history_messages = self.history_messages;
        config.history_max_age = (self.history_max_age_ms > 0)
            .then(|| std::time::Duration::from_millis(self.history_max_age_ms));
        config.replicas = (self.replicas > 0).then_some(self.replicas);
        Ok(Some(config))
    }
}

/// The host name and the port of `listen`.
fn default_node(listen: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "whispeer".into());
    let port = listen.rsplit(':').next().unwrap_or("7450");
    format!("{host}:{port}")
}
