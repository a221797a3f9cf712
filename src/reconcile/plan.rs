//! `plan`: from the desired state, the fleet, the rollout state and the time,
//! decide what to push, what each agent's and group's status is, and the next
//! rollout state. Pure and deterministic; see `docs/rollouts.md`.
//!
//! Each group is planned in three steps: start a rollout when its config
//! changed (`rollout.rs`), judge its agents and move the rollout on
//! (`rollout.rs`), then decide what each agent should run and its state
//! (`assign.rs`).
//!
//! [`Planner`] keeps what its last plan decided of each agent and group. When
//! a few agents changed, [`Planner::update`] judges and assigns those agents
//! again and moves their groups' rollouts on from kept counters: it decides
//! exactly what a plan of the whole fleet ([`Planner::full`]) would.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use super::assign::Assigned;
use super::input::{AgentView, PlanInput};
use super::join::{join_records, merge_records, merge_sorted, uid_order};
use super::output::{AgentCounts, Assignment, Event, GroupStatus, Plan, Push};
use super::rollout::{Judged, Opened, Progress};
use super::select::Matcher;
use super::state::{
    AgentMemories, AgentMemory, Control, ControlError, GroupState, RolloutKind, RolloutPhase, RolloutState, Timestamp,
};
use super::waves::{OrderKey, order_key};
use crate::desired::{DesiredState, Group, Selector};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};

/// Decides pushes, statuses and the next rollout state. Pure: the same input
/// always gives the same plan.
pub fn plan(input: &PlanInput) -> Plan {
    let mut planner = Planner::new(input.state.clone());
    let step = planner.full(input.desired, input.agents.to_vec(), input.now);
    Plan {
        pushes: step.pushes,
        state: planner.state(),
        agents: planner.assignments.iter().cloned().collect(),
        groups: planner.statuses,
        events: step.events,
        next: step.next,
    }
}

/// The capacity to give a fleet of `agents` views in ([`Planner::full`]):
/// room for an eighth more. Agents that come later take their places in the
/// planner's vectors; without room, the vectors move to memory the kernel
/// must first hand out, at 100,000 agents more than the plan itself costs.
pub fn fleet_capacity(agents: usize) -> usize {
    agents + agents / 8
}

/// What one plan of a [`Planner`] decided, besides what the planner keeps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Configs to send now, in group then fleet order.
    pub pushes: Vec<Push>,
    pub events: Vec<Event>,
    /// As [`Plan::next`].
    pub next: Option<Timestamp>,
    /// The rollout state changed: it is worth saving.
    pub changed: bool,
    /// Agents judged or assigned by this plan.
    pub planned: usize,
}

/// Plans over and over, keeping the last plan's decisions: the rollout state,
/// every agent's assignment and record, every group's status and counters.
#[derive(Debug, Clone, Default)]
pub struct Planner {
    /// The groups' states and the rollout counter. Its `agents` are the
    /// records of agents the fleet does not list; those of the agents it
    /// lists are in `slots`.
    state: RolloutState,
    /// The fleet as last planned, in the order given.
    agents: Vec<AgentView>,
    /// Indices of `agents` in uid order.
    by_uid: Vec<usize>,
    slots: Vec<Slot>,
    /// Per group of the desired state, in its order.
    groups: Vec<GroupPlan>,
    assignments: imbl::Vector<Assignment>,
    statuses: BTreeMap<GroupName, GroupStatus>,
    by_state: BTreeMap<AgentState, u64>,
    deadlines: Deadlines,
    /// Agents whose record changed, or that failed, in the last plan: the
    /// next plan decides them again.
    again: Vec<usize>,
    /// The commit of the desired state of the last full plan.
    commit: Option<CommitId>,
    /// What chose the groups of the last full plan's agents.
    selection: Vec<Selection>,
    now: Timestamp,
    next: Option<Timestamp>,
    /// An update may follow: a full plan was made and the fleet lists no
    /// uid twice.
    current: bool,
    /// Records of agents the fleet has not listed for this long are dropped
    /// by full plans; `None`: kept.
    retention: Option<Duration>,
}

/// What the last plan decided of one agent.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Its group, by position in the desired state (also when unsupported).
    group: Option<u32>,
    /// `group` was the last plan's, whose groups selected as these do.
    matched: bool,
    /// Its canary order key in a group (by position, while the groups
    /// select as they did when it was computed).
    order: Option<(u32, OrderKey)>,
    /// Its config is managed in that group.
    managed: bool,
    record: Option<AgentMemory>,
    judged: Judged,
    desired: Option<ConfigHash>,
    state: AgentState,
    judge_deadline: Option<Timestamp>,
    assign_deadline: Option<Timestamp>,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            group: None,
            matched: false,
            order: None,
            managed: false,
            record: None,
            judged: Judged::default(),
            desired: None,
            state: AgentState::Unmanaged,
            judge_deadline: None,
            assign_deadline: None,
        }
    }
}

