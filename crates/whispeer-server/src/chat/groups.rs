//! Chat groups in memory: who belongs to which group with which role, and the rules for
//! changing it. A request is first *planned* — checked against the rules and limits, giving the
//! changes it makes — then the hub stores the changes in `chat.db` and applies them here, one
//! request at a time, so memory never holds what the database does not.

use std::collections::{BTreeMap, HashMap};

use super::wire::ChatError;

/// A user's place in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Created it (or inherited it); may do everything.
    Owner,
    /// May invite and remove members.
    Admin,
    /// Reads and writes.
    Member,
    /// Invited, not yet joined: gets nothing until it joins.
    Invited,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Invited => "invited",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "owner" => Self::Owner,
            "admin" => Self::Admin,
            "invited" => Self::Invited,
            _ => Self::Member,
        }
    }

    fn joined(self) -> bool {
        self != Self::Invited
    }

    fn manages(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }
}

/// One change a request makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Create { group: String, owner: String, open: bool },
    Set { group: String, user: String, role: Role },
    Remove { group: String, user: String },
}

/// The limits planning checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupLimits {
    pub(crate) groups_per_user: usize,
    pub(crate) members_per_group: usize,
}

#[derive(Clone, Debug, Default)]
struct Group {
    open: bool,
    members: BTreeMap<String, Role>,
}

impl Group {
    fn joined(&self) -> usize {
        self.members.values().filter(|r| r.joined()).count()
    }
}

/// Every group.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    groups: HashMap<String, Group>,
    /// Groups each user has joined.
    joined: HashMap<String, usize>,
}

fn refuse(code: &'static str, message: String) -> ChatError {
    ChatError::new(code, message)
}

impl Groups {
    /// The groups as stored.
    pub(crate) fn load(stored: Vec<super::store::StoredGroup>) -> Self {
        let mut groups = Self::default();
        for group in stored {
            groups
                .groups
                .insert(group.name.clone(), Group { open: group.open, ..Group::default() });
            for (user, role) in group.members {
                groups.apply(&Change::Set { group: group.name.clone(), user, role });
            }
        }
        groups
    }

    fn group(&self, name: &str) -> Result<&Group, ChatError> {
        self.groups
            .get(name)
            .ok_or_else(|| refuse("no_such_group", format!("there is no group {name:?}")))
    }

    fn role(&self, name: &str, user: &str) -> Option<Role> {
        self.groups.get(name)?.members.get(user).copied()
    }

    fn room_for(&self, user: &str, limits: GroupLimits) -> Result<(), ChatError> {
        if self.joined.get(user).copied().unwrap_or(0) >= limits.groups_per_user {
            let message = format!(
                "{user} is in {} groups, the most allowed (max_groups_per_user)",
                limits.groups_per_user
            );
            return Err(refuse("too_many_groups", message));
        }
        Ok(())
    }

    /// Whether `user` has joined `group`.
    pub(crate) fn is_member(&self, group: &str, user: &str) -> bool {
        self.role(group, user).is_some_and(Role::joined)
    }

    /// The members who get `group`'s messages.
    pub(crate) fn members(&self, group: &str) -> Vec<String> {
        let Some(group) = self.groups.get(group) else { return Vec::new() };
        group.members.iter().filter(|(_, r)| r.joined()).map(|(u, _)| u.clone()).collect()
    }

    /// `group`'s members and their roles, for one of them.
    pub(crate) fn roster(
        &self,
        group: &str,
        asker: &str,
    ) -> Result<Vec<(String, Role)>, ChatError> {
        let found = self.group(group)?;
        if !self.is_member(group, asker) {
            return Err(not_member(group));
        }
        Ok(found.members.iter().map(|(u, r)| (u.clone(), *r)).collect())
    }

    /// The groups `user` has joined, and those it is invited to.
    pub(crate) fn of(&self, user: &str) -> Vec<(String, Role)> {
        let mut list: Vec<(String, Role)> = self
            .groups
            .iter()
            .filter_map(|(name, g)| g.members.get(user).map(|r| (name.clone(), *r)))
            .collect();
        list.sort();
        list
    }

    /// Everyone who shares a group with `user`.
    pub(crate) fn peers(&self, user: &str) -> Vec<String> {
        let mut peers: Vec<String> = self
            .groups
            .values()
            .filter(|g| g.members.get(user).is_some_and(|r| r.joined()))
            .flat_map(|g| g.members.iter().filter(|(_, r)| r.joined()).map(|(u, _)| u.clone()))
            .filter(|u| u != user)
            .collect();
        peers.sort();
        peers.dedup();
        peers
    }

