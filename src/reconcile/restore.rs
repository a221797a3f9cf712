//! Rebuilding the rollout state from what the git notes recorded, for a
//! controller whose state directory was lost. Pure.
//!
//! A completed rollout gives the group's stable config; a halted one stays
//! halted (its target is never offered again to agents that did not run it);
//! a progressing one resumes at the wave it had opened. Members are the
//! group's connected agents now, in canary order, so a resumed wave covers
//! the same canaries as before whenever the fleet is the same.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::input::AgentView;
use super::rollout::Reach;
use super::select::Matcher;
use super::state::{
    AgentMemories, AgentMemory, FailureRecord, GroupState, Membership, Rollout, RolloutKind, RolloutPhase,
    RolloutState, Stable, Timestamp,
};
use super::waves::rollout_members;
use crate::desired::{ConfigBundle, DesiredState};
use crate::model::{CommitId, GroupName, InstanceUid};

/// What the notes say about one group.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The config of the newest completed rollout.
    pub stable: Option<Stable>,
    /// A rollout newer than the stable one that had not completed.
    pub rollout: Option<RecoveredRollout>,
}

#[derive(Debug, Clone)]
pub struct RecoveredRollout {
    pub target: Arc<ConfigBundle>,
    pub commit: Option<CommitId>,
    pub halted: bool,
    pub paused: bool,
    /// Waves opened, as the note recorded.
    pub opened: u32,
    pub started: Timestamp,
    pub finished: Option<Timestamp>,
    /// Agents that had failed it, with their errors.
    pub failures: Vec<(InstanceUid, String)>,
}

