//! The rollout state machine of one group: whether a config starts a rollout
//! and of which kind ([`Change`], which `plan` and recovery use too),
//! starting it, recording failures, halting, opening waves after their bake
//! and completing. The rules are in `docs/rollouts.md`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::input::{AgentView, RemoteConfigState};
use super::output::Event;
use super::plan::{GroupCtx, Out};
use super::state::{AgentMemory, FailureRecord, GroupState, Rollout, RolloutKind, RolloutPhase, Stable, Timestamp};
use super::waves::{Members, OrderKey, order_key, wave_cuts};
use crate::desired::{Amount, ConfigBundle};
use crate::model::{CommitId, ConfigHash, GroupName, InstanceUid};

/// What a group's config means for its agents, against the config its
/// current (or last) rollout delivers and the stable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// What the group is given already: nothing starts.
    Unchanged,
    /// A new config, rolled out in waves.
    Changed,
    /// A group with no stable config: its first rollout, in waves.
    New,
    /// Back to the stable config after a change: pushed to every agent at once.
    Revert,
}

impl Change {
    /// `delivering`: what the group's current or last rollout delivers, else
    /// its stable config. A config the group is given already changes
    /// nothing, even while its rollout has not completed.
    pub fn of(config: ConfigHash, delivering: Option<ConfigHash>, stable: Option<ConfigHash>) -> Change {
        if delivering == Some(config) {
            return Change::Unchanged;
        }
        match RolloutKind::of(config, stable) {
            RolloutKind::Revert => Change::Revert,
            RolloutKind::Waves if stable.is_none() => Change::New,
            RolloutKind::Waves => Change::Changed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Change::Unchanged => "unchanged",
            Change::Changed => "changed",
            Change::New => "new",
            Change::Revert => "revert",
        }
    }

    /// The rollout it starts, if it starts one.
    pub fn rollout(self) -> Option<RolloutKind> {
        match self {
            Change::Unchanged => None,
            Change::Changed | Change::New => Some(RolloutKind::Waves),
            Change::Revert => Some(RolloutKind::Revert),
        }
    }

    /// Whether the controller pushes anything for the group.
    pub fn pushes(self) -> bool {
        self != Change::Unchanged
    }
}

impl RolloutKind {
    /// A rollout back to the stable config is a revert; any other goes in waves.
    pub fn of(target: ConfigHash, stable: Option<ConfigHash>) -> RolloutKind {
        if stable == Some(target) {
            RolloutKind::Revert
        } else {
            RolloutKind::Waves
        }
    }
}

/// Who a new rollout goes to.
pub(super) enum Reach<'w> {
    /// In canary waves over `members` (in canary order), cut by `waves`.
    Waves {
        members: Vec<InstanceUid>,
        waves: &'w [Amount],
    },
    /// Back to the stable config: every one of the group's `agents` at once,
    /// with no members and one cut covering the group.
    Everyone { agents: usize },
}

impl Rollout {
    /// A rollout of `target`, brought by `commit`, starting at `now` with its first wave open.
    pub(super) fn begin(
        id: u64,
        target: Arc<ConfigBundle>,
        commit: Option<CommitId>,
        reach: Reach<'_>,
        now: Timestamp,
    ) -> Rollout {
        let (kind, members, cuts) = match reach {
            Reach::Waves { members, waves } => {
                let cuts = wave_cuts(waves, members.len());
                (RolloutKind::Waves, members, cuts)
            }
            Reach::Everyone { agents } => (
                RolloutKind::Revert,
                Vec::new(),
                vec![u32::try_from(agents).unwrap_or(u32::MAX)],
            ),
        };
        Rollout {
            id,
            kind,
            target,
            commit,
            phase: RolloutPhase::Progressing,
            paused: false,
            promote: false,
            opened: 1,
            settled_since: None,
            wave_opened: Some(now),
            waiting_since: Some(now),
            started: now,
            finished: None,
            failures: BTreeMap::new(),
            missing: BTreeMap::new(),
            actions: Vec::new(),
            cuts,
            members: Arc::new(Members::from_order(members)),
        }
    }
}

/// Which agents the opened waves of a rollout cover.
pub(super) struct Opened {
    kind: RolloutKind,
    cut: u32,
    /// Canary key of the first member not yet opened: a late joiner is in the
    /// opened waves when it sorts before it. `None`: every wave is open.
    boundary: Option<OrderKey>,
}

