//! The fan-in workload of `whispeer bench`: [`PUBLISHERS`] publishers, each on its own
//! connection, to one subscriber on one subject, as a fleet of devices reports to one
//! collector. Paced like the other throughput workloads: the publishers together stay at most
//! the window ahead of what the subscriber received (each reserves its next batch of the
//! window, `cadence`, before sending it). A message lost stalls the run; the system gets no
//! figure.
//! The byte-copying forwarder has none (it copies reads whole, so two publishers' frames would
//! interleave), nor has a cluster (whose nodes the other workloads probe first).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::Notify;

use super::STALL;
use super::target::Target;

/// Publishers sending to the one subscriber.
pub(super) const PUBLISHERS: usize = 8;

/// Whether `target` runs the fan-in workload.
pub(super) fn has_fan_in(target: &Target) -> bool {
    !matches!(target, Target::Forwarder { .. } | Target::Cluster { .. })
}

/// How far the subscriber got, and a wake-up for the publishers as it moves.
struct Progress {
    received: AtomicU64,
    /// Messages the publishers reserved of the window so far.
    reserved: AtomicU64,
    moved: Notify,
}

impl Progress {
    /// Waits until the subscriber is at most `window` behind `upto`, or fails after a stall.
    async fn room_for(&self, upto: u64, window: u64) -> anyhow::Result<()> {
        let goal = upto.saturating_sub(window);
        super::reached(&self.received, &self.moved, goal).await.map_err(|at| {
            anyhow::anyhow!(
                "no progress for {STALL:?}: the subscriber has {at} of the {upto} messages sent: \
                 messages lost"
            )
        })
    }
}

/// Messages per second from [`PUBLISHERS`] publishers, `messages` in all, to one subscriber.
pub(super) async fn throughput(
    target: &Target,
    messages: u64,
    size: usize,
    window: u64,
) -> anyhow::Result<f64> {
    let subject = target.subject(&format!("in{PUBLISHERS}x{size}"));
    let progress = Arc::new(Progress {
        received: AtomicU64::new(0),
        reserved: AtomicU64::new(0),
        moved: Notify::new(),
    });
    let every = super::cadence(window);
    let conn = target.connect(0).await?;
    let subscribed = tokio::time::timeout(STALL, conn.subscribe(&subject)).await;
    let mut sub = subscribed.context("subscribing took too long")??;
    let reader = tokio::spawn({
        let progress = Arc::clone(&progress);
        async move {
            let _conn = conn;
            let mut n = 0;
            while n < messages {
                anyhow::ensure!(sub.next().await.is_some(), "subscription ended after {n}");
                n += 1;
                progress.received.store(n, Ordering::Release);
                if n % every == 0 || n == messages {
                    progress.moved.notify_waiters();
                }
            }
            anyhow::Ok(())
        }
    });
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        publishers.push(target.connect(p + 1).await?);
    }
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut sending = tokio::task::JoinSet::new();
    for (p, publisher) in publishers.into_iter().enumerate() {
        let (progress, subject, payload) =
            (Arc::clone(&progress), subject.clone(), payload.clone());
        let mine =
            messages / PUBLISHERS as u64 + u64::from((p as u64) < messages % PUBLISHERS as u64);
        sending.spawn(async move {
            let mut sent = 0;
            while sent < mine {
                let batch = (mine - sent).min(every);
                let upto = progress.reserved.fetch_add(batch, Ordering::AcqRel) + batch;
                progress.room_for(upto, window).await?;
                for _ in 0..batch {
                    publisher.publish(&subject, payload.clone()).await?;
                }
                sent += batch;
            }
            publisher.flush().await?;
            // Kept open until the subscriber has every message.
            anyhow::Ok(publisher)
        });
    }
    let mut open = Vec::new();
    let mut failed = None;
    while let Some(done) = sending.join_next().await {
        match done.map_err(anyhow::Error::from).and_then(|sent| sent) {
            Ok(publisher) => open.push(publisher),
            Err(err) => {
                failed.get_or_insert(err);
                sending.abort_all();
            }
        }
    }
    let received = match failed {
        Some(err) => Err(err),
        None => progress.room_for(messages, 0).await,
    };
    let seconds = start.elapsed().as_secs_f64();
    reader.abort();
    received?;
    drop(open);
    Ok(messages as f64 / seconds)
}