impl Slot {
    fn deadline(&self) -> Option<Timestamp> {
        earliest(self.judge_deadline, self.assign_deadline)
    }
}

/// A group's name, priority and selector.
type Selection = (GroupName, i64, Selector);

/// The indices (in uid order) of the agents of `by_uid`, each uid once: the
/// first agent listed under it that had a record, else the first.
fn first_of_each_uid(agents: &[AgentView], by_uid: &[usize], slots: &[Slot]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(by_uid.len());
    for &j in by_uid {
        match out.last_mut() {
            Some(k) if agents[*k].uid == agents[j].uid => {
                if slots[*k].record.is_none() && slots[j].record.is_some() {
                    *k = j;
                }
            }
            _ => out.push(j),
        }
    }
    out
}

/// What the last plan of a group keeps for the next.
#[derive(Debug, Clone, Default)]
struct GroupPlan {
    /// Its managed agents, in fleet order.
    idx: Vec<usize>,
    /// The sum of its agents' parts in the rollout's progress.
    tally: Tally,
    /// Members of its opened waves the fleet does not list that block the
    /// wave, and when one of them stops blocking.
    absent: (u32, Option<Timestamp>),
    counts: AgentCounts,
    /// When moving the rollout on may decide otherwise.
    deadline: Option<Timestamp>,
    /// Its rollout moved after its agents were judged: the next plan judges
    /// them all again.
    stale: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    counted: u32,
    verified: u32,
    blocking: u32,
}

impl Tally {
    fn add(&mut self, j: Judged) {
        self.counted += u32::from(j.counted);
        self.verified += u32::from(j.verified);
        self.blocking += u32::from(j.blocking);
    }

    fn remove(&mut self, j: Judged) {
        self.counted -= u32::from(j.counted);
        self.verified -= u32::from(j.verified);
        self.blocking -= u32::from(j.blocking);
    }
}

/// The agents' deadlines, earliest first. An entry whose agent's deadline
/// has changed since is dropped when it comes to the top.
#[derive(Debug, Clone, Default)]
struct Deadlines(BinaryHeap<Reverse<(Timestamp, usize)>>);

impl Deadlines {
    fn of(slots: &[Slot]) -> Self {
        Deadlines(
            slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some(Reverse((s.deadline()?, i))))
                .collect(),
        )
    }

    fn note(&mut self, i: usize, slot: &Slot) {
        if let Some(t) = slot.deadline() {
            self.0.push(Reverse((t, i)));
        }
    }

    fn earliest(&mut self, slots: &[Slot]) -> Option<Timestamp> {
        if self.0.len() > 2 * slots.len() + 1024 {
            *self = Deadlines::of(slots);
        }
        while let Some(&Reverse((t, i))) = self.0.peek() {
            if slots[i].deadline() == Some(t) {
                return Some(t);
            }
            self.0.pop();
        }
        None
    }
}

/// The fleet a plan over all agents goes over.
enum Fleet {
    /// As given.
    New(Vec<AgentView>),
    /// The last plan's (with its agents updated, and those that came),
    /// `moved` (in any order, some perhaps twice) those that came and those
    /// whose attributes or permitted groups changed.
    Known { moved: Vec<usize> },
}

/// Which agents of a group a plan decides.
enum Scope<'s> {
    /// All of them, counting the group afresh; with the ranks (by position
    /// among the group's agents) of a rollout that started now.
    Whole(Option<Vec<Option<u32>>>),
    /// These (in fleet order) and, when the rollout moves, all of them.
    Agents(&'s [usize]),
}

/// What planning the groups adds up to, besides pushes and events.
#[derive(Default)]
struct Notes {
    /// An update: what changes is noted for the assignments and deadlines
    /// (a full plan builds them anew).
    incremental: bool,
    again: Vec<usize>,
    /// Agents assigned, with the state they had before (updates only).
    assigned: Vec<(usize, AgentState)>,
    changed: bool,
    planned: usize,
}

impl Planner {
    /// A planner that goes on from `state` (restored, or empty).
    pub fn new(state: RolloutState) -> Self {
        Planner {
            state,
            ..Planner::default()
        }
    }

