//! An agent's state from the facts the planner established about it: the
//! first rule that holds wins. Pure and table-tested.

use super::input::RemoteConfigState;
use crate::model::AgentState;

/// What an agent's state is decided from (see [`classify`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Facts {
    pub(super) connected: bool,
    /// It failed the rollout it is in, or the config it should run (FAILED
    /// for it now or before, or unhealthy past the grace after applying it).
    pub(super) failed: bool,
    /// It waits for its wave, or has no config to run yet.
    pub(super) waiting: bool,
    /// Its status for the config it should run, if it reports one for it.
    pub(super) reports: Option<RemoteConfigState>,
    /// It reports health, and is unhealthy.
    pub(super) unhealthy: bool,
    /// The config it should run was given to it on this connection.
    pub(super) given: bool,
}

/// An agent's state from what is known of it; the first rule that holds wins.
pub(super) fn classify(f: Facts) -> AgentState {
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

#[cfg(test)]
mod tests {
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
