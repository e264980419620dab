//! Network transports for an embedded broker: `Broker::builder(..).with(Tcp::new(addr))` and
//! `.with(WebSocket::new(addr))` serve the broker itself to remote clients.
//!
//! Each is a core `Service`: bound while the broker is built (so a bad address is an error of
//! `try_build`), then served on the broker's runtime until `Broker::close_transports` or the
//! broker's end.

use std::io;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use whispeer_core::{Broker, BrokerBuilder, Extension, Running, Service};

use super::ServerConfig;

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
    /// The WebSocket path a URL named, applied over the config's.
    path: Option<String>,
    /// Why the address given cannot be served (found when the broker is built).
    invalid: Option<String>,
}

impl Transport {
    fn new(kind: Kind, addr: String) -> Self {
        Self { kind, addr, config: ServerConfig::default(), path: None, invalid: None }
    }
}

#[cfg(feature = "websocket")]
/// The listen address and path of a WebSocket URL: `http://host:port/path`,
/// `ws://host:port/path` or `host:port`. `https://` and `wss://` need TLS in the config.
fn websocket_url(url: &str) -> (String, Option<String>, bool) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let secure = matches!(scheme.to_ascii_lowercase().as_str(), "https" | "wss");
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], Some(&rest[at..])),
        None => (rest, None),
    };
    let default_port = if secure { 443 } else { 80 };
    let addr = match authority.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() && !authority.ends_with(']') => {
            authority.to_string()
        }
        _ if scheme.is_empty() => authority.to_string(),
        _ => format!("{authority}:{default_port}"),
    };
    let path = path.filter(|p| *p != "/").map(str::to_string);
    (addr, path, secure)
}

/// Serves an embedded broker to TCP clients (the binary protocol) on `addr`.
///
/// ```no_run
/// use whispeer_core::{Broker, BrokerOptions};
/// use whispeer_server::Tcp;
/// let broker = Broker::builder(BrokerOptions::default()).with(Tcp::new("127.0.0.1:7450")).build();
/// println!("serving on {:?}", broker.local_addrs());
/// ```
#[derive(Debug)]
pub struct Tcp(Transport);

impl Tcp {
    /// TCP on `addr` (port 0 picks a free port; see `Broker::local_addrs`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self(Transport::new(Kind::Tcp, addr.into()))
    }

    /// Uses these server settings (API keys, limits, TLS, …).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.0.config = config;
        self
    }
}

impl Extension for Tcp {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        builder.service(self.0)
    }
}

/// Serves an embedded broker to WebSocket clients (binary frames and JSON) on `addr`.
#[cfg(feature = "websocket")]
#[derive(Debug)]
pub struct WebSocket(Transport);

#[cfg(feature = "websocket")]
impl WebSocket {
    /// WebSocket on `url`: `host:port` (path `/ws` unless the config says otherwise), or a
    /// URL such as `http://localhost:8080` or `ws://0.0.0.0:8080/events`, whose path, if
    /// any, is the endpoint's. `https://` and `wss://` need a config with TLS.
    ///
    /// ```no_run
    /// use whispeer_core::{Broker, BrokerOptions};
    /// use whispeer_server::WebSocket;
    /// let broker = Broker::builder(BrokerOptions::default())
    ///     .with(WebSocket::new("http://localhost:8080"))
    ///     .build();
    /// println!("WebSocket clients connect to ws://{}/ws", broker.local_addrs()[0]);
    /// ```
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let (addr, path, secure) = websocket_url(&url);
        let mut transport = Transport::new(Kind::WebSocket, addr);
        transport.path = path;
        if secure {
            transport.invalid = Some(format!("{url}: TLS needs WebSocket::config with tls set"));
        }
        Self(transport)
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
        builder.service(self.0)
    }
}

/// The default brokers of `Broker::build_default` and `build_default_with_persistence`, also
/// serving WebSocket clients (`use whispeer::BrokerWs`).
#[cfg(feature = "websocket")]
pub trait BrokerWs {
    /// `Broker::build_default`, also serving WebSocket clients at `url` (see
    /// [`WebSocket::new`]).
    ///
    /// # Panics
    /// As `Broker::build_default`.
    fn build_default_with_ws(url: &str) -> BrokerBuilder;

    /// `Broker::build_default_with_persistence`, also serving WebSocket clients at `url`.
    ///
    /// # Errors
    /// As `Broker::build_default_with_persistence`.
    fn build_default_with_persistence_ws(
        url: &str,
        persistence: whispeer_core::PersistenceType,
    ) -> Result<BrokerBuilder, whispeer_core::KeyError>;
}

#[cfg(feature = "websocket")]
impl BrokerWs for Broker {
    fn build_default_with_ws(url: &str) -> BrokerBuilder {
        Self::build_default().with(WebSocket::new(url))
    }

    fn build_default_with_persistence_ws(
        url: &str,
        persistence: whispeer_core::PersistenceType,
    ) -> Result<BrokerBuilder, whispeer_core::KeyError> {
        Ok(Self::build_default_with_persistence(persistence)?.with(WebSocket::new(url)))
    }
}

impl Service for Transport {
    fn describe(&self) -> String {
        match self.kind {
            Kind::Tcp => format!("tcp listener on {}", self.addr),
            #[cfg(feature = "websocket")]
            Kind::WebSocket => format!("WebSocket listener on {}", self.addr),
        }
    }

    fn start(mut self: Box<Self>, broker: &Broker) -> io::Result<Running> {
        #[cfg(feature = "tls")]
        let has_tls = self.config.tls.is_some();
        #[cfg(not(feature = "tls"))]
        let has_tls = false;
        if let Some(why) = self.invalid.take().filter(|_| !has_tls) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        if let Some(path) = self.path.take() {
            self.config.websocket_path = path;
        }
        let listener = std::net::TcpListener::bind(&self.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let (served_broker, stopped, config, kind) =
            (broker.clone(), stop.clone(), self.config, self.kind);
        broker.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return tracing::error!(%err, "transport could not start"),
            };
            let shutdown = stopped.cancelled_owned();
            let result = match kind {
                Kind::Tcp => super::serve(listener, served_broker, config, shutdown).await,
                #[cfg(feature = "websocket")]
                Kind::WebSocket => {
                    super::serve_websocket(listener, served_broker, config, shutdown).await
                }
            };
            if let Err(err) = result {
                tracing::error!(%err, "transport stopped");
            }
        })?;
        Ok(Running::new(vec![addr], move || stop.cancel()))
    }
}

#[cfg(all(test, feature = "websocket"))]
mod tests {
    use super::websocket_url;

    #[test]
    fn websocket_urls_give_an_address_and_a_path() {
        let url = |u: &str| websocket_url(u);
        assert_eq!(url("http://localhost:8080"), ("localhost:8080".into(), None, false));
        assert_eq!(
            url("ws://0.0.0.0:8080/events"),
            ("0.0.0.0:8080".into(), Some("/events".into()), false)
        );
        assert_eq!(url("127.0.0.1:0"), ("127.0.0.1:0".into(), None, false));
        assert_eq!(url("http://localhost/"), ("localhost:80".into(), None, false));
        assert_eq!(url("wss://[::1]:9443/ws"), ("[::1]:9443".into(), Some("/ws".into()), true));
        assert_eq!(url("https://example.org"), ("example.org:443".into(), None, true));
    }
}
