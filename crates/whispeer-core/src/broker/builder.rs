//! Building a broker: [`BrokerOptions`], [`BrokerBuilder`] and the [`Extension`]s it takes.

use std::sync::Arc;

use tokio::runtime::Handle;
use whispeer_engines::{Compression, Encryption, Engines, TopicRule};

use crate::Broker;
use crate::bridge::Bridge;
use crate::error::BuildError;
use crate::options::BrokerOptions;
use crate::plugin::Plugin;
use crate::runtime::Spawner;
use crate::shared::Shared;
use crate::shared::sweep_forever;

/// Anything that extends a broker at build time: plugins, [`Compression`], [`Encryption`] and
/// [`TopicRule`]s today; transports and storage as they arrive. Passed to [`BrokerBuilder::with`].
pub trait Extension {
    /// Adds itself to the builder.
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder;
}

impl<P: Plugin> Extension for P {
    fn extend(self, builder: BrokerBuilder) -> BrokerBuilder {
        builder.plugin(self)
    }
}

impl Extension for Compression {
    fn extend(self, mut builder: BrokerBuilder) -> BrokerBuilder {
        builder.engines = std::mem::take(&mut builder.engines).with_compression(self);
        builder
    }
}

impl Extension for Encryption {
    fn extend(self, mut builder: BrokerBuilder) -> BrokerBuilder {
        builder.engines = std::mem::take(&mut builder.engines).with_encryption(self);
        builder
    }
}

impl Extension for TopicRule {
    fn extend(self, mut builder: BrokerBuilder) -> BrokerBuilder {
        builder.engines = std::mem::take(&mut builder.engines).with_rule(self);
        builder
    }
}

/// Builds a [`Broker`]. Start with [`Broker::builder`] or [`Broker::build_default`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct BrokerBuilder {
    options: BrokerOptions,
    plugins: Vec<Arc<dyn Plugin>>,
    engines: Engines,
    runtime: Option<Handle>,
    bridge: Option<Arc<dyn Bridge>>,
    pub(crate) services: Vec<Box<dyn crate::broker::Service>>,
}

impl std::fmt::Debug for BrokerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerBuilder")
            .field("options", &self.options)
            .field("plugins", &self.plugins.iter().map(|p| p.name()).collect::<Vec<_>>())
            .field("engines", &self.engines)
            .finish_non_exhaustive()
    }
}

impl BrokerBuilder {
    /// Adds an extension: a plugin, and later an engine, transport or store.
    pub fn with(self, extension: impl Extension) -> Self {
        extension.extend(self)
    }

    /// Adds a plugin; plugins run in the order they were added.
    pub fn plugin(mut self, plugin: impl Plugin) -> Self {
        self.plugins.push(Arc::new(plugin));
        self
    }

    /// Runs callback subscribers (their dispatchers and delivery tasks) on this runtime.
    /// Without it, they run on the runtime that calls `subscribe` (the dispatchers on the one
    /// of the first sync subscription), or, outside any runtime, on a small one the broker
    /// starts.
    pub fn runtime(mut self, handle: Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Makes the broker one node of a cluster, through `bridge` (for the server's cluster
    /// extension; see [`Bridge`]).
    pub fn bridge(mut self, bridge: Arc<dyn Bridge>) -> Self {
        self.bridge = Some(bridge);
        self
    }

    /// The options, for extensions that adjust them.
    pub fn options_mut(&mut self) -> &mut BrokerOptions {
        &mut self.options
    }

    /// Builds the broker.
    ///
    /// # Panics
    /// If a network transport (`server::Tcp`, `server::WebSocket`) cannot bind its address; use
    /// [`try_build`](Self::try_build) to handle that.
    pub fn build(self) -> Broker {
        match self.try_build() {
            Ok(broker) => broker,
            Err(err) => panic!("whispeer: {err}"),
        }
    }

    /// Builds the broker: opens (and repairs) its write-ahead log, if any, restoring the
    /// history of durable topics, and binds its network transports, if any.
    ///
    /// # Errors
    /// A write-ahead log that cannot be opened; the first transport that cannot bind.
    pub fn try_build(self) -> Result<Broker, BuildError> {
        whispeer_proto::clock::calibrate();
        let engines = self.engines.with_max_message_bytes(self.options.limits.max_message_bytes);
        let engines = engines.is_active().then(|| Arc::new(engines));
        let opened = match &self.options.durability {
            Some(durability) => {
                let location = durability.store.location();
                let storage = |source| BuildError::Storage { dir: location, source };
                Some(durability.store.open().map_err(storage)?)
            }
            None => None,
        };
        let (store, recovered) = opened.map_or((None, None), |(s, r)| (Some(s), Some(r)));
        let spawner = Spawner::new(self.runtime);
        let mut shared = Shared::new(self.options, self.plugins.into(), engines, spawner, store);
        shared.bridge = self.bridge;
        let broker = Broker { inner: Arc::new(shared) };
        if let Some(recovered) = recovered {
            broker.inner.restore(recovered.records);
            let history = &broker.inner.history;
            history.continue_after(recovered.marks, recovered.gap, recovered.floor);
            for commit in recovered.commits {
                broker.inner.commits.set(&commit.key, commit.topic, commit.offset);
            }
        }
        if broker.inner.history.has_age_bounds() {
            let sweep = sweep_forever(Arc::downgrade(&broker.inner));
            if let Err(err) = broker.inner.spawner.spawn(sweep) {
                tracing::warn!(%err, "no runtime for the history sweep: aged messages are evicted on publish only");
            }
        }
        crate::broker::start_all(self.services, &broker)?;
        Ok(broker)
    }

    pub(crate) fn new(options: BrokerOptions) -> Self {
        Self {
            options,
            plugins: Vec::new(),
            engines: Engines::new(),
            runtime: None,
            bridge: None,
            services: Vec::new(),
        }
    }
}