    pub(crate) fn plan_create(
        &self,
        group: &str,
        owner: &str,
        open: bool,
        limits: GroupLimits,
    ) -> Result<Vec<Change>, ChatError> {
        if self.groups.contains_key(group) {
            return Err(refuse("group_exists", format!("group {group:?} exists already")));
        }
        self.room_for(owner, limits)?;
        Ok(vec![Change::Create { group: group.into(), owner: owner.into(), open }])
    }

    pub(crate) fn plan_join(
        &self,
        group: &str,
        user: &str,
        limits: GroupLimits,
    ) -> Result<Vec<Change>, ChatError> {
        let found = self.group(group)?;
        let role = self.role(group, user);
        if role.is_some_and(Role::joined) {
            return Ok(Vec::new());
        }
        if !found.open && role != Some(Role::Invited) {
            let message = format!("group {group:?} is invite-only: ask a member to invite you");
            return Err(refuse("invite_only", message));
        }
        if found.joined() >= limits.members_per_group {
            let message = format!(
                "group {group:?} has {} members, the most allowed (max_members_per_group)",
                limits.members_per_group
            );
            return Err(refuse("group_full", message));
        }
        self.room_for(user, limits)?;
        let (group, user) = (group.into(), user.into());
        Ok(vec![Change::Set { group, user, role: Role::Member }])
    }

    /// An invitation: any member of an open group may invite; of an invite-only group, its
    /// owner and admins.
    pub(crate) fn plan_invite(
        &self,
        group: &str,
        by: &str,
        user: &str,
    ) -> Result<Vec<Change>, ChatError> {
        let found = self.group(group)?;
        let Some(inviter) = self.role(group, by).filter(|r| r.joined()) else {
            return Err(not_member(group));
        };
        if !found.open && !inviter.manages() {
            let message = format!("only the owner and admins invite to {group:?}");
            return Err(refuse("forbidden", message));
        }
        if self.role(group, user).is_some() {
            return Ok(Vec::new());
        }
        let (group, user) = (group.into(), user.into());
        Ok(vec![Change::Set { group, user, role: Role::Invited }])
    }

    /// Leaving (or declining an invitation); an owner who leaves hands the group to an admin,
    /// else to the first member by name.
    pub(crate) fn plan_leave(&self, group: &str, user: &str) -> Result<Vec<Change>, ChatError> {
        let found = self.group(group)?;
        let Some(role) = self.role(group, user) else { return Err(not_member(group)) };
        let mut changes = vec![Change::Remove { group: group.into(), user: user.into() }];
        if role == Role::Owner {
            let heir = found
                .members
                .iter()
                .filter(|(u, r)| *u != user && r.joined())
                .min_by_key(|(u, r)| (**r, (*u).clone()));
            if let Some((heir, _)) = heir {
                let (group, user) = (group.into(), heir.clone());
                changes.push(Change::Set { group, user, role: Role::Owner });
            }
        }
        Ok(changes)
    }

    /// Removing someone else: the owner removes anyone, an admin removes members and
    /// invitations.
    pub(crate) fn plan_remove(
        &self,
        group: &str,
        by: &str,
        user: &str,
    ) -> Result<Vec<Change>, ChatError> {
        self.group(group)?;
        let remover =
            self.role(group, by).filter(|r| r.joined()).ok_or_else(|| not_member(group))?;
        let Some(target) = self.role(group, user) else {
            return Err(refuse("not_member", format!("{user} is not in group {group:?}")));
        };
        let allowed = match remover {
            Role::Owner => target != Role::Owner,
            Role::Admin => matches!(target, Role::Member | Role::Invited),
            _ => false,
        };
        if !allowed {
            let message = format!("you may not remove {user} from {group:?}");
            return Err(refuse("forbidden", message));
        }
        Ok(vec![Change::Remove { group: group.into(), user: user.into() }])
    }

    /// Making a member an admin: the owner only.
    pub(crate) fn plan_admin(
        &self,
        group: &str,
        by: &str,
        user: &str,
    ) -> Result<Vec<Change>, ChatError> {
        self.group(group)?;
        if self.role(group, by) != Some(Role::Owner) {
            return Err(refuse("forbidden", format!("only the owner of {group:?} names admins")));
        }
        if self.role(group, user) != Some(Role::Member) {
            return Err(refuse("not_member", format!("{user} is not a member of {group:?}")));
        }
        Ok(vec![Change::Set { group: group.into(), user: user.into(), role: Role::Admin }])
    }

