//! Services: what runs beside a broker from `build` on — a network listener, an admin port —
//! added by extensions of other crates. The core knows no socket: a service reports the
//! addresses it bound, and how to stop it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::shared::Running;
use crate::{Broker, BrokerBuilder};

/// Something that starts with the broker: a type of another crate implements it, and
/// [`Extension`](crate::Extension) by calling [`BrokerBuilder::service`], so users add it with
/// `.with(..)`.
pub trait Service: Send + 'static {
    /// What it is, for errors and logs (e.g. `tcp 127.0.0.1:7450`).
    fn describe(&self) -> String;

    /// Starts serving `broker`, without blocking: bind now (so a bad address is an error of
    /// `try_build`), run on the broker's runtime ([`Broker::spawn`]).
    ///
    /// # Errors
    /// Why it could not start.
    fn start(self: Box<Self>, broker: &Broker) -> io::Result<Running>;
}

/// Starts `services` for `broker`, in order; the first that fails stops those started.
pub(crate) fn start_all(
    services: Vec<Box<dyn Service>>,
    broker: &Broker,
) -> Result<(), crate::BuildError> {
    for service in services {
        let name = service.describe();
        match service.start(broker) {
            Ok(running) => broker.inner.services.add(running),
            Err(source) => {
                broker.inner.services.stop();
                return Err(crate::BuildError::Service { service: name, source });
            }
        }
    }
    Ok(())
}

impl BrokerBuilder {
    /// Adds a service to start when the broker is built (for [`Extension`](crate::Extension)s
    /// of other crates).
    pub fn service(mut self, service: impl Service) -> Self {
        self.services.push(Box::new(service));
        self
    }
}

impl Broker {
    /// The addresses the broker's services listen on (after binding, so port 0 is resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.services.addrs()
    }

    /// Stops the broker's services (network listeners: they stop accepting, tell their
    /// clients, and close).
    pub fn close_transports(&self) {
        self.inner.services.stop();
    }

    /// Runs `task` on the broker's runtime: the one given to the builder, else the caller's,
    /// else the broker's own. For services.
    ///
    /// # Errors
    /// The I/O error of starting the broker's own runtime, when one was needed and failed.
    pub fn spawn<F>(&self, task: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.spawner.spawn(task).map(drop)
    }
}
