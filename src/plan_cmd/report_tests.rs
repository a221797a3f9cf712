use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::desired::{Amount, Selector};
use crate::plan_cmd::render;
use crate::reconcile::canary_order;

fn bundle(files: &[(&str, &str)]) -> Arc<ConfigBundle> {
    Arc::new(ConfigBundle::yaml(files))
}

fn group(name: &str, selector: &[(&str, &str)], priority: i64, config: &Arc<ConfigBundle>) -> Group {
    Group {
        name: GroupName::new(name),
        description: String::new(),
        priority,
        selector: Selector {
            match_attributes: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        },
        config: Arc::clone(config),
        config_paths: [(String::new(), "configs/new.yaml".to_string())].into(),
        rollout: RolloutPolicy {
            waves: vec![Amount::Count(1), Amount::Percent(50), Amount::Percent(100)],
            ..Default::default()
        },
    }
}

fn state(commit: &str, groups: Vec<Group>) -> DesiredState {
    DesiredState {
        commit: Some(CommitId::new(commit)),
        groups: groups.into_iter().map(|g| (g.name.clone(), g)).collect(),
        reconcile_interval: Duration::from_secs(300),
    }
}

/// A connected agent whose config the controller manages.
fn agent(n: u8, attrs: &[(&str, &str)]) -> FleetAgent {
    FleetAgent {
        instance_uid: InstanceUid::Uuid([n; 16]),
        connected: true,
        identifying_attributes: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        non_identifying_attributes: [("host.name".to_string(), format!("h{n}"))].into(),
        capabilities: vec![
            "ReportsStatus".into(),
            "AcceptsRemoteConfig".into(),
            "ReportsRemoteConfig".into(),
        ],
    }
}

fn stable(commit: &str, source: BaselineSource, config: &Arc<ConfigBundle>) -> Baseline {
    Baseline {
        commit: CommitId::new(commit),
        source,
        config: Arc::clone(config),
        paths: [(String::new(), "configs/old.yaml".to_string())].into(),
    }
}

fn base() -> BaseInfo {
    BaseInfo {
        kind: BaselineSource::FirstParent,
        rev: None,
        commit: Some(CommitId::new("p")),
    }
}

fn run(target: &DesiredState, previous: Option<&DesiredState>, stable: &[Baseline], agents: &[FleetAgent]) -> Report {
    let stable: BTreeMap<GroupName, Baseline> = target
        .groups
        .keys()
        .zip(stable)
        .filter(|(_, s)| !s.commit.as_str().is_empty())
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    build(
        &Inputs {
            target,
            previous,
            stable: &stable,
            agents,
        },
        base(),
        vec![],
    )
}

fn none() -> Baseline {
    stable("", BaselineSource::FirstParent, &bundle(&[]))
}

fn uids(agents: &[AgentRef]) -> Vec<InstanceUid> {
    agents.iter().map(|a| a.uid.clone()).collect()
}

/// The plan of a commit that changes group `gw` (selecting service.name=gw)
/// from `a: 1` (stable at the first parent) to `a: 2`.
fn gw_changed(agents: &[FleetAgent]) -> Report {
    let v1 = bundle(&[("", "a: 1\n")]);
    let v2 = bundle(&[("", "a: 2\n")]);
    let target = state("t", vec![group("gw", &[("service.name", "gw")], 0, &v2)]);
    let previous = state("p", vec![group("gw", &[("service.name", "gw")], 0, &v1)]);
    run(
        &target,
        Some(&previous),
        &[stable("p", BaselineSource::FirstParent, &v1)],
        agents,
    )
}

#[test]
fn waves_follow_the_canary_order_and_the_cuts() {
    let agents: Vec<FleetAgent> = (1..=5).map(|n| agent(n, &[("service.name", "gw")])).collect();
    let r = gw_changed(&agents);
    let g = &r.groups[0];
    assert_eq!(g.change, Change::Changed);
    let order = canary_order(
        &GroupName::new("gw"),
        agents.iter().map(|a| a.instance_uid.clone()).collect(),
    );
    let sizes: Vec<usize> = g.waves.iter().map(|w| w.agents.len()).collect();
    assert_eq!(sizes, [1, 2, 2], "1, then 50% of 5 rounded up (3), then all");
    let cumulative: Vec<usize> = g.waves.iter().map(|w| w.cumulative).collect();
    assert_eq!(cumulative, [1, 3, 5]);
    let listed: Vec<InstanceUid> = g.waves.iter().flat_map(|w| uids(&w.agents)).collect();
    assert_eq!(listed, order);
    assert_eq!(
        g.waves[0].agents[0].host.as_deref(),
        Some(&*format!("h{}", order[0].as_bytes()[0]))
    );
    let targets: Vec<&str> = g.waves.iter().map(|w| w.target.as_str()).collect();
    assert_eq!(targets, ["1", "50%", "100%"]);
    assert_eq!(g.files.len(), 1);
    assert_eq!(g.files[0].status, FileStatus::Modified);
    assert!(
        g.files[0]
            .diff
            .contains("--- a/configs/old.yaml\n+++ b/configs/new.yaml\n")
    );
    assert!(g.files[0].diff.contains("\n-a: 1\n+a: 2\n"), "{}", g.files[0].diff);
}

