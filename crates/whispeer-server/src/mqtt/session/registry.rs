//! The server's side of a session beyond one connection: its registry of sessions, the
//! principal a CONNECT's credentials stand for, the groups of a session that is over, and wills
//! published after a delay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use whispeer_core::{Broker, HistoryError};
use whispeer_proto::{Envelope, Filter};

use super::super::sessions::MqttSessions;
use super::SESSION_GROUP;
use crate::retained::Retained;
use crate::{Principal, ServerConfig};

/// The server's session registry, as this connection sees it.
pub(crate) struct Registry {
    pub(crate) sessions: Arc<MqttSessions>,
    pub(crate) connection: u64,
    pub(crate) stop: CancellationToken,
    /// Cancelled when another connection took the session over.
    pub(crate) taken: CancellationToken,
    pub(crate) broker: Broker,
    pub(crate) config: Arc<ServerConfig>,
}

impl Registry {
    /// The principal a CONNECT's password stands for: anyone's on a server without keys,
    /// `None` for missing or wrong credentials (the connection's AUTH will refuse them).
    pub(super) fn principal(&self, password: Option<&str>) -> Option<Arc<Principal>> {
        if !self.config.auth_required() {
            return Some(Principal::anonymous());
        }
        self.config.principal_of(password?.as_bytes())
    }

    /// Ends the session groups of `filters` (a session that is over): now those without
    /// members, the others once the connection that has them closes (tried for 2 s).
    pub(crate) fn end_groups(&self, client_id: &str, filters: Vec<String>) {
        let group = format!("{SESSION_GROUP}{client_id}");
        let active: Vec<Filter> = filters
            .iter()
            .filter_map(|text| Filter::parse(text).ok())
            .filter(|filter| {
                matches!(self.broker.end_group(filter, &group), Err(HistoryError::Active { .. }))
            })
            .collect();
        if active.is_empty() {
            return;
        }
        let broker = self.broker.clone();
        let end = async move {
            for filter in active {
                for _ in 0..40 {
                    match broker.end_group(&filter, &group) {
                        Err(HistoryError::Active { .. }) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(err) => {
                            tracing::debug!(%err, %filter, group, "mqtt session group not ended");
                            break;
                        }
                        Ok(_) => break,
                    }
                }
            }
        };
        if let Err(err) = self.broker.spawn(end) {
            tracing::debug!(%err, "mqtt session groups left to their linger");
        }
    }

    /// Publishes a will after `delay`, as `principal`, unless the client comes back first
    /// (or has already: the session was taken over).
    pub(super) fn publish_later(
        &self,
        client_id: &str,
        envelope: Envelope,
        delay: Duration,
        principal: Arc<Principal>,
    ) {
        if self.taken.is_cancelled() {
            return;
        }
        let (number, back) = self.sessions.delay_will(client_id);
        let (sessions, client) = (Arc::clone(&self.sessions), client_id.to_string());
        let (broker, config) = (self.broker.clone(), Arc::clone(&self.config));
        let later = async move {
            tokio::select! {
                () = back.cancelled() => {}
                () = tokio::time::sleep(delay) => publish_will(&broker, &config, &principal, envelope),
            }
            sessions.will_done(&client, number);
        };
        if let Err(err) = self.broker.spawn(later) {
            tracing::debug!(%err, client = client_id, "mqtt delayed will dropped: shutting down");
        }
    }
}

/// A delayed will, published as its client's connection would have: its principal's ACLs and
/// the retained messages' bounds apply.
fn publish_will(broker: &Broker, config: &ServerConfig, principal: &Principal, envelope: Envelope) {
    let topic = envelope.topic.clone();
    if !topic.is_reserved() && !principal.permissions.may_publish_as(&principal.name, &topic) {
        tracing::debug!(%topic, principal = %principal.name, "mqtt delayed will not allowed");
        return;
    }
    let retain = Retained::wanted(&envelope).then(|| envelope.clone());
    if let Some(kept) = &retain
        && config.retained.admit(kept, config.max_retained, config.max_retained_bytes).is_err()
    {
        tracing::debug!(%topic, "mqtt delayed will past the retained bounds");
        return;
    }
    match broker.publish_envelope(envelope) {
        Ok(_) => {
            if let Some(kept) = retain
                && let Err(err) = config.retained.keep(&kept)
            {
                tracing::warn!(%err, %topic, "retained will not stored");
            }
        }
        Err(err) => tracing::debug!(%err, %topic, "mqtt delayed will refused"),
    }
}
