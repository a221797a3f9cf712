//! What happens in rollouts: plans, pushes, and each rollout's story (started,
//! wave opened, agent failed, halted, complete...), one line per event.

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tracing::{debug, info, warn};

use super::{InternalEvent, Labeled, Registry};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid, PushOutcome};
use crate::reconcile::{Event, Phase, PushReason};

const TARGET: &str = "opamp_gitops::driver";

/// Every phase, in the order the metrics list them.
pub(super) const PHASES: [Phase; 6] = [
    Phase::Progressing,
    Phase::Paused,
    Phase::Complete,
    Phase::Halted,
    Phase::Superseded,
    Phase::Unchanged,
];
const REASONS: [PushReason; 4] = [
    PushReason::Wave,
    PushReason::Rollback,
    PushReason::Revert,
    PushReason::Sync,
];
/// How a rollout can end.
const COMPLETE: &str = "complete";
const HALTED: &str = "halted";
const SUPERSEDED: &str = "superseded";
/// Upper bounds, in seconds, of the commit-to-complete histogram.
const BUCKETS: [f64; 8] = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];
/// Plans take milliseconds: a full plan of 100,000 agents stays under 50 ms.
const PLAN_BUCKETS: [f64; 7] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// The reconcile driver's metrics. Group names may be labels; agent ids never are.
#[derive(Debug, Clone)]
pub struct RolloutMetrics {
    agents_by_state: Labeled<Gauge>,
    groups_by_phase: Labeled<Gauge>,
    /// Pushes handed to an agent's connection, by reason.
    pushes: Labeled<Counter>,
    /// Plans made, and how long each took.
    plans: Counter,
    plan_seconds: Histogram,
    /// Plans that went over the whole fleet.
    plans_full: Counter,
    /// Agents decided by plans, summed over plans.
    plan_agents: Counter,
    /// Pushes that found the agent gone or unable to take a config.
    pushes_dropped: Counter,
    agent_failures: Counter,
    rollouts_ended: Labeled<Counter>,
    commit_to_complete: Histogram,
}

impl Default for RolloutMetrics {
    fn default() -> Self {
        RolloutMetrics {
            agents_by_state: Labeled::new("state", AgentState::ALL.map(AgentState::as_str)),
            groups_by_phase: Labeled::new("phase", PHASES.map(Phase::as_str)),
            pushes: Labeled::new("reason", REASONS.map(reason_name)),
            plans: Counter::default(),
            plan_seconds: Histogram::new(PLAN_BUCKETS),
            plans_full: Counter::default(),
            plan_agents: Counter::default(),
            pushes_dropped: Counter::default(),
            agent_failures: Counter::default(),
            rollouts_ended: Labeled::new("outcome", [COMPLETE, HALTED, SUPERSEDED]),
            commit_to_complete: Histogram::new(BUCKETS),
        }
    }
}

impl RolloutMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.add(
            "agents_by_state",
            "Managed and unmanaged agents by state.",
            self.agents_by_state.clone(),
        );
        registry.add(
            "groups_by_phase",
            "Groups by the phase of their current or last rollout.",
            self.groups_by_phase.clone(),
        );
        registry.add("pushes", "Configs handed to agents, by reason.", self.pushes.clone());
        registry.add(
            "plans",
            "Rollout plans made (on changes and deadlines).",
            self.plans.clone(),
        );
        registry.add(
            "plans_full",
            "Plans over the whole fleet (a new commit, a deadline, agents that came, left or changed group, \
             the reconcile interval); the others decide only the agents that changed.",
            self.plans_full.clone(),
        );
        registry.add(
            "plan_agents",
            "Agents decided by plans, summed over the plans.",
            self.plan_agents.clone(),
        );
        registry.add(
            "plan_seconds",
            "How long each plan took, from reading the fleet to publishing the result.",
            self.plan_seconds.clone(),
        );
        registry.add(
            "pushes_dropped",
            "Pushes to agents that were gone or refuse remote config.",
            self.pushes_dropped.clone(),
        );
        registry.add(
            "agent_failures",
            "Agents that failed a rollout.",
            self.agent_failures.clone(),
        );
        registry.add(
            "rollouts_ended",
            "Rollouts that ended, by how.",
            self.rollouts_ended.clone(),
        );
        registry.add(
            "commit_to_complete_seconds",
            "Time from a commit first seen to its rollout complete.",
            self.commit_to_complete.clone(),
        );
    }
}

fn reason_name(reason: PushReason) -> &'static str {
    match reason {
        PushReason::Wave => "wave",
        PushReason::Rollback => "rollback",
        PushReason::Revert => "revert",
        PushReason::Sync => "sync",
    }
}

/// A commit as the logs show it: short, or `-` for none.
struct Short<'a>(Option<&'a CommitId>);

impl Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.map_or("-", CommitId::short))
    }
}

/// A plan was made: the agents' states and the groups' phases it decided.
pub struct Planned<'a, P> {
    pub agents_by_state: &'a BTreeMap<AgentState, u64>,
    /// Each group's phase.
    pub phases: P,
    pub took: std::time::Duration,
    /// It went over the whole fleet.
    pub full: bool,
    /// The agents it decided.
    pub agents: usize,
}

