//! [`create_transport`]: the transport a [`TransportConfig`] names.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::TopicHash;
use crate::key::PeerKey;
use crate::transport::{
    Connection, DisabledTransport, PeerInfo, PeerOptions, Transport, TransportConfig, TransportMode,
};

/// Makes the transport `config` names, with a new key.
pub fn create_transport(config: TransportConfig) -> Box<dyn Transport> {
    match create_transport_with(config, PeerOptions::default()) {
        Ok(transport) => transport,
        Err(err) => Box::new(Unavailable { reason: err.to_string() }),
    }
}

/// Makes the transport `config` names, with `options`.
///
/// # Errors
/// The key file cannot be read or written; relay mode without a `relay_url`.
pub fn create_transport_with(
    config: TransportConfig,
    options: PeerOptions,
) -> anyhow::Result<Box<dyn Transport>> {
    let key = match &options.key_file {
        Some(path) => PeerKey::load_or_create(path)?,
        None => PeerKey::generate(),
    };
    build(config, key, options)
}

/// The transport `config` names, as `key`.
pub(crate) fn build(
    config: TransportConfig,
    key: PeerKey,
    options: PeerOptions,
) -> anyhow::Result<Box<dyn Transport>> {
    Ok(match config.mode {
        TransportMode::Disabled => Box::new(DisabledTransport::new()),
        TransportMode::Relay => Box::new(crate::relay::RelayTransport::new(config, key, options)?),
        #[cfg(feature = "dht")]
        TransportMode::Hyperswarm => {
            Box::new(crate::dht::DhtTransport::new(config, &key, &options)?)
        }
        #[cfg(not(feature = "dht"))]
        TransportMode::Hyperswarm => Box::new(Unavailable {
            reason: "the DHT mode (TransportMode::Hyperswarm) needs whispeer-sync's feature `dht`"
                .into(),
        }),
    })
}

/// A transport that cannot work, saying why on every call.
#[derive(Debug)]
struct Unavailable {
    reason: String,
}

#[async_trait]
impl Transport for Unavailable {
    async fn connect(
        &mut self,
        _topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        anyhow::bail!("{}", self.reason)
    }

    async fn announce(&mut self, _topic: TopicHash) -> anyhow::Result<()> {
        anyhow::bail!("{}", self.reason)
    }

    async fn lookup(&self, _topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        anyhow::bail!("{}", self.reason)
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "unavailable"
    }
}