#[test]
fn agents_that_do_not_report_whether_they_applied_are_not_members() {
    let sel = [("service.name", "gw")];
    // The supervisor's defaults: AcceptsRemoteConfig without ReportsRemoteConfig.
    let mut silent = agent(2, &sel);
    silent.capabilities = vec!["ReportsStatus".into(), "AcceptsRemoteConfig".into()];
    let r = gw_changed(&[agent(1, &sel), silent, agent(3, &sel)]);
    let g = &r.groups[0];
    assert_eq!(
        g.agents,
        GroupCounts {
            members: 2,
            offline: 0,
            unsupported: 1
        }
    );
    assert_eq!(uids(&g.unsupported), [InstanceUid::Uuid([2; 16])]);
    let in_waves: Vec<InstanceUid> = g.waves.iter().flat_map(|w| uids(&w.agents)).collect();
    assert!(!in_waves.contains(&InstanceUid::Uuid([2; 16])), "{in_waves:?}");
    assert_eq!(r.fleet.unsupported, 1);
    assert!(
        render::text(&r).contains("has 1 agent without AcceptsRemoteConfig or ReportsRemoteConfig, never pushed to"),
        "{}",
        render::text(&r)
    );
}

#[test]
fn change_kinds_against_stable_and_previous() {
    let v1 = bundle(&[("", "a: 1\n")]);
    let v2 = bundle(&[("", "a: 2\n")]);
    let sel = [("k", "v")];
    let target = state(
        "t",
        vec![
            group("a-same", &sel, 0, &v1),
            group("b-changed", &sel, 0, &v2),
            group("c-revert", &sel, 0, &v1),
            group("d-new", &sel, 0, &v1),
            group("e-pending", &sel, 0, &v2),
        ],
    );
    let previous = state(
        "p",
        vec![
            group("a-same", &sel, 0, &v1),
            group("b-changed", &sel, 0, &v1),
            group("c-revert", &sel, 0, &v2),
            group("e-pending", &sel, 0, &v2),
        ],
    );
    let r = run(
        &target,
        Some(&previous),
        &[
            stable("p", BaselineSource::FirstParent, &v1),
            stable("p", BaselineSource::FirstParent, &v1),
            stable("old", BaselineSource::Note, &v1),
            none(),
            stable("old", BaselineSource::Note, &v1),
        ],
        &[agent(1, &sel)],
    );
    let kinds: Vec<(&str, Change)> = r.groups.iter().map(|g| (g.name.as_str(), g.change)).collect();
    assert_eq!(
        kinds,
        [
            ("a-same", Change::Unchanged),
            ("b-changed", Change::Changed),
            ("c-revert", Change::Revert),
            ("d-new", Change::New),
            ("e-pending", Change::Unchanged),
        ]
    );
    assert!(r.groups[0].files.is_empty() && r.groups[0].waves.is_empty());
    let revert = &r.groups[2];
    assert_eq!(revert.waves.len(), 1, "a revert goes to every agent at once");
    assert_eq!(revert.waves[0].target, "all");
    assert_eq!(revert.previous_config_hash, Some(v2.hash()));
    let new = &r.groups[3];
    assert_eq!(new.stable_config_hash, None);
    assert_eq!(new.files[0].status, FileStatus::Added);
    assert!(new.files[0].diff.starts_with("--- /dev/null\n+++ b/configs/new.yaml\n"));
    assert_eq!(new.waves.len(), 3, "a first rollout goes in waves");
    assert_eq!(
        r.groups[4].previous_config_hash,
        Some(v2.hash()),
        "unchanged by the commit, but an earlier rollout has not completed"
    );
    assert!(render::text(&r).contains("note: e-pending is unchanged by this commit, but its rollout to"));
    assert_eq!(r.removed, vec![]);
}

