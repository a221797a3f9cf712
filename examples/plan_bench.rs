//! Micro-benchmark of the planner: 100,000 agents in 50 groups, read from
//! repository text like the controller reads it. Builds the input once, then
//! times repeated plans of the whole fleet (`Planner::replan`, and once
//! `Planner::full`) in five situations (steady fleet, agents coming, with
//! room for them and without, a commit that starts 50 rollouts, every group
//! mid-rollout and its next wave opening), and updates after one agent's
//! report (`Planner::update`) in two, and prints the minimum, median and
//! maximum wall time (on a shared machine the minimum is the steadiest
//! figure).
//!
//! `cargo run --release --example plan_bench -- [AGENTS] [GROUPS] [RUNS]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_gitops::desired::{self, Description, DesiredState, MemSource};
use opamp_gitops::model::{CommitId, InstanceUid};
use opamp_gitops::reconcile::{AgentView, Planner, Push, RemoteConfigState, StatusView, Timestamp, fleet_capacity};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut next = |default: usize| -> Result<usize, String> {
        match args.next() {
            Some(a) => a.parse().map_err(|_| format!("not a number: {a}")),
            None => Ok(default),
        }
    };
    let (agents, groups, runs) = (next(100_000)?, next(50)?, next(20)?);
    if groups == 0 || runs == 0 {
        return Err("GROUPS and RUNS must be at least 1".into());
    }

    let v1 = repository(groups, "v1", "c1")?;
    let v2 = repository(groups, "v2", "c2")?;
    let mut fleet = fleet(agents, groups, &v1);
    println!("plan: {agents} agents in {groups} groups, {runs} runs each");
    println!("| situation | pushes | min ms | median ms | max ms |");
    println!("|---|---:|---:|---:|---:|");

    let now = Timestamp::from_millis(1_000_000);
    // A first plan over the applied fleet records every group's config as
    // stable. Each situation is planned by a copy of the planner that
    // planned the one before, as the controller plans after its last plan.
    let mut first = Planner::default();
    first.full(&v1, fleet.clone(), now);
    let steady = first.state();
    let (in_sync, _) = measure("steady (all in sync)", runs, || first.clone(), &v1, &fleet, now, false);
    measure(
        "steady, the fleet's views given anew",
        runs,
        || first.clone(),
        &v1,
        &fleet,
        now,
        true,
    );
    // Every hundredth agent comes after the others were planned, given as
    // the controller gives the fleet: with room for more (a copy of a
    // planner has none, so each run plans the fleet first, untimed).
    let most: Vec<AgentView> = (fleet.iter().enumerate())
        .filter(|(i, _)| i % 100 != 0)
        .map(|(_, a)| a.clone())
        .collect();
    let fewer = || {
        let mut views = Vec::with_capacity(fleet_capacity(most.len()));
        views.extend(most.iter().cloned());
        let mut planner = Planner::default();
        planner.full(&v1, views, now);
        planner
    };
    measure("steady, 1% of the agents come", runs, fewer, &v1, &fleet, now, false);
    // Once, when more come than there is room for, the vectors move.
    let mut no_room = Planner::default();
    no_room.full(&v1, most.clone(), now);
    measure(
        "steady, 1% of the agents come, no room left",
        runs,
        || no_room.clone(),
        &v1,
        &fleet,
        now,
        false,
    );

    let (started, pushes) = measure(
        "new commit: 50 rollouts start",
        runs,
        || in_sync.clone(),
        &v2,
        &fleet,
        now,
        false,
    );
    // The first wave applies; the planner then opens the next waves.
    apply(&mut fleet, &pushes);
    let later = Timestamp::from_millis(now.millis() + 3_600_000);
    let (baking, _) = measure(
        "mid-rollout, first wave baking",
        runs,
        || started.clone(),
        &v2,
        &fleet,
        later,
        false,
    );
    let baked = Timestamp::from_millis(later.millis() + 3_600_000);
    let (_, opened) = measure(
        "mid-rollout, next wave opens",
        runs,
        || baking.clone(),
        &v2,
        &fleet,
        baked,
        false,
    );
    println!();
    println!("update after one agent's report: {agents} agents, {runs} reports");
    println!("| situation | min µs | median µs | max µs | agents decided (median) |");
    println!("|---|---:|---:|---:|---:|");
    // All in sync: an agent turns unhealthy.
    let mut planner = Planner::new(steady.clone());
    planner.full(&v1, fleet_v1(&fleet, &v1), now);
    let reports: Vec<AgentView> = (0..runs)
        .map(|k| {
            let mut a = planner.agents()[k * 7919 % agents].clone();
            a.healthy = Some(false);
            a.health_error = "exporter failing".into();
            a
        })
        .collect();
    measure_updates("all in sync: an agent turns unhealthy", &mut planner, &v1, reports, now);
    // Mid-rollout: an agent of the wave just opened reports APPLIED.
    let mut planner = baking;
    planner.full(&v2, fleet.clone(), baked);
    let reports: Vec<AgentView> = opened
        .iter()
        .take(runs)
        .map(|p| {
            let mut a = planner.agents()[index_of(&fleet, &p.uid)].clone();
            a.remote = Some(applied(p.bundle.hash()));
            a
        })
        .collect();
    measure_updates(
        "mid-rollout: an agent of the open wave reports APPLIED",
        &mut planner,
        &v2,
        reports,
        baked,
    );
    Ok(())
}

