//! The Redis engine: pub/sub for fan-out, Streams for queue groups and for durable topics'
//! history (Centrifugo's pattern).
//!
//! - **Fan-out**: `PUBLISH` on the same subject names as NATS (`<prefix>.<token>…`); a node
//!   `PSUBSCRIBE`s the glob of each interest. A glob `*` also matches dots, so a pattern may
//!   deliver more than its filter: the relay drops what its interest's filter does not match.
//! - **Queue groups**: each group is a stream `<prefix>:group:<filter>.<name>` (hex) read by a
//!   Redis consumer group of the same name, one consumer per node, so each message reaches one
//!   node. Nodes with members list their groups in the sorted set `<prefix>:groups` (score: when
//!   last refreshed); every node reads it each second, and appends every message to the stream
//!   of each matching group.
//! - **History**: one stream `<prefix>:history`; an entry's id `<ms>-<seq>` is the offset
//!   `ms << 20 | seq`. A Lua script appends and drops a repeat of the same id within two minutes.
//! - **Membership**: `PUBLISH` / `SUBSCRIBE` on `_WHISPEER.<prefix>.nodes`.
//!
//! Every publish goes through one writer task that sends what is waiting as one pipeline, in
//! order; a flush waits for the pipelines before it. Subscriptions are tasks that connect again
//! after an error. One Redis server (its first URL): Sentinel and Redis Cluster are not
//! supported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, Value};
use tokio::sync::{mpsc, oneshot};
use whispeer_core::Interest;
use whispeer_core::proto::{Filter, Topic};

use super::ClusterConfig;
use super::engine::{
    Appended, Engine, EngineError, EngineFuture, GROUP_ACK_WAIT, GroupDelivery, GroupHistory,
    History, Inbox, Sequenced, Settle,
};
use super::subject::filter_subjects;

mod retained;
mod streams;
mod writer;

use streams::{
    create_group, id_to_offset, message_of, offset_to_id, read_group, stream_entries, text,
};
use writer::{Write, write};

/// Messages one subscription may buffer before the node reads them.
const SUBSCRIPTION_CAPACITY: usize = 65_536;
/// Publishes and appends waiting for the writer.
const WRITER_CAPACITY: usize = 65_536;
/// Commands sent in one pipeline at most.
const PIPELINE: usize = 512;
/// Entries a group's stream keeps at most (approximately): what its readers have not read yet.
const GROUP_STREAM_MAX: u64 = 100_000;
/// How long a group stays listed after its last refresh.
const GROUP_EXPIRY_MS: u64 = 10_000;
/// How often nodes refresh their groups and read everyone's.
const GROUP_REFRESH: Duration = Duration::from_secs(1);
/// Wait before a subscription connects again.
const RETRY: Duration = Duration::from_secs(1);

