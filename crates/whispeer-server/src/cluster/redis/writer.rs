//! The node's one writer to Redis: publishes (with each matching group's copy), appends to the
//! history and flushes, sent in order, as one pipeline per batch.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use whispeer_core::proto::{Filter, Topic};

use super::streams::{id_to_offset, text};
use super::{GROUP_STREAM_MAX, PIPELINE, unreachable};
use crate::cluster::engine::EngineError;
use crate::cluster::subject::topic_subject;

/// Appends a durable topic's message unless its id was appended within two minutes; returns
/// the entry's id (the first one's, for a repeat).
const APPEND: &str = r"
local seen = redis.call('GET', KEYS[2])
if seen then return seen end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 't', ARGV[1], 'm', ARGV[2])
redis.call('SET', KEYS[2], id, 'PX', 120000)
return id
";

/// Work for the writer task.
pub(super) enum Write {
    Publish {
        topic: Topic,
        message: Bytes,
    },
    Append {
        topic: Topic,
        message: Bytes,
        id: String,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    Flush(oneshot::Sender<Result<(), EngineError>>),
}

/// Sends what waits as one pipeline at a time, in order: publishes (and each matching group's
/// copy), appends (answered with their offsets), and flushes (answered once everything before
/// them was sent).
pub(super) async fn write(
    mut conn: ConnectionManager,
    mut work: mpsc::Receiver<Write>,
    groups: Arc<RwLock<Vec<(Filter, String)>>>,
    prefix: String,
    history: String,
    history_messages: u64,
) {
    let mut batch = Vec::with_capacity(PIPELINE);
    while work.recv_many(&mut batch, PIPELINE).await > 0 {
        let groups = groups.read().map(|g| g.clone()).unwrap_or_default();
        let mut pipe = redis::pipe();
        let mut commands = 0;
        let mut appends = Vec::new();
        let mut flushes = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Publish { topic, message } => {
                    pipe.cmd("PUBLISH")
                        .arg(topic_subject(&prefix, &topic))
                        .arg(message.as_ref())
                        .ignore();
                    commands += 1;
                    for (_, key) in groups.iter().filter(|(f, _)| f.matches(&topic)) {
                        pipe.cmd("XADD")
                            .arg(key)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(GROUP_STREAM_MAX)
                            .arg("*")
                            .arg("m")
                            .arg(message.as_ref())
                            .ignore();
                        commands += 1;
                    }
                }
                Write::Append { topic, message, id, reply } => {
                    pipe.cmd("EVAL")
                        .arg(APPEND)
                        .arg(2)
                        .arg(&history)
                        .arg(format!("{prefix}:dedup:{id}"))
                        .arg(topic.as_str())
                        .arg(message.as_ref())
                        .arg(history_messages);
                    commands += 1;
                    appends.push(reply);
                }
                Write::Flush(reply) => flushes.push(reply),
            }
        }
        let sent: redis::RedisResult<Vec<Value>> =
            if commands == 0 { Ok(Vec::new()) } else { pipe.query_async(&mut conn).await };
        match sent {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                for reply in appends {
                    let id = replies.next().as_ref().and_then(text);
                    let offset = id.as_deref().and_then(id_to_offset);
                    let _ =
                        reply.send(offset.ok_or_else(|| {
                            EngineError::Failed("the append got no entry id".into())
                        }));
                }
                for flush in flushes {
                    let _ = flush.send(Ok(()));
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cluster: Redis did not take a pipeline");
                for reply in appends {
                    let _ = reply.send(Err(unreachable(&err)));
                }
                for flush in flushes {
                    let _ = flush.send(Err(unreachable(&err)));
                }
            }
        }
    }
}
