//! Building a broker: [`BrokerOptions`], [`BrokerBuilder`] and the [`Extension`]s it takes.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use whispeer_engines::{Codec, Compression, Encryption, Engines, TopicRule};
use whispeer_proto::{Filter, Limits};

use crate::broker::{Broker, Shared};
use crate::delivery::Redelivery;
use crate::error::BuildError;
use crate::plugin::Plugin;
use crate::queue::SlowConsumer;
use crate::retention::{Retention, sweep_forever};
use crate::runtime::Spawner;
use crate::store::Durability;

/// Settings of a broker. Every field has a safe default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// How typed values are encoded. Default: [`Codec::Postcard`].
    pub codec: Codec,
    /// Bounds on topics and messages.
    pub limits: Limits,
    /// Default queue capacity of a subscription, in messages. Default: 1024.
    pub queue_capacity: usize,
    /// Default policy when a subscription's queue is full. Default: [`SlowConsumer::DropOldest`].
    pub slow_consumer: SlowConsumer,
    /// Default byte bound of a subscription's queue: payloads plus 256 bytes per message.
    /// Default: 16 MiB.
    pub queue_max_bytes: usize,
    /// QoS 1: default ack timeout, backoff and attempts before dead-lettering.
    pub redelivery: Redelivery,
    /// QoS 1: default credit window, in unacknowledged messages per subscriber. Default: 1024.
    pub prefetch: usize,
    /// How long a publish's idempotency key is remembered. Default: 2 minutes.
    pub dedup_window: Duration,
    /// Most idempotency keys remembered; beyond it the oldest are forgotten early (counted in
    /// the logs). Default: 100 000.
    pub dedup_max_keys: usize,
    /// How long a QoS 1 queue group outlives its last member, still queueing, so a member that
    /// comes back gets what it missed. Zero removes groups with their last member. Default:
    /// 60 s.
    pub group_linger: Duration,
    /// Default time to live by topic: the first filter that matches applies to messages
    /// without a `ttl-ms` header. Default: none.
    pub topic_ttl: Vec<(Filter, Duration)>,
    /// Which topics keep a history to replay, and how much: the first filter that matches a
    /// topic applies. Default: none (no topic keeps history; publishing takes no lock).
    pub retention: Vec<(Filter, Retention)>,
    /// Durable topics and their write-ahead log; their history survives a restart. A durable
    /// topic without a retention rule keeps the last 10 000 messages (64 MiB) in memory.
    /// Default: none.
    pub durability: Option<Durability>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            codec: Codec::default(),
            limits: Limits::default(),
            queue_capacity: 1024,
            slow_consumer: SlowConsumer::default(),
            queue_max_bytes: 16 * 1024 * 1024,
            redelivery: Redelivery::default(),
            prefetch: 1024,
            dedup_window: Duration::from_secs(120),
            dedup_max_keys: 100_000,
            group_linger: Duration::from_secs(60),
            topic_ttl: Vec::new(),
            retention: Vec::new(),
            durability: None,
        }
    }
}

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
    pub(crate) services: Vec<Box<dyn crate::service::Service>>,
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

    /// Runs callback subscribers' delivery tasks on this runtime. Without it, they run on the
    /// runtime that calls `subscribe`, or, outside any runtime, on a small one the broker starts.
    pub fn runtime(mut self, handle: Handle) -> Self {
        self.runtime = Some(handle);
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
        let shared = Shared::new(self.options, self.plugins.into(), engines, spawner, store);
        let broker = Broker { inner: Arc::new(shared) };
        if let Some(recovered) = recovered {
            broker.inner.restore(recovered.records);
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
        crate::service::start_all(self.services, &broker)?;
        Ok(broker)
    }

    pub(crate) fn new(options: BrokerOptions) -> Self {
        Self {
            options,
            plugins: Vec::new(),
            engines: Engines::new(),
            runtime: None,
            services: Vec::new(),
        }
    }
}