    /// Full plans drop the records of agents the fleet has not listed for
    /// `retention`.
    pub fn forgetting_after(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// The rollout state, with every agent's record (builds it: for saving).
    pub fn state(&self) -> RolloutState {
        RolloutState {
            groups: self.state.groups.clone(),
            agents: self.records(),
            rollouts: self.state.rollouts,
        }
    }

    /// Each group's state.
    pub fn group_states(&self) -> &BTreeMap<GroupName, GroupState> {
        &self.state.groups
    }

    /// Every agent's group, desired hash and state, in the order the fleet was given.
    pub fn assignments(&self) -> &imbl::Vector<Assignment> {
        &self.assignments
    }

    /// Each group's status.
    pub fn statuses(&self) -> &BTreeMap<GroupName, GroupStatus> {
        &self.statuses
    }

    /// How many agents are in each state.
    pub fn agents_by_state(&self) -> &BTreeMap<AgentState, u64> {
        &self.by_state
    }

    /// The fleet as last planned.
    pub fn agents(&self) -> &[AgentView] {
        &self.agents
    }

    /// Pauses, resumes or promotes a group's rollout; the next plan takes it up.
    pub fn control(
        &mut self,
        group: &GroupName,
        action: Control,
        now: Timestamp,
        by: Option<&str>,
    ) -> Result<(), ControlError> {
        match action {
            Control::Pause => self.state.pause(group, now, by),
            Control::Resume => self.state.resume(group, now, by),
            Control::Promote => self.state.promote(group, now, by),
        }?;
        // Only moving the rollout on reads what changed; the group is planned whole.
        match self.statuses.keys().position(|g| g == group) {
            Some(g) if self.current => self.groups[g].stale = true,
            _ => self.current = false,
        }
        Ok(())
    }

    /// Plans the whole fleet, `agents`, against `desired` at `now`.
    pub fn full(&mut self, desired: &DesiredState, agents: Vec<AgentView>, now: Timestamp) -> Step {
        self.plan_all(desired, Fleet::New(agents), now)
    }

    /// Plans the whole fleet as [`Planner::full`] does, the fleet being the
    /// last plan's with the agents that `changed` (a commit, a deadline, the
    /// reconcile interval, agents coming in: the fleet's views are not built
    /// again). Agents it did not list join at their places in uid order.
    /// `None`, having changed nothing, when some are new and the last plan's
    /// fleet was not in uid order, or two new ones share a uid.
    pub fn replan(&mut self, desired: &DesiredState, changed: &[AgentView], now: Timestamp) -> Option<Step> {
        if !self.current {
            return None;
        }
        let mut at = Vec::with_capacity(changed.len());
        let mut new = Vec::new();
        for v in changed {
            match self.find(&v.uid) {
                Some(i) => at.push((i, v)),
                None => new.push(v),
            }
        }
        new.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        let in_uid_order = || self.by_uid.iter().enumerate().all(|(k, &i)| k == i);
        if !new.is_empty() && (new.windows(2).any(|w| w[0].uid == w[1].uid) || !in_uid_order()) {
            return None;
        }
        let mut moved = Vec::new();
        for (i, v) in at {
            let old = &self.agents[i];
            if old.attributes != v.attributes || old.groups_allowed != v.groups_allowed {
                moved.push(i);
            }
            self.agents[i] = v.clone();
        }
        if !new.is_empty() {
            moved = self.admit(new, &moved);
        }
        Some(self.plan_all(desired, Fleet::Known { moved }, now))
    }

    /// Takes `new` agents (in uid order, none listed) into a fleet in uid
    /// order, each at its place with the record kept of it, as unmatched.
    /// Answers `moved` (indices before) at their new places, and the new
    /// agents'.
    fn admit(&mut self, new: Vec<&AgentView>, moved: &[usize]) -> Vec<usize> {
        let mut absent = std::mem::take(&mut self.state.agents).into_entries();
        let records: Vec<Option<AgentMemory>> = (new.iter())
            .map(|v| Some(absent[absent.binary_search_by(|(u, _)| u.cmp(&v.uid)).ok()?].1))
            .collect();
        absent.retain(|(u, _)| new.binary_search_by(|v| v.uid.cmp(u)).is_err());
        // Where each goes, and where the agents to plan as moved go.
        let at: Vec<usize> = (new.iter().enumerate())
            .map(|(j, v)| self.agents.partition_point(|a| a.uid < v.uid) + j)
            .collect();
        let moved = (moved.iter())
            .map(|&i| i + new.partition_point(|v| v.uid < self.agents[i].uid))
            .chain(at.iter().copied())
            .collect();
        let filler = new[0].clone();
        insert_at(&mut self.agents, &at, new.iter().map(|&v| v.clone()).collect(), || {
            filler.clone()
        });
        let slots = records.into_iter().map(|record| Slot {
            record,
            ..Slot::default()
        });
        insert_at(&mut self.slots, &at, slots.collect(), Slot::default);
        // Assignments to decide (as an agent's that changed): the plan sets them.
        let mut tail = self.assignments.split_off(at[0]).into_iter();
        let mut came = at.iter().zip(&new).peekable();
        let assignments: imbl::Vector<Assignment> = (at[0]..self.agents.len())
            .filter_map(|i| match came.next_if(|(p, _)| **p == i) {
                Some((_, v)) => Some(Assignment {
                    uid: v.uid.clone(),
                    group: None,
                    desired: None,
                    state: AgentState::Unmanaged,
                }),
                None => tail.next(),
            })
            .collect();
        self.assignments.append(assignments);
        self.state.agents = AgentMemories::from_sorted(absent);
        // Still the identity: the fleet is in uid order.
        self.by_uid.extend(self.by_uid.len()..self.agents.len());
        moved
    }

    fn plan_all(&mut self, desired: &DesiredState, fleet: Fleet, now: Timestamp) -> Step {
        let selection: Vec<Selection> = desired
            .groups
            .values()
            .map(|g| (g.name.clone(), g.priority, g.selector.clone()))
            .collect();
        let same_selection = selection == self.selection;
        // The last plan's agents (the usual case: a commit, a deadline) take
        // over their slots as they are. Except those that moved, they keep
        // their groups when the selection is the same.
        let mut rematch = None;
        let (agents, by_uid, mut slots, mut absent, same_fleet) = match fleet {
            Fleet::Known { mut moved } => {
                moved.sort_unstable();
                moved.dedup();
                rematch = Some(moved.into_iter().peekable());
                (
                    std::mem::take(&mut self.agents),
                    std::mem::take(&mut self.by_uid),
                    std::mem::take(&mut self.slots),
                    std::mem::take(&mut self.state.agents).into_entries(),
                    true,
                )
            }
            Fleet::New(agents)
                if self.current
                    && self.agents.len() == agents.len()
                    && self.agents.iter().zip(&agents).all(|(a, b)| a.uid == b.uid) =>
            {
                let mut slots = std::mem::take(&mut self.slots);
                for ((old, new), s) in self.agents.iter().zip(&agents).zip(&mut slots) {
                    s.matched =
                        same_selection && old.attributes == new.attributes && old.groups_allowed == new.groups_allowed;
                }
                let by_uid = std::mem::take(&mut self.by_uid);
                let absent = std::mem::take(&mut self.state.agents).into_entries();
                (agents, by_uid, slots, absent, true)
            }
            Fleet::New(agents) => {
                let by_uid = uid_order(&agents);
                let (slots, absent) = self.join(&agents, agents.capacity(), &by_uid, same_selection);
                (agents, by_uid, slots, absent, false)
            }
        };
        let matcher = Matcher::new(desired);
        let groups: Vec<&Group> = desired.groups.values().collect();
        let mut plans: Vec<GroupPlan> = groups.iter().map(|_| GroupPlan::default()).collect();
        let mut changed = false;
        // One pass over the fleet: each pass reads every slot from memory.
        for (i, (a, s)) in agents.iter().zip(&mut slots).enumerate() {
            if let Some(moved) = &mut rematch {
                s.matched = same_selection && moved.next_if_eq(&i).is_none();
            }
            if !same_selection {
                // Keys of groups by position: the positions may mean others now.
                s.order = None;
            }
            if !s.matched {
                s.group = matcher.find(a).map(|g| g as u32);
            }
            s.managed = s.group.is_some() && a.supported();
            s.state = match s.group {
                Some(g) if s.managed => {
                    plans[g as usize].idx.push(i);
                    AgentState::Pending
                }
                Some(_) => AgentState::Unsupported,
                None => AgentState::Unmanaged,
            };
            if !s.managed {
                // What an earlier plan decided of it in a group no longer holds.
                *s = Slot {
                    group: s.group,
                    state: s.state,
                    record: s.record,
                    order: s.order,
                    ..Slot::default()
                };
            }
            let Some(r) = &mut s.record else { continue };
            if self.retention.is_some() && r.absent_since.is_some() {
                r.absent_since = None;
                changed = true;
            }
            if !s.managed {
                // Kept so "never push a FAILED hash again" survives a group change.
                let kept = Some(AgentMemory { member: None, ..*r }).filter(|r| !r.is_empty());
                if kept != s.record {
                    s.record = kept;
                    changed = true;
                }
            }
        }
        if let Some(keep) = self.retention {
            absent.retain_mut(|(_, r)| {
                changed |= r.absent_since.is_none();
                let since = *r.absent_since.get_or_insert(now);
                let forget = now.reached(since, keep);
                changed |= forget;
                !forget
            });
        }

        let mut out = Out::default();
        let mut notes = Notes::default();
        let mut rollouts = self.state.rollouts;
        let mut next_groups = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for (g, group) in groups.iter().enumerate() {
            let gp = &mut plans[g];
            let idx = std::mem::take(&mut gp.idx);
            let ctx = GroupCtx::new(group, &agents, &idx, desired, now);
            let mut gs = self.state.groups.get(&group.name).cloned().unwrap_or_default();
            // Canary order keys are kept: a commit's rollouts do not hash the fleet again.
            let mut key_of = |n: usize| {
                let s = &mut slots[idx[n]];
                match s.order {
                    Some((k, key)) if s.group == Some(k) => key,
                    _ => {
                        let key = order_key(&group.name, &agents[idx[n]].uid);
                        s.order = s.group.map(|g| (g, key));
                        key
                    }
                }
            };
            let started = ctx.start_if_changed(&mut gs, &mut rollouts, &mut out, &mut key_of);
            let status = plan_group(
                &ctx,
                &mut gs,
                gp,
                &mut slots,
                Scope::Whole(started),
                &mut Deadlines::default(),
                &mut out,
                &mut notes,
            );
            gp.idx = idx;
            next_groups.insert(group.name.clone(), gs);
            statuses.insert(group.name.clone(), status);
        }
        changed |= notes.changed || next_groups != self.state.groups || rollouts != self.state.rollouts;

        let assignment = |a: &AgentView, s: &Slot| Assignment {
            uid: a.uid.clone(),
            group: s.group.map(|g| groups[g as usize].name.clone()),
            desired: s.desired,
            state: s.state,
        };
        // One more pass over the fleet: the counts, the deadlines and, of the
        // last plan's agents, the assignments decided otherwise.
        let mut counts = [0u64; AgentState::ALL.len()];
        let mut deadlines = Vec::new();
        let mut differ = Vec::new();
        let mut before = same_fleet.then(|| self.assignments.iter());
        for (i, s) in slots.iter().enumerate() {
            counts[s.state as usize] += 1;
            if let Some(t) = s.deadline() {
                deadlines.push(Reverse((t, i)));
            }
            if let Some(a) = before.as_mut().and_then(|b| b.next())
                && (a.state != s.state
                    || a.desired != s.desired
                    || a.group.as_ref() != s.group.map(|g| &groups[g as usize].name))
            {
                differ.push(i);
            }
        }
        let by_state = (AgentState::ALL.into_iter())
            .map(|state| (state, counts[state as usize]))
            .filter(|&(_, n)| n > 0)
            .collect();
        if same_fleet {
            for i in differ {
                self.assignments.set(i, assignment(&agents[i], &slots[i]));
            }
        } else {
            self.assignments = agents.iter().zip(&slots).map(|(a, s)| assignment(a, s)).collect();
        }
        self.deadlines = Deadlines(deadlines.into());
        self.current = by_uid.windows(2).all(|w| agents[w[0]].uid != agents[w[1]].uid);
        self.state = RolloutState {
            groups: next_groups,
            agents: AgentMemories::from_sorted(absent),
            rollouts,
        };
        self.agents = agents;
        self.by_uid = by_uid;
        self.slots = slots;
        self.groups = plans;
        self.statuses = statuses;
        self.by_state = by_state;
        self.again = notes.again;
        self.commit = desired.commit.clone();
        self.selection = selection;
        self.finish(out, changed, notes.planned, now)
    }

    /// Plans again after `changed` agents changed, against the desired state
    /// of the last full plan, at `now`: decides those agents (and those the
    /// last plan changed the records of) and moves their groups' rollouts on.
    /// `None`, having changed nothing, when only a full plan can: an agent is
    /// new or in another group, a deadline has passed, or the clock went back.
    pub fn update(&mut self, desired: &DesiredState, changed: &[AgentView], now: Timestamp) -> Option<Step> {
        if !self.current
            || desired.commit != self.commit
            || desired.groups.len() != self.groups.len()
            || now < self.now
            || self.next.is_some_and(|t| now >= t)
        {
            return None;
        }
        let mut at = Vec::with_capacity(changed.len());
        for v in changed {
            let i = self.find(&v.uid)?;
            let old = &self.agents[i];
            if old.attributes != v.attributes
                || old.groups_allowed != v.groups_allowed
                || old.supported() != v.supported()
            {
                return None;
            }
            at.push(i);
        }
        let mut again = std::mem::take(&mut self.again);
        for (i, v) in at.into_iter().zip(changed) {
            if self.agents[i] != *v {
                self.agents[i] = v.clone();
                again.push(i);
            }
        }
        again.sort_unstable();
        again.dedup();
        let mut by_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in &again {
            let s = &self.slots[i];
            if let (Some(g), true) = (s.group, s.managed) {
                by_group.entry(g as usize).or_default().push(i);
            }
        }

        let mut out = Out::default();
        let mut notes = Notes {
            incremental: true,
            ..Notes::default()
        };
        for (g, group) in desired.groups.values().enumerate() {
            let gp = &mut self.groups[g];
            let scope = match by_group.get(&g) {
                _ if gp.stale => Scope::Whole(None),
                Some(list) => Scope::Agents(list),
                None => continue,
            };
            let idx = std::mem::take(&mut gp.idx);
            let ctx = GroupCtx::new(group, &self.agents, &idx, desired, now);
            let gs = self.state.groups.entry(group.name.clone()).or_default();
            let status = plan_group(
                &ctx,
                gs,
                gp,
                &mut self.slots,
                scope,
                &mut self.deadlines,
                &mut out,
                &mut notes,
            );
            gp.idx = idx;
            self.statuses.insert(group.name.clone(), status);
        }
        for (i, was) in notes.assigned {
            let s = self.slots[i];
            let a = &self.assignments[i];
            if a.state == s.state && a.desired == s.desired {
                continue;
            }
            decrement(&mut self.by_state, was);
            *self.by_state.entry(s.state).or_default() += 1;
            let mut a = a.clone();
            a.state = s.state;
            a.desired = s.desired;
            self.assignments.set(i, a);
        }
        self.again = notes.again;
        Some(self.finish(out, notes.changed, notes.planned, now))
    }

    /// Each agent's slot with its record: of the agents the last plan listed
    /// (whose group is still theirs when nothing it was chosen by changed),
    /// or of those it did not; and the records of agents not listed.
    fn join(
        &mut self,
        agents: &[AgentView],
        room: usize,
        by_uid: &[usize],
        same_selection: bool,
    ) -> (Vec<Slot>, Vec<(InstanceUid, AgentMemory)>) {
        // As much room as the views have, for agents to come.
        let mut slots: Vec<Slot> = Vec::with_capacity(room);
        slots.resize(agents.len(), Slot::default());

        // Each agent's record: of the agents the last plan listed (whose
        // group is still theirs when nothing it was chosen by changed), or
        // of those it did not.
        let (old_agents, old_by_uid, old_slots) = (
            std::mem::take(&mut self.agents),
            std::mem::take(&mut self.by_uid),
            std::mem::take(&mut self.slots),
        );
        let listed = first_of_each_uid(&old_agents, &old_by_uid, &old_slots);
        let mut found = |i: usize, j: usize| {
            let (old, new, slot) = (&old_agents[j], &agents[i], &old_slots[j]);
            slots[i].record = slot.record;
            if same_selection && old.attributes == new.attributes && old.groups_allowed == new.groups_allowed {
                slots[i].group = slot.group;
                slots[i].matched = true;
            }
            slots[i].order = slot.order;
        };
        let gone = join_records(
            agents,
            by_uid,
            listed.iter().map(|&j| (&old_agents[j].uid, j)),
            &mut found,
        );
        let left = gone
            .into_iter()
            .filter_map(|(uid, j)| Some((uid, old_slots[j].record?)))
            .collect();
        let unlisted = self.state.agents.entries().iter().map(|(u, r)| (u, *r));
        let mut found = |i: usize, r: AgentMemory| slots[i].record = Some(r);
        let absent = merge_sorted(left, join_records(agents, by_uid, unlisted, &mut found));
        (slots, absent)
    }

    fn finish(&mut self, out: Out, changed: bool, planned: usize, now: Timestamp) -> Step {
        let groups = self.groups.iter().map(|g| earliest(g.deadline, g.absent.1));
        let next = groups.fold(self.deadlines.earliest(&self.slots), earliest);
        self.now = now;
        self.next = next;
        Step {
            pushes: out.pushes,
            events: out.events,
            next,
            changed,
            planned,
        }
    }

    fn find(&self, uid: &InstanceUid) -> Option<usize> {
        let k = self.by_uid.binary_search_by(|&i| self.agents[i].uid.cmp(uid)).ok()?;
        Some(self.by_uid[k])
    }

    /// Every record in uid order: the fleet's agents', then the others'.
    fn records(&self) -> AgentMemories {
        merge_records(
            self.by_uid.iter().map(|&i| (&self.agents[i].uid, self.slots[i].record)),
            &self.state.agents,
        )
    }
}

/// Inserts `items` into `v` so that they end at `at` (ascending places in
/// the result), moving only what comes after the first of them, each once.
fn insert_at<T>(v: &mut Vec<T>, at: &[usize], items: Vec<T>, filler: impl FnMut() -> T) {
    let mut hi = v.len();
    v.extend(std::iter::repeat_with(filler).take(at.len()));
    // Fillers at `hi..hi + k`, one for each of the `k` items still to place;
    // the elements below `hi` that go after the next item move up `k`
    // places, at most `k` at once.
    for (j, (&p, item)) in at.iter().zip(items).enumerate().rev() {
        let (from, k) = (p - j, j + 1);
        while hi > from {
            let lo = from.max(hi.saturating_sub(k));
            let (below, above) = v.split_at_mut(lo + k);
            below[lo..hi].swap_with_slice(&mut above[..hi - lo]);
            hi = lo;
        }
        v[p] = item;
    }
}

fn decrement(counts: &mut BTreeMap<AgentState, u64>, state: AgentState) {
    if let Some(n) = counts.get_mut(&state) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&state);
        }
    }
}

