//! Property tests of `plan` over random fleets, policies and event sequences:
//! determinism, waves never leaking the target, the fixpoint, where pushes
//! may go, and deadlines that nothing happens before.

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Ok,
    Fail,
    Silent,
    Unhealthy,
}

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    /// Every connected agent answers the last plan's pushes per its behaviour.
    Answer,
    /// Agent i disconnects, or reconnects on a new epoch.
    Toggle(usize),
    /// Late agent i joins the fleet (at its place in uid order).
    Arrive(usize),
    /// New commit: the config index of each group.
    Commit(usize, usize),
    Pause(usize),
    Resume(usize),
    Promote(usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    agents: Vec<(u8, bool, bool, Behaviour)>, // svc, supported, connected, behaviour
    /// Agents not in the fleet until they arrive.
    late: BTreeSet<usize>,
    /// The fleet in uid order (agents that arrive are then planned over the last fleet).
    sorted: bool,
    waves: &'static str,
    bake: u64,
    timeout: u64,
    max_failures: u64,
    hold: bool,
    steps: Vec<Step>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let agent = (
        0u8..3,
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.9),
        prop_oneof![
            6 => Just(Behaviour::Ok),
            1 => Just(Behaviour::Fail),
            1 => Just(Behaviour::Silent),
            1 => Just(Behaviour::Unhealthy),
        ],
    );
    let step = prop_oneof![
        4 => (1u64..200).prop_map(Step::Advance),
        4 => Just(Step::Answer),
        1 => (0usize..30).prop_map(Step::Toggle),
        1 => (0usize..30).prop_map(Step::Arrive),
        1 => (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Commit(a, b)),
        1 => (0usize..2).prop_map(Step::Pause),
        1 => (0usize..2).prop_map(Step::Resume),
        1 => (0usize..2).prop_map(Step::Promote),
    ];
    (
        prop::collection::vec(agent, 0..30),
        prop::collection::btree_set(0usize..30, 0..6),
        prop::bool::weighted(0.7),
        prop::sample::select(vec![
            "1, 100%",
            "1, 50%, 100%",
            "2, 10%, 100%",
            "100%",
            "25%, 25%, 100%",
        ]),
        0u64..120,
        1u64..300,
        0u64..3,
        any::<bool>(),
        prop::collection::vec(step, 1..40),
    )
        .prop_map(
            |(agents, late, sorted, waves, bake, timeout, max_failures, hold, steps)| Scenario {
                agents,
                late,
                sorted,
                waves,
                bake,
                timeout,
                max_failures,
                hold,
                steps,
            },
        )
}

fn desired(s: &Scenario, commit: usize, a: usize, b: usize) -> DesiredState {
    let tune = |r: Repo| {
        r.waves(s.waves)
            .bake(s.bake)
            .apply_timeout(s.timeout)
            .max_failures(Amount::Count(s.max_failures))
            .on_failure(if s.hold { OnFailure::Hold } else { OnFailure::Rollback })
    };
    let r = repo().commit(&format!("c{commit}")).interval(600);
    let r = tune(r.group("ga").select("svc", "0").config(&config(&format!("a{a}"))));
    let r = tune(
        r.group("gb")
            .select("svc", "1")
            .priority(1)
            .config(&config(&format!("b{b}"))),
    );
    r.build()
}

/// Whether `uid` is in an opened wave of the group's rollout (members by
/// rank, late joiners by their place in the canary order).
fn in_opened_wave(group: &GroupName, r: &Rollout, rec: Option<&AgentMemory>, uid: &InstanceUid) -> bool {
    let cut = r.opened_cut();
    match rec.and_then(|rec| rec.rank_in(r.id)) {
        Some(rank) => rank < cut,
        None => match r.members.at_rank(cut) {
            Some(first_unopened) => order_key(group, uid) < order_key(group, first_unopened),
            None => true,
        },
    }
}