    /// Applies a change already stored.
    pub(crate) fn apply(&mut self, change: &Change) {
        match change {
            Change::Create { group, owner, open } => {
                self.groups.insert(group.clone(), Group { open: *open, ..Group::default() });
                self.set(group, owner, Role::Owner);
            }
            Change::Set { group, user, role } => self.set(group, user, *role),
            Change::Remove { group, user } => {
                let Some(found) = self.groups.get_mut(group) else { return };
                let was_joined = found.members.remove(user).is_some_and(Role::joined);
                if found.members.is_empty() {
                    self.groups.remove(group);
                }
                if was_joined {
                    self.count(user, false);
                }
            }
        }
    }

    /// Sets whether `group` is open, making it (without members) if it is not there: a
    /// cluster's nodes hand a group's entry and its members' separately, in any order.
    pub(crate) fn set_open(&mut self, group: &str, open: bool) {
        self.groups.entry(group.into()).or_default().open = open;
    }

    /// Forgets `group` if it has no members (its entry was removed in the cluster).
    pub(crate) fn drop_if_empty(&mut self, group: &str) {
        if self.groups.get(group).is_some_and(|found| found.members.is_empty()) {
            self.groups.remove(group);
        }
    }

    /// Whether `group` is there.
    pub(crate) fn exists(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    fn set(&mut self, group: &str, user: &str, role: Role) {
        let found = self.groups.entry(group.into()).or_default();
        let before = found.members.insert(user.into(), role);
        match (before.is_some_and(Role::joined), role.joined()) {
            (false, true) => self.count(user, true),
            (true, false) => self.count(user, false),
            _ => {}
        }
    }

    fn count(&mut self, user: &str, up: bool) {
        let count = self.joined.entry(user.into()).or_default();
        if up {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
    }
}

fn not_member(group: &str) -> ChatError {
    refuse("not_member", format!("you are not a member of group {group:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GroupLimits = GroupLimits { groups_per_user: 2, members_per_group: 3 };

    fn run(
        groups: &mut Groups,
        plan: impl FnOnce(&Groups) -> Result<Vec<Change>, ChatError>,
    ) -> Result<(), String> {
        let changes = plan(groups).map_err(|e| e.code.to_string())?;
        changes.iter().for_each(|c| groups.apply(c));
        Ok(())
    }

    #[test]
    fn invite_only_groups_take_invited_users_and_owners_hand_over() {
        let mut g = Groups::default();
        run(&mut g, |g| g.plan_create("team", "alice", false, LIMITS)).unwrap();
        assert_eq!(run(&mut g, |g| g.plan_join("team", "bob", LIMITS)), Err("invite_only".into()));
        run(&mut g, |g| g.plan_invite("team", "alice", "bob")).unwrap();
        assert!(!g.is_member("team", "bob"), "an invitation is not membership");
        run(&mut g, |g| g.plan_join("team", "bob", LIMITS)).unwrap();
        assert_eq!(g.members("team"), vec!["alice", "bob"]);
        assert_eq!(run(&mut g, |g| g.plan_invite("team", "bob", "carol")), Err("forbidden".into()));
        assert_eq!(run(&mut g, |g| g.plan_remove("team", "bob", "alice")), Err("forbidden".into()));
        run(&mut g, |g| g.plan_leave("team", "alice")).unwrap();
        assert_eq!(g.roster("team", "bob").unwrap(), vec![("bob".to_string(), Role::Owner)]);
        run(&mut g, |g| g.plan_leave("team", "bob")).unwrap();
        assert_eq!(
            run(&mut g, |g| g.plan_join("team", "bob", LIMITS)),
            Err("no_such_group".into())
        );
    }

    #[test]
    fn limits_on_members_and_groups_are_refused_by_name() {
        let mut g = Groups::default();
        run(&mut g, |g| g.plan_create("a", "u1", true, LIMITS)).unwrap();
        run(&mut g, |g| g.plan_join("a", "u2", LIMITS)).unwrap();
        run(&mut g, |g| g.plan_join("a", "u3", LIMITS)).unwrap();
        assert_eq!(run(&mut g, |g| g.plan_join("a", "u4", LIMITS)), Err("group_full".into()));
        run(&mut g, |g| g.plan_create("b", "u1", true, LIMITS)).unwrap();
        assert_eq!(
            run(&mut g, |g| g.plan_create("c", "u1", true, LIMITS)),
            Err("too_many_groups".into())
        );
        run(&mut g, |g| g.plan_remove("a", "u1", "u2")).unwrap();
        assert!(!g.is_member("a", "u2"));
        assert_eq!(g.peers("u1"), vec!["u3"]);
    }
}
