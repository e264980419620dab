//! The seed's "Event Broadcasting" example (crate name adapted). As written its loop waits for
//! events forever; here the hub is dropped after publishing, so the loop ends once the event
//! is read.

#![expect(clippy::unwrap_used, reason = "the seed's code as written")]

use whispeer_sync::{SyncBroadcaster, SyncEvent};

#[tokio::main]
async fn main() {
    let hub = SyncBroadcaster::default();
    let mut rx = hub.subscribe();

    // Publish events
    hub.publish(SyncEvent::PeerConnected { peer_id: "peer-123".to_string() }).unwrap();
    drop(hub); // not in the seed: ends the loop below

    // Receive events
    while let Ok(event) = rx.recv().await {
        match event {
            SyncEvent::PeerConnected { peer_id } => {
                println!("Peer connected: {}", peer_id);
            }
            SyncEvent::PeerDisconnected { peer_id } => {
                println!("Peer disconnected: {}", peer_id);
            }
            _ => {}
        }
    }
}
