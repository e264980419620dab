//! What the connection's principal may do, and the `Welcome` it is greeted with.

use whispeer_proto::{
    Body, CAP_COMPACT_ACCEPTED, CAP_COMPACT_PUBLISH, Filter, PROTOCOL_VERSION, Topic,
};

use super::{CAP_AUTH_REQUIRED, Connection};

impl Connection {
    /// Whether a publish of `len` bytes fits the connection's budget (and takes it).
    pub(super) fn admit(&mut self, len: usize) -> bool {
        self.rate.as_mut().is_none_or(|rate| rate.admit(len))
    }

    pub(super) fn may_subscribe(&self, filter: &Filter) -> bool {
        self.principal.as_ref().is_some_and(|p| p.permissions.may_subscribe(&p.name, filter))
    }

    pub(super) fn may_join(&self, group: &str) -> bool {
        self.principal.as_ref().is_some_and(|p| p.permissions.may_join(&p.name, group))
    }

    /// Whether the principal may publish to `topic` (the last topic allowed is remembered).
    pub(super) fn may_publish(&mut self, topic: &Topic) -> bool {
        if self.allowed.as_ref() == Some(topic) {
            return true;
        }
        let allowed =
            self.principal.as_ref().is_some_and(|p| p.permissions.may_publish_as(&p.name, topic));
        if allowed {
            self.allowed = Some(topic.clone());
        }
        allowed
    }

    /// The WELCOME: `compact`, the client asked for compact deliveries (and gets them). Every
    /// connection reads compact publishes (`publish_read`), so every WELCOME says so.
    pub(super) fn welcome(&self, compact: bool) -> Body {
        let limits = &self.broker.options().limits;
        let mut capabilities = if self.config.auth_required() { CAP_AUTH_REQUIRED } else { 0 };
        capabilities |= CAP_COMPACT_PUBLISH;
        if compact {
            capabilities |= CAP_COMPACT_ACCEPTED;
        }
        Body::Welcome {
            version: PROTOCOL_VERSION,
            capabilities,
            max_frame_bytes: u32::try_from(limits.max_frame_bytes).unwrap_or(u32::MAX),
            max_message_bytes: u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX),
            heartbeat_ms: u32::try_from(self.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            name: self.config.name.clone(),
        }
    }
}
