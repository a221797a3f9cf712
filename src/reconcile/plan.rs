//! `plan`: from the desired state, the fleet, the rollout state and the time,
//! decide what to push, what each agent's and group's status is, and the next
//! rollout state. Pure and deterministic; see `docs/rollouts.md`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::select::Matcher;
use super::state::{
    AgentRecord, AgentRecords, ControlAction, FailureRecord, GroupState, Membership, Pushed, Rollout, RolloutKind,
    RolloutPhase, RolloutState, Stable, Timestamp,
};
use super::waves::{Members, OrderKey, order_key, wave_cuts};
use crate::desired::{AgentAttributes, ConfigBundle, DesiredState, Group, OnFailure};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};

/// Failures shown in a group's status (newest first).
pub const MAX_FAILURES_SHOWN: usize = 20;

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
    /// Identifying and non-identifying attributes merged (identifying wins).
    pub attributes: Arc<BTreeMap<String, String>>,
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
    pub remote: Option<RemoteStatus>,
    /// `None` until the agent reports health.
    pub healthy: Option<bool>,
    pub health_error: String,
    /// Since when it has been unhealthy, counted from its current connection at the earliest.
    pub unhealthy_since: Option<Timestamp>,
    /// The config that last left for it on its current connection, and when:
    /// its apply clock starts then.
    pub delivered: Option<(ConfigHash, Timestamp)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// `last_remote_config_hash`: the hash last received, whatever its status.
    pub hash: Option<ConfigHash>,
    pub status: RemoteConfigState,
    pub error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteConfigState {
    Unset,
    Applied,
    Applying,
    Failed,
}

impl AgentAttributes for AgentView {
    fn uid(&self) -> &InstanceUid {
        &self.uid
    }
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl AgentView {
    fn reports(&self, hash: ConfigHash) -> Option<RemoteConfigState> {
        self.remote.as_ref().filter(|r| r.hash == Some(hash)).map(|r| r.status)
    }

    /// APPLIED for `hash` and, when it reports health, healthy.
    fn good(&self, hash: ConfigHash) -> bool {
        self.connected
            && self.reports(hash) == Some(RemoteConfigState::Applied)
            && (!self.reports_health || self.healthy == Some(true))
    }

    /// APPLIED for `hash` but unhealthy for longer than `grace`: a failure.
    /// Shorter spells are what a collector's (re)start looks like.
    /// The grace runs from the later of the first unhealthy report and the
    /// moment `hash` reached the agent: a collector that was unhealthy on its
    /// old config gets the whole grace to come up healthy on the new one.
    fn unhealthy_after_applying(&self, hash: ConfigHash, grace: Duration, now: Timestamp) -> bool {
        let since = self
            .unhealthy_since
            .max(self.delivered_since(hash, Timestamp::default()));
        self.reports(hash) == Some(RemoteConfigState::Applied)
            && self.reports_health
            && self.healthy == Some(false)
            && since.is_none_or(|t| now.since(t) > grace)
    }

    /// Whether the controller can manage its config (see [`AgentState::Unsupported`]).
    fn supported(&self) -> bool {
        self.accepts_remote_config && self.reports_remote_config
    }

    /// When `hash` left for the agent on its current connection, at or after `since`.
    fn delivered_since(&self, hash: ConfigHash, since: Timestamp) -> Option<Timestamp> {
        self.delivered
            .filter(|&(h, at)| h == hash && at >= since)
            .map(|(_, at)| at)
    }
}

/// What `plan` decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Configs to send now, in group then fleet order.
    pub pushes: Vec<Push>,
    /// The next rollout state: persist it and pass it to the next call.
    pub state: RolloutState,
    /// One per agent of the input, in the same order.
    pub agents: Vec<Assignment>,
    /// One per group of the desired state.
    pub groups: BTreeMap<GroupName, GroupStatus>,
    pub events: Vec<Event>,
}

impl Plan {
    /// The assignment of one agent (a scan; for callers that need a few).
    pub fn agent(&self, uid: &InstanceUid) -> Option<&Assignment> {
        self.agents.iter().find(|a| &a.uid == uid)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub uid: InstanceUid,
    pub group: GroupName,
    pub bundle: Arc<ConfigBundle>,
    pub reason: PushReason,
}

/// Why a config is pushed, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushReason {
    /// The target, to an agent of an opened wave.
    Wave,
    /// The stable config back to an agent that failed a halted rollout.
    Rollback,
    /// A revert to the stable config, to every agent at once.
    Revert,
    /// The config it should run, to an agent running something else
    /// (new, reconnected, or drifted).
    Sync,
}

