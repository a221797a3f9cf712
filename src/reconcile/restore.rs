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
use super::select::Matcher;
use super::state::{
    AgentRecord, AgentRecords, FailureRecord, GroupState, Membership, Rollout, RolloutKind, RolloutPhase, RolloutState,
    Stable, Timestamp,
};
use super::waves::{Members, order_key, wave_cuts};
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
    let positions: BTreeMap<&GroupName, usize> = desired.groups.keys().enumerate().map(|(i, g)| (g, i)).collect();
    let mut members_of: BTreeMap<usize, Vec<&InstanceUid>> = BTreeMap::new();
    for a in agents.iter().filter(|a| a.connected && a.accepts_remote_config) {
        if let Some(g) = matcher.find(a) {
            members_of.entry(g).or_default().push(&a.uid);
        }
    }
    let mut state = RolloutState::default();
    let mut records: BTreeMap<InstanceUid, AgentRecord> = BTreeMap::new();
    for (name, rec) in recovered {
        let Some((&pos, group)) = positions.get(&name).zip(desired.groups.get(&name)) else {
            continue;
        };
        let stable_hash = rec.stable.as_ref().map(|s| s.bundle.hash());
        let rollout = rec.rollout.map(|r| {
            let id = state.rollouts;
            state.rollouts += 1;
            let mut order: Vec<&InstanceUid> = members_of.get(&pos).cloned().unwrap_or_default();
            // Back to the stable config: a revert goes to every agent at once,
            // with no members and one cut covering the group.
            let revert = stable_hash == Some(r.target.hash());
            let (kind, cuts, members) = if revert {
                let everyone = u32::try_from(order.len()).unwrap_or(u32::MAX);
                (RolloutKind::Revert, vec![everyone], Members::default())
            } else {
                order.sort_by_cached_key(|u| order_key(&name, u));
                for (rank, uid) in (0u32..).zip(&order) {
                    records.entry((*uid).clone()).or_default().member = Some(Membership { rollout: id, rank });
                }
                let cuts = wave_cuts(&group.rollout.waves, order.len());
                (
                    RolloutKind::Waves,
                    cuts,
                    Members::from_order(order.into_iter().cloned().collect()),
                )
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
            Rollout {
                id,
                kind,
                opened: r.opened.clamp(1, u32::try_from(cuts.len()).unwrap_or(u32::MAX).max(1)),
                cuts,
                members: Arc::new(members),
                target: r.target,
                commit: r.commit,
                phase: if halted {
                    RolloutPhase::Halted
                } else {
                    RolloutPhase::Progressing
                },
                paused: r.paused && !revert,
                promote: false,
                settled_since: None,
                started: r.started,
                finished: r.finished.filter(|_| halted),
                missing: BTreeMap::new(),
                failures,
                actions: Vec::new(),
            }
        });
        state.groups.insert(
            name,
            GroupState {
                stable: rec.stable,
                rollout,
            },
        );
    }
    state.agents = AgentRecords::from_sorted(records.into_iter().collect());
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
