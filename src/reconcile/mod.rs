//! The reconciler: per group canary rollouts and per agent drift healing,
//! decided by the pure function [`plan`] from the desired state, the fleet,
//! the rollout state and the time. No I/O, no clock, no randomness; the
//! driver calls it on every change and on a timer, carries out the pushes and
//! persists [`RolloutState`]. The rules are in `docs/rollouts.md`.

mod assign;
mod classify;
mod input;
mod join;
mod output;
mod plan;
mod restore;
mod rollout;
mod select;
mod state;
mod status;
mod waves;

#[cfg(test)]
mod tests;

pub use input::{AgentView, PlanInput, RemoteConfigState, StatusView, unsupported_reason};
pub use output::{
    AgentCounts, Assignment, Event, FailureView, GroupStatus, MAX_FAILURES_SHOWN, Phase, Plan, Push, PushReason,
};
pub use plan::{Planner, Step, fleet_capacity, plan};
pub use restore::{Recovered, RecoveredRollout, restore};
pub use rollout::Change;
pub use select::Matcher;
pub use state::{
    AgentMemories, AgentMemory, Control, ControlAction, ControlError, FailureRecord, GroupState, Membership, Pushed,
    Rollout, RolloutKind, RolloutPhase, RolloutState, Stable, Timestamp,
};
pub(crate) use state::{bundle_serde, files_serde};
pub use waves::{Members, OrderKey, canary_order, order_key, rollout_members, wave_cuts};
