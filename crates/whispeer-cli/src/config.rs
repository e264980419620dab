//! `whispeer serve` configuration: defaults, then `whispeer.toml`, then `WHISPEER_*` variables.
//!
//! Nested keys use a double underscore in variables: `WHISPEER_LIMITS__MAX_MESSAGE_BYTES=2048`
//! sets `[limits] max_message_bytes`. A bad value's error names the key and where it came from.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use whispeer::server::cluster::ClusterConfig;
use whispeer::server::{ApiKeys, Principal, ServerConfig};

mod access;
mod chat;
mod cluster;
mod delivery;
mod mqtt;
mod relay;
pub(crate) use access::{Jwt, User};
pub(crate) use delivery::Delivery;
use whispeer::{
    BrokerOptions, ByteBudget, Durability, Filter, FsyncPolicy, PersistenceType, Redelivery,
    Retention, SlowConsumer, WalOptions,
};

/// Variables the commands read themselves (`WHISPEER_KEY`, `WHISPEER_SERVER`, `WHISPEER_LOG`,
/// `WHISPEER_API_KEY`, `WHISPEER_CHAT_SERVER`), lower-cased as figment gives them: never
/// configuration.
const CLI_VARIABLES: [&str; 5] = ["key", "server", "log", "api_key", "chat_server"];

/// The key a `WHISPEER_*` variable sets, as figment reads it (`limits.max_message_bytes`).
fn env_key(name: &str) -> Option<String> {
    let rest = name.get(..9).filter(|p| p.eq_ignore_ascii_case("WHISPEER_")).map(|_| &name[9..])?;
    Some(rest.to_ascii_lowercase().replace("__", "."))
}

/// Every key path of the configuration (`listen`, `storage`, `storage.dir`, ...), from its
/// defaults: a key whose default is empty (`None`) is there too.
fn key_paths(defaults: &Figment) -> std::collections::HashSet<String> {
    use figment::Provider as _;
    fn walk(
        prefix: &str,
        dict: &figment::value::Dict,
        out: &mut std::collections::HashSet<String>,
    ) {
        for (key, value) in dict {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            if let figment::value::Value::Dict(_, inner) = value {
                walk(&path, inner, out);
            }
            out.insert(path);
        }
    }
    let mut out = std::collections::HashSet::new();
    if let Ok(data) = defaults.data() {
        for dict in data.values() {
            walk("", dict, &mut out);
        }
    }
    out
}

/// The default address: loopback, so an unconfigured server is reachable only from this host.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7450";

/// Everything `whispeer serve` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    /// Address to listen on for the binary protocol over TCP.
    pub(crate) listen: String,
    /// Address to listen on for WebSocket clients (binary frames); none by default.
    pub(crate) ws_listen: Option<String>,
    /// Address of the admin port (`/healthz`, `/readyz`, `/metrics`, `/api/…`); none by default.
    pub(crate) admin_listen: Option<String>,
    /// The bearer token of the admin API (`/api/…`); closed without one.
    pub(crate) admin_token: Option<String>,
    /// Path of the WebSocket endpoint.
    pub(crate) ws_path: String,
    /// Name sent to clients.
    pub(crate) name: String,
    /// API keys: `sha256:<hex>` digests (preferred) or plain keys; each may use every ordinary
    /// topic.
    pub(crate) api_keys: Vec<String>,
    /// Principals with their own key and topic permissions: `[[users]] name = "alice"`,
    /// `api_key = "sha256:…"`, `publish = ["chat/+"]`, `subscribe = [...]`,
    /// `deny_publish = [...]`, `deny_subscribe = [...]`, `groups = ["billing", "jobs-*"]`.
    pub(crate) users: Vec<User>,
    /// JWT keys: tokens sent as the API key are verified with them (`[jwt]`).
    pub(crate) jwt: Jwt,
    /// Heartbeat period in milliseconds; idle connections close after three.
    pub(crate) heartbeat_ms: u64,
    /// With authentication required: milliseconds a connection has to send HELLO and AUTH.
    pub(crate) auth_timeout_ms: u64,
    /// Most simultaneous connections.
    pub(crate) max_connections: usize,
    /// Most subscriptions per connection.
    pub(crate) max_subscriptions: usize,
    /// Most topics with a retained message.
    pub(crate) max_retained: usize,
    /// Most payload bytes of retained messages in all.
    pub(crate) max_retained_bytes: usize,
    /// Bytes of history all topics keep in memory together (`[[retention]]`, durable topics,
    /// chat inboxes and conversations); past it the oldest messages go first.
    pub(crate) max_history_bytes: usize,
    /// Most publishes per second per connection (bursts of one second's worth); none if unset.
    pub(crate) max_publish_rate: Option<u32>,
    /// Most published payload bytes per second per connection; none if unset.
    pub(crate) max_publish_bytes_per_sec: Option<u64>,
    /// Logging.
    pub(crate) log: Log,
    /// Size limits.
    pub(crate) limits: Limits,
    /// Subscriber queues.
    pub(crate) queues: Queues,
    /// QoS 1 redelivery, de-duplication, queue groups, time to live.
    pub(crate) delivery: Delivery,
    /// Retained history: `[[retention]] filter = "log/#"`, `max_messages`, `max_bytes`,
    /// `max_age_ms`; the first matching filter applies to a topic.
    pub(crate) retention: Vec<RetentionRule>,
    /// Durable topics and their write-ahead log; off unless `dir` is set.
    pub(crate) storage: Storage,
    /// TLS for every listener; off unless both `cert` and `key` are set.
    pub(crate) tls: Tls,
    /// This node's cluster; off unless `urls` is set.
    pub(crate) cluster: cluster::Cluster,
    /// The chat listener; off unless `listen` is set.
    pub(crate) chat: chat::Chat,
    /// The MQTT listener; off unless `listen` is set.
    pub(crate) mqtt: mqtt::Mqtt,
    /// The P2P relay on the WebSocket listener; off unless `enabled`.
    pub(crate) relay: relay::Relay,
}

