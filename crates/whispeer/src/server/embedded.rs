//! Network transports for an embedded broker: `Broker::builder(..).with(Tcp::new(addr))` and
//! `.with(WebSocket::new(addr))` serve the broker itself to remote clients.
//!
//! Listeners are bound while the broker is built (so a bad address is an error of
//! `try_build`), then served on the broker's runtime until `Broker::close_transports`.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ServerConfig;
use crate::{Broker, BrokerBuilder, Extension};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    #[cfg(feature = "websocket")]
    WebSocket,
}

/// A transport to start when the broker is built.
#[derive(Debug)]
pub(crate) struct Transport {
    kind: Kind,
    addr: String,
    config: ServerConfig,
}

/// Serves an embedded broker to TCP clients (the binary protocol) on `addr`.
///
/// ```no_run
/// use whispeer::{Broker, BrokerOptions, server::Tcp};
/// let broker = Broker::builder(BrokerOptions::default()).with(Tcp::new("127.0.0.1:7450")).build();
/// println!("serving on {:?}", broker.local_addrs());
/// ```
#[derive(Debug)]
pub struct Tcp(Transport);

impl Tcp {
    /// TCP on `addr` (port 0 picks a free port; see `Broker::local_addrs`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self(Transport { kind: Kind::Tcp, addr: addr.into(), config: ServerConfig::default() })
    }

    /// Uses these server settings (API keys, limits, TLS, …).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.0.config = config;
        self
    }
}

impl Extension for Tcp {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        builder.transport(self.0)
    }
}

/// Serves an embedded broker to WebSocket clients (binary frames and JSON) on `addr`.
#[cfg(feature = "websocket")]
#[derive(Debug)]
pub struct WebSocket(Transport);

#[cfg(feature = "websocket")]
impl WebSocket {
    /// WebSocket on `addr`, path `/ws` unless the config says otherwise.
    pub fn new(addr: impl Into<String>) -> Self {
        Self(Transport {
            kind: Kind::WebSocket,
            addr: addr.into(),
            config: ServerConfig::default(),
        })
    }

    /// Uses these server settings.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.0.config = config;
        self
    }
}

#[cfg(feature = "websocket")]
impl Extension for WebSocket {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        builder.transport(self.0)
    }
}

/// The running transports of a broker.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) stop: CancellationToken,
    pub(crate) addrs: Vec<SocketAddr>,
}

/// Why a transport did not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The address asked for.
    pub addr: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Binds every transport now and serves each on the broker's runtime.
pub(crate) fn start(transports: Vec<Transport>, broker: &Broker) -> Result<Running, ListenError> {
    let stop = CancellationToken::new();
    let mut addrs = Vec::new();
    for transport in transports {
        let listen_error = |source| ListenError { addr: transport.addr.clone(), source };
        let listener = std::net::TcpListener::bind(&transport.addr).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        addrs.push(listener.local_addr().map_err(listen_error)?);
        let (broker_for_task, stopped, config) = (broker.clone(), stop.clone(), transport.config);
        let kind = transport.kind;
        let served = async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return tracing::error!(%err, "transport could not start"),
            };
            let shutdown = stopped.cancelled_owned();
            let result = match kind {
                Kind::Tcp => super::serve(listener, broker_for_task, config, shutdown).await,
                #[cfg(feature = "websocket")]
                Kind::WebSocket => {
                    super::serve_websocket(listener, broker_for_task, config, shutdown).await
                }
            };
            if let Err(err) = result {
                tracing::error!(%err, "transport stopped");
            }
        };
        let spawned = broker
            .inner
            .spawner
            .spawn(served)
            .map_err(|source| ListenError { addr: transport.addr, source })?;
        drop(spawned);
    }
    Ok(Running { stop, addrs })
}

impl Broker {
    /// The addresses the broker's transports listen on (after binding, so port 0 is resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.transports.get().map(|running| running.addrs.clone()).unwrap_or_default()
    }

    /// Stops the broker's transports: they stop accepting, tell their clients, and close.
    pub fn close_transports(&self) {
        if let Some(running) = self.inner.transports.get() {
            running.stop.cancel();
        }
    }
}
