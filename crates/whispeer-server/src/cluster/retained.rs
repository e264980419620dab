//! Retained messages shared by a cluster's nodes: each node hands the engine every retained
//! message it keeps (the engine keeps the last of each topic, durably: a JetStream stream with
//! one message per subject, or a Redis hash), and keeps what the engine hands every node —
//! all topics' when it starts or reconnects, then each new one, its own included — so a
//! subscriber on any node gets the topic's last retained message, whichever node took it, and a
//! node that starts later gets them all. Two nodes keeping one topic at once end with the one
//! the engine kept last, on every node.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use whispeer_core::proto::{Envelope, Limits};

use super::engine::Engine;
use crate::{Retained, ServerConfig};

/// Topics under this prefix are the server's own state that the engine keeps like retained
/// messages (chat's groups, members, cursors, …): never handed to subscribers. Reserved (`$`):
/// the broker refuses a client's publish there, so no client can write that state.
pub(crate) const STATE_PREFIX: &str = "$state/";

/// Retained messages waiting for the engine before more are refused (and logged).
const QUEUE: usize = 4096;
/// The longest wait between two tries while the engine fails (it doubles up to this).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn longer(wait: Duration) -> Duration {
    (wait * 2).min(MAX_BACKOFF)
}

/// What a node shares: its retained messages and their bounds.
#[derive(Debug)]
pub(super) struct Shared {
    retained: Arc<Retained>,
    max_topics: usize,
    max_bytes: usize,
}

impl Shared {
    pub(super) fn of(server: &ServerConfig) -> Self {
        let retained = Arc::clone(&server.retained);
        Self { retained, max_topics: server.max_retained, max_bytes: server.max_retained_bytes }
    }
}

/// Shares `shared`'s retained messages through `engine` until the node stops.
pub(super) async fn share(engine: Arc<dyn Engine>, shared: Shared, limits: Limits) {
    let (tx, mut kept) = mpsc::channel::<Envelope>(QUEUE);
    shared.retained.forward_to(move |envelope| {
        if tx.try_send(envelope.clone()).is_err() {
            tracing::warn!(topic = %envelope.topic, "cluster: a retained message was not shared: the queue to the engine is full");
        }
    });
    let send = async {
        while let Some(envelope) = kept.recv().await {
            let mut bytes = BytesMut::new();
            if let Err(err) = envelope.encode(&mut bytes) {
                tracing::warn!(%err, "cluster: retained message not encoded");
                continue;
            }
            let bytes = bytes.freeze();
            // The node took it: keep trying until the engine has it too.
            let mut wait = Duration::from_millis(250);
            while let Err(err) = engine.retain(&envelope.topic, bytes.clone()).await {
                tracing::warn!(%err, topic = %envelope.topic, "cluster: retained message not shared yet; retrying");
                tokio::time::sleep(wait).await;
                wait = longer(wait);
            }
        }
    };
    let receive = async {
        let mut wait = Duration::from_secs(1);
        loop {
            match engine.retained().await {
                Ok(mut inbox) => {
                    wait = Duration::from_secs(1);
                    while let Some(bytes) = inbox.next().await {
                        // The caught-up marker, and the server's own state (chat's), are not
                        // retained messages for subscribers.
                        if bytes.is_empty() {
                            continue;
                        }
                        let envelope = match Envelope::decode(bytes, &limits) {
                            Ok(envelope) => envelope,
                            Err(err) => {
                                tracing::warn!(%err, "cluster: a retained message did not decode");
                                continue;
                            }
                        };
                        if envelope.topic.as_str().starts_with(STATE_PREFIX) {
                            continue;
                        }
                        let (max, max_bytes) = (shared.max_topics, shared.max_bytes);
                        if let Err(err) = shared.retained.keep_shared(&envelope, max, max_bytes) {
                            tracing::warn!(%err, topic = %envelope.topic, "cluster: a shared retained message not kept");
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, ?wait, "cluster: retained messages unreadable; retrying");
                    wait = longer(wait);
                }
            }
            tokio::time::sleep(wait).await;
        }
    };
    tokio::join!(send, receive);
}
