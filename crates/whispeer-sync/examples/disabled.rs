//! The seed's "Disabled Transport (Local-Only)" example, as written (crate name adapted).

use whispeer_sync::{DisabledTransport, Transport};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut transport = DisabledTransport::new();

    // This is a no-op in local-only mode
    let topic = [0u8; 32];
    transport.announce(topic).await?;

    // Returns empty peer list
    let peers = transport.lookup(topic).await?;
    assert!(peers.is_empty());

    Ok(())
}