impl<P: IntoIterator<Item = Phase>> InternalEvent for Planned<'_, P> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        m.plans.inc();
        if self.full {
            m.plans_full.inc();
        }
        m.plan_agents.inc_by(self.agents as u64);
        m.plan_seconds.observe(self.took.as_secs_f64());
        for state in AgentState::ALL {
            let n = self.agents_by_state.get(&state).copied().unwrap_or(0);
            m.agents_by_state.set(state.as_str(), n);
        }
        let mut by_phase = [0u64; PHASES.len()];
        for phase in self.phases {
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                by_phase[i] += 1;
            }
        }
        for (phase, n) in PHASES.iter().zip(by_phase) {
            m.groups_by_phase.set(phase.as_str(), n);
        }
    }
}

/// A config was handed to the fleet for an agent, with what became of it.
pub struct ConfigPushed<'a> {
    pub agent: &'a InstanceUid,
    pub group: &'a GroupName,
    pub hash: &'a ConfigHash,
    pub reason: PushReason,
    pub outcome: PushOutcome,
}

impl InternalEvent for ConfigPushed<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        let Self {
            agent,
            group,
            hash,
            reason,
            outcome,
        } = self;
        match outcome {
            PushOutcome::Sent | PushOutcome::Queued => m.pushes.inc(reason_name(reason)),
            PushOutcome::NotConnected | PushOutcome::NotAccepted => {
                m.pushes_dropped.inc();
            }
        }
        debug!(target: TARGET, agent = %agent, group = %group, hash = %hash, reason = ?reason, outcome = ?outcome, "pushed config");
        if outcome == PushOutcome::NotAccepted {
            warn!(target: TARGET, agent = %agent, "push refused: the agent does not accept remote config");
        }
    }
}

/// An event of a plan, told by the event type for it below.
pub struct RolloutEvent<'a> {
    pub event: &'a Event,
    /// For a completed rollout: how long since its commit was first seen.
    pub took: Option<Duration>,
    /// Who made the rollout's commit (`Name <email>`), when known.
    pub author: Option<&'a str>,
}

impl InternalEvent for RolloutEvent<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        match self.event {
            Event::RolloutStarted {
                group,
                commit,
                hash,
                waves,
                targeted,
            } => RolloutStarted {
                group,
                commit: commit.as_ref(),
                hash,
                waves: *waves,
                targeted: *targeted,
                author: self.author,
            }
            .emit(m),
            Event::WaveOpened {
                group,
                commit,
                wave,
                agents,
            } => WaveOpened {
                group,
                commit: commit.as_ref(),
                wave: *wave,
                agents: *agents,
            }
            .emit(m),
            Event::WaveDone { group, commit, wave } => WaveDone {
                group,
                commit: commit.as_ref(),
                wave: *wave,
            }
            .emit(m),
            Event::AgentFailed {
                group,
                agent,
                hash,
                error,
            } => AgentFailed {
                group,
                agent,
                hash,
                error,
            }
            .emit(m),
            Event::Halted {
                group,
                commit,
                failures,
            } => RolloutHalted {
                group,
                commit: commit.as_ref(),
                failures: *failures,
                author: self.author,
            }
            .emit(m),
            Event::RolledBack { group, agent, hash } => RolledBack { group, agent, hash }.emit(m),
            Event::Complete { group, commit, hash } => RolloutComplete {
                group,
                commit: commit.as_ref(),
                hash,
                took: self.took,
                author: self.author,
            }
            .emit(m),
            Event::Superseded {
                group,
                commit,
                hash,
                by,
            } => RolloutSuperseded {
                group,
                commit: commit.as_ref(),
                hash,
                by,
                author: self.author,
            }
            .emit(m),
            Event::RevertPushed {
                group,
                commit,
                hash,
                agents,
            } => RevertPushed {
                group,
                commit: commit.as_ref(),
                hash,
                agents: *agents,
            }
            .emit(m),
            Event::DriftHealed { group, agent, hash } => DriftHealed { group, agent, hash }.emit(m),
        }
    }
}

pub struct RolloutStarted<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub hash: &'a ConfigHash,
    pub waves: u32,
    pub targeted: u32,
    pub author: Option<&'a str>,
}

impl InternalEvent for RolloutStarted<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), author = self.author, hash = %self.hash, waves = self.waves, agents = self.targeted, "rollout started");
    }
}

pub struct WaveOpened<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub wave: u32,
    /// Members covered by the opened waves (cumulative).
    pub agents: u32,
}

impl InternalEvent for WaveOpened<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), wave = self.wave, agents = self.agents, "wave opened");
    }
}

pub struct WaveDone<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub wave: u32,
}

impl InternalEvent for WaveDone<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), wave = self.wave, "wave done");
    }
}

pub struct AgentFailed<'a> {
    pub group: &'a GroupName,
    pub agent: &'a InstanceUid,
    pub hash: &'a ConfigHash,
    pub error: &'a str,
}

