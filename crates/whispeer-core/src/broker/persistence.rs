//! Persistence as the broker sees it: the `Persistence` extension, and the broker's access to
//! its store (durable waits, reads beyond memory, health).

use std::path::PathBuf;

use whispeer_engines::{Compression, Encryption, KeyError};
use whispeer_proto::Topic;

use super::{BrokerBuilder, Extension};
use crate::Broker;
use crate::message::Message;
use crate::options::BrokerOptions;
use crate::publish::PublishReceipt;
use crate::store::{Durability, PageBound, PersistenceType, WalOptions};

/// Persistence as a builder extension: every topic (but `$` ones) durable in one store.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")] {
/// use whispeer_core::{Broker, BrokerOptions, Persistence};
/// let broker = Broker::builder(BrokerOptions::default()).with(Persistence::sqlite("data/whispeer.db")).build();
/// # }
/// ```
#[derive(Debug)]
pub struct Persistence;

impl Persistence {
    /// Every topic durable in the SQLite database at `path`.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(path: impl Into<PathBuf>) -> Durability {
        Durability::everything(PersistenceType::Sqlite(path.into()))
    }

    /// Every topic durable in a write-ahead log in `dir`, with the default options.
    pub fn wal(dir: impl Into<PathBuf>) -> Durability {
        Durability::everything(PersistenceType::Wal(WalOptions::new(dir)))
    }

    /// Every topic "durable" in memory: the contract of a store, for tests.
    pub fn memory() -> Durability {
        Durability::everything(PersistenceType::Memory)
    }
}

impl Extension for Durability {
    fn extend(self, mut builder: BrokerBuilder) -> BrokerBuilder {
        builder.options_mut().durability = Some(self);
        builder
    }
}

impl Broker {
    /// [`Broker::build_default`] with every topic durable in `persistence` (topics starting with
    /// `$` excepted): their history survives a restart, and a QoS 1 acknowledgement waits for
    /// the store.
    ///
    /// Stored payloads are sealed, so they open after a restart only with the same key: the key
    /// comes from `WHISPEER_KEY` when it is set (see `whispeer keygen`); otherwise a key is
    /// generated for this process, a warning says so, and messages stored now will not open in
    /// the next one. The key is never written next to the data.
    ///
    /// ```no_run
    /// use whispeer_core::{Broker, PersistenceType};
    /// let broker = Broker::build_default_with_persistence(PersistenceType::Memory)?.build();
    /// # Ok::<(), whispeer_core::KeyError>(())
    /// ```
    ///
    /// # Errors
    /// A `WHISPEER_KEY` that is not a keyring.
    ///
    /// # Panics
    /// As [`Broker::build_default`], without `WHISPEER_KEY`.
    pub fn build_default_with_persistence(
        persistence: PersistenceType,
    ) -> Result<BrokerBuilder, KeyError> {
        let encryption = match std::env::var_os("WHISPEER_KEY") {
            Some(_) => Encryption::from_env("WHISPEER_KEY")?,
            None => {
                tracing::warn!(
                    "WHISPEER_KEY is not set: stored messages will not open after a restart"
                );
                Encryption::generated()
                    .expect("the operating system's random number generator provides a key")
            }
        };
        let builder = Self::builder(BrokerOptions::default());
        Ok(builder
            .with(Durability::everything(persistence))
            .with(Compression::new())
            .with(encryption))
    }

    /// Waits until a published message is durable: for a durable topic, until its write-ahead
    /// log record is stored under the fsync policy; for any other message at once. Returns
    /// `false` if the log's writer stopped first (a failing disk).
    pub async fn durable(&self, receipt: &PublishReceipt) -> bool {
        match (receipt.ticket, &self.inner.store) {
            (Some(ticket), Some(store)) => store.durable(ticket).await,
            _ => true,
        }
    }

    /// Whether the store (if any) still writes: `false` once its writer failed, after which
    /// no durable publish is acknowledged. `/readyz` reports it.
    pub fn store_healthy(&self) -> bool {
        self.inner.store.as_ref().is_none_or(|store| store.healthy())
    }

    /// Reads up to `max` messages of a durable topic from its store, from offset `from` on —
    /// beyond what its in-memory history still holds, as far back as the store goes. Empty
    /// without durability.
    ///
    /// # Errors
    /// The store's I/O error.
    pub fn stored(&self, topic: &Topic, from: u64, max: usize) -> std::io::Result<Vec<Message>> {
        self.stored_page(topic, from, PageBound::new(max, usize::MAX))
    }

    /// [`Broker::stored`] within `bound`.
    pub(crate) fn stored_page(
        &self,
        topic: &Topic,
        from: u64,
        bound: PageBound,
    ) -> std::io::Result<Vec<Message>> {
        let Some(store) = &self.inner.store else { return Ok(Vec::new()) };
        let records = store.read(topic, from, bound)?;
        let engines = self.inner.engines.clone();
        Ok(records
            .into_iter()
            .map(|r| Message::retained(r.envelope, true, engines.clone(), None, r.offset))
            .collect())
    }
}