/// `[tls]`: PEM files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Tls {
    /// Certificate chain.
    pub(crate) cert: Option<std::path::PathBuf>,
    /// Private key.
    pub(crate) key: Option<std::path::PathBuf>,
    /// CA whose certificates clients must present; no client certificates if unset.
    pub(crate) client_ca: Option<std::path::PathBuf>,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Log {
    /// `text` or `json`.
    pub(crate) format: LogFormat,
    /// A `tracing` filter such as `info` or `whispeer=debug`; `WHISPEER_LOG` overrides it.
    pub(crate) level: String,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Limits {
    pub(crate) max_message_bytes: usize,
    pub(crate) max_frame_bytes: usize,
    pub(crate) max_topic_len: usize,
    pub(crate) max_topic_depth: usize,
}

/// `[queues]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Queues {
    /// Messages buffered per subscription.
    pub(crate) capacity: usize,
    /// Bytes buffered per subscription (payloads plus 256 per message).
    pub(crate) max_bytes: usize,
    /// `drop-oldest`, `drop-newest`, `disconnect` or `back-pressure`.
    pub(crate) slow_consumer: Policy,
    /// Under `back-pressure`: how long a publisher waits for a full subscriber's room before
    /// that subscriber is disconnected.
    pub(crate) back_pressure_timeout_ms: u64,
}

/// `[storage]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Storage {
    /// Directory of the store; no durability without it.
    pub(crate) dir: Option<std::path::PathBuf>,
    /// `wal` (segment files in `dir`, the default) or `sqlite` (`dir/whispeer.db`).
    pub(crate) kind: StoreKind,
    /// Filters of the durable topics.
    pub(crate) durable: Vec<String>,
    /// `always` (group commit), `every_n`, `interval` or `never`.
    pub(crate) fsync: Fsync,
    /// For `every_n`: records per fsync.
    pub(crate) fsync_every_n: u32,
    /// For `interval`: milliseconds between fsyncs.
    pub(crate) fsync_interval_ms: u64,
    /// A segment rolls over past this size.
    pub(crate) segment_bytes: u64,
    /// The oldest segments are deleted while the log is larger.
    pub(crate) max_bytes: u64,
}

/// Store names in configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoreKind {
    Wal,
    Sqlite,
}

/// fsync policy names in configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Fsync {
    Always,
    EveryN,
    Interval,
    Never,
}

impl Default for Storage {
    fn default() -> Self {
        let wal = WalOptions::new("");
        Self {
            dir: None,
            kind: StoreKind::Wal,
            durable: Vec::new(),
            fsync: Fsync::Always,
            fsync_every_n: 100,
            fsync_interval_ms: 10,
            segment_bytes: wal.segment_bytes,
            max_bytes: wal.max_bytes,
        }
    }
}

