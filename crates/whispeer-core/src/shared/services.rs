//! The services running beside a broker (see `broker::service`): where they listen, and how
//! to stop them; stopped when the broker's last handle is dropped.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

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
    pub(crate) fn add(&self, running: Running) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(running);
    }

    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        let services = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        services.iter().flat_map(|s| s.addrs.iter().copied()).collect()
    }

    pub(crate) fn stop(&self) {
        let services = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for service in services {
            (service.stop)();
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop();
    }
}