impl Opened {
    pub(super) fn of(r: &Rollout, group: &GroupName) -> Self {
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
    pub(super) fn place(&self, group: &GroupName, uid: &InstanceUid, rank: Option<u32>) -> (bool, bool) {
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
    /// Starts a rollout when the group's config differs from the one its
    /// current rollout (or, without one, its stable config) delivers. For a
    /// rollout in waves, answers each group agent's rank among its members.
    /// `key_of(n)`: the canary order key of the group's `n`th agent.
    pub(super) fn start_if_changed(
        &self,
        gs: &mut GroupState,
        rollouts: &mut u64,
        out: &mut Out,
        key_of: &mut impl FnMut(usize) -> OrderKey,
    ) -> Option<Vec<Option<u32>>> {
        let target = &self.group.config;
        let th = target.hash();
        let stable = gs.stable.as_ref().map(|s| s.bundle.hash());
        let kind = Change::of(th, gs.delivering(), stable).rollout()?;
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
        let mut ranks = None;
        let reach = match kind {
            RolloutKind::Revert => Reach::Everyone { agents: self.idx.len() },
            RolloutKind::Waves => {
                // The canary order, fixed for the rollout.
                // The group's agents are all ones whose config is managed.
                let mut keyed: Vec<(OrderKey, usize)> = (0..self.idx.len()).map(|n| (key_of(n), n)).collect();
                keyed.sort_unstable();
                let order = keyed.into_iter().map(|(_, n)| n);
                let mut r = vec![None; self.idx.len()];
                let mut members = Vec::with_capacity(order.len());
                for (rank, n) in (0u32..).zip(order) {
                    r[n] = Some(rank);
                    members.push(self.agents[self.idx[n]].uid.clone());
                }
                ranks = Some(r);
                Reach::Waves {
                    members,
                    waves: &self.group.rollout.waves,
                }
            }
        };
        let r = Rollout::begin(*rollouts, Arc::clone(target), commit.clone(), reach, self.now);
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

    /// Pass 1 for one agent of the group: its part in the progress of the
    /// rollout's current wave, whether it failed the target now, and since
    /// when it has been missing.
    pub(super) fn judge(
        &self,
        r: &Rollout,
        opened: &Opened,
        a: &AgentView,
        prev: Option<&AgentMemory>,
        rank: Option<u32>,
    ) -> Judgement {
        let mut j = Judgement::default();
        let (in_opened, counted) = opened.place(self.name(), &a.uid, rank);
        if !in_opened {
            return j;
        }
        j.judged.counted = counted;
        if r.failures.contains_key(&a.uid) {
            return j;
        }
        let th = r.target.hash();
        let timeout = self.group.rollout.apply_timeout;
        if let Some(error) = self.failure(a, prev, th, timeout) {
            j.failure = Some(error);
            return j;
        }
        let good = a.good(th);
        j.judged.verified = counted && good;
        if !counted || good {
            return j;
        }
        if a.connected {
            j.judged.blocking = true;
            return j;
        }
        let since = match a.disconnected_at {
            Some(t) => t,
            None => {
                let t = r.missing.get(&a.uid).copied().unwrap_or(self.now);
                j.missing = Some(t);
                t
            }
        };
        j.judged.blocking = !self.reached(since, timeout);
        j
    }

    /// Members of the opened waves the fleet no longer lists (forgotten, or
    /// moved to another group) block like disconnected ones: answers how
    /// many do, and adds them to `missing`. `counted`: the group's agents
    /// counted for the wave.
    pub(super) fn absent_members(
        &self,
        r: &Rollout,
        opened: &Opened,
        counted: u32,
        missing: &mut BTreeMap<InstanceUid, Timestamp>,
    ) -> u32 {
        if r.kind != RolloutKind::Waves || counted >= opened.cut {
            return 0;
        }
        let timeout = self.group.rollout.apply_timeout;
        let present: HashSet<&InstanceUid> = self.idx.iter().map(|&i| &self.agents[i].uid).collect();
        let ordered = r.members.ordered();
        let mut blocking = 0;
        for uid in ordered.get(..opened.cut as usize).unwrap_or(ordered) {
            if present.contains(uid) || r.failures.contains_key(uid) {
                continue;
            }
            let t = r.missing.get(uid).copied().unwrap_or(self.now);
            missing.insert(uid.clone(), t);
            if !self.reached(t, timeout) {
                blocking += 1;
            }
        }
        blocking
    }

    /// Records the failures pass 1 found, in the order found.
    pub(super) fn record_failures(&self, r: &mut Rollout, failed: Vec<(InstanceUid, String)>, out: &mut Out) {
        let th = r.target.hash();
        for (uid, error) in failed {
            out.events.push(Event::AgentFailed {
                group: self.name().clone(),
                agent: uid.clone(),
                hash: th,
                error: error.clone(),
            });
            r.failures.insert(uid, FailureRecord { error, at: self.now });
        }
    }

    /// Why an agent of an opened wave failed the target, if it did.
    fn failure(&self, a: &AgentView, prev: Option<&AgentMemory>, th: ConfigHash, timeout: Duration) -> Option<String> {
        if !a.connected {
            return None;
        }
        if let Some((hash, times)) = a.push_drops
            && hash == th
            && times >= MAX_PUSH_DROPS
        {
            return Some(format!(
                "its connection closed each time the config reached it ({times} times): \
                 the agent may refuse a config this large"
            ));
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
                return self.unhealthy_after_applying(a, th).then(|| {
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
        self.reached(delivered, timeout).then(|| {
            format!(
                "not APPLIED within {} of receiving the config",
                humantime::format_duration(timeout)
            )
        })
    }

    /// Halts, opens waves and completes the rollout as pass 1 allows.
    pub(super) fn advance(&self, r: &mut Rollout, progress: Progress, stable: &mut Option<Stable>, out: &mut Out) {
        if r.phase != RolloutPhase::Progressing {
            return;
        }
        let policy = &self.group.rollout;
        if r.kind == RolloutKind::Waves && r.failures.len() > policy.max_failures.budget_of(r.members.len()) {
            r.phase = RolloutPhase::Halted;
            r.finished = Some(self.now);
            r.settled_since = None;
            r.waiting_since = None;
            out.events.push(Event::Halted {
                group: self.name().clone(),
                commit: r.commit.clone(),
                failures: u32::try_from(r.failures.len()).unwrap_or(u32::MAX),
            });
            return;
        }
        // A wave whose members are all away is not done: agents that are
        // away are left out of the count, but a rollout never moves past a
        // wave (nor completes) before a member of the opened waves has
        // judged the config, by verifying it or failing it (failures within
        // the budget let it go on, as the policy says), so agents returning
        // from an outage meet the canary first.
        let unjudged = progress.verified == 0 && r.failures.is_empty();
        let unverified = r.kind == RolloutKind::Waves && unjudged && r.opened_cut() > 0;
        if progress.blocking > 0 || unverified {
            r.settled_since = None;
            r.waiting_since.get_or_insert(self.now);
            return;
        }
        r.waiting_since = None;
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
                r.kind == RolloutKind::Revert || cut == before || r.promote || self.reached(settled, policy.bake);
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
            r.wave_opened = Some(self.now);
            out.events.push(Event::WaveOpened {
                group: self.name().clone(),
                commit: r.commit.clone(),
                wave: r.opened,
                agents: r.opened_cut(),
            });
            if r.opened_cut() > cut {
                // New agents to wait for; a wave that adds none is done at once.
                r.settled_since = None;
                r.waiting_since = Some(self.now);
                return;
            }
        }
    }
}

/// Deliveries of the target that ended the agent's connection before it
/// said anything of the config, in a row, after which the agent has failed.
const MAX_PUSH_DROPS: u32 = 3;

/// What the agents of a rollout's opened waves say, for [`GroupCtx::advance`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    /// Members the wave still waits for.
    pub blocking: u32,
    /// Members counted in the opened waves that run the target, healthy.
    pub verified: u32,
}

/// One agent's part in [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Judged {
    /// Counted for the current wave being done.
    pub counted: bool,
    /// Counted, and runs the target, healthy.
    pub verified: bool,
    /// The wave waits for it.
    pub blocking: bool,
}

/// What pass 1 finds of one agent.
#[derive(Debug, Default)]
pub(super) struct Judgement {
    pub judged: Judged,
    /// Why it failed the target now.
    pub failure: Option<String>,
    /// Since when it has been missing (away with no time of leaving).
    pub missing: Option<Timestamp>,
}
