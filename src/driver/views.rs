//! The fleet as the planner sees it: each inventory record projected to an
//! `AgentView`, sorted by uid. Merged attribute maps are cached per agent and
//! rebuilt only when the agent sends a new description.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::desired::merge_attributes;
use crate::fleet::{AgentRecord, Capabilities, Description, FleetSnapshot};
use crate::model::InstanceUid;
use crate::reconcile::{AgentView, StatusView, Timestamp};

/// Builds views, reusing attribute maps across calls.
pub struct ViewBuilder {
    /// Distinguishes this process's connection epochs from a previous one's:
    /// the planner remembers pushes per epoch across restarts, and the fleet
    /// counts epochs from zero in every process.
    boot: u64,
    attributes: HashMap<InstanceUid, CachedAttributes>,
}

/// The description an agent last sent, and its attributes merged from it.
type CachedAttributes = (Arc<Description>, Arc<BTreeMap<String, String>>);

const EPOCH_BITS: u32 = 20;

impl ViewBuilder {
    /// `boot` must differ between controller processes: its start time in milliseconds.
    pub fn new(boot: Timestamp) -> Self {
        ViewBuilder {
            boot: boot.millis(),
            attributes: HashMap::new(),
        }
    }

    pub fn build(&mut self, fleet: &FleetSnapshot) -> Vec<AgentView> {
        let mut views: Vec<AgentView> = fleet.agents.values().map(|r| self.view(r)).collect();
        views.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        if self.attributes.len() > fleet.agents.len() {
            self.attributes.retain(|uid, _| fleet.agents.contains_key(uid));
        }
        views
    }

    fn view(&mut self, r: &AgentRecord) -> AgentView {
        AgentView {
            uid: r.uid.clone(),
            attributes: self.attributes_of(r),
            accepts_remote_config: r.capabilities.has(Capabilities::ACCEPTS_REMOTE_CONFIG),
            reports_remote_config: r.capabilities.has(Capabilities::REPORTS_REMOTE_CONFIG),
            reports_health: r.capabilities.has(Capabilities::REPORTS_HEALTH),
            connected: r.connected,
            connection_epoch: (self.boot << EPOCH_BITS) | (r.connection_epoch & ((1 << EPOCH_BITS) - 1)),
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

    /// Identifying and non-identifying attributes merged; identifying wins.
    fn attributes_of(&mut self, r: &AgentRecord) -> Arc<BTreeMap<String, String>> {
        let Some(desc) = &r.description else {
            self.attributes.remove(&r.uid);
            return Arc::default();
        };
        if let Some((seen, merged)) = self.attributes.get(&r.uid)
            && Arc::ptr_eq(seen, desc)
        {
            return merged.clone();
        }
        let merged = Arc::new(merge_attributes(&desc.identifying, &desc.non_identifying));
        self.attributes.insert(r.uid.clone(), (desc.clone(), merged.clone()));
        merged
    }
}
