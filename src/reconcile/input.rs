//! What `plan` decides from: the desired state, the fleet as [`AgentView`]s,
//! the previous rollout state and the time; and what an agent's reports say
//! about one config hash.

use std::sync::Arc;
use std::time::Duration;

use super::state::{RolloutState, Timestamp};
use crate::desired::{AgentAttributes, Description, DesiredState};
pub use crate::model::RemoteConfigState;
use crate::model::{ConfigHash, GroupName, InstanceUid};

/// Everything `plan` decides from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub desired: &'a DesiredState,
    pub agents: &'a [AgentView],
    /// What the previous plan returned (restored from disk after a restart).
    pub state: &'a RolloutState,
    pub now: Timestamp,
}

/// One agent as the planner needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    pub uid: InstanceUid,
    /// Its attributes, as the agent described itself (shared with the inventory).
    pub attributes: Arc<Description>,
    pub accepts_remote_config: bool,
    /// Without it the agent never says whether it applied a config, so it
    /// is `unsupported` like one that does not accept remote config.
    pub reports_remote_config: bool,
    pub reports_health: bool,
    pub connected: bool,
    /// Changes on every new connection of the agent and never repeats for it,
    /// also across controller restarts (pushes are remembered per epoch).
    pub connection_epoch: u64,
    pub disconnected_at: Option<Timestamp>,
    /// The last `remote_config_status`, if the agent sent one.
    pub remote: Option<StatusView>,
    /// `None` until the agent reports health.
    pub healthy: Option<bool>,
    pub health_error: String,
    /// Since when it has been unhealthy, counted from its current connection at the earliest.
    pub unhealthy_since: Option<Timestamp>,
    /// The config that last left for it on its current connection, and when:
    /// its apply clock starts then.
    pub delivered: Option<(ConfigHash, Timestamp)>,
    /// A config whose delivery was followed, this many times in a row, by the
    /// connection closing before the agent said anything of it.
    pub push_drops: Option<(ConfigHash, u32)>,
    /// The only groups its credentials let it join; `None`: any.
    pub groups_allowed: Option<Arc<[GroupName]>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    /// `last_remote_config_hash`: the hash last received, whatever its status.
    pub hash: Option<ConfigHash>,
    pub status: RemoteConfigState,
    pub error: String,
}

impl AgentAttributes for AgentView {
    fn uid(&self) -> &InstanceUid {
        &self.uid
    }
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.attribute(key)
    }

    fn may_join(&self, group: &GroupName) -> bool {
        self.groups_allowed.as_ref().is_none_or(|g| g.contains(group))
    }
}

impl AgentView {
    pub(super) fn reports(&self, hash: ConfigHash) -> Option<RemoteConfigState> {
        self.remote.as_ref().filter(|r| r.hash == Some(hash)).map(|r| r.status)
    }

    /// APPLIED for `hash` and, when it reports health, healthy.
    pub(super) fn good(&self, hash: ConfigHash) -> bool {
        self.connected
            && self.reports(hash) == Some(RemoteConfigState::Applied)
            && (!self.reports_health || self.healthy == Some(true))
    }

    /// APPLIED for `hash` but unhealthy for longer than `grace`: a failure.
    /// Shorter spells are what a collector's (re)start looks like.
    /// The grace runs from the later of the first unhealthy report and the
    /// moment `hash` reached the agent: a collector that was unhealthy on its
    /// old config gets the whole grace to come up healthy on the new one.
    pub fn unhealthy_after_applying(&self, hash: ConfigHash, grace: Duration, now: Timestamp) -> bool {
        self.unhealthy_on(hash)
            .is_some_and(|since| since.is_none_or(|t| now.since(t) > grace))
    }

    /// APPLIED for `hash` but unhealthy: since when its grace runs (`None`
    /// inside: since an unknown time, so the grace is over).
    pub(super) fn unhealthy_on(&self, hash: ConfigHash) -> Option<Option<Timestamp>> {
        (self.reports(hash) == Some(RemoteConfigState::Applied) && self.reports_health && self.healthy == Some(false))
            .then(|| {
                self.unhealthy_since
                    .max(self.delivered_since(hash, Timestamp::default()))
            })
    }

    /// Whether the controller can manage its config (see [`unsupported_reason`]).
    pub fn supported(&self) -> bool {
        unsupported_reason(self.accepts_remote_config, self.reports_remote_config).is_none()
    }

    /// When `hash` left for the agent on its current connection, at or after `since`.
    pub(super) fn delivered_since(&self, hash: ConfigHash, since: Timestamp) -> Option<Timestamp> {
        self.delivered
            .filter(|&(h, at)| h == hash && at >= since)
            .map(|(_, at)| at)
    }
}

/// Why the controller cannot manage an agent's config, if it cannot (it is
/// [`crate::model::AgentState::Unsupported`]): it must accept remote config,
/// and report its status so that a rollout can tell whether it applied.
pub fn unsupported_reason(accepts_remote_config: bool, reports_remote_config: bool) -> Option<&'static str> {
    if !accepts_remote_config {
        Some("lacks the AcceptsRemoteConfig capability")
    } else if !reports_remote_config {
        Some("accepts remote config but does not report its status (ReportsRemoteConfig is off)")
    } else {
        None
    }
}