/// `[[retention]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionRule {
    pub(crate) filter: String,
    pub(crate) max_messages: usize,
    #[serde(default)]
    pub(crate) max_bytes: Option<usize>,
    #[serde(default)]
    pub(crate) max_age_ms: Option<u64>,
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Slow-consumer policy names in configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Policy {
    DropOldest,
    DropNewest,
    Disconnect,
    BackPressure,
}

impl Default for Config {
    fn default() -> Self {
        let server = ServerConfig::default();
        Self {
            listen: DEFAULT_LISTEN.into(),
            ws_listen: None,
            admin_listen: None,
            admin_token: None,
            ws_path: server.websocket_path,
            name: server.name,
            api_keys: Vec::new(),
            users: Vec::new(),
            jwt: Jwt::default(),
            heartbeat_ms: server.heartbeat.as_millis() as u64,
            auth_timeout_ms: millis(server.auth_timeout),
            max_connections: server.max_connections,
            max_subscriptions: server.max_subscriptions,
            max_retained: server.max_retained,
            max_retained_bytes: server.max_retained_bytes,
            max_history_bytes: BrokerOptions::default().history_max_bytes,
            max_publish_rate: None,
            max_publish_bytes_per_sec: None,
            log: Log::default(),
            limits: Limits::default(),
            queues: Queues::default(),
            delivery: Delivery::default(),
            retention: Vec::new(),
            storage: Storage::default(),
            tls: Tls::default(),
            cluster: cluster::Cluster::default(),
            chat: chat::Chat::default(),
            mqtt: mqtt::Mqtt::default(),
            relay: relay::Relay::default(),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let limits = whispeer::proto::Limits::default();
        Self {
            max_message_bytes: limits.max_message_bytes,
            max_frame_bytes: limits.max_frame_bytes,
            max_topic_len: limits.max_topic_len,
            max_topic_depth: limits.max_topic_depth,
        }
    }
}

impl Default for Queues {
    fn default() -> Self {
        let defaults = BrokerOptions::default();
        Self {
            capacity: defaults.queue_capacity,
            max_bytes: defaults.queue_max_bytes,
            slow_consumer: Policy::DropOldest,
            back_pressure_timeout_ms: millis(defaults.back_pressure_timeout),
        }
    }
}

impl Config {
    /// Loads defaults, then the file (required if `explicit`), then `WHISPEER_*` variables.
    ///
    /// A key the file does not know is an error (a typo); a variable that names no key is left
    /// out and returned, to be warned about: the environment is shared with other programs.
    pub(crate) fn load(
        path: &Path,
        explicit: bool,
    ) -> Result<(Self, Vec<String>), Box<figment::Error>> {
        let defaults = Figment::from(Serialized::defaults(Self::default()));
        let known = key_paths(&defaults);
        let mut figment = defaults;
        if explicit || path.exists() {
            figment = figment.merge(Toml::file_exact(path));
        }
        let ignored: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| {
                let name = name.into_string().ok()?;
                let key = env_key(&name)?;
                (!CLI_VARIABLES.contains(&key.as_str()) && !known.contains(&key)).then_some(name)
            })
            .collect();
        let known = std::sync::Arc::new(known);
        let env = Env::prefixed("WHISPEER_").split("__").filter(move |key| {
            let key = key.as_str().to_ascii_lowercase();
            !CLI_VARIABLES.contains(&key.as_str()) && known.contains(&key)
        });
        let config = figment.merge(env).extract().map_err(Box::new)?;
        Ok((config, ignored))
    }