#[test]
fn files_added_removed_and_retyped() {
    let old = bundle(&[("", "x\n"), ("gone.yaml", "g\n"), ("same.yaml", "s\n")]);
    let mut files = old.files().clone();
    files.remove("gone.yaml");
    files.insert(
        "extra.yaml".into(),
        ConfigFile {
            content_type: "text/yaml".into(),
            body: Bytes::from_static(b"e\n"),
        },
    );
    files.insert(
        "".into(),
        ConfigFile {
            content_type: "application/json".into(),
            body: Bytes::from_static(b"x\n"),
        },
    );
    let changes = file_changes(
        Some((old.files(), &BTreeMap::new())),
        (
            &files,
            &BTreeMap::from([("extra.yaml".to_string(), "configs/extra.yaml".to_string())]),
        ),
    );
    let got: Vec<(&str, FileStatus)> = changes.iter().map(|c| (c.key.as_str(), c.status)).collect();
    assert_eq!(
        got,
        [
            ("", FileStatus::Modified),
            ("extra.yaml", FileStatus::Added),
            ("gone.yaml", FileStatus::Removed),
            ("same.yaml", FileStatus::Unchanged),
        ]
    );
    assert_eq!(changes[0].diff, "", "same body, only the content type differs");
    assert_eq!(changes[0].new_content_type.as_deref(), Some("application/json"));
    assert!(changes[1].diff.contains("+++ b/configs/extra.yaml\n"));
    assert!(changes[2].diff.contains("+++ /dev/null\n") && changes[2].diff.contains("-g\n"));
    assert!(unified_diff(&[0xff], b"x", "a", "b").starts_with("Binary files a and b differ"));
}