/// What moving a rollout on can change that the agents' treatment reads.
fn treatment_inputs(gs: &GroupState) -> (Option<(u64, RolloutPhase, u32)>, Option<ConfigHash>) {
    (
        gs.rollout.as_ref().map(|r| (r.id, r.phase, r.opened)),
        gs.stable.as_ref().map(|s| s.bundle.hash()),
    )
}

/// Everything moving a rollout on can change.
type Moves = (
    Option<(RolloutPhase, bool, bool, u32, [Option<Timestamp>; 4])>,
    Option<ConfigHash>,
);

fn moves(gs: &GroupState) -> Moves {
    (
        gs.rollout.as_ref().map(|r| {
            (
                r.phase,
                r.paused,
                r.promote,
                r.opened,
                [r.settled_since, r.wave_opened, r.waiting_since, r.finished],
            )
        }),
        gs.stable.as_ref().map(|s| s.bundle.hash()),
    )
}

/// Plans one group: judges the agents `scope` names, moves the rollout on,
/// assigns them (all of the group's when the rollout moved) and answers the
/// group's status. Pushes and events go to `out`.
#[allow(clippy::too_many_arguments)]
fn plan_group(
    ctx: &GroupCtx<'_>,
    gs: &mut GroupState,
    gp: &mut GroupPlan,
    slots: &mut [Slot],
    scope: Scope<'_>,
    deadlines: &mut Deadlines,
    out: &mut Out,
    notes: &mut Notes,
) -> GroupStatus {
    let treated = treatment_inputs(gs);
    let moved = moves(gs);
    let rolling = gs
        .rollout
        .as_ref()
        .filter(|r| r.kind == RolloutKind::Waves && r.phase != RolloutPhase::Complete)
        .map(|r| r.id);
    let rank = |slots: &[Slot], i: usize| rolling.and_then(|id| slots[i].record.as_ref()?.rank_in(id));
    let whole = matches!(scope, Scope::Whole(_));
    let (list, ranks): (&[usize], Vec<Option<u32>>) = match scope {
        Scope::Whole(Some(ranks)) => (ctx.idx, ranks),
        Scope::Whole(None) => (ctx.idx, ctx.idx.iter().map(|&i| rank(slots, i)).collect()),
        Scope::Agents(list) => (list, list.iter().map(|&i| rank(slots, i)).collect()),
    };
    let incremental = notes.incremental;
    let note = |deadlines: &mut Deadlines, i: usize, slot: &Slot, was: Option<Timestamp>| {
        if incremental && slot.deadline() != was {
            deadlines.note(i, slot);
        }
    };

    if whole {
        gp.tally = Tally::default();
        gp.absent = (0, None);
        gp.deadline = None;
        gp.counts = AgentCounts::default();
    }
    // With no rollout under way nothing is judged: the pass that assigns
    // clears what an earlier one judged.
    let unjudge = if let Some(r) = gs.rollout.as_mut()
        && r.phase != RolloutPhase::Complete
    {
        let opened = Opened::of(r, ctx.name());
        let mut missing = whole.then(BTreeMap::new);
        let mut failed = Vec::new();
        for (&i, &rank) in list.iter().zip(&ranks) {
            let a = &ctx.agents[i];
            let (j, deadline) = ctx.deadline_of(|| ctx.judge(&*r, &opened, a, slots[i].record.as_ref(), rank));
            let slot = &mut slots[i];
            if !whole {
                gp.tally.remove(slot.judged);
            }
            gp.tally.add(j.judged);
            let was = slot.deadline();
            slot.judged = j.judged;
            slot.judge_deadline = deadline;
            note(deadlines, i, slot, was);
            match &mut missing {
                Some(m) => {
                    if let Some(t) = j.missing {
                        m.insert(a.uid.clone(), t);
                    }
                }
                None => {
                    let old = match j.missing {
                        Some(t) => r.missing.insert(a.uid.clone(), t),
                        None => r.missing.remove(&a.uid),
                    };
                    notes.changed |= old != j.missing;
                }
            }
            if let Some(error) = j.failure {
                failed.push((a.uid.clone(), error));
                notes.again.push(i);
            }
        }
        if let Some(mut m) = missing {
            let (blocking, deadline) = ctx.deadline_of(|| ctx.absent_members(r, &opened, gp.tally.counted, &mut m));
            gp.absent = (blocking, deadline);
            notes.changed |= r.missing != m;
            r.missing = m;
        }
        notes.changed |= !failed.is_empty();
        ctx.record_failures(r, failed, out);
        let progress = Progress {
            blocking: gp.tally.blocking + gp.absent.0,
            verified: gp.tally.verified,
        };
        let ((), deadline) = ctx.deadline_of(|| ctx.advance(r, progress, &mut gs.stable, out));
        gp.deadline = deadline;
        false
    } else {
        whole
    };
    notes.changed |= moves(gs) != moved;
    let retreat = treatment_inputs(gs) != treated;

    let all: Vec<Option<u32>>;
    let (list, ranks) = if retreat && !whole {
        all = ctx.idx.iter().map(|&i| rank(slots, i)).collect();
        (ctx.idx, &all)
    } else {
        (list, &ranks)
    };
    let current = ctx.current(gs);
    let mut reverted = 0;
    for (&i, &rank) in list.iter().zip(ranks) {
        let slot = &mut slots[i];
        let was = slot.deadline();
        if unjudge {
            slot.judged = Judged::default();
            slot.judge_deadline = None;
        }
        let (
            Assigned {
                desired,
                state,
                changed,
                reverted: r,
            },
            deadline,
        ) = ctx.deadline_of(|| ctx.assign_one(&ctx.agents[i], &mut slot.record, rank, &current, out));
        if !whole {
            gp.counts.remove(slot.state);
        }
        if incremental {
            notes.assigned.push((i, slot.state));
        }
        gp.counts.add(state);
        if changed {
            notes.again.push(i);
            notes.changed = true;
        }
        reverted += u32::from(r);
        slot.desired = desired;
        slot.state = state;
        slot.assign_deadline = deadline;
        note(deadlines, i, slot, was);
    }
    notes.planned += list.len();
    ctx.reverted(gs, reverted, out);
    gp.stale = retreat;
    ctx.status(gs, gp.counts)
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the group plans add to, across groups.
#[derive(Default)]
pub(super) struct Out {
    pub(super) pushes: Vec<Push>,
    pub(super) events: Vec<Event>,
}

/// One group's plan: the group, its agents and the time.
pub(super) struct GroupCtx<'a> {
    pub(super) group: &'a Group,
    pub(super) agents: &'a [AgentView],
    /// Indices into `agents` of the group's agents whose config the
    /// controller manages (see [`AgentView::supported`]).
    pub(super) idx: &'a [usize],
    pub(super) commit: Option<&'a CommitId>,
    pub(super) now: Timestamp,
    pub(super) reconcile_interval: Duration,
    /// The earliest time a comparison with the clock went the other way.
    next: Cell<Option<Timestamp>>,
}

