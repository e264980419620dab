//! The tasks of a node's link to its engine: `send` (the outbound queue to the engine,
//! flushing for QoS 1 confirmations, with `acknowledge` settling durable topics' tickets in
//! order as the engine stores them), `follow_interests` (engine subscriptions following what
//! local subscribers need, one reader task per subscription) and `follow_history` (every
//! durable topic's message from the engine's history, at its offset).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use whispeer_core::{Broker, Interest};

use super::engine::{Appended, EngineError};
use super::relay::{Kind, OUTBOUND_CAPACITY, Outgoing, Relay};
use super::{ENGINE_TIMEOUT, Engine, PUBLISH_SECONDS, seconds, topics_filter};

/// Messages taken from the outbound queue at once.
const SEND_BATCH: usize = 256;
/// Wait before retrying a subscription the engine refused.
const RETRY: Duration = Duration::from_secs(1);
/// How long the history may stay silent before the node asks the engine how far it reaches.
const SILENCE: Duration = Duration::from_secs(2);

/// A durable ticket and what will say whether the engine stored its message.
type Pending = (u64, Appended);

/// Publishes the outbound queue to the engine, in order; flushes while QoS 1 publishers wait,
/// and settles their tickets. Durable topics' acknowledgements go to `acknowledge`.
pub(super) async fn send(
    engine: Arc<dyn Engine>,
    relay: Arc<Relay>,
    mut outbound: mpsc::Receiver<Outgoing>,
) {
    let (acks, pending) = mpsc::channel(OUTBOUND_CAPACITY);
    let acknowledging = tokio::spawn(acknowledge(Arc::clone(&relay), pending));
    let _stop_acknowledging = Stop(acknowledging);
    let mut batch = Vec::with_capacity(SEND_BATCH);
    let (mut sent, mut settled) = (0u64, 0u64);
    loop {
        tokio::select! {
            taken = outbound.recv_many(&mut batch, SEND_BATCH) => {
                if taken == 0 {
                    break;
                }
                let last = batch.last().map_or(sent, |out| out.ticket);
                if !publish(&*engine, &relay, &mut batch, &acks).await {
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

/// Settles durable tickets in the order they were appended, as the engine acknowledges them.
async fn acknowledge(relay: Arc<Relay>, mut pending: mpsc::Receiver<Pending>) {
    while let Some((ticket, appended)) = pending.recv().await {
        let stored = tokio::time::timeout(ENGINE_TIMEOUT, appended).await;
        if let Ok(Err(err)) = &stored {
            tracing::warn!(%err, "cluster: the engine did not store a durable topic's message");
        }
        relay.settle_durable(ticket, stored.ok().and_then(Result::ok));
    }
}

/// A task aborted when dropped.
struct Stop(JoinHandle<()>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A durable ticket that failed before reaching the engine: settled through the same ordered
/// queue, so it never settles ahead of earlier ones.
fn failed(why: &str) -> Appended {
    let why = super::EngineError::Unreachable(why.to_string());
    Box::pin(std::future::ready(Err(why)))
}

/// Publishes one batch; `false` (and the batch counted lost) when the engine did not take it.
async fn publish(
    engine: &dyn Engine,
    relay: &Relay,
    batch: &mut Vec<Outgoing>,
    acks: &mpsc::Sender<Pending>,
) -> bool {
    let count = batch.len() as u64;
    if !engine.connected() {
        for out in batch.drain(..) {
            if let Kind::Append { ticket, .. } = out.kind {
                let _ = acks.send((ticket, failed("the cluster engine is unreachable"))).await;
            }
        }
        relay.counters.lost_unreachable.fetch_add(count, Ordering::Relaxed);
        return false;
    }
    let started = Instant::now();
    let mut unsettled: Vec<u64> = Vec::new();
    let published = tokio::time::timeout(ENGINE_TIMEOUT, async {
        for out in batch.drain(..) {
            match out.kind {
                Kind::Live => engine.publish(&out.topic, out.bytes).await?,
                Kind::Append { ticket, id } => {
                    unsettled.push(ticket);
                    let appended = engine.append(&out.topic, out.bytes, id).await?;
                    unsettled.pop();
                    let _ = acks.send((ticket, appended)).await;
                }
            }
        }
        Ok::<(), super::EngineError>(())
    })
    .await;
    // What the batch still held, or an append the engine refused, failed.
    for out in batch.drain(..) {
        if let Kind::Append { ticket, .. } = out.kind {
            unsettled.push(ticket);
        }
    }
    for ticket in unsettled {
        let _ = acks.send((ticket, failed("the cluster engine did not take it"))).await;
    }
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

/// Routes every durable topic's message of the engine's history here, at its offset: from the
/// beginning of what the engine keeps when the node starts (so every node's history of a
/// durable topic is the same), then each new one; after an error, from where it stopped.
pub(super) async fn follow_history(engine: Arc<dyn Engine>, relay: Arc<Relay>, broker: Broker) {
    let limits = broker.options().limits.clone();
    let mut next = 1;
    // Loaded once it read as far as the history reached now.
    let mut end = None;
    let mut silence = Silence::default();
    loop {
        if end.is_none() {
            match engine.history_end().await {
                Ok(last) => end = Some(last),
                Err(err) => tracing::warn!(%err, "cluster: cannot read the history; retrying"),
            }
        }
        if end.is_some_and(|end| next > end) {
            relay.history_loaded.store(true, Ordering::Release);
        }
        match engine.history(next).await {
            Ok(mut history) => loop {
                let item = match silence.next(&mut history, next, || engine.history_end()).await {
                    Next::Item(item) => item,
                    Next::Ended => break,
                    Next::Stuck(last) => {
                        tracing::warn!(
                            next,
                            last,
                            "cluster: the history stopped coming; reading it again from where it stopped"
                        );
                        break;
                    }
                };
                match item {
                    Ok(sequenced) => {
                        next = sequenced.offset + 1;
                        relay.deliver_sequenced(&broker, sequenced, &limits);
                        if end.is_some_and(|end| next > end) {
                            relay.history_loaded.store(true, Ordering::Release);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cluster: reading the history failed; resuming");
                        break;
                    }
                }
            },
            Err(err) => tracing::warn!(%err, "cluster: cannot read the history; retrying"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// What waiting for the next item of a history came to.
enum Next<T> {
    Item(T),
    /// The stream ended.
    Ended,
    /// Silent while the engine holds more, up to this end: to be read again.
    Stuck(u64),
}

/// What a history follower remembers of the silences of the engine's history (the durable
/// topics' own, or a queue group's share of it).
#[derive(Debug, Default)]
struct Silence {
    /// The offset awaited when a silence first found the engine holding it.
    suspected: Option<u64>,
    /// The engine's last offset when the history was last read again.
    read_again_at: Option<u64>,
}

impl Silence {
    /// The next item of `stream`, `next` being the offset awaited. After each `SILENCE` without
    /// one — nothing new, or an engine consumer that stopped delivering (JetStream's can after
    /// a change of leader) while the history goes on — `end` gives the offset the engine's end
    /// is at now, and [`Silence::stuck`] decides.
    async fn next<S, F>(&mut self, stream: &mut S, next: u64, end: impl Fn() -> F) -> Next<S::Item>
    where
        S: Stream + Unpin,
        F: Future<Output = Result<u64, EngineError>>,
    {
        loop {
            match tokio::time::timeout(SILENCE, stream.next()).await {
                Ok(Some(item)) => return Next::Item(item),
                Ok(None) => return Next::Ended,
                Err(_) => {
                    if let Ok(last) = end().await
                        && self.stuck(next, last)
                    {
                        return Next::Stuck(last);
                    }
                }
            }
        }
    }

    /// After a silence, with `next` awaited and `last` the engine's last offset: whether the
    /// history is stuck and is to be read again. It is when the engine holds messages from
    /// `next` on (`last` reaches it) on two looks in a row with nothing delivered between
    /// (a message on its way at the first look is not a stall), and it was not read again at
    /// this same end already (messages that aged out of the engine never come, and reading
    /// again at every silence would not bring them).
    fn stuck(&mut self, next: u64, last: u64) -> bool {
        if last < next || self.read_again_at == Some(last) {
            return false;
        }
        if self.suspected != Some(next) {
            self.suspected = Some(next);
            return false;
        }
        (self.suspected, self.read_again_at) = (None, Some(last));
        true
    }
}

/// A reader task, stopped when dropped (which ends its engine subscription); a group's also
/// gives back to the engine what its group had not settled.
struct Reader {
    task: JoinHandle<()>,
    group: Option<(Arc<Relay>, whispeer_core::Filter, Box<str>)>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((relay, filter, name)) = &self.group {
            relay.release_group(filter, name);
        }
    }
}

/// Hands a queue group its share of the durable topics' messages from the engine's group
/// consumer (which keeps the group's position), starting it again after an error, and when it
/// stays silent for two checks while the engine says more wait for the group (the rules of
/// [`Silence`]).
async fn follow_group_history(
    engine: Arc<dyn Engine>,
    relay: Arc<Relay>,
    broker: Broker,
    filter: whispeer_core::Filter,
    name: Box<str>,
) {
    let limits = broker.options().limits.clone();
    // What this node was handed, counted: the offsets the silence rules see (the engine's
    // pending count is how far the group's end is past them).
    let mut handed = 0;
    let mut silence = Silence::default();
    loop {
        match engine.group_history(&filter, &name).await {
            Ok(mut deliveries) => loop {
                // The group's end, counted as `handed` is: what this node had and what waits.
                let end =
                    || async { engine.group_pending(&filter, &name).await.map(|p| handed + p) };
                let delivery = match silence.next(&mut deliveries, handed + 1, end).await {
                    Next::Item(delivery) => delivery,
                    Next::Ended => break,
                    // The position is the engine's: reading again loses nothing, and what is out
                    // unsettled comes back after the ack wait.
                    Next::Stuck(last) => {
                        let pending = last - handed;
                        tracing::warn!(%filter, pending, "cluster: a group's history stopped coming; reading it again");
                        break;
                    }
                };
                match delivery {
                    Ok(delivery) => {
                        handed += 1;
                        relay.deliver_to_group(&broker, &filter, &name, delivery, &limits);
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cluster: a group's history read failed; resuming");
                        break;
                    }
                }
            },
            Err(err) => {
                tracing::warn!(%err, %filter, "cluster: cannot read a group's history; retrying")
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Keeps the engine's subscriptions equal to what local subscribers need.
pub(super) async fn follow_interests(engine: Arc<dyn Engine>, relay: Arc<Relay>, broker: Broker) {
    let limits = broker.options().limits.clone();
    let durable: Vec<whispeer_core::Filter> =
        broker.options().durability.as_ref().map(|d| d.topics.clone()).unwrap_or_default();
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
                    // A group whose filter reaches durable topics also reads the engine's
                    // group consumer for them.
                    let group = match &interest {
                        Interest::Group { filter, name }
                            if durable.iter().any(|d| d.overlaps(filter)) =>
                        {
                            Some((filter.clone(), name.clone()))
                        }
                        _ => None,
                    };
                    let history = group.clone().map(|(filter, name)| {
                        let (engine, relay, broker) =
                            (Arc::clone(&engine), Arc::clone(&relay), broker.clone());
                        follow_group_history(engine, relay, broker, filter, name)
                    });
                    let live_relay = Arc::clone(&relay);
                    let task = tokio::spawn(async move {
                        let live = async {
                            while let Some(bytes) = inbox.next().await {
                                live_relay.deliver(&broker, &key, bytes, &limits);
                            }
                        };
                        match history {
                            Some(history) => {
                                tokio::join!(live, history);
                            }
                            None => live.await,
                        }
                    });
                    let group = group.map(|(filter, name)| (Arc::clone(&relay), filter, name));
                    active.insert(interest, Reader { task, group });
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

#[cfg(test)]
mod tests {
    use futures_util::stream;

    use super::{EngineError, Next, SILENCE, Silence};

    #[tokio::test(start_paused = true)]
    async fn a_history_silent_while_the_engine_holds_more_is_stuck_after_two_silences() {
        let end = |last: u64| move || async move { Ok::<_, EngineError>(last) };
        let mut silence = Silence::default();
        let started = tokio::time::Instant::now();
        let silent = silence.next(&mut stream::pending::<u32>(), 5, end(5)).await;
        assert!(matches!(silent, Next::Stuck(5)));
        assert_eq!(started.elapsed(), SILENCE * 2, "two silences, not one");
        // Nothing held past what came: it keeps waiting.
        let mut silence = Silence::default();
        let mut quiet = stream::pending::<u32>();
        let waiting = silence.next(&mut quiet, 6, end(5));
        assert!(tokio::time::timeout(SILENCE * 10, waiting).await.is_err());
        assert!(matches!(silence.next(&mut stream::iter([7]), 1, end(9)).await, Next::Item(7)));
        assert!(matches!(silence.next(&mut stream::empty::<u32>(), 1, end(9)).await, Next::Ended));
    }

    #[test]
    fn a_silent_history_is_read_again_only_when_the_engine_holds_more_on_two_looks() {
        let mut silence = Silence::default();
        assert!(!silence.stuck(11, 10), "everything up to the end came: not stuck");
        assert!(!silence.stuck(11, 10));
        assert!(!silence.stuck(11, 11), "offset 11 is held: suspected at the first look");
        assert!(!silence.stuck(12, 12), "11 came between the looks: suspected afresh");
        assert!(silence.stuck(12, 12), "12 still missing one silence later: read again");
        assert!(!silence.stuck(12, 12), "read again at this end already: not again");
        assert!(!silence.stuck(12, 12));
        assert!(!silence.stuck(12, 13), "more appended since: suspected again");
        assert!(silence.stuck(12, 13));
    }
}
