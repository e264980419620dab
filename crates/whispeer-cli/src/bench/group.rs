//! The work-queue workload of `whispeer bench`: one publisher and a queue group of
//! [`MEMBERS`] members, each on its own connection, sharing the messages (each message to one
//! member), as a pool of workers takes jobs. Paced like the other throughput workloads: the
//! publisher stays at most the window ahead of what the members together received. A message
//! lost stalls the run and one delivered twice fails it; either way the system gets no figure.
//! Only the systems with queue groups run it: whispeer and NATS (through async-nats and its
//! raw protocol, `SUB <subject> <group> <sid>`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use super::STALL;
use super::target::Target;

/// Members of the group.
pub(super) const MEMBERS: usize = 8;

/// Whether `target` has queue groups to measure.
pub(super) fn has_groups(target: &Target) -> bool {
    match target {
        Target::Whispeer { .. } | Target::NatsRaw { .. } => true,
        #[cfg(feature = "nats")]
        Target::Nats { .. } => true,
        _ => false,
    }
}

/// Messages per second through a queue group of [`MEMBERS`], and the smallest member's share
/// of them against an even share (1.0: every member took as many).
pub(super) async fn throughput(
    target: &Target,
    messages: u64,
    size: usize,
    window: u64,
) -> anyhow::Result<(f64, f64)> {
    let subject = target.subject(&format!("g{MEMBERS}x{size}"));
    let taken: Arc<Vec<AtomicU64>> = Arc::new((0..MEMBERS).map(|_| AtomicU64::new(0)).collect());
    let total = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(tokio::sync::Notify::new());
    let every = super::cadence(window);
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let conn = target.connect(i + 1).await?;
        let joined = tokio::time::timeout(STALL, conn.subscribe_group(&subject, "workers")).await;
        let mut sub = joined.map_err(|_| anyhow::anyhow!("joining the group took too long"))??;
        let (taken, total, moved) = (Arc::clone(&taken), Arc::clone(&total), Arc::clone(&moved));
        members.push(tokio::spawn(async move {
            let _conn = conn;
            // Ends when aborted, once the group received every message.
            while sub.next().await.is_some() {
                taken[i].fetch_add(1, Ordering::Relaxed);
                let all = total.fetch_add(1, Ordering::AcqRel) + 1;
                if all % every == 0 || all >= messages {
                    moved.notify_waiters();
                }
            }
        }));
    }
    let stop = || members.iter().for_each(tokio::task::JoinHandle::abort);
    let publisher = target.connect(0).await?;
    let payload = Bytes::from(vec![b'x'; size]);
    let received = || total.load(Ordering::Acquire);
    // Waits until the group received `goal` (the publisher's next bound), or fails after a
    // stall: a message lost.
    let wait_for = |goal: u64| {
        let (total, moved) = (&total, &moved);
        async move {
            super::reached(total, moved, goal).await.map_err(|at| {
                anyhow::anyhow!(
                    "no progress for {STALL:?}: the group has {at} of the messages: messages lost"
                )
            })
        }
    };
    let start = Instant::now();
    for sent in 0..messages {
        if sent % every == 0
            && let Err(err) = wait_for((sent + every).saturating_sub(window)).await
        {
            stop();
            return Err(err);
        }
        publisher.publish(&subject, payload.clone()).await?;
    }
    publisher.flush().await?;
    let done = wait_for(messages).await;
    let seconds = start.elapsed().as_secs_f64();
    stop();
    done?;
    anyhow::ensure!(received() == messages, "{} deliveries of {messages} messages", received());
    let least = taken.iter().map(|t| t.load(Ordering::Relaxed)).min().unwrap_or(0);
    let even = messages as f64 / MEMBERS as f64;
    Ok((messages as f64 / seconds, least as f64 / even))
}
