//! Micro-benchmark of `reconcile::plan`: 100,000 agents in 50 groups, read
//! from repository text like the controller reads it. Builds the input once,
//! then times repeated runs of `plan` in four situations (steady fleet, a
//! commit that starts 50 rollouts, every group mid-rollout and its next wave
//! opening) and prints the
//! minimum, median and maximum wall time (on a shared machine the minimum is
//! the steadiest figure).
//!
//! `cargo run --release --example plan_bench -- [AGENTS] [GROUPS] [RUNS]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opamp_gitops::desired::{self, Description, DesiredState, MemSource};
use opamp_gitops::model::{CommitId, InstanceUid};
use opamp_gitops::reconcile::{
    AgentView, Plan, PlanInput, RemoteConfigState, RolloutState, StatusView, Timestamp, plan,
};

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
    // A first plan over the applied fleet records every group's config as stable.
    let steady = plan(&PlanInput {
        desired: &v1,
        agents: &fleet,
        state: &RolloutState::default(),
        now,
    })
    .state;
    measure("steady (all in sync)", runs, &v1, &fleet, &steady, now);

    let started = measure("new commit: 50 rollouts start", runs, &v2, &fleet, &steady, now);
    // The first wave applies; the planner then opens the next waves.
    apply(&mut fleet, &started);
    let later = Timestamp::from_millis(now.millis() + 3_600_000);
    let baking = measure(
        "mid-rollout, first wave baking",
        runs,
        &v2,
        &fleet,
        &started.state,
        later,
    );
    let baked = Timestamp::from_millis(later.millis() + 3_600_000);
    measure("mid-rollout, next wave opens", runs, &v2, &fleet, &baking.state, baked);
    Ok(())
}

/// Times `runs` plans of the same input; prints one table row and returns the last plan.
fn measure(
    name: &str,
    runs: usize,
    desired: &DesiredState,
    agents: &[AgentView],
    state: &RolloutState,
    now: Timestamp,
) -> Plan {
    let input = PlanInput {
        desired,
        agents,
        state,
        now,
    };
    let mut last = plan(&input); // warm-up
    let mut wall = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let p = plan(&input);
        wall.push(t0.elapsed());
        drop(std::mem::replace(&mut last, p));
    }
    wall.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        last.pushes.len(),
        ms(wall[0]),
        ms(wall[runs / 2]),
        ms(wall[runs - 1]),
    );
    last
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
fn apply(fleet: &mut [AgentView], plan: &Plan) {
    let index: BTreeMap<&InstanceUid, usize> = fleet.iter().enumerate().map(|(i, a)| (&a.uid, i)).collect();
    let updates: Vec<(usize, _)> = plan
        .pushes
        .iter()
        .filter_map(|p| index.get(&p.uid).map(|&i| (i, p.bundle.hash())))
        .collect();
    for (i, hash) in updates {
        fleet[i].remote = Some(StatusView {
            hash: Some(hash),
            status: RemoteConfigState::Applied,
            error: String::new(),
        });
    }
}
