//! A group's status as the notes and the API show it, projected from its
//! rollout state and the counts of its agents' states.

use super::output::{AgentCounts, FailureView, GroupStatus, MAX_FAILURES_SHOWN, Phase};
use super::plan::GroupCtx;
use super::state::{GroupState, RolloutKind, RolloutPhase};
use crate::model::AgentState;

impl AgentCounts {
    /// Counts one agent of the group in `state`.
    pub(super) fn add(&mut self, state: AgentState) {
        match state {
            AgentState::InSync => self.applied += 1,
            AgentState::Applying | AgentState::Drifted => self.applying += 1,
            AgentState::Failed => self.failed += 1,
            AgentState::Offline => self.offline += 1,
            _ => self.pending += 1,
        }
        self.targeted += 1;
    }

    /// No longer counts one agent of the group in `state`.
    pub(super) fn remove(&mut self, state: AgentState) {
        let n = match state {
            AgentState::InSync => &mut self.applied,
            AgentState::Applying | AgentState::Drifted => &mut self.applying,
            AgentState::Failed => &mut self.failed,
            AgentState::Offline => &mut self.offline,
            _ => &mut self.pending,
        };
        *n -= 1;
        self.targeted -= 1;
    }
}

impl GroupCtx<'_> {
    /// The group's status from its rollout state and the counts of its agents.
    pub(super) fn status(&self, gs: &GroupState, agents: AgentCounts) -> GroupStatus {
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
                failed: 0,
                failures: Vec::new(),
                started: None,
                finished: None,
                wave_opened: None,
                waiting_since: None,
                bake_ends: None,
                actions: Vec::new(),
            };
        };
        let phase = match r.phase {
            RolloutPhase::Progressing if r.paused => Phase::Paused,
            RolloutPhase::Progressing => Phase::Progressing,
            RolloutPhase::Halted => Phase::Halted,
            RolloutPhase::Complete => Phase::Complete,
        };
        let in_progress = matches!(phase, Phase::Progressing | Phase::Paused);
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
            failed: u32::try_from(r.failures.len()).unwrap_or(u32::MAX),
            failures,
            started: Some(r.started),
            finished: r.finished,
            wave_opened: r.wave_opened.filter(|_| in_progress),
            waiting_since: r.waiting_since.filter(|_| phase == Phase::Progressing),
            bake_ends: r
                .settled_since
                .filter(|_| phase == Phase::Progressing && r.kind == RolloutKind::Waves)
                .map(|t| t.after(self.group.rollout.bake)),
            actions: r.actions.clone(),
        }
    }
}
