//! whispeer-sync — peer-to-peer sync: find peers by topic, talk to them over end-to-end
//! encrypted connections, and hear when they come and go.
//!
//! - [`Transport`]: announce on a topic, look peers up, and get a stream of [`Connection`]s to
//!   the peers of a topic. [`create_transport`] picks one from a [`TransportConfig`]:
//!   [`TransportMode::Hyperswarm`] (the DHT mode: a Kademlia DHT on libp2p — not the Hyperswarm
//!   wire protocol — over TCP and QUIC with Noise, AutoNAT, relays and DCUtR hole punching; see
//!   [`dht`]), [`TransportMode::Relay`] (a `whispeer serve --relay` pairs peers over WebSocket
//!   and forwards bytes it cannot read: the peers run Noise XX end to end through it) or
//!   [`TransportMode::Disabled`] (local only).
//! - [`Sync`]: brokers that mesh over any transport (`Broker::builder(..).with(Sync::new(config)
//!   .share("docs/#"))`).
//! - [`derive_topic`]: a topic's 32-byte hash (BLAKE2b-256 of its name), what peers meet on.
//! - [`SyncBroadcaster`] / [`SyncEvent`]: peers connected and gone, nodes changed.
//!
//! ```
//! use whispeer_sync::{DisabledTransport, Transport, derive_topic};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! let mut transport = DisabledTransport::new();
//! let topic = derive_topic("my-database");
//! transport.announce(topic).await?;
//! assert!(transport.lookup(topic).await?.is_empty());
//! # anyhow::Ok(())
//! # })?;
//! # anyhow::Ok(())
//! ```

#[cfg(feature = "dht")]
pub mod dht;
mod events;
mod factory;
mod key;
mod mesh;
mod noise;
pub mod relay;
mod topic;
mod transport;

pub use events::{SyncBroadcaster, SyncEvent};
pub use factory::{create_transport, create_transport_with};
pub use key::PeerKey;
pub use mesh::Sync;
pub use noise::MAX_MESSAGE_BYTES;
pub use relay::RelayTransport;
pub use topic::{TopicHash, derive_topic};
pub use transport::{
    Connection, DisabledTransport, PeerInfo, PeerOptions, Transport, TransportConfig, TransportMode,
};

/// Parses one mesh message (for the fuzz targets; not for applications).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzz_mesh_message(bytes: &[u8]) {
    mesh::fuzz(bytes);
}