/// Redis as a cluster engine.
pub(crate) struct Redis {
    prefix: String,
    node: String,
    addr: String,
    client: Client,
    commands: ConnectionManager,
    writer: mpsc::Sender<Write>,
    connected: Arc<AtomicBool>,
    /// Counts the returns of Redis after an outage: subscriptions connect again on each.
    returns: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn unreachable(err: &redis::RedisError) -> EngineError {
    EngineError::Unreachable(err.to_string())
}

fn now_ms() -> u64 {
    super::members::now_ms()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A Redis glob for a NATS-style subject: `*` and `>` both become `*`.
fn glob(subject: &str) -> String {
    subject
        .split('.')
        .map(|token| if token == ">" { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

impl Redis {
    /// Connects to the first of `config.urls` and starts the writer, the health check and the
    /// groups' registry reader.
    pub(crate) async fn connect(
        config: &ClusterConfig,
        connected: Arc<AtomicBool>,
    ) -> Result<Self, EngineError> {
        let url = config.urls.first().ok_or_else(|| EngineError::Failed("no Redis URL".into()))?;
        let client =
            Client::open(url.as_str()).map_err(|err| EngineError::Failed(err.to_string()))?;
        let addr = client.get_connection_info().addr.to_string();
        // Short reconnection rounds: a failed round ends soon, and the next command (the health
        // check's, every half second) starts another, so the node is back soon after Redis.
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_max_delay(500)
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(5));
        let commands = ConnectionManager::new_with_config(client.clone(), manager)
            .await
            .map_err(|e| unreachable(&e))?;
        connected.store(true, Ordering::Release);
        let prefix = config.prefix.clone();
        let groups: Arc<RwLock<Vec<(Filter, String)>>> = Arc::default();
        let (writer, work) = mpsc::channel(WRITER_CAPACITY);
        let history = format!("{prefix}:history");
        tokio::spawn(write(
            commands.clone(),
            work,
            Arc::clone(&groups),
            prefix.clone(),
            history,
            config.history_messages,
        ));
        let (returned, returns) = tokio::sync::watch::channel(0);
        tokio::spawn(health(commands.clone(), Arc::clone(&connected), returned));
        tokio::spawn(read_groups(commands.clone(), groups, prefix.clone()));
        let node = config.node.clone();
        Ok(Self { prefix, node, addr, client, commands, writer, connected, returns })
    }

    fn history_key(&self) -> String {
        format!("{}:history", self.prefix)
    }

    async fn send(&self, write: Write) -> Result<(), EngineError> {
        self.writer
            .send(write)
            .await
            .map_err(|_| EngineError::Failed("the writer has stopped".into()))
    }

    /// A channel subscription (patterns or exact names) as an inbox, connecting again after an
    /// error; it ends when the inbox is dropped.
    fn pubsub(&self, channels: Vec<String>, patterns: bool) -> Inbox {
        let (tx, rx) = mpsc::channel::<Bytes>(SUBSCRIPTION_CAPACITY);
        let (client, mut returns) = (self.client.clone(), self.returns.clone());
        tokio::spawn(async move {
            while !tx.is_closed() {
                returns.borrow_and_update();
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    for channel in &channels {
                        if patterns {
                            pubsub.psubscribe(channel).await?;
                        } else {
                            pubsub.subscribe(channel).await?;
                        }
                    }
                    Ok::<_, redis::RedisError>(pubsub)
                };
                match subscribed.await {
                    Ok(pubsub) => {
                        let mut messages = pubsub.into_on_message();
                        loop {
                            tokio::select! {
                                () = tx.closed() => return,
                                // Redis came back: this connection may be dead without a word.
                                _ = returns.changed() => break,
                                message = messages.next() => match message {
                                    Some(message) => {
                                        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                                        if tx.try_send(payload).is_err() && !tx.is_closed() {
                                            tracing::warn!("cluster: a Redis subscription fell behind; a message was dropped");
                                        }
                                    }
                                    None => break,
                                },
                            }
                        }
                    }
                    Err(err) => {
                        tracing::debug!(%err, "cluster: Redis subscription failed; retrying")
                    }
                }
                tokio::time::sleep(RETRY).await;
            }
        });
        Box::pin(tokio_stream_from(rx))
    }

    /// A queue group's share of messages: its stream read by the consumer group `name`, this
    /// node being one consumer; the group is listed (and refreshed) for publishers.
    fn group(&self, filter: &Filter, name: &str) -> Inbox {
        let (tx, rx) = mpsc::channel::<Bytes>(SUBSCRIPTION_CAPACITY);
        let key = format!(
            "{}:group:{}.{}",
            self.prefix,
            hex(filter.as_str().as_bytes()),
            hex(name.as_bytes())
        );
        let listing = serde_json::json!({"filter": filter.as_str(), "key": key}).to_string();
        let registry = format!("{}:groups", self.prefix);
        let (client, mut commands, name, node) =
            (self.client.clone(), self.commands.clone(), name.to_string(), self.node.clone());
        tokio::spawn(async move {
            let refresh = async {
                loop {
                    let score = now_ms();
                    let listed: Result<(), _> = redis::cmd("ZADD")
                        .arg(&registry)
                        .arg(score)
                        .arg(&listing)
                        .query_async(&mut commands)
                        .await;
                    if let Err(err) = listed {
                        tracing::debug!(%err, "cluster: cannot list a group in Redis");
                    }
                    tokio::time::sleep(GROUP_REFRESH).await;
                }
            };
            let read = async {
                while !tx.is_closed() {
                    if let Err(err) = read_group(&client, &key, &name, &node, &tx).await {
                        tracing::debug!(%err, "cluster: Redis group read failed; retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            tokio::select! {
                () = refresh => {}
                () = read => {}
                () = tx.closed() => {}
            }
        });
        Box::pin(tokio_stream_from(rx))
    }
}

/// Makes group entry `id` claimable by every reader at once (its idle time set to the ack
/// wait), for a reader that gives it back.
async fn give_back(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    node: &str,
    id: &str,
) -> redis::RedisResult<()> {
    let idle = GROUP_ACK_WAIT.as_millis() as u64;
    redis::cmd("XCLAIM")
        .arg(key)
        .arg(group)
        .arg(node)
        .arg(0)
        .arg(id)
        .arg("IDLE")
        .arg(idle)
        .arg("JUSTID")
        .query_async::<()>(conn)
        .await
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Pings Redis every half second; `connected` follows.
async fn health(
    mut conn: ConnectionManager,
    connected: Arc<AtomicBool>,
    returned: tokio::sync::watch::Sender<u64>,
) {
    loop {
        let ping = redis::cmd("PING");
        let pinged = ping.query_async::<()>(&mut conn);
        let up = matches!(tokio::time::timeout(Duration::from_secs(1), pinged).await, Ok(Ok(())));
        if connected.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!("cluster engine connected");
                returned.send_modify(|returns| *returns += 1);
            } else {
                tracing::warn!("cluster engine disconnected; reconnecting");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads the groups listed lately, every second, for the writer.
async fn read_groups(
    mut conn: ConnectionManager,
    groups: Arc<RwLock<Vec<(Filter, String)>>>,
    prefix: String,
) {
    let registry = format!("{prefix}:groups");
    loop {
        let since = now_ms().saturating_sub(GROUP_EXPIRY_MS);
        let listed: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGEBYSCORE")
            .arg(&registry)
            .arg(since)
            .arg("+inf")
            .query_async(&mut conn)
            .await;
        if let Ok(listed) = listed {
            let parsed: Vec<(Filter, String)> = listed
                .iter()
                .filter_map(|entry| {
                    let value: serde_json::Value = serde_json::from_str(entry).ok()?;
                    let filter = Filter::parse(value["filter"].as_str()?).ok()?;
                    Some((filter, value["key"].as_str()?.to_string()))
                })
                .collect();
            if let Ok(mut groups) = groups.write() {
                *groups = parsed;
            }
            let _: redis::RedisResult<()> = redis::cmd("ZREMRANGEBYSCORE")
                .arg(&registry)
                .arg("-inf")
                .arg(since)
                .query_async(&mut conn)
                .await;
        }
        tokio::time::sleep(GROUP_REFRESH).await;
    }
}

impl Engine for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn publish(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        let topic = topic.clone();
        Box::pin(self.send(Write::Publish { topic, message }))
    }

    fn flush(&self) -> EngineFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let (reply, flushed) = oneshot::channel();
            self.send(Write::Flush(reply)).await?;
            flushed.await.map_err(|_| EngineError::Failed("the writer has stopped".into()))?
        })
    }

    fn subscribe(&self, interest: &Interest) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        let inbox = match interest {
            Interest::Topics(filter) => {
                let patterns =
                    filter_subjects(&self.prefix, filter).iter().map(|s| glob(s)).collect();
                self.pubsub(patterns, true)
            }
            Interest::Group { filter, name } => self.group(filter, name),
        };
        Box::pin(std::future::ready(Ok(inbox)))
    }

    fn append(
        &self,
        topic: &Topic,
        message: Bytes,
        id: String,
    ) -> EngineFuture<'_, Result<Appended, EngineError>> {
        let topic = topic.clone();
        Box::pin(async move {
            let (reply, offset) = oneshot::channel();
            self.send(Write::Append { topic, message, id, reply }).await?;
            let appended: Appended = Box::pin(async move {
                offset.await.map_err(|_| EngineError::Failed("the writer has stopped".into()))?
            });
            Ok(appended)
        })
    }

    fn history(&self, from: u64) -> EngineFuture<'_, Result<History, EngineError>> {
        let (client, key) = (self.client.clone(), self.history_key());
        Box::pin(async move {
            let mut conn =
                client.get_multiplexed_async_connection().await.map_err(|e| unreachable(&e))?;
            let (tx, rx) = mpsc::channel::<Result<Sequenced, EngineError>>(1024);
            let mut last = if from <= 1 { "0-0".to_string() } else { offset_to_id(from - 1) };
            tokio::spawn(async move {
                while !tx.is_closed() {
                    let reply: redis::RedisResult<Value> = redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(512)
                        .arg("BLOCK")
                        .arg(1000)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(&last)
                        .query_async(&mut conn)
                        .await;
                    let entries = match reply {
                        Ok(reply) => stream_entries(reply),
                        Err(err) => {
                            let _ = tx.send(Err(unreachable(&err))).await;
                            return;
                        }
                    };
                    for (id, fields) in entries {
                        let Some((offset, bytes)) = message_of(&id, &fields) else { continue };
                        last = id;
                        let sequenced = Sequenced { offset, stored_ms: offset >> 20, bytes };
                        if tx.send(Ok(sequenced)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            let history: History = Box::pin(tokio_stream_from(rx));
            Ok(history)
        })
    }

    fn group_history(
        &self,
        filter: &Filter,
        name: &str,
    ) -> EngineFuture<'_, Result<GroupHistory, EngineError>> {
        let group = super::group_id(filter.as_str(), name);
        let (client, commands, key, node) =
            (self.client.clone(), self.commands.clone(), self.history_key(), self.node.clone());
        Box::pin(async move {
            let mut conn =
                client.get_multiplexed_async_connection().await.map_err(|e| unreachable(&e))?;
            create_group(&mut conn, &key, &group).await.map_err(|e| unreachable(&e))?;
            let (tx, rx) = mpsc::channel::<Result<GroupDelivery, EngineError>>(1024);
            tokio::spawn(async move {
                let idle = GROUP_ACK_WAIT.as_millis() as u64;
                let mut claimed_at = tokio::time::Instant::now() - Duration::from_secs(60);
                while !tx.is_closed() {
                    let mut entries = Vec::new();
                    if claimed_at.elapsed() >= Duration::from_secs(5) {
                        // What a node took and never settled (it died): taken over here.
                        claimed_at = tokio::time::Instant::now();
                        let claimed: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
                            .arg(&key)
                            .arg(&group)
                            .arg(&node)
                            .arg(idle)
                            .arg("0-0")
                            .arg("COUNT")
                            .arg(256)
                            .query_async(&mut conn)
                            .await;
                        if let Ok(Value::Array(mut parts)) = claimed
                            && parts.len() >= 2
                        {
                            let list = parts.swap_remove(1);
                            entries.extend(stream_entries(Value::Array(vec![Value::Array(vec![
                                Value::Nil,
                                list,
                            ])])));
                        }
                    }
                    let read: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(&group)
                        .arg(&node)
                        .arg("COUNT")
                        .arg(256)
                        .arg("BLOCK")
                        .arg(1000)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(">")
                        .query_async(&mut conn)
                        .await;
                    match read {
                        Ok(reply) => entries.extend(stream_entries(reply)),
                        Err(err) => {
                            let _ = tx.send(Err(unreachable(&err))).await;
                            return;
                        }
                    }
                    for (id, fields) in entries {
                        let Some((offset, bytes)) = message_of(&id, &fields) else { continue };
                        let (mut commands, key, group, node) =
                            (commands.clone(), key.clone(), group.clone(), node.clone());
                        // Given back, it is marked idle for the ack wait at once, so the next
                        // claim by any reader (every 5 s) takes it.
                        let settle: Settle = Box::new(move |done| {
                            Box::pin(async move {
                                let settled: redis::RedisResult<()> = if done {
                                    redis::cmd("XACK")
                                        .arg(&key)
                                        .arg(&group)
                                        .arg(&id)
                                        .query_async(&mut commands)
                                        .await
                                } else {
                                    give_back(&mut commands, &key, &group, &node, &id).await
                                };
                                if let Err(err) = settled {
                                    tracing::debug!(%err, "cluster: a group message could not be settled");
                                }
                            })
                        });
                        let sequenced = Sequenced { offset, stored_ms: offset >> 20, bytes };
                        if let Err(unsent) = tx.send(Ok(GroupDelivery { sequenced, settle })).await
                        {
                            // The reader went away with this one in hand: give it back.
                            if let Ok(delivery) = unsent.0 {
                                (delivery.settle)(false).await;
                            }
                        }
                    }
                }
            });
            let deliveries: GroupHistory = Box::pin(tokio_stream_from(rx));
            Ok(deliveries)
        })
    }

    fn history_end(&self) -> EngineFuture<'_, Result<u64, EngineError>> {
        let (mut conn, key) = (self.commands.clone(), self.history_key());
        Box::pin(async move {
            let reply: Value = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(|e| unreachable(&e))?;
            let Value::Array(entries) = reply else { return Ok(0) };
            let last = entries.first().and_then(|entry| match entry {
                Value::Array(parts) => parts.first().and_then(text),
                _ => None,
            });
            Ok(last.as_deref().and_then(id_to_offset).unwrap_or(0))
        })
    }

    fn server(&self) -> Option<String> {
        self.connected().then(|| self.addr.clone())
    }

    fn announce(&self, entry: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        let (mut conn, channel) =
            (self.commands.clone(), format!("_WHISPEER.{}.nodes", self.prefix));
        Box::pin(async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(entry.as_ref())
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| unreachable(&e))
        })
    }

    fn membership(&self) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        let inbox = self.pubsub(vec![format!("_WHISPEER.{}.nodes", self.prefix)], false);
        Box::pin(std::future::ready(Ok(inbox)))
    }

    fn retain(&self, topic: &Topic, message: Bytes) -> EngineFuture<'_, Result<(), EngineError>> {
        let (mut conn, topic) = (self.commands.clone(), topic.clone());
        Box::pin(async move { retained::retain(&mut conn, &self.prefix, &topic, &message).await })
    }

    fn retained(&self) -> EngineFuture<'_, Result<Inbox, EngineError>> {
        let (client, conn) = (self.client.clone(), self.commands.clone());
        let inbox = retained::watch(client, conn, self.prefix.clone(), self.returns.clone());
        Box::pin(std::future::ready(Ok(inbox)))
    }
}

#[cfg(test)]
mod tests;
