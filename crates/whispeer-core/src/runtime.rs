//! Where delivery tasks and dispatchers run.
//!
//! In order of preference: the runtime handle given to the builder; the tokio runtime the
//! caller is in; a small runtime the broker starts on first need and owns. The last makes
//! callbacks work from a plain `fn main` with no runtime at all.

use std::future::Future;
use std::io;
use std::sync::{Mutex, OnceLock, PoisonError};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// Worker threads of the broker's own runtime, when it needs one.
const OWNED_WORKERS: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct Spawner {
    handle: Option<Handle>,
    owned: OnceLock<OwnedRuntime>,
    init: Mutex<()>,
}

impl Spawner {
    pub(crate) fn new(handle: Option<Handle>) -> Self {
        Self { handle, ..Self::default() }
    }

    /// Spawns a delivery task.
    ///
    /// # Errors
    /// The I/O error of starting the broker's own runtime, if one was needed and failed.
    pub(crate) fn spawn<F>(&self, task: F) -> io::Result<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(handle) = &self.handle {
            return Ok(handle.spawn(task));
        }
        if let Ok(handle) = Handle::try_current() {
            return Ok(handle.spawn(task));
        }
        Ok(self.owned()?.spawn(task))
    }

    fn owned(&self) -> io::Result<&Runtime> {
        if let Some(owned) = self.owned.get() {
            return Ok(owned.runtime());
        }
        let _guard = self.init.lock().unwrap_or_else(PoisonError::into_inner);
        if self.owned.get().is_none() {
            let runtime = Builder::new_multi_thread()
                .worker_threads(OWNED_WORKERS)
                .thread_name("whispeer-delivery")
                .enable_all()
                .build()?;
            let _ = self.owned.set(OwnedRuntime(Some(runtime)));
        }
        Ok(self.owned.get().expect("initialised above under the init lock").runtime())
    }
}

/// A runtime the broker started; shut down without blocking when the broker goes, so that the
/// last broker handle may be dropped anywhere, including inside another runtime.
#[derive(Debug)]
struct OwnedRuntime(Option<Runtime>);

impl OwnedRuntime {
    fn runtime(&self) -> &Runtime {
        self.0.as_ref().expect("only taken in drop")
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