    /// The broker's options.
    ///
    /// # Errors
    /// A `[[delivery.ttl]]` filter that is not a valid filter, or a jitter outside 0 to 1.
    pub(crate) fn broker_options(&self) -> anyhow::Result<BrokerOptions> {
        let mut options = BrokerOptions::default();
        options.limits.max_message_bytes = self.limits.max_message_bytes;
        options.limits.max_frame_bytes = self.limits.max_frame_bytes;
        options.limits.max_topic_len = self.limits.max_topic_len;
        options.limits.max_topic_depth = self.limits.max_topic_depth;
        options.queue_capacity = self.queues.capacity;
        options.queue_max_bytes = self.queues.max_bytes;
        options.slow_consumer = match self.queues.slow_consumer {
            Policy::DropOldest => SlowConsumer::DropOldest,
            Policy::DropNewest => SlowConsumer::DropNewest,
            Policy::Disconnect => SlowConsumer::Disconnect,
            Policy::BackPressure => SlowConsumer::BackPressure,
        };
        options.back_pressure_timeout = Duration::from_millis(self.queues.back_pressure_timeout_ms);
        let d = &self.delivery;
        anyhow::ensure!((0.0..=1.0).contains(&d.jitter), "delivery.jitter must be within 0 and 1");
        options.redelivery = Redelivery::new(Duration::from_millis(d.ack_timeout_ms))
            .backoff(d.backoff_factor, Duration::from_millis(d.max_delay_ms))
            .jitter(d.jitter)
            .max_attempts(d.max_attempts);
        options.prefetch = d.prefetch;
        options.dedup_window = Duration::from_millis(d.dedup_window_ms);
        options.dedup_max_keys = d.dedup_max_keys;
        options.group_linger = Duration::from_millis(d.group_linger_ms);
        options.history_max_bytes = self.max_history_bytes;
        for rule in &d.ttl {
            let filter = Filter::parse(&rule.filter)
                .map_err(|e| anyhow::anyhow!("delivery.ttl: filter {:?}: {e}", rule.filter))?;
            options.topic_ttl.push((filter, Duration::from_millis(rule.ttl_ms)));
        }
        for rule in &self.retention {
            let filter = Filter::parse(&rule.filter)
                .map_err(|e| anyhow::anyhow!("retention: filter {:?}: {e}", rule.filter))?;
            let mut retention = Retention::messages(rule.max_messages);
            if let Some(bytes) = rule.max_bytes {
                retention = retention.max_bytes(bytes);
            }
            if let Some(age) = rule.max_age_ms {
                retention = retention.max_age(Duration::from_millis(age));
            }
            options.retention.push((filter, retention));
        }
        let storage = &self.storage;
        if !self.cluster.urls.is_empty() && !storage.durable.is_empty() {
            // In a cluster, durable topics live in the engine (its history, its offsets).
            anyhow::ensure!(
                storage.dir.is_none(),
                "storage.dir: in a cluster, durable topics are kept by the engine (JetStream); \
                 remove storage.dir (see CLUSTER.md)"
            );
            let mut durability = Durability::in_store(PersistenceType::Memory);
            for filter in &storage.durable {
                let filter = Filter::parse(filter)
                    .map_err(|e| anyhow::anyhow!("storage.durable: filter {filter:?}: {e}"))?;
                durability = durability.topic(filter);
            }
            options.durability = Some(durability);
            return Ok(options);
        }
        match &storage.dir {
            Some(dir) => {
                let fsync = match storage.fsync {
                    Fsync::Always => FsyncPolicy::Always,
                    Fsync::EveryN => FsyncPolicy::EveryN(storage.fsync_every_n.max(1)),
                    Fsync::Interval => {
                        FsyncPolicy::Interval(Duration::from_millis(storage.fsync_interval_ms))
                    }
                    Fsync::Never => FsyncPolicy::Never,
                };
                let mut wal =
                    WalOptions::new(dir).fsync(fsync).segment_bytes(storage.segment_bytes);
                wal.max_bytes = storage.max_bytes;
                let mut durability = match storage.kind {
                    StoreKind::Wal => Durability::new(wal),
                    StoreKind::Sqlite => {
                        Durability::in_store(PersistenceType::Sqlite(dir.join("whispeer.db")))
                    }
                };
                for filter in &storage.durable {
                    let filter = Filter::parse(filter)
                        .map_err(|e| anyhow::anyhow!("storage.durable: filter {filter:?}: {e}"))?;
                    durability = durability.topic(filter);
                }
                options.durability = Some(durability);
            }
            None => {
                anyhow::ensure!(storage.durable.is_empty(), "storage.durable needs storage.dir")
            }
        }
        Ok(options)
    }

    /// The chat listener's settings, or `None` when it is off. On a cluster node chat's state
    /// is the engine's: `chat.dir` is refused there.
    ///
    /// # Errors
    /// A bad `[chat]` value.
    pub(crate) fn chat_settings(
        &self,
        server: ServerConfig,
    ) -> anyhow::Result<Option<whispeer::server::ChatConfig>> {
        if self.chat.listen.is_none() {
            return Ok(None);
        }
        if !self.cluster.urls.is_empty() {
            anyhow::ensure!(
                self.chat.dir.is_none(),
                "chat.dir: on a cluster node chat's groups, cursors and keys are kept by the \
                 cluster's engine; remove chat.dir (see CHAT.md)"
            );
            // Chat's inboxes and logs are durable topics there: the engine keeps them, as it
            // keeps every durable topic of a cluster (a store beside it would be a second history).
            anyhow::ensure!(
                self.storage.dir.is_none(),
                "storage.dir: on a cluster node chat's inboxes and logs are kept by the \
                 cluster's engine; remove storage.dir (see CHAT.md)"
            );
            return self.chat.settings(server, None).map(Some);
        }
        self.chat.settings(server, self.storage.dir.as_deref()).map(Some)
    }