/// Checks what must hold of every plan; `agents` and `input_state` are what
/// it was made from (the world delivers its pushes afterwards).
fn check(w: &World, agents: &[AgentView], input_state: &RolloutState, p: &Plan) -> Result<(), TestCaseError> {
    let again = plan(&PlanInput {
        desired: &w.desired,
        agents,
        state: input_state,
        now: w.now,
    });
    prop_assert_eq!(&again, p, "the same input gives the same plan");
    prop_assert_eq!(p.agents.len(), agents.len());
    for push in &p.pushes {
        let a = w
            .agents
            .iter()
            .find(|a| a.uid == push.uid)
            .expect("pushed agent is in the fleet");
        prop_assert!(a.connected, "pushed to a disconnected agent");
        prop_assert!(a.accepts_remote_config, "pushed to an unsupported agent");
        let asg = p.agent(&push.uid).expect("assigned");
        prop_assert_eq!(asg.group.as_ref(), Some(&push.group), "pushed outside its group");
        let h = push.bundle.hash();
        let watched = input_state
            .agents
            .get(&push.uid)
            .and_then(|r| r.pushed)
            .is_some_and(|p| p.hash == h && (p.observed || p.epoch != a.connection_epoch));
        prop_assert!(
            a.remote.as_ref().is_none_or(|r| r.hash != Some(h)) || watched,
            "pushed a hash the agent already has, without having watched it apply"
        );
        prop_assert!(
            input_state.agents.get(&push.uid).is_none_or(|r| !r.has_failed(h)),
            "pushed a hash the agent reported FAILED for: {:?} now reports {:?}, record {:?}, push {:?}",
            push.uid,
            a.remote,
            input_state.agents.get(&push.uid),
            push.reason
        );
        let gs = &p.state.groups[&push.group];
        if let Some(r) = &gs.rollout
            && r.kind == RolloutKind::Waves
            && r.phase != RolloutPhase::Complete
            && r.target.hash() == h
        {
            prop_assert!(
                in_opened_wave(&push.group, r, p.state.agents.get(&push.uid), &push.uid),
                "target given outside the opened waves"
            );
        }
    }
    for (g, gs) in &p.state.groups {
        let Some(r) = gs.rollout.as_ref().filter(|r| r.kind == RolloutKind::Waves) else {
            continue;
        };
        for a in agents {
            if let Some(rank) = p.state.agents.get(&a.uid).and_then(|rec| rec.rank_in(r.id)) {
                prop_assert_eq!(
                    r.members.at_rank(rank),
                    Some(&a.uid),
                    "membership agrees with the order"
                );
                prop_assert_eq!(
                    in_opened_wave(g, r, None, &a.uid),
                    rank < r.opened_cut(),
                    "a member's place by key agrees with its rank"
                );
            }
        }
    }
    let mut seen = BTreeSet::new();
    prop_assert!(
        p.pushes.iter().all(|x| seen.insert(x.uid.clone())),
        "one push per agent"
    );
    Ok(())
}

/// The scenario's agents; all connected unless `offline` honours the scenario.
/// Planning again just before a plan's deadline, with nothing else changed,
/// decides what planning again at once decides: the driver may sleep until
/// the deadline ([`Plan::next`]).
fn check_deadline(w: &World) -> Result<(), TestCaseError> {
    let at = |now| {
        plan(&PlanInput {
            desired: &w.desired,
            agents: &w.agents,
            state: &w.state,
            now,
        })
    };
    let soon = at(w.now);
    if let Some(next) = soon.next {
        prop_assert!(next > w.now, "a deadline in the past: {next} at {}", w.now);
    }
    let before = match soon.next {
        Some(next) => Timestamp::from_millis(next.millis() - 1),
        None => w.now.after(Duration::from_secs(30 * 86_400)),
    };
    let later = at(before);
    prop_assert_eq!(
        &later.pushes,
        &soon.pushes,
        "pushes changed before the deadline {:?}",
        soon.next
    );
    prop_assert_eq!(
        &later.events,
        &soon.events,
        "events changed before the deadline {:?}",
        soon.next
    );
    prop_assert_eq!(
        &later.agents,
        &soon.agents,
        "states changed before the deadline {:?}",
        soon.next
    );
    Ok(())
}

fn fleet_of(s: &Scenario, offline: bool) -> Vec<AgentView> {
    s.agents
        .iter()
        .enumerate()
        .map(|(i, (svc, supported, connected, _))| {
            // "p10" sorts before "p2".
            let name = if s.sorted { format!("p{i:02}") } else { format!("p{i}") };
            let mut a = agent(&name).attrs(&[("svc", &svc.to_string())]);
            a.accepts_remote_config = *supported;
            if offline && !connected {
                a = a.offline(Some(t(900)));
            }
            a
        })
        .collect()
}