#[test]
fn callouts_several_groups_empty_groups_unsupported_unmanaged_moved() {
    let v1 = bundle(&[("", "a: 1\n")]);
    let v2 = bundle(&[("", "a: 2\n")]);
    let target = state(
        "t",
        vec![
            group("gw", &[("service.name", "gw")], 10, &v2),
            group("prod", &[("env", "prod")], 0, &v1),
            group("nobody", &[("service.name", "none")], 0, &v1),
            group("shadowed", &[("service.name", "gw")], 5, &v1),
        ],
    );
    let previous = state(
        "p",
        vec![
            group("gw", &[("service.name", "gw")], 10, &v1),
            group("prod", &[("env", "prod")], 0, &v1),
            group("old", &[("env", "old")], 0, &v1),
        ],
    );
    let mut unsupported = agent(3, &[("service.name", "gw")]);
    unsupported.capabilities = vec!["ReportsStatus".into()];
    let mut offline = agent(4, &[("service.name", "gw")]);
    offline.connected = false;
    let agents = vec![
        agent(1, &[("service.name", "gw"), ("env", "prod")]),
        agent(2, &[("env", "prod")]),
        unsupported,
        offline,
        agent(5, &[("env", "old")]),
    ];
    let s = |c: &Arc<ConfigBundle>| stable("p", BaselineSource::FirstParent, c);
    // Baseline per group in name order: gw, nobody, prod, shadowed.
    let r = run(&target, Some(&previous), &[s(&v1), none(), s(&v1), none()], &agents);

    assert_eq!(
        r.fleet,
        FleetCounts {
            agents: 5,
            connected: 4,
            offline: 1,
            unmanaged: 1,
            unsupported: 1
        }
    );
    let multi: Vec<(u8, &str, Vec<&str>)> = r
        .callouts
        .multiple_matches
        .iter()
        .map(|m| {
            (
                m.agent.uid.as_bytes()[0],
                m.winner.as_str(),
                m.losers.iter().map(GroupName::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        multi,
        [
            (1, "gw", vec!["shadowed", "prod"]),
            (3, "gw", vec!["shadowed"]),
            (4, "gw", vec!["shadowed"]),
        ]
    );
    let empty: Vec<(&str, usize)> = r
        .callouts
        .groups_without_agents
        .iter()
        .map(|e| (e.group.as_str(), e.matched))
        .collect();
    assert_eq!(empty, [("nobody", 0), ("shadowed", 3)]);
    assert_eq!(uids(&r.callouts.unmanaged), [InstanceUid::Uuid([5; 16])]);
    let gw = &r.groups[0];
    assert_eq!(
        gw.agents,
        GroupCounts {
            members: 2,
            offline: 1,
            unsupported: 1
        }
    );
    assert_eq!(uids(&gw.unsupported), [InstanceUid::Uuid([3; 16])]);
    assert_eq!(uids(&gw.offline), [InstanceUid::Uuid([4; 16])]);
    let in_waves: Vec<InstanceUid> = gw.waves.iter().flat_map(|w| uids(&w.agents)).collect();
    let mut in_waves = in_waves;
    in_waves.sort();
    assert_eq!(
        in_waves,
        [InstanceUid::Uuid([1; 16]), InstanceUid::Uuid([4; 16])],
        "supported agents, away ones in their places too"
    );
    assert_eq!(r.removed.len(), 1);
    assert_eq!((r.removed[0].name.as_str(), r.removed[0].agents), ("old", 1));
    let moved: Vec<(u8, Option<&str>, Option<&str>)> = r
        .callouts
        .moved
        .iter()
        .map(|m| {
            (
                m.agent.uid.as_bytes()[0],
                m.from.as_ref().map(GroupName::as_str),
                m.to.as_ref().map(GroupName::as_str),
            )
        })
        .collect();
    assert_eq!(moved, [(5, Some("old"), None)]);

    let text = render::text(&r);
    assert!(
        text.contains("is matched by several groups: gw wins over shadowed, prod"),
        "{text}"
    );
    assert!(text.contains("group nobody matches no agent"), "{text}");
    assert!(text.contains("group shadowed holds no agent: the 3 agents it matches belong to higher-ranked groups"));
    assert!(
        text.contains("group gw (changed) has 1 agent without AcceptsRemoteConfig"),
        "{text}"
    );
    assert!(
        text.contains("1 agent is matched by no group (unmanaged, never pushed to)"),
        "{text}"
    );
    assert!(text.contains("  old       removed    "), "{text}");
    assert!(text.contains("offline, in their places until they return (1): 04040404-0404-0404-0404-040404040404 (h4)"));
    assert!(text.contains("  nobody    new        none -> "), "{text}");
    assert!(text.contains("no connected agents: nothing is pushed now"), "{text}");
}

#[test]
fn renderers_show_the_key_parts() {
    let v1 = bundle(&[("", "a: 1\n")]);
    let v2 = bundle(&[("", "a: 2\n")]);
    let target = state(
        "t",
        vec![group("gw", &[], 0, &v2), group("core", &[("k", "v")], 1, &v1)],
    );
    let previous = state(
        "p",
        vec![group("gw", &[], 0, &v1), group("core", &[("k", "v")], 1, &v1)],
    );
    let agents: Vec<FleetAgent> = (1..=50).map(|n| agent(n, &[])).collect();
    let s = |c: &Arc<ConfigBundle>| stable("p", BaselineSource::FirstParent, c);
    let r = run(&target, Some(&previous), &[s(&v1), s(&v1)], &agents);

    let md = render::markdown(&r);
    assert!(md.starts_with("### opamp-gitops plan for `t`\n"), "{md}");
    assert!(md.contains("| group | change | config hash | agents | waves |"));
    assert!(md.contains("| `gw` | **changed** |"), "{md}");
    assert!(md.contains("| `core` | unchanged |"), "{md}");
    assert!(md.contains("<details><summary><b>gw</b>: changed, 50 agents in 3 waves; first wave 1</summary>"));
    assert!(md.contains("```diff\n--- a/configs/old.yaml\n+++ b/configs/new.yaml\n@@ -1 +1 @@\n-a: 1\n+a: 2\n```"));
    assert!(md.contains("| 1 | 1 | 1 of 50 |"), "{md}");
    assert!(md.contains("| 3 | 100% | 50 of 50 |"), "{md}");
    assert!(md.contains(", and 4 more |"), "wave 2 adds 24 agents: 20 listed");
    assert!(md.contains(", and 5 more |"), "wave 3 adds 25 agents: 20 listed");
    assert!(md.contains("</details>\n"), "{md}");
    assert!(
        md.contains("#### Call-outs\n\n- group `core` matches no agent\n"),
        "{md}"
    );
    assert_eq!(md.matches("<details>").count(), 1, "only changed groups get details");

    let json: serde_json::Value = serde_json::from_str(&render::json(&r)).unwrap();
    assert_eq!(json["commit"], "t");
    assert_eq!(json["base"]["kind"], "first_parent");
    assert_eq!(json["groups"][1]["name"], "gw");
    assert_eq!(json["groups"][1]["change"], "changed");
    assert_eq!(json["groups"][1]["stable_config_hash"], v1.hash().to_string());
    assert_eq!(
        json["groups"][1]["rollout"]["waves"],
        serde_json::json!(["1", "50%", "100%"])
    );
    let listed: usize = json["groups"][1]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["agents"].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, 50, "JSON lists every agent");
    assert_eq!(json["groups"][0]["change"], "unchanged");
    assert_eq!(json["fleet"]["agents"], 50);

    let text = render::text(&r);
    assert!(
        text.starts_with("plan for commit t\ncompared with first parent (p)\n"),
        "{text}"
    );
    assert!(text.contains("== gw (changed)"));
    assert!(text.contains("wave 1 (1, 1 of 50): +1: "));
    assert!(text.contains("    -a: 1\n    +a: 2\n"));
}
