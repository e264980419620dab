//! The two tasks of a node's link to its engine: `send` (the outbound queue to the engine,
//! flushing for QoS 1 confirmations) and `follow_interests` (engine subscriptions following
//! what local subscribers need, one reader task per subscription).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use whispeer_core::{Broker, Interest};

use super::relay::{Outgoing, Relay};
use super::{ENGINE_TIMEOUT, Engine, PUBLISH_SECONDS, seconds, topics_filter};

/// Messages taken from the outbound queue at once.
const SEND_BATCH: usize = 256;
/// Wait before retrying a subscription the engine refused.
const RETRY: Duration = Duration::from_secs(1);

/// Publishes the outbound queue to the engine, in order; flushes while QoS 1 publishers wait,
/// and settles their tickets.
pub(super) async fn send(
    engine: Arc<dyn Engine>,
    relay: Arc<Relay>,
    mut outbound: mpsc::Receiver<Outgoing>,
) {
    let mut batch = Vec::with_capacity(SEND_BATCH);
    let (mut sent, mut settled) = (0u64, 0u64);
    loop {
        tokio::select! {
            taken = outbound.recv_many(&mut batch, SEND_BATCH) => {
                if taken == 0 {
                    break;
                }
                let last = batch.last().map_or(sent, |out| out.ticket);
                if !publish(&*engine, &relay, &mut batch).await {
                    // Unflushed earlier tickets may be lost with the connection too.
                    relay.settle(last, Some(settled + 1));
                    settled = last;
                }
                sent = last;
            }
            () = relay.flush_wanted.notified() => {}
        }
        if relay.waiting.load(Ordering::Acquire) > 0 && settled < sent {
            let flushed = tokio::time::timeout(ENGINE_TIMEOUT, engine.flush()).await;
            let ok = matches!(flushed, Ok(Ok(())));
            relay.settle(sent, (!ok).then_some(settled + 1));
            settled = sent;
        }
    }
}

/// Publishes one batch; `false` (and the batch counted lost) when the engine did not take it.
async fn publish(engine: &dyn Engine, relay: &Relay, batch: &mut Vec<Outgoing>) -> bool {
    let count = batch.len() as u64;
    if !engine.connected() {
        batch.clear();
        relay.counters.lost_unreachable.fetch_add(count, Ordering::Relaxed);
        return false;
    }
    let started = Instant::now();
    let published = tokio::time::timeout(ENGINE_TIMEOUT, async {
        for out in batch.drain(..) {
            engine.publish(&out.topic, out.bytes).await?;
        }
        Ok::<(), super::EngineError>(())
    })
    .await;
    batch.clear();
    metrics::histogram!(PUBLISH_SECONDS).record(seconds(started));
    match published {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            tracing::warn!(%err, "cluster: publishing to the engine failed");
            relay.counters.lost_unreachable.fetch_add(count, Ordering::Relaxed);
            false
        }
        Err(_) => {
            tracing::warn!("cluster: the engine took too long; messages may not have reached it");
            relay.counters.lost_unreachable.fetch_add(count, Ordering::Relaxed);
            false
        }
    }
}

/// A reader task, stopped when dropped (which ends its engine subscription).
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the engine's subscriptions equal to what local subscribers need.
pub(super) async fn follow_interests(engine: Arc<dyn Engine>, relay: Arc<Relay>, broker: Broker) {
    let limits = broker.options().limits.clone();
    let mut active: HashMap<Interest, Reader> = HashMap::new();
    loop {
        let wanted = relay.wanted();
        active.retain(|interest, _| wanted.contains(interest));
        let mut failed = false;
        for interest in wanted {
            if active.contains_key(&interest) {
                continue;
            }
            match engine.subscribe(&interest).await {
                Ok(mut inbox) => {
                    let (relay, broker, limits) =
                        (Arc::clone(&relay), broker.clone(), limits.clone());
                    let key = interest.clone();
                    let task = tokio::spawn(async move {
                        while let Some(bytes) = inbox.next().await {
                            relay.deliver(&broker, &key, bytes, &limits);
                        }
                    });
                    active.insert(interest, Reader(task));
                }
                Err(err) => {
                    tracing::warn!(%err, filter = %interest.filter(), "cluster: engine subscription failed; retrying");
                    failed = true;
                }
            }
        }
        relay.set_active(active.keys().filter_map(topics_filter).collect());
        if failed {
            tokio::select! {
                () = relay.interests_changed.notified() => {}
                () = tokio::time::sleep(RETRY) => {}
            }
        } else {
            relay.interests_changed.notified().await;
        }
    }
}
