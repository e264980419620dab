//! whispeer — a publish/subscribe broker to embed in a Rust program, or to run as a server.
//!
//! This crate is the one dependency users add. It re-exports the embeddable broker
//! ([`whispeer-core`](whispeer_core): start with [`Broker::builder`]) and, behind features, the
//! network server ([`server`]: `server`, `websocket`, `tls`, `admin`) and SQLite persistence
//! (`sqlite`):
//!
//! ```ignore
//! use whispeer::{Broker, BrokerOptions, Compression, Encryption, Persistence, WebSocket};
//! let broker = Broker::builder(BrokerOptions::default())
//!     .with(Encryption::new())
//!     .with(Compression::new())
//!     .with(WebSocket::new("http://localhost:8080"))
//!     .with(Persistence::sqlite("./path/to/db"))
//!     .build();
//! ```
//!
//! In process:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), whispeer::Error> {
//! use serde::{Deserialize, Serialize};
//! use whispeer::{Broker, BrokerOptions};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! struct Reading { sensor: String, celsius: f32 }
//!
//! let broker = Broker::builder(BrokerOptions::default()).build();
//! let mut readings = broker.subscription::<Reading>("sensor/+/temperature")?;
//! let reading = Reading { sensor: "kitchen".into(), celsius: 21.5 };
//! broker.publish("sensor/kitchen/temperature", &reading)?;
//! assert_eq!(readings.recv().await, Some(reading));
//! # Ok(()) }
//! ```

pub use whispeer_core::*;

/// The network server: TCP and WebSocket listeners, the JSON form, TLS, API keys, ACLs, JWT,
/// limits, the connection registry and the admin port (see [`whispeer_server`]).
#[cfg(feature = "server")]
pub use whispeer_server as server;

/// The embedded transports, also at the top for one-line imports.
#[cfg(feature = "server")]
pub use whispeer_server::Tcp;
#[cfg(feature = "websocket")]
pub use whispeer_server::{BrokerWs, WebSocket};
