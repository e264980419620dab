//! A session's subscriptions: SUBSCRIBE's filters with their options, as native subscriptions
//! of their own or, for a persistent session, as queue groups of the session's own.

use whispeer_proto::{Body, Filter, Frame, Qos, StartAt};

use super::super::codec::{RetainHandling, SubFilter};
use super::super::sessions::StoredSub;
use super::{Pending, SESSION_GROUP, Session, SubAckBuild, SubInfo, shared};

impl Session {
    /// A persistent session's subscription: a native QoS 1 queue group of the session's own,
    /// remembered by the registry. With `pkid`, the SUBACK entry it answers.
    pub(super) fn session_subscribe(
        &mut self,
        options: &SubFilter,
        id: Option<usize>,
        answer: Option<(u16, usize)>,
    ) -> Vec<Frame> {
        let text = options.path.as_str();
        let granted = options.qos.min(1);
        if let Some(&sub) = self.subs.get(text) {
            // Resumed already: kept (its queue holds what came while away), its options updated.
            if let Some(info) = self.sub_info.get_mut(&sub) {
                info.qos = granted;
                info.acks_itself = granted == 0;
                info.no_local = options.no_local;
                info.keep_retain = options.keep_retain;
            }
            self.remember(options, granted, id);
            return match answer {
                Some((pkid, index)) => {
                    vec![self.ask(Pending::Subscribe { pkid, index, granted, sub }, Body::Ping)]
                }
                None => Vec::new(),
            };
        }
        let Ok(filter) = Filter::parse_with(text, &self.limits) else {
            return match answer {
                Some((pkid, index)) => {
                    vec![self.ask(Pending::SubscribeInvalid { pkid, index }, Body::Ping)]
                }
                None => Vec::new(),
            };
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        self.subs.insert(text.to_string(), sub);
        let info = SubInfo {
            qos: granted,
            id,
            acks_itself: granted == 0,
            session: true,
            no_local: options.no_local,
            keep_retain: options.keep_retain,
            skip_retained: options.retained != RetainHandling::Always,
        };
        self.sub_info.insert(sub, info);
        self.remember(options, granted, id);
        let body = Body::Subscribe {
            sub,
            qos: Qos::AtLeastOnce,
            filter,
            prefetch: self.receive_max.map_or(0, u32::from),
            group: Some(format!("{SESSION_GROUP}{}", self.client_id)),
            start: StartAt::Latest,
        };
        let pending = match answer {
            Some((pkid, index)) => Pending::Subscribe { pkid, index, granted, sub },
            None => Pending::Ignore,
        };
        vec![self.ask(pending, body)]
    }

    fn remember(&self, options: &SubFilter, qos: u8, id: Option<usize>) {
        if let Some(r) = &self.registry {
            let stored = StoredSub {
                filter: options.path.clone(),
                qos,
                id,
                no_local: options.no_local,
                keep_retain: options.keep_retain,
            };
            r.sessions.subscribed(&self.client_id, r.connection, stored);
        }
    }

    pub(super) fn subscribe(
        &mut self,
        pkid: u16,
        filters: &[SubFilter],
        id: Option<usize>,
    ) -> Vec<Frame> {
        self.subacks.insert(pkid, SubAckBuild { granted: vec![None; filters.len()] });
        let mut frames = Vec::new();
        for (index, options) in filters.iter().enumerate() {
            let (text, qos) = (&options.path, &options.qos);
            let (group, filter) = shared(text);
            if self.persistent && group.is_none() {
                frames.extend(self.session_subscribe(options, id, Some((pkid, index))));
                continue;
            }
            let Ok(filter) = Filter::parse_with(filter, &self.limits) else {
                frames.push(self.ask(Pending::SubscribeInvalid { pkid, index }, Body::Ping));
                continue;
            };
            let skip_retained = match options.retained {
                RetainHandling::Always => false,
                RetainHandling::IfNew => self.subs.contains_key(text),
                RetainHandling::Never => true,
            };
            // A filter subscribed again replaces the subscription it had.
            if let Some(old) = self.subs.remove(text) {
                self.sub_info.remove(&old);
                frames.push(self.ask(Pending::Ignore, Body::Unsubscribe { sub: old }));
            }
            let sub = self.next_sub;
            self.next_sub += 1;
            let granted = (*qos).min(1);
            self.subs.insert(text.clone(), sub);
            let info = SubInfo {
                qos: granted,
                id,
                acks_itself: false,
                session: false,
                no_local: options.no_local,
                keep_retain: options.keep_retain,
                skip_retained,
            };
            self.sub_info.insert(sub, info);
            let body = Body::Subscribe {
                sub,
                qos: if granted == 0 { Qos::AtMostOnce } else { Qos::AtLeastOnce },
                filter,
                prefetch: self.receive_max.map_or(0, u32::from),
                group,
                start: StartAt::Latest,
            };
            frames.push(self.ask(Pending::Subscribe { pkid, index, granted, sub }, body));
        }
        frames
    }
}