/// The rollout state the notes describe, for the fleet connected now.
pub fn restore(
    desired: &DesiredState,
    agents: &[AgentView],
    recovered: BTreeMap<GroupName, Recovered>,
    now: Timestamp,
) -> RolloutState {
    let matcher = Matcher::new(desired);
    // The agents of each group whose config the controller manages, as the
    // planner counts them.
    let mut group_agents: BTreeMap<&GroupName, Vec<&AgentView>> = BTreeMap::new();
    for a in agents.iter().filter(|a| a.supported()) {
        if let Some(g) = matcher.group_of(a) {
            group_agents.entry(&g.name).or_default().push(a);
        }
    }
    let mut state = RolloutState::default();
    let mut records: BTreeMap<InstanceUid, AgentMemory> = BTreeMap::new();
    for (name, rec) in recovered {
        let Some(group) = desired.groups.get(&name) else {
            continue;
        };
        let of_group = group_agents.get(&name).map(Vec::as_slice).unwrap_or_default();
        let stable_hash = rec.stable.as_ref().map(|s| s.bundle.hash());
        let rollout = rec.rollout.map(|r| {
            let id = state.rollouts;
            state.rollouts += 1;
            let revert = RolloutKind::of(r.target.hash(), stable_hash) == RolloutKind::Revert;
            let reach = if revert {
                Reach::Everyone { agents: of_group.len() }
            } else {
                let members: Vec<InstanceUid> = rollout_members(&name, of_group.iter().copied())
                    .into_iter()
                    .map(|n| of_group[n].uid.clone())
                    .collect();
                for (rank, uid) in (0u32..).zip(&members) {
                    records.entry(uid.clone()).or_default().member = Some(Membership { rollout: id, rank });
                }
                Reach::Waves {
                    members,
                    waves: &group.rollout.waves,
                }
            };
            // A revert never halts; a failure noted on it must not bar an agent
            // from the stable config.
            let failed_at = r.finished.unwrap_or(now);
            let failures: BTreeMap<InstanceUid, FailureRecord> = r
                .failures
                .into_iter()
                .filter(|_| !revert)
                .map(|(uid, error)| (uid, FailureRecord { error, at: failed_at }))
                .collect();
            for uid in failures.keys() {
                records.entry(uid.clone()).or_default().failed = Some(r.target.hash());
            }
            let halted = r.halted && !revert;
            let mut rollout = Rollout::begin(id, r.target, r.commit, reach, r.started);
            rollout.opened = r.opened.clamp(1, rollout.waves().max(1));
            // The wave's clocks start again: its bake is served in full.
            rollout.wave_opened = Some(now);
            rollout.waiting_since = Some(now);
            if halted {
                rollout.phase = RolloutPhase::Halted;
                rollout.finished = r.finished;
            }
            rollout.paused = r.paused && !revert;
            rollout.failures = failures;
            rollout
        });
        state.groups.insert(
            name,
            GroupState {
                stable: rec.stable,
                rollout,
            },
        );
    }
    state.agents = AgentMemories::from_sorted(records.into_iter().collect());
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::{AgentFx, agent, config, gname, repo, t};
    use crate::reconcile::{Event, Phase, PlanInput, plan};

    fn plan_at(
        desired: &DesiredState,
        agents: &[AgentView],
        state: &RolloutState,
        now: Timestamp,
    ) -> crate::reconcile::Plan {
        plan(&PlanInput {
            desired,
            agents,
            state,
            now,
        })
    }

    /// Ten agents running `v1`, sorted by uid as the driver passes them.
    fn fleet_on(v1: &Arc<ConfigBundle>) -> Vec<AgentView> {
        let mut v: Vec<AgentView> = (0..10).map(|i| agent(&format!("a{i}")).reports(v1).applied()).collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    fn recovered(v1: &Arc<ConfigBundle>, v2: &Arc<ConfigBundle>, halted: bool) -> BTreeMap<GroupName, Recovered> {
        BTreeMap::from([(
            gname("gw"),
            Recovered {
                stable: Some(Stable {
                    bundle: v1.clone(),
                    commit: None,
                }),
                rollout: Some(RecoveredRollout {
                    target: v2.clone(),
                    commit: None,
                    halted,
                    paused: false,
                    opened: 2,
                    started: t(1),
                    finished: halted.then_some(t(2)),
                    failures: vec![],
                }),
            },
        )])
    }

    #[test]
    fn progressing_resumes_at_its_wave() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("1, 50%, 100%").bake(3600).config(&v2).build();
        let agents = fleet_on(&v1);
        let state = restore(&desired, &agents, recovered(&v1, &v2, false), t(100));
        let p = plan_at(&desired, &agents, &state, t(100));
        let g = &p.groups[&gname("gw")];
        assert_eq!((g.phase, g.wave, g.waves), (Phase::Progressing, 2, 3));
        // Wave 2 covers 50% of 10 agents, in canary order: exactly those get v2.
        let order = crate::reconcile::canary_order(&gname("gw"), agents.iter().map(|a| a.uid.clone()).collect());
        let mut pushed: Vec<InstanceUid> = p.pushes.iter().map(|p| p.uid.clone()).collect();
        pushed.sort_by_key(|u| order.iter().position(|o| o == u));
        assert_eq!(pushed, order[..5].to_vec());
        assert!(p.pushes.iter().all(|push| push.bundle.hash() == v2.hash()));
        assert!(
            !p.events.iter().any(|e| matches!(e, Event::RolloutStarted { .. })),
            "{:?}",
            p.events
        );
    }

    #[test]
    fn halted_stays_halted() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("1, 50%, 100%").config(&v2).build();
        let agents = fleet_on(&v1);
        // Halted at wave 1: the canary failed and was rolled back to v1.
        let order = crate::reconcile::canary_order(&gname("gw"), agents.iter().map(|a| a.uid.clone()).collect());
        let mut rec = recovered(&v1, &v2, true);
        let r = rec.get_mut(&gname("gw")).unwrap().rollout.as_mut().unwrap();
        r.opened = 1;
        r.failures = vec![(order[0].clone(), "boom".into())];
        let state = restore(&desired, &agents, rec, t(100));
        let p = plan_at(&desired, &agents, &state, t(100));
        let g = &p.groups[&gname("gw")];
        assert_eq!((g.phase, g.wave), (Phase::Halted, 1));
        assert!(p.pushes.is_empty(), "the bad config goes to nobody: {:?}", p.pushes);
        assert!(!p.events.iter().any(|e| matches!(e, Event::RolloutStarted { .. })));
    }

    #[test]
    fn halted_gives_its_target_to_nobody_even_to_failed_agents_the_note_left_out() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("5, 100%").config(&v2).build();
        // Wave 1's five agents all failed and were rolled back to v1, but the
        // note names only two of them (an older note kept the newest few).
        let agents = fleet_on(&v1);
        let order = crate::reconcile::canary_order(&gname("gw"), agents.iter().map(|a| a.uid.clone()).collect());
        let mut rec = recovered(&v1, &v2, true);
        let r = rec.get_mut(&gname("gw")).unwrap().rollout.as_mut().unwrap();
        r.opened = 1;
        r.failures = order[..2].iter().map(|u| (u.clone(), "boom".into())).collect();
        let state = restore(&desired, &agents, rec, t(100));
        let p = plan_at(&desired, &agents, &state, t(100));
        assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
        assert!(p.pushes.is_empty(), "v2 goes to nobody: {:?}", p.pushes);
        // An agent of the opened wave that runs the target keeps it.
        let mut agents = agents;
        let kept = agents.iter().position(|a| a.uid == order[3]).unwrap();
        agents[kept] = agents[kept].clone().reports(&v2).applied();
        let p = plan_at(&desired, &agents, &state, t(100));
        assert!(p.pushes.is_empty(), "{:?}", p.pushes);
        assert_eq!(p.agent(&order[3]).and_then(|a| a.desired), Some(v2.hash()));
        assert_eq!(p.agent(&order[4]).and_then(|a| a.desired), Some(v1.hash()));
    }

    #[test]
    fn a_revert_in_progress_resumes_as_a_revert() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("1, 50%, 100%").config(&v1).build();
        // Half the fleet still runs the bad v2; the revert to v1 was under way.
        let mut agents = fleet_on(&v1);
        for a in agents.iter_mut().take(5) {
            *a = a.clone().reports(&v2).applied();
        }
        let mut rec = recovered(&v1, &v1, false);
        let r = rec.get_mut(&gname("gw")).unwrap().rollout.as_mut().unwrap();
        r.opened = 1;
        // Even a failure noted on it does not keep an agent from the stable config.
        r.failures = vec![(agents[0].uid.clone(), "noted".into())];
        let state = restore(&desired, &agents, rec, t(100));
        let p = plan_at(&desired, &agents, &state, t(100));
        assert_eq!(p.pushes.len(), 5, "every agent on v2 gets v1 at once: {:?}", p.pushes);
        assert!(p.pushes.iter().all(|push| push.bundle.hash() == v1.hash()));
    }

    #[test]
    fn members_are_the_agents_the_planner_would_count() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("1, 50%, 100%").config(&v2).build();
        let mut agents = fleet_on(&v1);
        // Accepts remote config but never says whether it applied it.
        agents[3].reports_remote_config = false;
        agents[4] = agents[4].clone().offline(None);
        let state = restore(&desired, &agents, recovered(&v1, &v2, false), t(100));
        let members = &state.groups[&gname("gw")].rollout.as_ref().unwrap().members;
        assert_eq!(members.len(), 9, "{:?}", members.ordered());
        assert!(!members.ordered().contains(&agents[3].uid), "unsupported");
        assert!(members.ordered().contains(&agents[4].uid), "away, it keeps its place");
    }

    #[test]
    fn complete_gives_stable_and_nothing_moves() {
        let v1 = config("v1");
        let desired = repo().group("gw").config(&v1).build();
        let agents = fleet_on(&v1);
        let recovered = BTreeMap::from([(
            gname("gw"),
            Recovered {
                stable: Some(Stable {
                    bundle: v1.clone(),
                    commit: None,
                }),
                rollout: None,
            },
        )]);
        let state = restore(&desired, &agents, recovered, t(5));
        let p = plan_at(&desired, &agents, &state, t(5));
        assert!(p.pushes.is_empty());
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.groups[&gname("gw")].stable_hash, Some(v1.hash()));
    }

    #[test]
    fn failed_agents_keep_their_failure_and_unknown_groups_are_dropped() {
        let (v1, v2) = (config("v1"), config("v2"));
        let desired = repo().group("gw").waves("1, 100%").config(&v2).build();
        let agents = fleet_on(&v1);
        let mut rec = recovered(&v1, &v2, true);
        let canary = agents[0].uid.clone();
        rec.get_mut(&gname("gw")).unwrap().rollout.as_mut().unwrap().failures = vec![(canary.clone(), "boom".into())];
        rec.insert(gname("gone"), Recovered::default());
        let state = restore(&desired, &agents, rec, t(9));
        assert!(!state.groups.contains_key(&gname("gone")));
        assert_eq!(state.agents.get(&canary).and_then(|r| r.failed), Some(v2.hash()));
        let p = plan_at(&desired, &agents, &state, t(9));
        assert_eq!(p.groups[&gname("gw")].failures[0].error, "boom");
    }
}
