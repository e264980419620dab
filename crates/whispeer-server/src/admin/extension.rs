//! The admin port as an extension of an embedded broker (`.with(Admin::new(addr))`), and
//! `parse_start`, the start positions people write.

use std::time::UNIX_EPOCH;

use tokio::net::TcpListener;
use whispeer_core::{Broker, StartAt};

use super::AdminServer;
use crate::ServerConfig;

/// The admin port as an extension of an embedded broker:
/// `.with(Admin::new("127.0.0.1:9090").token("secret"))` serves `/healthz`, `/readyz`,
/// `/metrics` and (with a token) the admin API, ready once the broker is built.
///
/// ```no_run
/// use whispeer_core::{Broker, BrokerOptions};
/// use whispeer_server::{Admin, ServerConfig, Tcp};
/// let config = ServerConfig::default();
/// let broker = Broker::builder(BrokerOptions::default())
///     .with(Tcp::new("127.0.0.1:7450").config(config.clone()))
///     .with(Admin::new("127.0.0.1:9090").counters_of(&config))
///     .build();
/// ```
#[derive(Debug)]
pub struct Admin {
    addr: String,
    token: Option<String>,
    server: ServerConfig,
}

impl Admin {
    /// The admin port on `addr` (port 0 picks a free one; see `Broker::local_addrs`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into(), token: None, server: ServerConfig::default() }
    }

    /// Opens the admin API (`/api/...`) to requests bearing `token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Reports the connections and counters of the listeners configured with `config` (a clone
    /// of the one given to `Tcp::config` / `WebSocket::config`: they share its counters).
    pub fn counters_of(mut self, config: &ServerConfig) -> Self {
        self.server = config.clone();
        self
    }
}

impl whispeer_core::Extension for Admin {
    fn extend(self, builder: whispeer_core::BrokerBuilder) -> whispeer_core::BrokerBuilder {
        builder.service(self)
    }
}

impl whispeer_core::Service for Admin {
    fn describe(&self) -> String {
        format!("admin port on {}", self.addr)
    }

    fn start(self: Box<Self>, broker: &Broker) -> std::io::Result<whispeer_core::Running> {
        let listener = std::net::TcpListener::bind(&self.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let admin = AdminServer::new(broker.clone(), &self.server, self.token.as_deref())?;
        admin.set_ready(true);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let (served, on_stop) = (admin.clone(), admin);
        broker.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => return tracing::error!(%err, "admin port could not start"),
            };
            tokio::select! {
                result = served.serve(listener) => if let Err(err) = result {
                    tracing::error!(%err, "admin port stopped");
                },
                () = stopped.cancelled() => {}
            }
        })?;
        Ok(whispeer_core::Running::new(vec![addr], move || {
            on_stop.set_ready(false);
            stop.cancel();
        }))
    }
}

/// A start position as people write it: `earliest`, `latest`, an offset, `time:<ms>` or an
/// RFC 3339 time (what `whispeer sub --from` and `/api/history?from=` take).
///
/// # Errors
/// What was expected, when `text` is none of these.
pub fn parse_start(text: &str) -> Result<StartAt, String> {
    match text {
        "earliest" => return Ok(StartAt::Earliest),
        "latest" => return Ok(StartAt::Latest),
        _ => {}
    }
    if let Ok(offset) = text.parse::<u64>() {
        return Ok(StartAt::Offset(offset));
    }
    if let Some(ms) = text.strip_prefix("time:") {
        return ms.parse().map(StartAt::Time).map_err(|e| format!("time:{ms}: {e}"));
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?}: expected earliest, latest, an offset, time:<ms> or an RFC 3339 time")
    })?;
    let ms = time.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis();
    Ok(StartAt::Time(u64::try_from(ms).unwrap_or(u64::MAX)))
}