    /// The cluster's settings, with the engine keeping as much durable history as memory does:
    /// `history_messages` grows to the largest `max_messages` of the `[[retention]]` rules that
    /// reach durable topics, and without `history_max_age_ms` the engine's age limit is the
    /// longest `max_age_ms` when aged rules cover every durable filter.
    pub(crate) fn cluster_settings(&self) -> anyhow::Result<Option<ClusterConfig>> {
        let Some(mut settings) = self.cluster.settings(&self.listen)? else { return Ok(None) };
        let durable: Vec<Filter> =
            self.storage.durable.iter().filter_map(|f| Filter::parse(f).ok()).collect();
        let rules: Vec<(Filter, &RetentionRule)> = self
            .retention
            .iter()
            .filter_map(|rule| Filter::parse(&rule.filter).ok().map(|f| (f, rule)))
            .filter(|(filter, _)| durable.iter().any(|d| d.overlaps(filter)))
            .collect();
        if let Some(most) = rules.iter().map(|(_, rule)| rule.max_messages as u64).max() {
            settings.history_messages = settings.history_messages.max(most);
        }
        let aged = |d: &Filter| {
            rules.iter().filter(|(f, _)| f.covers(d)).find_map(|(_, rule)| rule.max_age_ms)
        };
        if settings.history_max_age.is_none() && !durable.is_empty() {
            let ages: Option<Vec<u64>> = durable.iter().map(aged).collect();
            if let Some(longest) = ages.and_then(|ages| ages.into_iter().max()) {
                settings.history_max_age = Some(Duration::from_millis(longest));
            }
        }
        Ok(Some(settings))
    }

    /// The server's settings.
    pub(crate) fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let mut server = ServerConfig::default();
        server.name.clone_from(&self.name);
        server.api_keys = ApiKeys::parse(&self.api_keys)?;
        server.jwt = self.jwt.verifier()?.map(Arc::new);
        for (index, user) in self.users.iter().enumerate() {
            let principal = Principal::new(user.name.clone(), user.permissions()?);
            server.api_keys.add(self.api_keys.len() + index, &user.api_key, principal)?;
        }
        server.heartbeat = Duration::from_millis(self.heartbeat_ms.max(10));
        server.auth_timeout = Duration::from_millis(self.auth_timeout_ms.max(10));
        server.max_connections = self.max_connections;
        server.max_subscriptions = self.max_subscriptions;
        server.max_retained = self.max_retained;
        server.max_retained_bytes = self.max_retained_bytes;
        server.mqtt_max_session_expiry = Duration::from_secs(self.mqtt.max_session_expiry_secs);
        if let Some(dir) = &self.storage.dir {
            // Retained messages of durable topics are kept beside the store, and the key
            // directory's (`@keys/…`: device identities and key policies).
            let durable = self.storage.durable.iter().map(String::as_str).chain(["@keys/#"]);
            let durable = durable.filter_map(|f| Filter::parse(f).ok());
            let limits = self.broker_options()?.limits;
            server.retained = Arc::new(
                whispeer::server::Retained::open(dir, durable.collect(), limits).map_err(|e| {
                    anyhow::anyhow!("storage.dir: retained messages in {}: {e}", dir.display())
                })?,
            );
        }
        server.max_publish_rate = self.max_publish_rate;
        server.max_publish_bytes_rate = self.max_publish_bytes_per_sec;
        server.connection_max_bytes = self.delivery.connection_max_bytes;
        server.queued = ByteBudget::new(self.delivery.max_queued_bytes);
        server.tls = match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => {
                let read = |path: &std::path::PathBuf| {
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("tls: cannot read {}: {e}", path.display()))
                };
                let client_ca = self.tls.client_ca.as_ref().map(read).transpose()?;
                Some(whispeer::server::server_tls(&read(cert)?, &read(key)?, client_ca.as_deref())?)
            }
            (None, None) => None,
            _ => anyhow::bail!("tls: set both cert and key"),
        };
        Ok(server)
    }
}

#[cfg(test)]
#[expect(clippy::result_large_err, reason = "figment's Jail closures must return figment::Result")]
mod tests;
