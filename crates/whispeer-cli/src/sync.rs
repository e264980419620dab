//! `whispeer sync`: join a mesh of embedded brokers from the command line (whispeer-sync's
//! `Sync` over the relay transport), print what arrives on the shared filters, and publish each
//! line of standard input with `--pub`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio::io::AsyncBufReadExt;
use whispeer::{Broker, BrokerOptions, SubscribeOptions};
use whispeer_sync::{PeerOptions, Sync, SyncEvent, TransportConfig, TransportMode};

use crate::pubsub::block_on_multi;

/// `whispeer sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// The mesh's name: nodes with the same name meet (its BLAKE2b-256 hash is what the relay
    /// sees).
    #[arg(long)]
    topic: String,
    /// A filter whose messages this node shares and takes; repeat for several.
    #[arg(long = "share", required = true, value_name = "FILTER")]
    shares: Vec<String>,
    /// Meet through this relay (`whispeer serve --ws-listen ADDR --relay`), e.g.
    /// ws://127.0.0.1:7451; without it, through the DHT (Kademlia on libp2p).
    #[arg(long, env = "WHISPEER_RELAY")]
    relay: Option<String>,
    /// DHT mode: a node to join the DHT through (a multiaddr ending with /p2p/<peer id>, as
    /// another `whispeer sync` prints it); repeat for several.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// DHT mode: an address to listen on [default: /ip4/0.0.0.0/tcp/0 and
    /// /ip4/0.0.0.0/udp/0/quic-v1]; repeat for several.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// DHT mode: also relay connections for peers behind NATs.
    #[arg(long)]
    relay_server: bool,
    /// For a wss:// relay: a PEM file of CA certificates to trust besides the platform's.
    #[arg(long, value_name = "FILE")]
    relay_ca: Option<PathBuf>,
    /// An API key or JWT for a relay on a server that requires one.
    #[arg(long, env = "WHISPEER_RELAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where this node's key is kept, so it keeps its id (and its place in the mesh) across
    /// runs; made on first use [default: a new key each run].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Publish each line of standard input to this topic (it must match a --share filter to
    /// reach the mesh).
    #[arg(long = "pub", value_name = "TOPIC")]
    publish: Option<String>,
    /// How long to wait for the relay before an error, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
}

pub(crate) fn run(args: SyncArgs) -> ExitCode {
    // Logs on stderr: WHISPEER_LOG=whispeer_sync=info shows connections, relay reservations
    // and hole punches.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WHISPEER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    block_on_multi(async move {
        let mode =
            if args.relay.is_some() { TransportMode::Relay } else { TransportMode::Hyperswarm };
        let config = TransportConfig {
            mode,
            relay_url: args.relay.clone(),
            timeout_ms: args.timeout_ms,
            encryption: true,
        };
        let options = PeerOptions {
            key_file: args.key_file.clone(),
            relay_token: args.token,
            relay_ca: args.relay_ca.clone(),
            bootstrap: args.bootstrap.clone(),
            listen: args.listen.clone(),
            relay_server: args.relay_server,
        };
        let mut sync = Sync::new(config).topic(&args.topic).options(options);
        for share in &args.shares {
            sync = sync.share(share);
        }
        let mut events = sync.events().subscribe();
        let broker = Broker::builder(BrokerOptions::default()).with(sync).try_build()?;
        let mut arrivals = Vec::new();
        for share in &args.shares {
            arrivals.push(broker.messages(SubscribeOptions::from(share.as_str()))?);
        }
        let through = args.relay.as_deref().unwrap_or("the DHT");
        eprintln!(
            "whispeer: sync on {:?} through {through}, sharing {}",
            args.topic,
            args.shares.join(" ")
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        for mut subscription in arrivals {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(message) = subscription.recv_message().await {
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut lines =
            args.publish.as_ref().map(|_| tokio::io::BufReader::new(tokio::io::stdin()).lines());
        loop {
            tokio::select! {
                message = rx.recv() => {
                    let Some(message) = message else { break };
                    let payload = message.plaintext().map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("{} {}", message.topic(), String::from_utf8_lossy(&payload));
                }
                event = events.recv() => match event {
                    Ok(SyncEvent::PeerConnected { peer_id }) => eprintln!("whispeer: peer {peer_id} connected"),
                    Ok(SyncEvent::PeerDisconnected { peer_id }) => eprintln!("whispeer: peer {peer_id} left"),
                    Ok(SyncEvent::Error { message }) => eprintln!("whispeer: {message}"),
                    Ok(SyncEvent::Listening { addresses }) => {
                        for address in addresses {
                            eprintln!("whispeer: sync listening on {address}");
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                line = async { match lines.as_mut() { Some(l) => l.next_line().await, None => std::future::pending().await } } => {
                    match line? {
                        Some(line) => {
                            let topic = args.publish.as_deref().unwrap_or_default();
                            broker.publish_bytes(topic, line.into_bytes())?;
                        }
                        None => lines = None,
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        broker.close_transports();
        // The mesh saves its cursors as it stops.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Ok(())
    })
}
