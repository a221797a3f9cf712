//! `plan`: from the desired state, the fleet, the rollout state and the time,
//! decide what to push, what each agent's and group's status is, and the next
//! rollout state. Pure and deterministic; see `docs/rollouts.md`.
//!
//! Each group is planned in three steps: start a rollout when its config
//! changed (`rollout.rs`), move the rollout on (`rollout.rs`), then decide
//! what each agent should run and its state (`assign.rs`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use super::input::{AgentView, PlanInput};
use super::join::{collect_records, join_records, uid_order};
use super::output::{Assignment, Event, GroupStatus, Plan, Push};
use super::select::Matcher;
use super::state::{AgentMemory, GroupState, RolloutKind, RolloutPhase, RolloutState, Timestamp};
use crate::desired::Group;
use crate::model::{AgentState, CommitId, ConfigHash, GroupName};

/// Decides pushes, statuses and the next rollout state. Pure: the same input
/// always gives the same plan.
pub fn plan(input: &PlanInput) -> Plan {
    let agents = input.agents;
    let matcher = Matcher::new(input.desired);
    let groups: Vec<&Group> = input.desired.groups.values().collect();
    let mut in_group: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    let mut assignments = Vec::with_capacity(agents.len());
    let by_uid = uid_order(agents);
    let prev = join_records(agents, &by_uid, &input.state.agents);
    let mut records: Vec<Option<AgentMemory>> = vec![None; agents.len()];
    for (i, a) in agents.iter().enumerate() {
        let group = matcher.find(a);
        let state = match group {
            None => AgentState::Unmanaged,
            Some(_) if !a.supported() => AgentState::Unsupported,
            Some(g) => {
                in_group[g].push(i);
                AgentState::Pending
            }
        };
        if state != AgentState::Pending
            && let Some(r) = prev[i]
        {
            // Kept so "never push a FAILED hash again" survives a group change.
            records[i] = Some(AgentMemory { member: None, ..*r }).filter(|r| !r.is_empty());
        }
        assignments.push(Assignment {
            uid: a.uid.clone(),
            group: group.map(|g| groups[g].name.clone()),
            desired: None,
            state,
        });
    }

    let mut out = Out {
        pushes: Vec::new(),
        events: Vec::new(),
        assignments,
        records,
    };
    let mut next_groups = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    let mut rollouts = input.state.rollouts;
    let mut next: Option<Timestamp> = None;
    for (g, group) in groups.iter().enumerate() {
        let ctx = GroupCtx {
            group,
            agents,
            idx: &in_group[g],
            prev: &prev,
            commit: input.desired.commit.as_ref(),
            now: input.now,
            reconcile_interval: input.desired.reconcile_interval,
            next: Cell::new(None),
        };
        let (gs, status) = ctx.plan(input.state.groups.get(&group.name), &mut rollouts, &mut out);
        next = earliest(next, ctx.next.get());
        next_groups.insert(group.name.clone(), gs);
        statuses.insert(group.name.clone(), status);
    }
    Plan {
        pushes: out.pushes,
        state: RolloutState {
            groups: next_groups,
            agents: collect_records(agents, &by_uid, out.records, &input.state.agents),
            rollouts,
        },
        agents: out.assignments,
        groups: statuses,
        events: out.events,
        next,
    }
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the group plans add to, across groups.
pub(super) struct Out {
    pub(super) pushes: Vec<Push>,
    pub(super) events: Vec<Event>,
    pub(super) assignments: Vec<Assignment>,
    /// The next record of each agent, by its index in the fleet.
    pub(super) records: Vec<Option<AgentMemory>>,
}

/// One group's plan: the group, its agents and the time.
pub(super) struct GroupCtx<'a> {
    pub(super) group: &'a Group,
    pub(super) agents: &'a [AgentView],
    /// Indices into `agents` of the group's agents whose config the
    /// controller manages (see [`AgentView::supported`]).
    pub(super) idx: &'a [usize],
    /// Each fleet agent's previous record, by its index in the fleet.
    pub(super) prev: &'a [Option<&'a AgentMemory>],
    pub(super) commit: Option<&'a CommitId>,
    pub(super) now: Timestamp,
    pub(super) reconcile_interval: Duration,
    /// The earliest time a comparison with the clock went the other way.
    pub(super) next: Cell<Option<Timestamp>>,
}

impl GroupCtx<'_> {
    pub(super) fn name(&self) -> &GroupName {
        &self.group.name
    }

    /// Whether `d` has passed since `since`. Every comparison with the clock
    /// goes through here: one that has not passed yet is when the plan
    /// must be made again ([`super::Plan::next`]).
    pub(super) fn reached(&self, since: Timestamp, d: Duration) -> bool {
        let reached = self.now.reached(since, d);
        if !reached {
            self.next.set(earliest(self.next.get(), Some(since.after(d))));
        }
        reached
    }

    /// APPLIED for `hash` but unhealthy for longer than the group's grace
    /// (see [`AgentView::unhealthy_after_applying`]).
    pub(super) fn unhealthy_after_applying(&self, a: &AgentView, hash: ConfigHash) -> bool {
        match a.unhealthy_on(hash) {
            None => false,
            Some(None) => true,
            Some(Some(since)) => self.reached(since, self.group.rollout.unhealthy_grace + Duration::from_millis(1)),
        }
    }

    /// Starts, moves on and assigns the group's rollout; answers its next
    /// state and its status.
    fn plan(&self, prev: Option<&GroupState>, rollouts: &mut u64, out: &mut Out) -> (GroupState, GroupStatus) {
        let mut gs = prev.cloned().unwrap_or_default();
        let started = self.start_if_changed(&mut gs, rollouts, out);
        let ranks: Vec<Option<u32>> = match (&gs.rollout, started) {
            (_, Some(ranks)) => ranks,
            (Some(r), None) if r.kind == RolloutKind::Waves && r.phase != RolloutPhase::Complete => self
                .idx
                .iter()
                .map(|&i| self.prev[i].and_then(|p| p.rank_in(r.id)))
                .collect(),
            _ => vec![None; self.idx.len()],
        };
        if let Some(r) = gs.rollout.as_mut()
            && r.phase != RolloutPhase::Complete
        {
            let progress = self.check_agents(r, &ranks, out);
            self.advance(r, progress, &mut gs.stable, out);
        }
        let status = self.assign(&gs, &ranks, out);
        (gs, status)
    }
}
