//! Retained messages on Redis: the hash `<prefix>:retained` (topic → the last retained
//! envelope) and, in the same transaction, a PUBLISH on `_WHISPEER.<prefix>.retained`, so the
//! hash and the channel agree on the order. A node reads by subscribing to the channel first
//! and then reading the whole hash: what it read is at least as new as anything announced
//! before, and what is announced after comes through the channel in order. After Redis comes
//! back, it reads the hash again.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::Client;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, watch};
use whispeer_core::proto::Topic;

use super::{EngineError, Inbox, RETRY, SUBSCRIPTION_CAPACITY, tokio_stream_from, unreachable};

fn key(prefix: &str) -> String {
    format!("{prefix}:retained")
}

fn channel(prefix: &str) -> String {
    format!("_WHISPEER.{prefix}.retained")
}

/// Keeps `message` as `topic`'s retained message and announces it, in one transaction.
pub(super) async fn retain(
    conn: &mut ConnectionManager,
    prefix: &str,
    topic: &Topic,
    message: &Bytes,
) -> Result<(), EngineError> {
    redis::pipe()
        .atomic()
        .hset(key(prefix), topic.as_str(), message.as_ref())
        .ignore()
        .publish(channel(prefix), message.as_ref())
        .ignore()
        .query_async::<()>(conn)
        .await
        .map_err(|e| unreachable(&e))
}

/// Every topic's retained message, then each one kept afterwards; again after a reconnection.
pub(super) fn watch(
    client: Client,
    mut commands: ConnectionManager,
    prefix: String,
    mut returns: watch::Receiver<u64>,
) -> Inbox {
    let (tx, rx) = mpsc::channel::<Bytes>(SUBSCRIPTION_CAPACITY);
    tokio::spawn(async move {
        while !tx.is_closed() {
            returns.borrow_and_update();
            let ready = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel(&prefix)).await?;
                let all: HashMap<String, Vec<u8>> =
                    redis::cmd("HGETALL").arg(key(&prefix)).query_async(&mut commands).await?;
                Ok::<_, redis::RedisError>((pubsub, all))
            };
            match ready.await {
                Ok((pubsub, all)) => {
                    for value in all.into_values() {
                        if tx.send(Bytes::from(value)).await.is_err() {
                            return;
                        }
                    }
                    // Every topic's was handed: the empty marker.
                    if tx.send(Bytes::new()).await.is_err() {
                        return;
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            () = tx.closed() => return,
                            _ = returns.changed() => break,
                            message = messages.next() => match message {
                                Some(message) => {
                                    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                                    if tx.send(payload).await.is_err() {
                                        return;
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                }
                Err(err) => tracing::debug!(%err, "cluster: reading retained messages; retrying"),
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    Box::pin(tokio_stream_from(rx))
}
