//! The seed's "Basic Example", as written (crate name adapted): the DHT mode, alone on the
//! network unless others run it too; it waits for peers until stopped (Ctrl-C).

use whispeer_sync::{TransportConfig, TransportMode, create_transport, derive_topic};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Create a transport for your database
    let config = TransportConfig {
        mode: TransportMode::Hyperswarm,
        encryption: true,
        timeout_ms: 30000,
        ..Default::default()
    };
    let mut transport = create_transport(config);

    // Derive a topic from your database ID
    let db_id = "my-app-database";
    let topic = derive_topic(db_id);

    // Announce this peer on the topic (DHT)
    transport.announce(topic).await?;

    // Lookup other peers on the same topic
    let peers = transport.lookup(topic).await?;
    println!("Found {} peers", peers.len());

    // Connect and listen for incoming connections
    let mut connections = transport.connect(topic).await?;
    while let Some(mut conn) = connections.recv().await {
        println!("New peer connected: {}", conn.peer_id());

        // Send a message
        conn.send(b"Hello from PluresDB!").await?;

        // Receive messages
        while let Ok(Some(msg)) = conn.receive().await {
            println!("Received: {:?}", msg);
        }
    }

    Ok(())
}