/// An agent's group, the config it should run now and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub uid: InstanceUid,
    pub group: Option<GroupName>,
    pub desired: Option<ConfigHash>,
    pub state: AgentState,
}

/// What the notes and `GET /api/v1/groups` show of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupStatus {
    /// The group's config at the desired commit.
    pub config_hash: ConfigHash,
    pub stable_hash: Option<ConfigHash>,
    pub phase: Phase,
    /// Waves opened so far.
    pub wave: u32,
    pub waves: u32,
    /// The commit whose config the current (or last) rollout delivers.
    pub commit: Option<CommitId>,
    pub agents: AgentCounts,
    /// Newest first, at most [`MAX_FAILURES_SHOWN`].
    pub failures: Vec<FailureView>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// Operator pause/resume/promote actions, oldest first.
    pub actions: Vec<ControlAction>,
}

impl GroupStatus {
    /// The phase to show in the note of `commit`: the rollout's phase on the
    /// commit that started it, `unchanged` on a commit that did not change the group.
    pub fn phase_at(&self, commit: &CommitId) -> Phase {
        if self.commit.as_ref() == Some(commit) {
            self.phase
        } else {
            Phase::Unchanged
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    Paused,
    Complete,
    Halted,
    Superseded,
    Unchanged,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Complete => "complete",
            Phase::Halted => "halted",
            Phase::Superseded => "superseded",
            Phase::Unchanged => "unchanged",
        }
    }
}

/// Counts over the group's agents that accept remote config; they add up to `targeted`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCounts {
    pub targeted: u32,
    /// Running what they should (in sync).
    pub applied: u32,
    /// Given their config, not confirmed yet (drifted agents count here too).
    pub applying: u32,
    pub failed: u32,
    /// Waiting for their wave.
    pub pending: u32,
    pub offline: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureView {
    pub agent: InstanceUid,
    pub error: String,
    pub at: Timestamp,
}

/// Something worth a log line; group-level events also mean a note rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RolloutStarted {
        group: GroupName,
        commit: Option<CommitId>,
        hash: ConfigHash,
        waves: u32,
        targeted: u32,
    },
    WaveOpened {
        group: GroupName,
        commit: Option<CommitId>,
        wave: u32,
        /// Members covered by the opened waves (cumulative).
        agents: u32,
    },
    WaveDone {
        group: GroupName,
        commit: Option<CommitId>,
        wave: u32,
    },
    AgentFailed {
        group: GroupName,
        agent: InstanceUid,
        hash: ConfigHash,
        error: String,
    },
    Halted {
        group: GroupName,
        commit: Option<CommitId>,
        failures: u32,
    },
    RolledBack {
        group: GroupName,
        agent: InstanceUid,
        hash: ConfigHash,
    },
    Complete {
        group: GroupName,
        commit: Option<CommitId>,
        hash: ConfigHash,
    },
    /// A rollout in progress was replaced by a newer commit's.
    Superseded {
        group: GroupName,
        commit: Option<CommitId>,
        hash: ConfigHash,
        by: ConfigHash,
    },
    RevertPushed {
        group: GroupName,
        commit: Option<CommitId>,
        hash: ConfigHash,
        agents: u32,
    },
    DriftHealed {
        group: GroupName,
        agent: InstanceUid,
        hash: ConfigHash,
    },
}

/// What an agent's state is decided from (see [`classify`]).
#[derive(Debug, Clone, Copy, Default)]
struct Facts {
    connected: bool,
    /// It failed the rollout it is in, or the config it should run (FAILED
    /// for it now or before, or unhealthy past the grace after applying it).
    failed: bool,
    /// It waits for its wave, or has no config to run yet.
    waiting: bool,
    /// Its status for the config it should run, if it reports one for it.
    reports: Option<RemoteConfigState>,
    /// It reports health, and is unhealthy.
    unhealthy: bool,
    /// The config it should run was given to it on this connection.
    given: bool,
}