impl<'a> GroupCtx<'a> {
    fn new(
        group: &'a Group,
        agents: &'a [AgentView],
        idx: &'a [usize],
        desired: &'a DesiredState,
        now: Timestamp,
    ) -> Self {
        GroupCtx {
            group,
            agents,
            idx,
            commit: desired.commit.as_ref(),
            now,
            reconcile_interval: desired.reconcile_interval,
            next: Cell::new(None),
        }
    }

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

    /// Runs `f` and answers, besides, the earliest deadline it met.
    fn deadline_of<T>(&self, f: impl FnOnce() -> T) -> (T, Option<Timestamp>) {
        let outer = self.next.take();
        let t = f();
        (t, self.next.replace(outer))
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
}

#[cfg(test)]
mod tests {
    use super::{Planner, fleet_capacity, insert_at};
    use crate::reconcile::tests::{agent, repo, t};

    #[test]
    fn agents_that_come_take_the_room_the_fleet_was_given_with() {
        let desired = repo().group("gw").build();
        let mut views = Vec::with_capacity(fleet_capacity(16));
        views.extend((0..16).map(|i| agent(&format!("a{i:02}"))));
        let mut planner = Planner::default();
        planner.full(&desired, views, t(1_000));
        let room = |p: &Planner| (p.agents.capacity(), p.slots.capacity());
        assert_eq!(room(&planner), (18, 18), "an eighth more than 16");
        planner
            .replan(&desired, &[agent("a05x"), agent("b")], t(1_001))
            .expect("a fleet in uid order");
        assert_eq!(planner.agents.len(), 18);
        assert_eq!(room(&planner), (18, 18), "the vectors did not grow");
    }

    #[test]
    fn every_set_of_places_in_a_short_vector_takes_its_items() {
        // Odd numbers among the even: each subset of the odd ones below 2n + 1.
        for n in 0..9u32 {
            for set in 0..1u32 << (n + 1) {
                let items: Vec<u32> = (0..=n).filter(|i| set & 1 << i != 0).map(|i| 2 * i + 1).collect();
                let at: Vec<usize> = (items.iter().enumerate()).map(|(j, &x)| (x / 2) as usize + j).collect();
                let mut v: Vec<u32> = (0..n).map(|i| 2 * i + 2).collect();
                insert_at(&mut v, &at, items.clone(), || 0);
                let mut want: Vec<u32> = (0..n).map(|i| 2 * i + 2).chain(items).collect();
                want.sort();
                assert_eq!(v, want, "n {n}, places {at:?}");
            }
        }
    }
}
