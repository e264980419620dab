//! Plugins: hooks the broker calls on publish, subscribe and unsubscribe, and the built-in
//! [`LoggingPlugin`].
//!
//! Plugins see envelopes, never decoded values: with encryption on, they see only ciphertext.
//! The topic, id, timestamp, flags and headers of an encrypted message are authenticated, so a
//! plugin that edits them makes the message unopenable for every subscriber (it is counted in
//! `open_errors`); plugins that transform should stick to unencrypted topics.
//! Hooks run on the caller's thread inside `publish` / `subscribe`, so they must be quick and
//! must not block; a plugin that needs I/O hands the work to its own task.

use whispeer_proto::{Envelope, Filter};

/// Why a plugin refused an operation; returned to the caller inside `PublishError::Rejected`
/// or `SubscribeError::Rejected`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// A reason a person can read.
    pub reason: String,
}

impl Rejection {
    /// A rejection with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }
}

/// Extends the broker at its publish and subscribe points.
///
/// Every hook has a default that allows the operation, so a plugin implements only what it needs.
///
/// ```
/// use whispeer_core::{Broker, BrokerOptions, Plugin, Rejection};
/// use whispeer_core::proto::Envelope;
///
/// /// Refuses messages larger than 1 KiB.
/// struct SmallOnly;
///
/// impl Plugin for SmallOnly {
///     fn name(&self) -> &'static str { "small-only" }
///     fn on_publish(&self, envelope: &mut Envelope) -> Result<(), Rejection> {
///         if envelope.payload.len() > 1024 {
///             return Err(Rejection::new("payload over 1 KiB"));
///         }
///         Ok(())
///     }
/// }
///
/// let broker = Broker::builder(BrokerOptions::default()).with(SmallOnly).build();
/// assert!(broker.publish("t", &vec![0u8; 2048]).is_err());
/// ```
pub trait Plugin: Send + Sync + 'static {
    /// A short name for logs and errors.
    fn name(&self) -> &'static str;

    /// Called for every message before it is routed. May edit the envelope (headers, payload)
    /// or refuse it. Plugins run in the order they were added; each sees the previous one's edits.
    ///
    /// # Errors
    /// A [`Rejection`] stops the publish; no subscriber gets the message.
    fn on_publish(&self, envelope: &mut Envelope) -> Result<(), Rejection> {
        let _ = envelope;
        Ok(())
    }

    /// Called before a subscription is created.
    ///
    /// # Errors
    /// A [`Rejection`] stops the subscription.
    fn on_subscribe(&self, filter: &Filter) -> Result<(), Rejection> {
        let _ = filter;
        Ok(())
    }

    /// Called after a subscription has ended (dropped, unsubscribed or disconnected by policy).
    fn on_unsubscribe(&self, filter: &Filter) {
        let _ = filter;
    }
}

/// Logs every publish, subscribe and unsubscribe through `tracing` at `DEBUG` level, under the
/// target `whispeer_core::plugin::logging`. It logs sizes and ids, never payloads.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingPlugin;

impl LoggingPlugin {
    /// A logging plugin.
    pub fn new() -> Self {
        Self
    }
}

impl Plugin for LoggingPlugin {
    fn name(&self) -> &'static str {
        "logging"
    }

    fn on_publish(&self, envelope: &mut Envelope) -> Result<(), Rejection> {
        tracing::debug!(
            target: "whispeer::plugin::logging",
            topic = %envelope.topic,
            id = %envelope.id,
            bytes = envelope.payload.len(),
            "publish"
        );
        Ok(())
    }

    fn on_subscribe(&self, filter: &Filter) -> Result<(), Rejection> {
        tracing::debug!(target: "whispeer::plugin::logging", %filter, "subscribe");
        Ok(())
    }

    fn on_unsubscribe(&self, filter: &Filter) {
        tracing::debug!(target: "whispeer::plugin::logging", %filter, "unsubscribe");
    }
}
