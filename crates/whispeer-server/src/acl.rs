//! Authorization: what each authenticated principal may publish and subscribe to.
//!
//! Grants and denials are topic filters, checked with the same relations the router matches
//! with (`Filter::covers`, `Filter::overlaps`), so no wildcard widens a grant:
//!
//! - **publish** to a topic: some `publish` filter matches it and no `deny_publish` filter does;
//! - **subscribe** with a filter: some `subscribe` filter *covers* it (every topic it could
//!   match, the grant matches too — `a/+` covers `a/b` but not `a/#`) and no `deny_subscribe`
//!   filter *overlaps* it (no topic it could match is denied).
//!
//! - **join a queue group** (which shares, and for a durable subscription commits, the
//!   group's messages with its other members): some `groups` pattern names it — a name, or a
//!   prefix ending in `*` — or it is the principal's own: its name, or its name followed by
//!   `-` (`alice-phone`).
//!
//! Topics whose first segment starts with `$` (the broker's) or `@` (addressed, `@inbox/<id>`)
//! are skipped by leading wildcards, so a grant of `#` opens neither. A principal may always
//! subscribe to its own inbox, `@inbox/<name>` and below; other inboxes, and publishing to any
//! inbox, need an explicit grant that names `@inbox`.
//!
//! The key directory, `@keys/<principal>/…` (device identities and key policies, as retained
//! messages), is open to read for every principal; each writes its own entries only (the
//! anonymous principal of a server without keys, anyone's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use whispeer_proto::{Filter, Topic};

/// What one principal may do; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Permissions {
    /// Topics it may publish to.
    pub publish: Vec<Filter>,
    /// Filters it may subscribe with (and anything they cover).
    pub subscribe: Vec<Filter>,
    /// Topics it may not publish to, whatever `publish` says.
    pub deny_publish: Vec<Filter>,
    /// Topics it may not receive, whatever `subscribe` says.
    pub deny_subscribe: Vec<Filter>,
    /// Queue groups it may join besides its own: names, or prefixes ending in `*`.
    pub groups: Vec<String>,
}

fn all() -> Vec<Filter> {
    vec![Filter::parse("#").expect("`#` is a valid filter")]
}

impl Permissions {
    /// Nothing but its own inbox.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every topic not hidden from wildcards (`$…` and `@…` topics stay closed).
    pub fn everything() -> Self {
        Self { publish: all(), subscribe: all(), groups: vec!["*".into()], ..Self::default() }
    }

    /// Whether `principal` may join the queue group `group`.
    pub fn may_join(&self, principal: &str, group: &str) -> bool {
        let own = group == principal
            || group.strip_prefix(principal).is_some_and(|rest| rest.starts_with('-'));
        own || self.groups.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => group.starts_with(prefix),
            None => group == pattern,
        })
    }

    /// Whether `principal` may publish to `topic`.
    pub fn may_publish(&self, topic: &Topic) -> bool {
        !self.deny_publish.iter().any(|f| f.matches(topic))
            && self.publish.iter().any(|f| f.matches(topic))
    }

    /// Whether `principal` may publish to `topic`: as [`Permissions::may_publish`], or its own
    /// entries in the key directory.
    pub fn may_publish_as(&self, principal: &str, topic: &Topic) -> bool {
        self.may_publish(topic) || own_keys(principal).is_some_and(|own| own.matches(topic))
    }

    /// Whether `principal` may subscribe with `filter`.
    pub fn may_subscribe(&self, principal: &str, filter: &Filter) -> bool {
        if self.deny_subscribe.iter().any(|denied| denied.overlaps(filter)) {
            return false;
        }
        self.subscribe.iter().any(|grant| grant.covers(filter))
            || own_inbox(principal).is_some_and(|inbox| inbox.covers(filter))
            || Filter::parse(KEYS_ALL).is_ok_and(|directory| directory.covers(filter))
    }
}

/// The key directory: every principal's entries.
const KEYS_ALL: &str = "@keys/#";

/// `@keys/<principal>/#`, when the name is a valid single segment.
fn own_keys(principal: &str) -> Option<Filter> {
    if principal.is_empty() || principal.contains(['/', '+', '*', '#']) {
        return None;
    }
    Filter::parse(&format!("@keys/{principal}/#")).ok()
}

/// `@inbox/<principal>/#`, when the name is a valid single segment.
fn own_inbox(principal: &str) -> Option<Filter> {
    if principal.is_empty() || principal.contains(['/', '+', '*', '#']) {
        return None;
    }
    Filter::parse(&format!("@inbox/{principal}/#")).ok()
}

/// An authenticated party: its name and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Its name, for logs and its inbox.
    pub name: String,
    /// What it may do.
    pub permissions: Permissions,
}