/// Times `runs` plans of the whole fleet, each by a fresh `copy` of a
/// planner: as the controller plans a fleet it planned before
/// (`Planner::replan`, given the agents that changed or came since), or,
/// with `anew`, one given as a new list of views (`Planner::full`: agents
/// left). Prints one table row and
/// returns a planner after the plan, and its pushes.
fn measure(
    name: &str,
    runs: usize,
    copy: impl Fn() -> Planner,
    desired: &DesiredState,
    agents: &[AgentView],
    now: Timestamp,
    anew: bool,
) -> (Planner, Vec<Push>) {
    let base = copy();
    let known = base.agents();
    let changed: Vec<AgentView> = match known.len() == agents.len() {
        true => (known.iter().zip(agents))
            .filter(|(a, b)| a != b)
            .map(|(_, b)| b.clone())
            .collect(),
        false => (agents.iter())
            .filter(|a| known.binary_search_by(|b| b.uid.cmp(&a.uid)).is_err())
            .cloned()
            .collect(),
    };
    let mut wall = Vec::with_capacity(runs);
    let mut last = None;
    // The first run warms up.
    for run in 0..=runs {
        let mut planner = copy();
        let fleet = if anew { agents.to_vec() } else { Vec::new() };
        let t0 = Instant::now();
        let step = match anew {
            true => planner.full(desired, fleet, now),
            false => planner.replan(desired, &changed, now).expect("a fleet in uid order"),
        };
        if run > 0 {
            wall.push(t0.elapsed());
        }
        last = Some((planner, step.pushes));
    }
    wall.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (planner, pushes) = last.expect("at least one run");
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        pushes.len(),
        ms(wall[0]),
        ms(wall[runs / 2]),
        ms(wall[runs - 1]),
    );
    (planner, pushes)
}

/// Times one update per report, each at its own millisecond after `start`.
/// The agents whose records the full plan before changed are decided again
/// by the first update after it; that update is made before, untimed.
fn measure_updates(
    name: &str,
    planner: &mut Planner,
    desired: &DesiredState,
    reports: Vec<AgentView>,
    start: Timestamp,
) {
    if planner.update(desired, &[], start).is_none() {
        println!("| {name} | an update could not be made: a full plan was needed |");
        return;
    }
    let mut wall = Vec::with_capacity(reports.len());
    let mut decided = Vec::with_capacity(reports.len());
    for (k, report) in reports.into_iter().enumerate() {
        let now = Timestamp::from_millis(start.millis() + 1 + k as u64);
        let t0 = Instant::now();
        let step = planner.update(desired, std::slice::from_ref(&report), now);
        wall.push(t0.elapsed());
        let Some(step) = step else {
            println!("| {name} | an update could not be made: a full plan was needed |");
            return;
        };
        decided.push(step.planned);
    }
    wall.sort();
    decided.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = wall.len();
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {} |",
        us(wall[0]),
        us(wall[n / 2]),
        us(wall[n - 1]),
        decided[n / 2],
    );
}

