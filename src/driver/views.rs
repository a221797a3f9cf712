//! The fleet as the planner sees it: each inventory record projected to an
//! `AgentView`, sorted by uid. Attributes are the record's own description,
//! shared, not copied.

use std::sync::Arc;

use crate::desired::Description;
use crate::fleet::{AgentRecord, Capabilities, FleetSnapshot};
use crate::model::global_epoch;
use crate::reconcile::{AgentView, StatusView, Timestamp, fleet_capacity};

/// Builds views.
pub struct ViewBuilder {
    /// Distinguishes this process's connection epochs from a previous one's:
    /// the planner remembers pushes per epoch across restarts, and the fleet
    /// counts epochs from zero in every process. `None`: the fleet's epochs
    /// are unique already (a cluster's).
    boot: Option<u64>,
    /// The attributes of an agent that has not described itself.
    undescribed: Arc<Description>,
}

impl ViewBuilder {
    /// `boot` must differ between controller processes: its start time in milliseconds.
    pub fn new(boot: Timestamp) -> Self {
        ViewBuilder {
            boot: Some(boot.millis()),
            undescribed: Arc::default(),
        }
    }

    /// For a fleet whose epochs are unique already: a cluster's, which made
    /// them so with [`global_epoch`] as each replica's agents came in.
    pub fn global() -> Self {
        ViewBuilder {
            boot: None,
            undescribed: Arc::default(),
        }
    }

    pub fn build(&self, fleet: &FleetSnapshot) -> Vec<AgentView> {
        // The snapshot is in uid order already.
        let mut views = Vec::with_capacity(fleet_capacity(fleet.agents.len()));
        views.extend(fleet.agents.values().map(|r| self.view(r)));
        views
    }

    pub fn view(&self, r: &AgentRecord) -> AgentView {
        AgentView {
            uid: r.uid.clone(),
            attributes: r.description.clone().unwrap_or_else(|| self.undescribed.clone()),
            accepts_remote_config: r.capabilities.has(Capabilities::ACCEPTS_REMOTE_CONFIG),
            reports_remote_config: r.capabilities.has(Capabilities::REPORTS_REMOTE_CONFIG),
            reports_health: r.capabilities.has(Capabilities::REPORTS_HEALTH),
            connected: r.connected,
            connection_epoch: self
                .boot
                .map_or(r.connection_epoch, |boot| global_epoch(boot, r.connection_epoch)),
            disconnected_at: if r.connected {
                None
            } else {
                r.disconnected_at.map(Timestamp::of)
            },
            remote: r.remote_config_status.as_ref().map(|s| StatusView {
                hash: s.hash,
                status: s.state,
                error: s.error_message.clone(),
            }),
            healthy: r.health.as_ref().map(|h| h.healthy),
            health_error: r.health.as_ref().map(|h| h.last_error.clone()).unwrap_or_default(),
            unhealthy_since: r.unhealthy_since.map(Timestamp::of),
            delivered: r.delivered_now().map(|d| (d.hash, Timestamp::of(d.at))),
            push_drops: r.push_drops,
            groups_allowed: r.identity.as_ref().and_then(|i| i.groups.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::ViewBuilder;
    use crate::fleet::{AgentRecord, FleetSnapshot, Transport};
    use crate::model::InstanceUid;
    use crate::reconcile::{Timestamp, fleet_capacity};

    #[test]
    fn views_come_in_uid_order_with_room_for_agents_to_come() {
        let mut fleet = FleetSnapshot::default();
        for i in (0..16).rev() {
            let uid = InstanceUid::Uuid([i; 16]);
            let record = AgentRecord::new(uid.clone(), Transport::WebSocket, SystemTime::UNIX_EPOCH);
            fleet.agents.insert(uid, Arc::new(record));
        }
        let views = ViewBuilder::new(Timestamp::from_millis(1)).build(&fleet);
        assert!(views.is_sorted_by(|a, b| a.uid < b.uid));
        assert_eq!((views.len(), views.capacity()), (16, fleet_capacity(16)));
    }
}