impl Principal {
    /// A principal with these permissions.
    pub fn new(name: impl Into<String>, permissions: Permissions) -> Self {
        Self { name: name.into(), permissions }
    }

    /// The principal of a server without credentials: anyone, allowed every ordinary topic.
    pub(crate) fn anonymous() -> Arc<Self> {
        let mut permissions = Permissions::everything();
        // Without keys nobody is anybody: every entry of the key directory is open (clients
        // check the fingerprints).
        permissions.publish.extend(Filter::parse(KEYS_ALL));
        Arc::new(Self::new("anonymous", permissions))
    }
}

/// Counts of refusals, for operators.
#[derive(Debug, Default)]
pub struct AccessCounters {
    pub(crate) auth_failures: AtomicU64,
    pub(crate) denied_publish: AtomicU64,
    pub(crate) denied_subscribe: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) auth_timeouts: AtomicU64,
}

impl AccessCounters {
    /// Wrong API keys or invalid tokens.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Publishes refused by the permissions.
    pub fn denied_publish(&self) -> u64 {
        self.denied_publish.load(Ordering::Relaxed)
    }

    /// Subscriptions refused by the permissions.
    pub fn denied_subscribe(&self) -> u64 {
        self.denied_subscribe.load(Ordering::Relaxed)
    }

    /// Publishes refused by a connection's rate or byte limit.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Connections closed for not completing HELLO and authentication within the auth timeout.
    pub fn auth_timeouts(&self) -> u64 {
        self.auth_timeouts.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(list: &[&str]) -> Vec<Filter> {
        list.iter().map(|f| Filter::parse(f).unwrap()).collect()
    }

    #[test]
    fn grants_cover_and_denials_overlap() {
        let perms = Permissions {
            publish: filters(&["chat/+"]),
            subscribe: filters(&["chat/+", "news/#"]),
            deny_publish: filters(&["chat/admin"]),
            deny_subscribe: filters(&["news/secret/#"]),
            groups: Vec::new(),
        };
        let topic = |t: &str| Topic::parse(t).unwrap();
        let filter = |f: &str| Filter::parse(f).unwrap();
        assert!(perms.may_publish(&topic("chat/lobby")));
        assert!(!perms.may_publish(&topic("chat/admin")));
        assert!(!perms.may_publish(&topic("chat/a/b")));
        assert!(perms.may_subscribe("ada", &filter("chat/lobby")));
        assert!(!perms.may_subscribe("ada", &filter("chat/#")));
        assert!(!perms.may_subscribe("ada", &filter("news/+/x")), "overlaps news/secret/x");
        assert!(perms.may_subscribe("ada", &filter("news/public/#")));
        assert!(perms.may_subscribe("ada", &filter("@inbox/ada")));
        assert!(perms.may_subscribe("ada", &filter("@inbox/ada/#")));
        assert!(!perms.may_subscribe("ada", &filter("@inbox/bob")));
        assert!(!perms.may_subscribe("ada", &filter("@inbox/+")));
    }

    #[test]
    fn the_key_directory_is_read_by_all_and_written_by_each_for_itself() {
        let none = Permissions::none();
        let topic = |t: &str| Topic::parse(t).unwrap();
        let filter = |f: &str| Filter::parse(f).unwrap();
        assert!(none.may_publish_as("ada", &topic("@keys/ada/phone")));
        assert!(none.may_publish_as("ada", &topic("@keys/ada/policy/ops")));
        assert!(!none.may_publish_as("ada", &topic("@keys/bob/phone")));
        assert!(!none.may_publish_as("ada", &topic("@inbox/ada")));
        assert!(none.may_subscribe("ada", &filter("@keys/bob/+")));
        assert!(none.may_subscribe("ada", &filter("@keys/#")));
        assert!(!Permissions::everything().may_publish(&topic("@keys/bob/phone")));
        let anonymous = Principal::anonymous();
        assert!(anonymous.permissions.may_publish_as("anonymous", &topic("@keys/bob/phone")));
    }

    #[test]
    fn groups_are_granted_by_name_or_prefix_besides_the_own() {
        let perms =
            Permissions { groups: vec!["billing".into(), "jobs-*".into()], ..Default::default() };
        for granted in ["billing", "jobs-eu", "jobs-", "ada", "ada-phone"] {
            assert!(perms.may_join("ada", granted), "{granted}");
        }
        for refused in ["billing2", "jobs", "bob-phone", "adam", "ada2", "Billing"] {
            assert!(!perms.may_join("ada", refused), "{refused}");
        }
        assert!(Permissions::everything().may_join("ada", "anything"));
        assert!(!Permissions::none().may_join("ada", "anything"));
    }
}
