use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::desired::{Amount, ConfigFile, Expression, MemSource, OnFailure, Operator};
use crate::model::InstanceUid;

const MAIN: &str = "\
receivers:
  otlp:
    protocols:
      grpc: {}
processors:
  batch: {}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [debug]
";

const EXTENSIONS: &str = "\
extensions:
  health_check: {}
service:
  extensions: [health_check]
";

const GROUP: &str = "\
config:
  \"\": configs/main.yaml
";

/// A valid repository with one group; each case adds or replaces files.
fn repo(files: &[(&str, &str)]) -> MemSource {
    let mut src = MemSource::new([
        ("configs/main.yaml", MAIN),
        ("configs/extensions.yaml", EXTENSIONS),
        ("groups/a.yaml", GROUP),
    ]);
    for (path, body) in files {
        if body.is_empty() && !path.starts_with("configs/") {
            src.remove(path);
        } else {
            src.insert(path, *body);
        }
    }
    src
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match load(&repo(files), None) {
        Ok(_) => vec![],
        Err(e) => e.diagnostics().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_base_repository_is_valid() {
    assert_eq!(errors(&[]), Vec::<String>::new());
}

/// A name, the files that make the repository invalid, and every line
/// `validate` must print for it.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn invalid_repositories() {
    let cases: &[Case] = &[
        (
            "bad YAML",
            &[("groups/a.yaml", "config:\n  \"\": [configs/main.yaml\n")],
            &["groups/a.yaml:3:1: invalid YAML: while parsing a flow sequence, expected ',' or ']'"],
        ),
        (
            "duplicate YAML key",
            &[(
                "groups/a.yaml",
                "priority: 1\nconfig: {\"\": configs/main.yaml}\npriority: 2\n",
            )],
            &["groups/a.yaml:3:1: duplicate key \"priority\" (first at line 1)"],
        ),
        (
            "unknown key",
            &[("groups/a.yaml", "config: {\"\": configs/main.yaml}\npriorty: 3\n")],
            &[
                "groups/a.yaml:2:1: priorty: unknown key (expected one of: description, priority, selector, config, rollout)",
            ],
        ),
        (
            "unknown nested key",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nrollout:\n  bake: 1m\n  wave: [100%]\n",
            )],
            &[
                "groups/a.yaml:4:3: rollout.wave: unknown key (expected one of: waves, bake, apply_timeout, unhealthy_grace, max_failures, on_failure)",
            ],
        ),
        (
            "missing config key",
            &[("groups/a.yaml", "description: no files\n")],
            &["groups/a.yaml:1:1: missing key \"config\""],
        ),
        (
            "empty config",
            &[("groups/a.yaml", "description: x\nconfig: {}\n")],
            &["groups/a.yaml:2:1: config: list at least one file (\"\" is the main file)"],
        ),
        (
            "missing file",
            &[(
                "groups/a.yaml",
                "config:\n  \"\": configs/main.yaml\n  extra.yaml: configs/nope.yaml\n",
            )],
            &["groups/a.yaml:3:15: config[\"extra.yaml\"]: no such file: configs/nope.yaml"],
        ),
        (
            "config path outside the repository",
            &[("groups/a.yaml", "config:\n  \"\": ../main.yaml\n")],
            &[
                "groups/a.yaml:2:7: config[\"\"]: \"../main.yaml\" is not a path inside the repository (write it relative to the repository root, without \"..\")",
            ],
        ),
        (
            "bad duration",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nrollout:\n  bake: soon\n",
            )],
            &[
                "groups/a.yaml:3:9: rollout.bake: invalid duration \"soon\": expected number at 0 (examples: 30s, 5m, 1h 30m)",
            ],
        ),
        (
            "duration without unit",
            &[("fleet.yaml", "rollout:\n  apply_timeout: 60\n")],
            &[
                "fleet.yaml:2:18: rollout.apply_timeout: invalid duration \"60\": time unit needed, for example 60sec or 60ms (examples: 30s, 5m, 1h 30m)",
            ],
        ),
        (
            "zero reconcile interval",
            &[("fleet.yaml", "reconcile:\n  interval: 0s\n")],
            &["fleet.yaml:2:13: reconcile.interval: must be longer than zero"],
        ),
        (
            "non-increasing waves",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nrollout:\n  waves: [1, 10%, 10%, 100%]\n",
            )],
            &[
                "groups/a.yaml:3:19: rollout.waves[2]: waves must increase: 10% is not more than the wave before it (10%)",
            ],
        ),
        (
            "non-increasing counts",
            &[("fleet.yaml", "rollout:\n  waves: [5, 2, 100%]\n")],
            &["fleet.yaml:2:14: rollout.waves[1]: waves must increase: 2 is not more than the wave before it (5)"],
        ),
        (
            "count after percentage",
            &[("fleet.yaml", "rollout:\n  waves: [10%, 20, 100%]\n")],
            &[
                "fleet.yaml:2:16: rollout.waves[1]: a count (20) cannot follow a percentage (10%): list counts first, then percentages",
            ],
        ),
        (
            "last wave not 100%",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nrollout:\n  waves:\n    - 1\n    - 50%\n",
            )],
            &["groups/a.yaml:5:7: rollout.waves: the last wave must be 100% (the whole group), found 50%"],
        ),
        (
            "last wave a count",
            &[("fleet.yaml", "rollout:\n  waves: [1, 1000]\n")],
            &["fleet.yaml:2:14: rollout.waves: the last wave must be 100% (the whole group), found 1000"],
        ),
        (
            "no waves",
            &[("fleet.yaml", "rollout:\n  waves: []\n")],
            &["fleet.yaml:2:10: rollout.waves: list at least one wave, the last 100%"],
        ),
        (
            "bad amounts",
            &[(
                "fleet.yaml",
                "rollout:\n  waves: [0, 150%, ten, 100%]\n  max_failures: -1\n",
            )],
            &[
                "fleet.yaml:2:11: rollout.waves[0]: a wave must be at least 1 agent",
                "fleet.yaml:2:14: rollout.waves[1]: a percentage must be at most 100%, found 150%",
                "fleet.yaml:2:20: rollout.waves[2]: expected a count like 5 or a percentage like 10%, found \"ten\"",
                "fleet.yaml:3:17: rollout.max_failures: expected a count like 5 or a percentage like 10%, found \"-1\"",
            ],
        ),
        (
            "bad on_failure",
            &[("fleet.yaml", "rollout:\n  on_failure: retry\n")],
            &["fleet.yaml:2:15: rollout.on_failure: expected rollback or hold, found \"retry\""],
        ),
        (
            "priority not an integer",
            &[("groups/a.yaml", "priority: high\nconfig: {\"\": configs/main.yaml}\n")],
            &["groups/a.yaml:1:11: priority: expected an integer, found \"high\""],
        ),
        (
            "unknown selector operator",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nselector:\n  match_expressions:\n    - {key: zone, operator: Within, values: [a]}\n",
            )],
            &[
                "groups/a.yaml:4:29: selector.match_expressions[0].operator: unknown operator \"Within\" (expected In, NotIn, Exists or DoesNotExist)",
            ],
        ),
        (
            "selector values",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nselector:\n  match_expressions:\n    - {key: zone, operator: In}\n    - {key: zone, operator: Exists, values: [a]}\n    - {operator: NotIn, values: []}\n",
            )],
            &[
                "groups/a.yaml:4:7: selector.match_expressions[0].values: In needs at least one value",
                "groups/a.yaml:5:45: selector.match_expressions[1].values: Exists takes no values",
                "groups/a.yaml:6:7: selector.match_expressions[2]: missing key \"key\"",
            ],
        ),
        (
            "selector attribute and uid",
            &[(
                "groups/a.yaml",
                "config: {\"\": configs/main.yaml}\nselector:\n  match_attributes: {zone: [a]}\n  instance_uids: [not-a-uid]\n  match_labels: {}\n",
            )],
            &[
                "groups/a.yaml:3:28: selector.match_attributes[\"zone\"]: expected a string, found a list",
                "groups/a.yaml:4:19: selector.instance_uids[0]: \"not-a-uid\" is not an instance uid (expected a UUID or a 26-character ULID)",
                "groups/a.yaml:5:3: selector.match_labels: unknown key (expected one of: match_attributes, match_expressions, instance_uids)",
            ],
        ),
        (
            "duplicate selectors at equal priority",
            &[
                (
                    "groups/a.yaml",
                    "priority: 5\nselector:\n  match_attributes: {zone: a}\nconfig: {\"\": configs/main.yaml}\n",
                ),
                (
                    "groups/b.yaml",
                    "selector:\n  match_attributes: {zone: a}\npriority: 5\nconfig: {\"\": configs/main.yaml}\n",
                ),
            ],
            &[
                "groups/b.yaml:1:1: group \"b\" has the same selector and priority (5) as group \"a\": agents would match both with no winner",
            ],
        ),
        (
            "two catch-all groups at equal priority",
            &[("groups/b.yaml", GROUP)],
            &[
                "groups/b.yaml:1:1: group \"b\" has the same selector and priority (0) as group \"a\": agents would match both with no winner",
            ],
        ),
        (
            "group file names",
            &[
                ("groups/Bad.yaml", GROUP),
                ("groups/notes.txt", "x"),
                ("groups/a.yml", GROUP),
            ],
            &[
                "groups/Bad.yaml:1:1: invalid group name \"Bad\": use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters",
                "groups/a.yml:1:1: group \"a\" is also defined by groups/a.yaml",
                "groups/notes.txt:1:1: not a group file: group files end in .yaml or .yml",
            ],
        ),
        (
            "no groups",
            &[("groups/a.yaml", "")],
            &["groups:0:0: no group files: add at least one groups/<name>.yaml"],
        ),
        (
            "top level not a mapping",
            &[("fleet.yaml", "- rollout\n")],
            &["fleet.yaml:1:1: expected a mapping at the top level, found a list"],
        ),
        (
            "a pipeline naming an undefined receiver",
            &[(
                "configs/main.yaml",
                &MAIN.replace("receivers: [otlp]", "receivers: [otlp, otlp/edge]"),
            )],
            &[
                "configs/main.yaml:12:25: service.pipelines[\"traces\"].receivers[1]: receiver \"otlp/edge\" is not defined under receivers or connectors (group \"a\")",
            ],
        ),
        (
            "undefined processor and exporter",
            &[(
                "configs/main.yaml",
                &MAIN.replace("[batch]", "[memory_limiter]").replace("[debug]", "[otlp]"),
            )],
            &[
                "configs/main.yaml:13:20: service.pipelines[\"traces\"].processors[0]: processor \"memory_limiter\" is not defined under processors (group \"a\")",
                "configs/main.yaml:14:19: service.pipelines[\"traces\"].exporters[0]: exporter \"otlp\" is not defined under exporters or connectors (group \"a\")",
            ],
        ),
        (
            "malformed component ids",
            &[(
                "configs/main.yaml",
                &MAIN.replace("  batch: {}", "  batch/: {}\n  1st: {}"),
            )],
            &[
                "configs/main.yaml:6:3: processors[\"batch/\"]: invalid component id: the name after '/' must not be empty",
                "configs/main.yaml:7:3: processors[\"1st\"]: invalid component id: the type must start with a letter and hold only letters, digits and '_' (at most 63 characters)",
                "configs/main.yaml:14:20: service.pipelines[\"traces\"].processors[0]: processor \"batch\" is not defined under processors (group \"a\")",
            ],
        ),
        (
            "service.extensions naming an undefined extension",
            &[
                (
                    "groups/a.yaml",
                    "config:\n  \"\": configs/main.yaml\n  ext.yaml: configs/extensions.yaml\n  more.yaml: configs/more.yaml\n",
                ),
                ("configs/more.yaml", "service:\n  extensions: [health_check, pprof]\n"),
            ],
            &[
                "configs/more.yaml:2:30: service.extensions[1]: extension \"pprof\" is not defined under extensions (group \"a\")",
            ],
        ),
        (
            "no pipeline",
            &[(
                "configs/main.yaml",
                "receivers: {otlp: {}}\nexporters: {debug: {}}\nservice:\n  pipelines: {}\n",
            )],
            &["configs/main.yaml:4:3: service.pipelines: no pipeline is defined (group \"a\")"],
        ),
        (
            "no service at all",
            &[("configs/main.yaml", "receivers: {otlp: {}}\n")],
            &["groups/a.yaml:1:1: service.pipelines: no pipeline is defined (group \"a\")"],
        ),
        (
            "a pipeline without receivers, a bad pipeline id and key",
            &[(
                "configs/main.yaml",
                "exporters: {debug: {}}\nservice:\n  pipelines:\n    trace:\n      exporters: [debug]\n      exporter: [debug]\n",
            )],
            &[
                "configs/main.yaml:4:5: service.pipelines[\"trace\"]: invalid pipeline id: the signal must be traces, metrics, logs or profiles",
                "configs/main.yaml:4:5: service.pipelines[\"trace\"]: needs at least one receiver (group \"a\")",
                "configs/main.yaml:6:7: service.pipelines[\"trace\"].exporter: unknown key (expected one of: receivers, processors, exporters) (group \"a\")",
            ],
        ),
        (
            "a config file that is not YAML",
            &[("configs/main.yaml", "receivers: [\n")],
            &["configs/main.yaml:2:1: invalid YAML: while parsing a node, did not find expected node content"],
        ),
        (
            "several errors at once, sorted by path and position",
            &[
                (
                    "fleet.yaml",
                    "rollout:\n  waves: [50%, 10%]\nreconcile: {interval: forever}\n",
                ),
                (
                    "groups/a.yaml",
                    "config: {\"\": configs/main.yaml}\nselector: {match_expressions: [{key: k, operator: Is}]}\n",
                ),
                ("groups/b.yaml", "priority: 1\nconfig: {\"\": configs/missing.yaml}\n"),
                ("configs/main.yaml", &MAIN.replace("[debug]", "[debug/x]")),
            ],
            &[
                "configs/main.yaml:14:19: service.pipelines[\"traces\"].exporters[0]: exporter \"debug/x\" is not defined under exporters or connectors (group \"a\")",
                "fleet.yaml:2:16: rollout.waves: the last wave must be 100% (the whole group), found 10%",
                "fleet.yaml:2:16: rollout.waves[1]: waves must increase: 10% is not more than the wave before it (50%)",
                "fleet.yaml:3:23: reconcile.interval: invalid duration \"forever\": expected number at 0 (examples: 30s, 5m, 1h 30m)",
                "groups/a.yaml:2:51: selector.match_expressions[0].operator: unknown operator \"Is\" (expected In, NotIn, Exists or DoesNotExist)",
                "groups/b.yaml:2:14: config[\"\"]: no such file: configs/missing.yaml",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (name, files, expected) in cases {
        let got = errors(files);
        if got != *expected {
            failures.push(format!("{name}:\n  expected {expected:#?}\n  got      {got:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn errors_display_one_per_line() {
    let e = load(&repo(&[("fleet.yaml", "a: 1\nb: 2\n")]), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "fleet.yaml:1:1: a: unknown key (expected one of: rollout, reconcile)\n\
         fleet.yaml:2:1: b: unknown key (expected one of: rollout, reconcile)"
    );
}

const FULL_FLEET: &str = "\
rollout:
  waves: [2, 25%, 100%]
  bake: 2m
  apply_timeout: 1h 30m
  unhealthy_grace: 45s
  max_failures: 5%
  on_failure: hold
reconcile:
  interval: 10m
";

const EDGE: &str = "\
description: Gateways in the edge clusters
priority: 10
selector:
  match_attributes:
    service.name: otelcol-gateway
    deployment.environment: production
  match_expressions:
    - {key: host.name, operator: In, values: [edge-1, edge-2]}
    - {key: canary, operator: DoesNotExist}
  instance_uids: [0192f3c4-5d6e-7f80-9a0b-1c2d3e4f5a6b, 01ARZ3NDEKTSV4RRFFQ69G5FAV]
config:
  \"\": configs/main.yaml
  extensions.yaml: configs/extensions.yaml
  settings.json: configs/settings.json
rollout:
  waves: [5%, 100%]
  on_failure: rollback
";

#[test]
fn a_valid_repository_loads_into_the_desired_state() {
    let settings = "{\"exporters\": {\"otlp\": {\"endpoint\": \"collector:4317\"}}}";
    let src = repo(&[
        ("fleet.yaml", FULL_FLEET),
        ("groups/edge.yaml", EDGE),
        (
            "groups/a.yaml",
            "priority: -1\nselector: {}\nconfig: {\"\": configs/main.yaml}\n",
        ),
        ("configs/settings.json", settings),
    ]);
    let commit = CommitId::new("ABCDEF0123456789abcdef0123456789abcdef01");
    let state = load(&src, Some(commit.clone())).unwrap();
    assert_eq!(state.commit, Some(commit));
    assert_eq!(state.reconcile_interval, Duration::from_secs(600));
    let names: Vec<&str> = state.groups.keys().map(GroupName::as_str).collect();
    assert_eq!(names, ["a", "edge"]);

    let fleet_policy = RolloutPolicy {
        waves: vec![Amount::Count(2), Amount::Percent(25), Amount::Percent(100)],
        bake: Duration::from_secs(120),
        apply_timeout: Duration::from_secs(5400),
        unhealthy_grace: Duration::from_secs(45),
        max_failures: Amount::Percent(5),
        on_failure: OnFailure::Hold,
    };
    let catch_all = &state.groups[&GroupName::new("a")];
    assert_eq!(catch_all.priority, -1);
    assert!(catch_all.selector.is_empty());
    assert_eq!(catch_all.description, "");
    assert_eq!(catch_all.rollout, fleet_policy);
    let files = catch_all.config.files();
    assert_eq!(files.len(), 1);
    assert_eq!(files[""].content_type, "text/yaml");
    assert_eq!(&files[""].body[..], MAIN.as_bytes());

    let edge = &state.groups[&GroupName::new("edge")];
    assert_eq!(edge.description, "Gateways in the edge clusters");
    assert_eq!(edge.priority, 10);
    assert_eq!(
        edge.rollout,
        RolloutPolicy {
            waves: vec![Amount::Percent(5), Amount::Percent(100)],
            on_failure: OnFailure::Rollback,
            ..fleet_policy
        },
        "each key the group gives overrides fleet.yaml, the others are inherited"
    );
    let s = &edge.selector;
    assert_eq!(
        s.match_attributes,
        BTreeMap::from([
            ("deployment.environment".to_string(), "production".to_string()),
            ("service.name".to_string(), "otelcol-gateway".to_string()),
        ])
    );
    assert_eq!(
        s.match_expressions,
        vec![
            Expression {
                key: "host.name".into(),
                operator: Operator::In,
                values: vec!["edge-1".into(), "edge-2".into()],
            },
            Expression {
                key: "canary".into(),
                operator: Operator::DoesNotExist,
                values: vec![],
            },
        ]
    );
    assert_eq!(
        s.instance_uids,
        vec![
            InstanceUid::parse_text("0192f3c4-5d6e-7f80-9a0b-1c2d3e4f5a6b").unwrap(),
            InstanceUid::from_wire(b"01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap(),
        ]
    );

    // The bundle is the group's config map as written, not the merged result.
    let expected = BTreeMap::from([
        (
            String::new(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::from_static(MAIN.as_bytes()),
            },
        ),
        (
            "extensions.yaml".to_string(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::from_static(EXTENSIONS.as_bytes()),
            },
        ),
        (
            "settings.json".to_string(),
            ConfigFile {
                content_type: "application/json".into(),
                body: Bytes::copy_from_slice(settings.as_bytes()),
            },
        ),
    ]);
    assert_eq!(edge.config.files(), &expected);
    assert_eq!(edge.config.hash(), crate::desired::canonical_hash(&expected));
    assert_ne!(edge.config.hash(), catch_all.config.hash());
}

#[test]
fn defaults_without_fleet_yaml() {
    let state = load(&repo(&[]), None).unwrap();
    assert_eq!(state.commit, None);
    assert_eq!(state.reconcile_interval, Duration::from_secs(300));
    let a = &state.groups[&GroupName::new("a")];
    assert_eq!(a.rollout, RolloutPolicy::default());
    assert_eq!(a.priority, 0);
}

#[test]
fn the_hash_changes_with_any_referenced_file_and_only_then() {
    let h = |files: &[(&str, &str)]| {
        load(&repo(files), None).unwrap().groups[&GroupName::new("a")]
            .config
            .hash()
    };
    let base = h(&[]);
    assert_eq!(base, h(&[("configs/unused.yaml", "x: 1\n")]));
    assert_eq!(
        base,
        h(&[("fleet.yaml", FULL_FLEET)]),
        "policy is not part of the config"
    );
    assert_ne!(base, h(&[("configs/main.yaml", &format!("{MAIN}# comment\n"))]));
}

#[test]
fn merge_order_lets_the_main_file_override_named_files() {
    // A named file defines the exporter the main file uses; the main file
    // (merged last) replaces the named file's pipelines list.
    let files: &[(&str, &str)] = &[
        (
            "groups/a.yaml",
            "config:\n  \"\": configs/main.yaml\n  b.yaml: configs/b.yaml\n  a.yaml: configs/a.yaml\n",
        ),
        ("configs/a.yaml", "exporters: {otlp: {}}\n"),
        (
            "configs/b.yaml",
            "service:\n  pipelines:\n    traces:\n      receivers: [nope]\n      exporters: [debug]\n",
        ),
    ];
    assert_eq!(errors(files), Vec::<String>::new());
    let files: &[(&str, &str)] = &[
        (
            "groups/a.yaml",
            "config:\n  \"\": configs/main.yaml\n  b.yaml: configs/b.yaml\n",
        ),
        (
            "configs/b.yaml",
            "receivers: {otlp: null}\nservice:\n  pipelines:\n    logs:\n      receivers: [nope]\n      exporters: [debug]\n",
        ),
    ];
    assert_eq!(
        errors(files),
        [
            "configs/b.yaml:5:19: service.pipelines[\"logs\"].receivers[0]: receiver \"nope\" is not defined under receivers or connectors (group \"a\")"
        ],
        "pipelines merge by key, so the named file's logs pipeline stays"
    );
}

#[test]
fn dotfiles_in_groups_are_ignored_and_paths_are_normalized() {
    let state = load(
        &repo(&[
            ("groups/.gitkeep", "x"),
            ("groups/a.yaml", "config:\n  \"\": ./configs//main.yaml\n"),
        ]),
        None,
    )
    .unwrap();
    assert_eq!(state.groups.len(), 1);
    assert_eq!(
        state.groups[&GroupName::new("a")].config_paths,
        BTreeMap::from([(String::new(), "configs/main.yaml".to_string())]),
        "the group keeps each config file's normalized path"
    );
}

proptest::proptest! {
    #[test]
    fn never_panics_on_arbitrary_group_files(text in "[ -~\n\t]{0,200}") {
        let _ = load(&repo(&[("groups/a.yaml", text.as_str())]), None);
    }

    #[test]
    fn never_panics_on_yamlish_group_files(text in "(config|rollout|waves|selector|[-:{}\\[\\], \n\"]|%|1|&a|\\*a|<<){0,40}") {
        let _ = load(&repo(&[("groups/a.yaml", text.as_str())]), None);
    }
}
