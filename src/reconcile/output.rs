//! What `plan` returns: pushes, each agent's assignment, each group's status
//! and the events worth a log line.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::state::{ControlAction, RolloutState, Timestamp};
use crate::desired::ConfigBundle;
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};

/// Failures shown in a group's status (newest first).
pub const MAX_FAILURES_SHOWN: usize = 20;

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
    /// The earliest time at which planning again, with nothing else
    /// changed, could decide otherwise (a bake ends, a timeout runs out);
    /// `None`: only a change of the desired state, the fleet or the
    /// rollout state can.
    pub next: Option<Timestamp>,
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
    /// Agents that failed the current (or last) rollout, all of them.
    pub failed: u32,
    /// Newest first, at most [`MAX_FAILURES_SHOWN`].
    pub failures: Vec<FailureView>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// When the current wave opened (rollouts in progress).
    pub wave_opened: Option<Timestamp>,
    /// Since when the current wave has waited for its agents; `None` while
    /// it is settled (applied and healthy), paused, or ended.
    pub waiting_since: Option<Timestamp>,
    /// When the current wave's bake ends, while it is settled and not paused.
    pub bake_ends: Option<Timestamp>,
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

#[cfg(test)]
impl GroupStatus {
    /// For tests: the rollout of `commit`, in `phase` at `wave` of 3, over
    /// ten agents of which `applied` run it; no failures.
    pub(crate) fn sample(commit: CommitId, phase: Phase, wave: u32, applied: u32) -> Self {
        GroupStatus {
            config_hash: ConfigHash([commit.as_str().as_bytes()[0]; 32]),
            stable_hash: None,
            phase,
            wave,
            waves: 3,
            commit: Some(commit),
            agents: AgentCounts {
                targeted: 10,
                applied,
                ..Default::default()
            },
            failed: 0,
            failures: vec![],
            started: Some(Timestamp::from_millis(1_000)),
            finished: None,
            wave_opened: None,
            waiting_since: None,
            bake_ends: None,
            actions: vec![],
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

impl Event {
    /// The group the event is about.
    pub fn group(&self) -> &GroupName {
        match self {
            Event::RolloutStarted { group, .. }
            | Event::WaveOpened { group, .. }
            | Event::WaveDone { group, .. }
            | Event::AgentFailed { group, .. }
            | Event::Halted { group, .. }
            | Event::RolledBack { group, .. }
            | Event::Complete { group, .. }
            | Event::Superseded { group, .. }
            | Event::RevertPushed { group, .. }
            | Event::DriftHealed { group, .. } => group,
        }
    }

    /// The commit of the rollout a group-level event is about.
    pub fn commit(&self) -> Option<&CommitId> {
        match self {
            Event::RolloutStarted { commit, .. }
            | Event::WaveOpened { commit, .. }
            | Event::WaveDone { commit, .. }
            | Event::Halted { commit, .. }
            | Event::Complete { commit, .. }
            | Event::Superseded { commit, .. }
            | Event::RevertPushed { commit, .. } => commit.as_ref(),
            Event::AgentFailed { .. } | Event::RolledBack { .. } | Event::DriftHealed { .. } => None,
        }
    }
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