fn index_of(fleet: &[AgentView], uid: &InstanceUid) -> usize {
    fleet
        .binary_search_by(|a| a.uid.cmp(uid))
        .expect("a pushed agent is in the fleet")
}

fn applied(hash: opamp_gitops::model::ConfigHash) -> StatusView {
    StatusView {
        hash: Some(hash),
        status: RemoteConfigState::Applied,
        error: String::new(),
    }
}

/// The fleet as it was, every agent on its group's v1 config.
fn fleet_v1(fleet: &[AgentView], v1: &DesiredState) -> Vec<AgentView> {
    let hashes: Vec<_> = v1.groups.values().map(|g| g.config.hash()).collect();
    fleet
        .iter()
        .enumerate()
        .map(|(i, a)| AgentView {
            remote: Some(applied(hashes[i % hashes.len()])),
            ..a.clone()
        })
        .collect()
}

/// `groups` groups, each selecting `svc=s<i>` with its own collector config,
/// with the default rollout policy (canary waves [1, 10%, 50%, 100%]).
fn repository(groups: usize, version: &str, commit: &str) -> Result<DesiredState, String> {
    let mut files = MemSource::default();
    for i in 0..groups {
        files.insert(
            &format!("groups/g{i:02}.yaml"),
            format!(
                "priority: {i}\nselector:\n  match_attributes:\n    svc: s{i}\n  match_expressions:\n    \
                 - {{key: os.type, operator: In, values: [linux, windows]}}\nconfig:\n  \"\": configs/g{i}.yaml\n"
            ),
        );
        files.insert(
            &format!("configs/g{i}.yaml"),
            collector_config(&format!("{version}-{i}")),
        );
    }
    desired::load(&files, Some(CommitId::new(commit))).map_err(|e| format!("benchmark repository: {e:?}"))
}

fn collector_config(tag: &str) -> String {
    format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: localhost:4317\n\
         processors:\n  batch: {{}}\n\
         exporters:\n  otlp/gateway:\n    endpoint: gateway-{tag}:4317\n\
         service:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      processors: [batch]\n      \
         exporters: [otlp/gateway]\n"
    )
}

/// Connected, healthy agents spread evenly over the groups, each APPLIED on its group's config.
fn fleet(agents: usize, groups: usize, desired: &DesiredState) -> Vec<AgentView> {
    let hashes: Vec<_> = desired.groups.values().map(|g| g.config.hash()).collect();
    (0..agents)
        .map(|i| {
            let g = i % groups;
            let mut uid = [0u8; 16];
            uid[..8].copy_from_slice(&(i as u64).to_be_bytes());
            AgentView {
                uid: InstanceUid::Uuid(uid),
                attributes: Arc::new(Description {
                    identifying: [("service.name", "otelcol".to_string())].into_iter().collect(),
                    non_identifying: [
                        ("svc", format!("s{g}")),
                        ("host.name", format!("h{i}")),
                        ("os.type", "linux".to_string()),
                    ]
                    .into_iter()
                    .collect(),
                }),
                accepts_remote_config: true,
                reports_remote_config: true,
                reports_health: true,
                connected: true,
                connection_epoch: 1,
                disconnected_at: None,
                remote: Some(StatusView {
                    hash: Some(hashes[g]),
                    status: RemoteConfigState::Applied,
                    error: String::new(),
                }),
                healthy: Some(true),
                health_error: String::new(),
                unhealthy_since: None,
                delivered: None,
                push_drops: None,
                groups_allowed: None,
            }
        })
        .collect()
}

/// Every pushed agent reports APPLIED for what it was given.
fn apply(fleet: &mut [AgentView], pushes: &[Push]) {
    let index: BTreeMap<&InstanceUid, usize> = fleet.iter().enumerate().map(|(i, a)| (&a.uid, i)).collect();
    let updates: Vec<(usize, _)> = pushes
        .iter()
        .filter_map(|p| index.get(&p.uid).map(|&i| (i, p.bundle.hash())))
        .collect();
    for (i, hash) in updates {
        fleet[i].remote = Some(applied(hash));
    }
}
