//! Services: what runs beside a broker from `build` on — a network listener, an admin port —
//! added by extensions of other crates. The core knows no socket: a service reports the
//! addresses it bound, and how to stop it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

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

/// A started service: where it listens, and how to stop it.
pub struct Running {
    addrs: Vec<SocketAddr>,
    stop: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

impl Running {
    /// A service listening on `addrs`, stopped by calling `stop` (which must not block).
    pub fn new(addrs: Vec<SocketAddr>, stop: impl FnOnce() + Send + 'static) -> Self {
        Self { addrs, stop: Box::new(stop) }
    }
}

/// The running services of a broker; stopped when the broker's last handle is dropped.
#[derive(Debug, Default)]
pub(crate) struct Services(Mutex<Vec<Running>>);

impl Services {
    fn add(&self, running: Running) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(running);
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        let services = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        services.iter().flat_map(|s| s.addrs.iter().copied()).collect()
    }

    fn stop(&self) {
        let services = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for service in services {
            (service.stop)();
        }
    }
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

impl Drop for Services {
    fn drop(&mut self) {
        self.stop();
    }
}