impl InternalEvent for AgentFailed<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        m.agent_failures.inc();
        warn!(target: TARGET, group = %self.group, agent = %self.agent, hash = %self.hash, error = %self.error, "agent failed");
    }
}

pub struct RolloutHalted<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub failures: u32,
    pub author: Option<&'a str>,
}

impl InternalEvent for RolloutHalted<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        m.rollouts_ended.inc(HALTED);
        warn!(target: TARGET, group = %self.group, commit = %Short(self.commit), author = self.author, failures = self.failures, "rollout halted");
    }
}

pub struct RolledBack<'a> {
    pub group: &'a GroupName,
    pub agent: &'a InstanceUid,
    pub hash: &'a ConfigHash,
}

impl InternalEvent for RolledBack<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, agent = %self.agent, hash = %self.hash, "rolled back");
    }
}

pub struct RolloutComplete<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub hash: &'a ConfigHash,
    /// How long since the commit was first seen, when known.
    pub took: Option<Duration>,
    pub author: Option<&'a str>,
}

impl InternalEvent for RolloutComplete<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        m.rollouts_ended.inc(COMPLETE);
        if let Some(took) = self.took {
            m.commit_to_complete.observe(took.as_secs_f64());
        }
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), author = self.author, hash = %self.hash, "rollout complete");
    }
}

/// A rollout in progress was replaced by a newer commit's.
pub struct RolloutSuperseded<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub hash: &'a ConfigHash,
    pub by: &'a ConfigHash,
    pub author: Option<&'a str>,
}

impl InternalEvent for RolloutSuperseded<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, m: &RolloutMetrics) {
        m.rollouts_ended.inc(SUPERSEDED);
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), author = self.author, hash = %self.hash, by = %self.by, "rollout superseded");
    }
}

pub struct RevertPushed<'a> {
    pub group: &'a GroupName,
    pub commit: Option<&'a CommitId>,
    pub hash: &'a ConfigHash,
    pub agents: u32,
}

impl InternalEvent for RevertPushed<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, commit = %Short(self.commit), hash = %self.hash, agents = self.agents, "revert pushed to every agent");
    }
}

pub struct DriftHealed<'a> {
    pub group: &'a GroupName,
    pub agent: &'a InstanceUid,
    pub hash: &'a ConfigHash,
}

impl InternalEvent for DriftHealed<'_> {
    type Metrics = RolloutMetrics;

    fn emit(self, _: &RolloutMetrics) {
        info!(target: TARGET, group = %self.group, agent = %self.agent, hash = %self.hash, "drift healed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(registry: &Registry, line_start: &str) -> Option<String> {
        registry
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(line_start).map(str::to_string))
    }

    #[test]
    fn gauges_follow_the_newest_plan() {
        let m = RolloutMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let states = BTreeMap::from([(AgentState::Failed, 2), (AgentState::InSync, 1)]);
        Planned {
            agents_by_state: &states,
            phases: [Phase::Halted, Phase::Halted],
            took: std::time::Duration::ZERO,
            full: true,
            agents: 3,
        }
        .emit(&m);
        assert_eq!(
            sample(&registry, "opamp_gitops_agents_by_state{state=\"failed\"} ").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(&registry, "opamp_gitops_groups_by_phase{phase=\"halted\"} ").as_deref(),
            Some("2")
        );
        // A state or phase the next plan no longer has counts zero again.
        Planned {
            agents_by_state: &BTreeMap::from([(AgentState::InSync, 3)]),
            phases: [Phase::Complete, Phase::Halted],
            took: std::time::Duration::ZERO,
            full: true,
            agents: 3,
        }
        .emit(&m);
        assert_eq!(
            sample(&registry, "opamp_gitops_agents_by_state{state=\"failed\"} ").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&registry, "opamp_gitops_agents_by_state{state=\"in_sync\"} ").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(&registry, "opamp_gitops_groups_by_phase{phase=\"halted\"} ").as_deref(),
            Some("1")
        );
        assert_eq!(sample(&registry, "opamp_gitops_plans_total ").as_deref(), Some("2"));
    }

    #[test]
    fn rollout_endings_are_counted_by_how() {
        let m = RolloutMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let (group, hash) = (GroupName::new("g"), ConfigHash([1; 32]));
        for event in [
            Event::Halted {
                group: group.clone(),
                commit: None,
                failures: 1,
            },
            Event::Superseded {
                group: group.clone(),
                commit: None,
                hash,
                by: ConfigHash([2; 32]),
            },
            Event::Complete {
                group: group.clone(),
                commit: None,
                hash,
            },
        ] {
            RolloutEvent {
                event: &event,
                took: None,
                author: Some("Ada <ada@example.com>"),
            }
            .emit(&m);
        }
        for how in [COMPLETE, HALTED, SUPERSEDED] {
            let line = format!("opamp_gitops_rollouts_ended_total{{outcome=\"{how}\"}} ");
            assert_eq!(sample(&registry, &line).as_deref(), Some("1"), "{how}");
        }
        // Without the commit's first sighting nothing is observed.
        assert_eq!(
            sample(&registry, "opamp_gitops_commit_to_complete_seconds_count ").as_deref(),
            Some("0")
        );
    }
}
