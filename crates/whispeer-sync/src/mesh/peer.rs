//! One mesh connection: `Hello` both ways, then the catch-up (what the peer's cursors say it
//! missed, from this node's log), then live: this node's own new messages out as they are
//! published, the peer's messages in — each taken once (past the cursor of its publisher) and
//! routed to this broker's subscribers.

use std::collections::HashMap;
use std::sync::Arc;

use whispeer_core::proto::Filter;

use super::Mesh;
use super::log::Entry;
use super::wire::MeshMessage;
use crate::events::SyncEvent;
use crate::transport::Connection;

/// Serves one connection until it ends or the mesh stops.
pub(super) async fn serve(mesh: Arc<Mesh>, mut conn: Box<dyn Connection>) {
    let who = conn.peer_id().to_string();
    match run(&mesh, conn.as_mut()).await {
        Ok(Some(node)) => {
            tracing::debug!(%node, "mesh peer left");
            let _ = mesh.events.publish(SyncEvent::PeerDisconnected { peer_id: node });
        }
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(peer = %who, %err, "mesh connection ended");
            let message = format!("mesh connection to {who} ended: {err}");
            let _ = mesh.events.publish(SyncEvent::Error { message });
        }
    }
    let _ = conn.close().await;
}

fn matches_any(filters: &[Filter], entry: &Entry) -> bool {
    filters.iter().any(|f| f.matches(&entry.envelope.topic))
}

async fn send(conn: &mut dyn Connection, entry: Entry) -> anyhow::Result<()> {
    let message = MeshMessage::Message {
        origin: entry.origin.to_string(),
        seq: entry.seq,
        envelope: entry.envelope,
    };
    conn.send(&message.encode()?).await
}

/// The connection's life; the peer's node id once it said hello (`None`: it was this node).
async fn run(mesh: &Arc<Mesh>, conn: &mut dyn Connection) -> anyhow::Result<Option<String>> {
    let hello = MeshMessage::Hello {
        node: mesh.node.to_string(),
        filters: mesh.shares.iter().map(ToString::to_string).collect(),
        cursors: mesh.log().cursors(),
    };
    conn.send(&hello.encode()?).await?;
    let first = tokio::time::timeout(mesh.timeout, conn.receive())
        .await
        .map_err(|_| anyhow::anyhow!("no hello within {} ms", mesh.timeout.as_millis()))??
        .ok_or_else(|| anyhow::anyhow!("the peer left before its hello"))?;
    let MeshMessage::Hello { node, filters, cursors } = MeshMessage::decode(&first, &mesh.limits)?
    else {
        anyhow::bail!("the peer's first message was not a hello");
    };
    if node == *mesh.node {
        return Ok(None);
    }
    let theirs: Vec<Filter> = filters.iter().filter_map(|f| Filter::parse(f).ok()).collect();
    let cursors: HashMap<String, u64> = cursors.into_iter().collect();
    let _ = mesh.events.publish(SyncEvent::PeerConnected { peer_id: node.clone() });
    tracing::debug!(%node, "mesh peer connected");

    // The catch-up: what the peer missed, in order per publisher.
    let mut sent_own = cursors.get(&*mesh.node).copied().unwrap_or(0);
    let missed = mesh.log().missed_by(&node, &mesh.node, &cursors);
    for entry in missed {
        if entry.origin == mesh.node {
            sent_own = sent_own.max(entry.seq);
        }
        if matches_any(&theirs, &entry) {
            send(conn, entry).await?;
        }
    }
    let mut stop = mesh.stop.subscribe();
    loop {
        let published = mesh.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        let own = mesh.log().own_after(&mesh.node, sent_own);
        for entry in own {
            sent_own = entry.seq;
            if matches_any(&theirs, &entry) {
                send(conn, entry).await?;
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(Some(node)),
            () = &mut published => {}
            received = conn.receive() => match received? {
                None => return Ok(Some(node)),
                Some(bytes) => mesh.receive(&bytes)?,
            },
        }
    }
}