/// An agent's state from what is known of it; the first rule that holds wins.
fn classify(f: Facts) -> AgentState {
    use RemoteConfigState::{Applied, Applying, Failed};
    if !f.connected {
        AgentState::Offline
    } else if f.failed || f.reports == Some(Failed) {
        AgentState::Failed
    } else if f.waiting {
        AgentState::Pending
    } else if f.reports == Some(Applied) && !f.unhealthy {
        AgentState::InSync
    } else if f.given || matches!(f.reports, Some(Applying | Applied)) {
        AgentState::Applying
    } else {
        AgentState::Drifted
    }
}

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
    let mut records: Vec<Option<AgentRecord>> = vec![None; agents.len()];
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
            records[i] = Some(AgentRecord { member: None, ..*r }).filter(|r| !r.is_empty());
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
    for (g, group) in groups.iter().enumerate() {
        let ctx = GroupCtx {
            group,
            agents,
            idx: &in_group[g],
            prev: &prev,
            commit: input.desired.commit.as_ref(),
            now: input.now,
            reconcile_interval: input.desired.reconcile_interval,
        };
        let (gs, status) = ctx.plan(input.state.groups.get(&group.name), &mut rollouts, &mut out);
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
    }
}

/// The fleet's indices in uid order (without sorting when it already is).
fn uid_order(agents: &[AgentView]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..agents.len()).collect();
    if !agents.windows(2).all(|w| w[0].uid <= w[1].uid) {
        order.sort_by(|&a, &b| agents[a].uid.cmp(&agents[b].uid));
    }
    order
}

/// Each agent's previous record, by a merge of two uid-ordered sequences.
fn join_records<'a>(agents: &[AgentView], by_uid: &[usize], records: &'a AgentRecords) -> Vec<Option<&'a AgentRecord>> {
    let entries = records.entries();
    let mut prev = vec![None; agents.len()];
    let mut j = 0;
    for &i in by_uid {
        let uid = &agents[i].uid;
        while j < entries.len() && entries[j].0 < *uid {
            j += 1;
        }
        if let Some((u, r)) = entries.get(j)
            && u == uid
        {
            prev[i] = Some(r);
        }
    }
    prev
}

/// The next records in uid order; a uid listed twice keeps its first record.
/// Agents the fleet does not list keep their previous record: after a
/// controller restart the fleet fills up again as agents reconnect, and what
/// was pushed to them, what they failed and their place in a rollout must
/// still be known when they do.
fn collect_records(
    agents: &[AgentView],
    by_uid: &[usize],
    mut next: Vec<Option<AgentRecord>>,
    previous: &AgentRecords,
) -> AgentRecords {
    let mut out: Vec<(InstanceUid, AgentRecord)> = Vec::with_capacity(previous.len().max(agents.len()));
    let mut absent = previous.entries().iter().peekable();
    for &i in by_uid {
        let uid = &agents[i].uid;
        while let Some((u, r)) = absent.next_if(|(u, _)| u < uid) {
            out.push((u.clone(), *r));
        }
        absent.next_if(|(u, _)| u == uid);
        if let Some(r) = next[i].take()
            && out.last().is_none_or(|(u, _)| u != uid)
        {
            out.push((uid.clone(), r));
        }
    }
    out.extend(absent.map(|(u, r)| (u.clone(), *r)));
    AgentRecords::from_sorted(out)
}

struct Out {
    pushes: Vec<Push>,
    events: Vec<Event>,
    assignments: Vec<Assignment>,
    /// The next record of each agent, by its index in the fleet.
    records: Vec<Option<AgentRecord>>,
}

struct GroupCtx<'a> {
    group: &'a Group,
    agents: &'a [AgentView],
    /// Indices into `agents` of the group's agents that accept remote config.
    idx: &'a [usize],
    /// Each fleet agent's previous record, by its index in the fleet.
    prev: &'a [Option<&'a AgentRecord>],
    commit: Option<&'a CommitId>,
    now: Timestamp,
    reconcile_interval: Duration,
}

/// How an agent is treated in pass 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Given the target once per connection; silence past apply_timeout is a failure.
    Wave,
    /// Given `should` at once, again after reconcile_interval while it runs something else.
    Sync(PushReason),
    /// Waits for its wave: keeps what it runs.
    Keep,
}

/// Which agents the opened waves of a rollout cover.
struct Opened {
    kind: RolloutKind,
    cut: u32,
    /// Canary key of the first member not yet opened: a late joiner is in the
    /// opened waves when it sorts before it. `None`: every wave is open.
    boundary: Option<OrderKey>,
}