/// The fleet but for its late agents.
fn early(s: &Scenario, fleet: &[AgentView]) -> Vec<AgentView> {
    let on_time = fleet.iter().enumerate().filter(|(i, _)| !s.late.contains(i));
    on_time.map(|(_, a)| a.clone()).collect()
}

/// Each pushed agent answers per its behaviour (by uid: `all` and `behaviours` go together).
fn answer(w: &mut World, p: &Plan, all: &[AgentView], behaviours: &[Behaviour]) {
    for push in &p.pushes {
        let Some(i) = w.agents.iter().position(|a| a.uid == push.uid) else {
            continue;
        };
        if !w.agents[i].connected {
            continue;
        }
        let behaviour = all.iter().position(|a| a.uid == push.uid).map(|j| behaviours[j]);
        let a = w.agents[i].clone().reports(&push.bundle);
        w.agents[i] = match behaviour.expect("one of the scenario's agents") {
            Behaviour::Ok => a.applied().healthy(),
            Behaviour::Fail => a.failed("boom"),
            Behaviour::Silent => a.applying(),
            Behaviour::Unhealthy => a.applied().unhealthy("crash"),
        };
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn plans_are_deterministic_keep_waves_and_push_only_where_allowed(s in scenario()) {
        let all = fleet_of(&s, true);
        let behaviours: Vec<Behaviour> = s.agents.iter().map(|a| a.3).collect();
        let mut w = World::new(desired(&s, 0, 0, 0), early(&s, &all));
        let mut commits = 0;
        let groups = [gname("ga"), gname("gb")];
        let mut prev_state = w.state.clone();
        let mut prev_agents = w.agents.clone();
        let mut last = w.plan();
        check(&w, &prev_agents, &prev_state, &last)?;
        for step in &s.steps {
            match step {
                Step::Advance(secs) => w.advance(*secs),
                Step::Answer => answer(&mut w, &last, &all, &behaviours),
                Step::Toggle(i) => {
                    if let Some(a) = w.agents.get_mut(*i % s.agents.len().max(1)) {
                        if a.connected {
                            a.connected = false;
                            a.disconnected_at = Some(w.now);
                        } else {
                            a.connected = true;
                            a.disconnected_at = None;
                            a.connection_epoch += 1;
                        }
                    }
                }
                Step::Arrive(i) => {
                    if let Some(a) = all.get(*i % s.agents.len().max(1))
                        && !w.agents.iter().any(|b| b.uid == a.uid)
                    {
                        let at = w.agents.partition_point(|b| b.uid < a.uid);
                        w.agents.insert(at, a.clone());
                    }
                }
                Step::Commit(a, b) => {
                    commits += 1;
                    w.desired = desired(&s, commits, *a, *b);
                }
                Step::Pause(g) => { let _ = w.control(&groups[*g], Control::Pause); }
                Step::Resume(g) => { let _ = w.control(&groups[*g], Control::Resume); }
                Step::Promote(g) => { let _ = w.control(&groups[*g], Control::Promote); }
            }
            prev_state = w.state.clone();
            prev_agents = w.agents.clone();
            last = w.plan();
            check(&w, &prev_agents, &prev_state, &last)?;
            check_deadline(&w)?;
        }
    }

    #[test]
    fn answered_pushes_reach_a_fixpoint(
        s in scenario(),
        rounds in 1usize..8,
    ) {
        // Everyone behaves; each round answers the pushes and plans again at
        // the same instant: nothing new may be pushed until time passes.
        let s = Scenario { bake: s.bake.max(1), ..s };
        let agents = fleet_of(&s, false);
        let ok = vec![Behaviour::Ok; agents.len()];
        let mut w = World::new(desired(&s, 0, 0, 0), agents.clone());
        let bake = s.bake;
        for r in 0..rounds {
            let p = w.plan();
            answer(&mut w, &p, &agents, &ok);
            let again = w.plan();
            prop_assert!(again.pushes.is_empty(), "round {}: pushed again after all APPLIED: {:?}", r, again.pushes);
            prop_assert!(again.agents.iter().all(|a| a.state != AgentState::Failed));
            w.advance(bake);
        }
    }
}