impl Opened {
    fn of(r: &Rollout, group: &GroupName) -> Self {
        let cut = r.opened_cut();
        let boundary = if (cut as usize) < r.members.len() {
            r.members.at_rank(cut).map(|u| order_key(group, u))
        } else {
            None
        };
        Opened {
            kind: r.kind,
            cut,
            boundary,
        }
    }

    /// (in an opened wave, counted for the wave being done), given the
    /// agent's rank among the members.
    fn place(&self, group: &GroupName, uid: &InstanceUid, rank: Option<u32>) -> (bool, bool) {
        if self.kind == RolloutKind::Revert {
            return (true, true);
        }
        match rank {
            Some(rank) => (rank < self.cut, rank < self.cut),
            None => (self.boundary.is_none_or(|b| order_key(group, uid) < b), false),
        }
    }
}

impl GroupCtx<'_> {
    fn name(&self) -> &GroupName {
        &self.group.name
    }

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
            let blocking = self.check_agents(r, &ranks, out);
            self.advance(r, blocking, &mut gs.stable, out);
        }
        let status = self.assign(&gs, &ranks, out);
        (gs, status)
    }

    /// Starts a rollout when the group's config differs from the one its
    /// current rollout (or, without one, its stable config) delivers. For a
    /// rollout in waves, answers each group agent's rank among its members.
    fn start_if_changed(&self, gs: &mut GroupState, rollouts: &mut u64, out: &mut Out) -> Option<Vec<Option<u32>>> {
        let target = &self.group.config;
        let th = target.hash();
        let delivered = match (&gs.rollout, &gs.stable) {
            (Some(r), _) => Some(r.target.hash()),
            (None, Some(s)) => Some(s.bundle.hash()),
            (None, None) => None,
        };
        if delivered == Some(th) {
            return None;
        }
        if let Some(old) = &gs.rollout
            && old.in_progress()
        {
            out.events.push(Event::Superseded {
                group: self.name().clone(),
                commit: old.commit.clone(),
                hash: old.target.hash(),
                by: th,
            });
        }
        // The desired state's commit is the one that brought the new config.
        let commit = self.commit.cloned();
        let revert = gs.stable.as_ref().is_some_and(|s| s.bundle.hash() == th);
        let mut ranks = None;
        let (kind, members) = if revert {
            (RolloutKind::Revert, Arc::new(Members::default()))
        } else {
            // The canary order of the connected agents, fixed for the rollout.
            let mut keyed: Vec<(OrderKey, usize)> = self
                .idx
                .iter()
                .enumerate()
                .filter(|&(_, &i)| self.agents[i].connected)
                .map(|(n, &i)| (order_key(self.name(), &self.agents[i].uid), n))
                .collect();
            keyed.sort_unstable();
            let mut r = vec![None; self.idx.len()];
            let mut order = Vec::with_capacity(keyed.len());
            for (rank, (_, n)) in (0u32..).zip(keyed) {
                r[n] = Some(rank);
                order.push(self.agents[self.idx[n]].uid.clone());
            }
            ranks = Some(r);
            (RolloutKind::Waves, Arc::new(Members::from_order(order)))
        };
        let cuts = match kind {
            RolloutKind::Waves => wave_cuts(&self.group.rollout.waves, members.len()),
            RolloutKind::Revert => vec![u32::try_from(self.idx.len()).unwrap_or(u32::MAX)],
        };
        let r = Rollout {
            id: *rollouts,
            kind,
            target: Arc::clone(target),
            commit: commit.clone(),
            phase: RolloutPhase::Progressing,
            paused: false,
            promote: false,
            opened: 1,
            settled_since: None,
            started: self.now,
            finished: None,
            failures: BTreeMap::new(),
            missing: BTreeMap::new(),
            actions: Vec::new(),
            cuts,
            members,
        };
        if kind == RolloutKind::Waves {
            out.events.push(Event::RolloutStarted {
                group: self.name().clone(),
                commit: commit.clone(),
                hash: th,
                waves: r.waves(),
                targeted: u32::try_from(r.members.len()).unwrap_or(u32::MAX),
            });
            out.events.push(Event::WaveOpened {
                group: self.name().clone(),
                commit,
                wave: 1,
                agents: r.opened_cut(),
            });
        }
        *rollouts += 1;
        gs.rollout = Some(r);
        ranks
    }

    /// Pass 1: records new failures of agents in opened waves and counts the
    /// agents that keep the current wave from being done.
    fn check_agents(&self, r: &mut Rollout, ranks: &[Option<u32>], out: &mut Out) -> u32 {
        let th = r.target.hash();
        let timeout = self.group.rollout.apply_timeout;
        let opened = Opened::of(r, self.name());
        let mut new_failures: Vec<(InstanceUid, String)> = Vec::new();
        let mut blocking = 0u32;
        let mut counted_present = 0u32;
        let mut missing = BTreeMap::new();
        for (n, &i) in self.idx.iter().enumerate() {
            let a = &self.agents[i];
            let (in_opened, counted) = opened.place(self.name(), &a.uid, ranks[n]);
            if !in_opened {
                continue;
            }
            if counted {
                counted_present += 1;
            }
            if r.failures.contains_key(&a.uid) {
                continue;
            }
            if let Some(error) = self.failure(a, self.prev[i], th, timeout) {
                new_failures.push((a.uid.clone(), error));
                continue;
            }
            if !counted || a.good(th) {
                continue;
            }
            if a.connected {
                blocking += 1;
                continue;
            }
            let since = match a.disconnected_at {
                Some(t) => t,
                None => {
                    let t = r.missing.get(&a.uid).copied().unwrap_or(self.now);
                    missing.insert(a.uid.clone(), t);
                    t
                }
            };
            if !self.now.reached(since, timeout) {
                blocking += 1;
            }
        }
        if r.kind == RolloutKind::Waves && counted_present < opened.cut {
            // Members of the opened waves the fleet no longer lists (forgotten,
            // or moved to another group) block like disconnected ones.
            let present: HashSet<&InstanceUid> = self.idx.iter().map(|&i| &self.agents[i].uid).collect();
            let ordered = r.members.ordered();
            for uid in ordered.get(..opened.cut as usize).unwrap_or(ordered) {
                if present.contains(uid) || r.failures.contains_key(uid) {
                    continue;
                }
                let t = r.missing.get(uid).copied().unwrap_or(self.now);
                missing.insert(uid.clone(), t);
                if !self.now.reached(t, timeout) {
                    blocking += 1;
                }
            }
        }
        r.missing = missing;
        for (uid, error) in new_failures {
            out.events.push(Event::AgentFailed {
                group: self.name().clone(),
                agent: uid.clone(),
                hash: th,
                error: error.clone(),
            });
            r.failures.insert(uid, FailureRecord { error, at: self.now });
        }
        blocking
    }

    /// Why an agent of an opened wave failed the target, if it did.
    fn failure(&self, a: &AgentView, prev: Option<&AgentRecord>, th: ConfigHash, timeout: Duration) -> Option<String> {
        if !a.connected {
            return None;
        }
        let grace = self.group.rollout.unhealthy_grace;
        match a.reports(th) {
            Some(RemoteConfigState::Failed) => {
                let error = a.remote.as_ref().map(|r| r.error.as_str()).unwrap_or_default();
                return Some(if error.is_empty() {
                    "reported FAILED".to_owned()
                } else {
                    error.to_owned()
                });
            }
            Some(RemoteConfigState::Applied) => {
                return a.unhealthy_after_applying(th, grace, self.now).then(|| {
                    format!(
                        "unhealthy for more than {} after applying: {}",
                        humantime::format_duration(grace),
                        a.health_error
                    )
                });
            }
            _ => {}
        }
        // The clock runs from the moment the agent could receive the push
        // (an HTTP agent only gets it with its next poll). A clock that only
        // watched an agent already applying ends in one more push, not a failure.
        let pushed = prev.and_then(|r| r.pushed)?;
        if pushed.hash != th || pushed.epoch != a.connection_epoch || pushed.observed {
            return None;
        }
        let delivered = a.delivered_since(th, pushed.at)?;
        self.now.reached(delivered, timeout).then(|| {
            format!(
                "not APPLIED within {} of receiving the config",
                humantime::format_duration(timeout)
            )
        })
    }

    /// Halts, opens waves and completes the rollout as pass 1 allows.
    fn advance(&self, r: &mut Rollout, blocking: u32, stable: &mut Option<Stable>, out: &mut Out) {
        if r.phase != RolloutPhase::Progressing {
            return;
        }
        let policy = &self.group.rollout;
        if r.kind == RolloutKind::Waves && r.failures.len() > policy.max_failures.budget_of(r.members.len()) {
            r.phase = RolloutPhase::Halted;
            r.finished = Some(self.now);
            r.settled_since = None;
            out.events.push(Event::Halted {
                group: self.name().clone(),
                commit: r.commit.clone(),
                failures: u32::try_from(r.failures.len()).unwrap_or(u32::MAX),
            });
            return;
        }
        if blocking > 0 {
            r.settled_since = None;
            return;
        }
        let settled = *r.settled_since.get_or_insert(self.now);
        if r.paused {
            return;
        }
        loop {
            let wave = r.opened.max(1);
            let cut = r.opened_cut();
            let before = match wave {
                1 => 0,
                w => r.cuts.get(w as usize - 2).copied().unwrap_or(0),
            };
            let baked =
                r.kind == RolloutKind::Revert || cut == before || r.promote || self.now.reached(settled, policy.bake);
            if !baked {
                return;
            }
            if r.kind == RolloutKind::Waves {
                out.events.push(Event::WaveDone {
                    group: self.name().clone(),
                    commit: r.commit.clone(),
                    wave,
                });
            }
            r.promote = false;
            if wave >= r.waves() {
                r.phase = RolloutPhase::Complete;
                r.finished = Some(self.now);
                r.settled_since = None;
                *stable = Some(Stable {
                    bundle: Arc::clone(&r.target),
                    commit: r.commit.clone(),
                });
                out.events.push(Event::Complete {
                    group: self.name().clone(),
                    commit: r.commit.clone(),
                    hash: r.target.hash(),
                });
                return;
            }
            r.opened = wave + 1;
            r.settled_since = Some(self.now);
            out.events.push(Event::WaveOpened {
                group: self.name().clone(),
                commit: r.commit.clone(),
                wave: r.opened,
                agents: r.opened_cut(),
            });
            if r.opened_cut() > cut {
                // New agents to wait for; a wave that adds none is done at once.
                r.settled_since = None;
                return;
            }
        }
    }

    /// Pass 2: what each agent should run, pushes, agent states and the group status.
    fn assign(&self, gs: &GroupState, ranks: &[Option<u32>], out: &mut Out) -> GroupStatus {
        let stable = gs.stable.as_ref().map(|s| &s.bundle);
        let rollout = gs.rollout.as_ref();
        let rolling = rollout.filter(|r| r.kind == RolloutKind::Waves && r.phase != RolloutPhase::Complete);
        let opened = rolling.map(|r| Opened::of(r, self.name()));
        let rollback = self.group.rollout.on_failure == OnFailure::Rollback;
        let mut counts = AgentCounts::default();
        let mut reverted = 0u32;
        for (n, &i) in self.idx.iter().enumerate() {
            let a = &self.agents[i];
            let (should, mode, active) = match (rolling, &opened) {
                (Some(r), Some(o)) => {
                    let (in_opened, _) = o.place(self.name(), &a.uid, ranks[n]);
                    let failed = r.failures.contains_key(&a.uid);
                    if in_opened && failed && rollback && r.phase == RolloutPhase::Halted {
                        match stable {
                            Some(s) => (Some(s), Mode::Sync(PushReason::Rollback), true),
                            None => (None, Mode::Keep, true),
                        }
                    } else if in_opened {
                        (Some(&r.target), Mode::Wave, true)
                    } else if ranks[n].is_some() {
                        (stable, Mode::Keep, false)
                    } else {
                        (stable, Mode::Sync(PushReason::Sync), false)
                    }
                }
                _ => match rollout {
                    Some(r) if r.kind == RolloutKind::Revert && r.phase == RolloutPhase::Progressing => {
                        (Some(&r.target), Mode::Sync(PushReason::Revert), true)
                    }
                    Some(r) => (Some(&r.target), Mode::Sync(PushReason::Sync), true),
                    None => (stable, Mode::Sync(PushReason::Sync), true),
                },
            };
            let mut rec = self.prev[i].copied().unwrap_or_default();
            rec.member = rolling.and_then(|r| ranks[n].map(|rank| Membership { rollout: r.id, rank }));
            if let Some(rs) = &a.remote
                && let Some(h) = rs.hash
            {
                match rs.status {
                    RemoteConfigState::Failed => rec.note_failed(h),
                    RemoteConfigState::Applied => rec.forget_failed(h),
                    _ => {}
                }
            }
            let sh = should.map(|b| b.hash());
            if let Some(h) = sh
                && mode != Mode::Keep
                && a.connected
                && matches!(
                    a.reports(h),
                    Some(RemoteConfigState::Applying | RemoteConfigState::Unset)
                )
                && rec.pushed.is_none_or(|p| p.hash != h || p.epoch != a.connection_epoch)
            {
                // Applying what it should on a connection where it was not
                // given it (a restarted supervisor, a lost report): watch it
                // for apply_timeout, then give it once more (see `should_push`).
                // The watch runs from the push or the first sighting on an
                // earlier connection, so reconnecting does not put it off.
                let since = rec.pushed.filter(|p| p.hash == h).map_or(self.now, |p| p.at);
                rec.pushed = Some(Pushed {
                    hash: h,
                    at: since,
                    epoch: a.connection_epoch,
                    observed: true,
                });
            }
            let pushed = match (should, sh) {
                (Some(bundle), Some(h)) if self.should_push(a, &rec, h, mode) => {
                    rec.pushed = Some(Pushed {
                        hash: h,
                        at: self.now,
                        epoch: a.connection_epoch,
                        observed: false,
                    });
                    let reason = match mode {
                        Mode::Sync(r) => r,
                        _ => PushReason::Wave,
                    };
                    match reason {
                        PushReason::Rollback => out.events.push(Event::RolledBack {
                            group: self.name().clone(),
                            agent: a.uid.clone(),
                            hash: h,
                        }),
                        PushReason::Revert => reverted += 1,
                        PushReason::Sync
                            if rolling.is_none()
                                && a.remote.as_ref().is_some_and(|r| r.hash.is_some_and(|x| x != h)) =>
                        {
                            out.events.push(Event::DriftHealed {
                                group: self.name().clone(),
                                agent: a.uid.clone(),
                                hash: h,
                            })
                        }
                        _ => {}
                    }
                    out.pushes.push(Push {
                        uid: a.uid.clone(),
                        group: self.name().clone(),
                        bundle: Arc::clone(bundle),
                        reason,
                    });
                    true
                }
                _ => false,
            };
            // An agent given stable back that runs it well is in sync again;
            // its failure stays in the rollout's list. (One that timed out was
            // given nothing back: its old report proves nothing.)
            let rolled_back = mode == Mode::Sync(PushReason::Rollback)
                && sh.is_some_and(|h| a.good(h) && rec.pushed.is_some_and(|p| p.hash == h && !p.observed));
            let failed_rollout = active && !rolled_back && rolling.is_some_and(|r| r.failures.contains_key(&a.uid));
            let grace = self.group.rollout.unhealthy_grace;
            let state = classify(Facts {
                connected: a.connected,
                failed: failed_rollout
                    || sh.is_some_and(|h| rec.has_failed(h) || a.unhealthy_after_applying(h, grace, self.now)),
                waiting: !active || mode == Mode::Keep || sh.is_none(),
                reports: sh.and_then(|h| a.reports(h)),
                unhealthy: a.reports_health && a.healthy == Some(false),
                given: pushed
                    || sh.is_some_and(|h| {
                        rec.pushed
                            .is_some_and(|p| p.hash == h && p.epoch == a.connection_epoch && !p.observed)
                    }),
            });
            match state {
                AgentState::InSync => counts.applied += 1,
                AgentState::Applying | AgentState::Drifted => counts.applying += 1,
                AgentState::Failed => counts.failed += 1,
                AgentState::Offline => counts.offline += 1,
                _ => counts.pending += 1,
            }
            counts.targeted += 1;
            let asg = &mut out.assignments[i];
            asg.desired = sh;
            asg.state = state;
            if !rec.is_empty() {
                out.records[i] = Some(rec);
            }
        }
        if reverted > 0
            && let Some(r) = rollout
        {
            out.events.push(Event::RevertPushed {
                group: self.name().clone(),
                commit: r.commit.clone(),
                hash: r.target.hash(),
                agents: reverted,
            });
        }
        self.status(gs, counts)
    }

    fn should_push(&self, a: &AgentView, rec: &AgentRecord, h: ConfigHash, mode: Mode) -> bool {
        if !a.connected || rec.has_failed(h) || mode == Mode::Keep {
            return false;
        }
        let same_connection = rec.pushed.filter(|p| p.hash == h && p.epoch == a.connection_epoch);
        match (a.reports(h), same_connection) {
            // It has reached a verdict on this hash.
            (Some(RemoteConfigState::Applied | RemoteConfigState::Failed), _) => false,
            // Watched while it applies: once more when the watch runs out (a
            // supervisor answers a hash it already has at once).
            (Some(_), Some(p)) => p.observed && self.now.reached(p.at, self.group.rollout.apply_timeout),
            // Cannot happen: a watch is set above for exactly this case.
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(p)) => match mode {
                Mode::Wave => p.observed,
                _ => p.observed || self.now.reached(p.at, self.reconcile_interval),
            },
        }
    }

    fn status(&self, gs: &GroupState, agents: AgentCounts) -> GroupStatus {
        let stable_hash = gs.stable.as_ref().map(|s| s.bundle.hash());
        let config_hash = self.group.config.hash();
        let Some(r) = &gs.rollout else {
            return GroupStatus {
                config_hash,
                stable_hash,
                phase: Phase::Unchanged,
                wave: 0,
                waves: 0,
                commit: gs.stable.as_ref().and_then(|s| s.commit.clone()),
                agents,
                failures: Vec::new(),
                started: None,
                finished: None,
                actions: Vec::new(),
            };
        };
        let phase = match r.phase {
            RolloutPhase::Progressing if r.paused => Phase::Paused,
            RolloutPhase::Progressing => Phase::Progressing,
            RolloutPhase::Halted => Phase::Halted,
            RolloutPhase::Complete => Phase::Complete,
        };
        let mut failures: Vec<FailureView> = r
            .failures
            .iter()
            .map(|(u, f)| FailureView {
                agent: u.clone(),
                error: f.error.clone(),
                at: f.at,
            })
            .collect();
        failures.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| a.agent.cmp(&b.agent)));
        failures.truncate(MAX_FAILURES_SHOWN);
        GroupStatus {
            config_hash,
            stable_hash,
            phase,
            wave: r.opened,
            waves: r.waves(),
            commit: r.commit.clone(),
            agents,
            failures,
            started: Some(r.started),
            finished: r.finished,
            actions: r.actions.clone(),
        }
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn agent_states_from_facts() {
        let on = Facts {
            connected: true,
            ..Facts::default()
        };
        let cases: &[(&str, Facts, AgentState)] = &[
            (
                "disconnected is offline, whatever else holds",
                Facts {
                    failed: true,
                    ..Facts::default()
                },
                AgentState::Offline,
            ),
            ("failed its rollout", Facts { failed: true, ..on }, AgentState::Failed),
            (
                "FAILED for what it should run",
                Facts {
                    reports: Some(RemoteConfigState::Failed),
                    ..on
                },
                AgentState::Failed,
            ),
            (
                "failed wins over waiting",
                Facts {
                    failed: true,
                    waiting: true,
                    ..on
                },
                AgentState::Failed,
            ),
            (
                "waiting for its wave",
                Facts {
                    waiting: true,
                    reports: Some(RemoteConfigState::Applied),
                    ..on
                },
                AgentState::Pending,
            ),
            (
                "APPLIED and healthy",
                Facts {
                    reports: Some(RemoteConfigState::Applied),
                    ..on
                },
                AgentState::InSync,
            ),
            (
                "APPLIED but unhealthy within the grace",
                Facts {
                    reports: Some(RemoteConfigState::Applied),
                    unhealthy: true,
                    ..on
                },
                AgentState::Applying,
            ),
            (
                "APPLYING",
                Facts {
                    reports: Some(RemoteConfigState::Applying),
                    ..on
                },
                AgentState::Applying,
            ),
            (
                "given it, no word yet",
                Facts { given: true, ..on },
                AgentState::Applying,
            ),
            (
                "UNSET for it and given it",
                Facts {
                    reports: Some(RemoteConfigState::Unset),
                    given: true,
                    ..on
                },
                AgentState::Applying,
            ),
            ("runs something else, not given it yet", on, AgentState::Drifted),
        ];
        for (name, facts, want) in cases {
            assert_eq!(classify(*facts), *want, "{name}");
        }
    }
}
