use super::*;
use crate::desired::{MemSource, load_merged};

/// Shared by the group: named `common.yaml`, so merged before the main file.
const COMMON: &str = "\
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
exporters:
  debug:
    verbosity: basic
service:
  extensions: [health_check]
";

const MAIN: &str = "\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: localhost:4317
  hostmetrics:
    collection_interval: 30s
processors:
  memory_limiter:
    check_interval: 0s
  batch: {}
exporters:
  debug:
    verbosity: loud
  otlp/b:
    endpoint: \"${env:BACKEND}\"
    headers: {authorization: \"Bearer ${env:TOKEN}\"}
bogus: 1
service:
  extensions: [health_check]
  telemetry:
    logs:
      level: loud
  pipelines:
    traces:
      receivers: [otlp, hostmetrics]
      processors: [memory_limiter, batch]
      exporters: [debug, otlp/b]
";

const GROUP: &str = "\
config:
  \"\": configs/main.yaml
  common.yaml: configs/common.yaml
";

fn merged() -> MergedConfig {
    let source = MemSource::new([
        ("configs/common.yaml", COMMON),
        ("configs/main.yaml", MAIN),
        ("groups/a.yaml", GROUP),
    ]);
    let (_, mut merged) = load_merged(&source, None).expect("the repository is valid");
    merged.remove(&GroupName::new("a")).expect("group a is merged")
}

#[test]
fn the_merged_yaml_is_what_the_supervisor_builds() {
    let m = merged();
    assert_eq!(m.group_file(), "groups/a.yaml");
    assert_eq!(
        m.yaml(),
        "\
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
exporters:
  debug:
    verbosity: loud
  otlp/b:
    endpoint: \"${env:BACKEND}\"
    headers:
      authorization: \"Bearer ${env:TOKEN}\"
service:
  extensions:
    - health_check
  telemetry:
    logs:
      level: loud
  pipelines:
    traces:
      receivers:
        - otlp
        - hostmetrics
      processors:
        - memory_limiter
        - batch
      exporters:
        - debug
        - otlp/b
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: localhost:4317
  hostmetrics:
    collection_interval: 30s
processors:
  memory_limiter:
    check_interval: 0s
  batch: {}
bogus: 1
"
    );
}

#[test]
fn environment_variables_without_a_default() {
    let cases: &[(&str, &[&str])] = &[
        ("${env:A}", &["A"]),
        ("${B}", &["B"]),
        ("x${env:A}y${env:B_2}z", &["A", "B_2"]),
        ("${env:A:-fallback}", &[]),
        ("${env:A:-}", &[]),
        ("$${env:A}", &[]),
        ("$$${env:A}", &["A"]),
        ("$A", &[]),
        ("${file:/etc/secret}", &[]),
        ("${env:1A}", &[]),
        ("${env:A-B}", &[]),
        ("${env:A", &[]),
        ("$", &[]),
        ("${}", &[]),
    ];
    for (text, want) in cases {
        let mut got = BTreeSet::new();
        env_refs(text, &mut got);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "{text:?}");
    }
    assert_eq!(
        merged().env_vars().into_iter().collect::<Vec<_>>(),
        ["BACKEND", "TOKEN"]
    );
}

#[test]
fn refusals_point_at_the_file_and_line_that_define_what_the_collector_names() {
    let group = "groups/a.yaml: collector refuses the merged config:";
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "a validation error names the component",
            "Error: processors::memory_limiter: 'check_interval' must be greater than zero\n",
            &[
                "groups/a.yaml: collector refuses the merged config: processors::memory_limiter: 'check_interval' must be greater than zero",
                "configs/main.yaml:9:3: processors::memory_limiter: 'check_interval' must be greater than zero (group \"a\")",
            ],
        ),
        (
            "a decoding error, over several lines; the last file that defines the component wins",
            "Error: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s):\n\n\
             'exporters' error reading configuration for \"debug\": decoding failed due to the following error(s):\n\n\
             'verbosity' unknown metrics level \"loud\"\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s): 'exporters' error reading configuration for \"debug\": decoding failed due to the following error(s): 'verbosity' unknown metrics level \"loud\"",
                "configs/main.yaml:13:3: exporters::debug: 'exporters' error reading configuration for \"debug\": decoding failed due to the following error(s): 'verbosity' unknown metrics level \"loud\" (group \"a\")",
            ],
        ),
        (
            "a component type the collector does not have",
            "Error: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s):\n\n\
             'receivers' unknown type: \"hostmetrics\" for id: \"hostmetrics\" (valid values: [otlp nop])\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s): 'receivers' unknown type: \"hostmetrics\" for id: \"hostmetrics\" (valid values: [otlp nop])",
                "configs/main.yaml:6:3: receivers::hostmetrics: 'receivers' unknown type: \"hostmetrics\" for id: \"hostmetrics\" (valid values: [otlp nop]) (group \"a\")",
            ],
        ),
        (
            "several validation errors, one per line; a component only a named file defines",
            "Error: exporters::otlp/b::clientconfig: address $EP: missing port in address\n\
             processors::batch: send_batch_max_size must be greater or equal to send_batch_size\n\
             extensions::health_check: bad endpoint\n",
            &[
                "groups/a.yaml: collector refuses the merged config: exporters::otlp/b::clientconfig: address $EP: missing port in address processors::batch: send_batch_max_size must be greater or equal to send_batch_size extensions::health_check: bad endpoint",
                "configs/main.yaml:15:3: exporters::otlp/b::clientconfig: address $EP: missing port in address (group \"a\")",
                "configs/main.yaml:11:3: processors::batch: send_batch_max_size must be greater or equal to send_batch_size (group \"a\")",
                "configs/common.yaml:2:3: extensions::health_check: bad endpoint (group \"a\")",
            ],
        ),
        (
            "a pipeline",
            "Error: service::pipelines::traces: references exporter \"otlp\" which is not configured\n",
            &[
                "groups/a.yaml: collector refuses the merged config: service::pipelines::traces: references exporter \"otlp\" which is not configured",
                "configs/main.yaml:25:5: service::pipelines::traces: references exporter \"otlp\" which is not configured (group \"a\")",
            ],
        ),
        (
            "a dotted path under service",
            "Error: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s):\n\n\
             'service.telemetry.logs' decoding failed due to the following error(s):\n\n'level' unrecognized level: \"loud\"\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s): 'service.telemetry.logs' decoding failed due to the following error(s): 'level' unrecognized level: \"loud\"",
                "configs/main.yaml:22:5: service::telemetry::logs: 'service.telemetry.logs' decoding failed due to the following error(s): 'level' unrecognized level: \"loud\" (group \"a\")",
            ],
        ),
        (
            "unknown top-level keys",
            "Error: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s):\n\n\
             'otelcol.configSettings' has invalid keys: bogus\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s): 'otelcol.configSettings' has invalid keys: bogus",
                "configs/main.yaml:18:1: bogus: 'otelcol.configSettings' has invalid keys: bogus (group \"a\")",
            ],
        ),
        (
            "a service key that no file has is not located",
            "Error: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s):\n\n\
             'service' has invalid keys: nope\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot unmarshal the configuration: decoding failed due to the following error(s): 'service' has invalid keys: nope",
            ],
        ),
        (
            "nothing named: the group alone",
            "Error: failed to get config: cannot resolve the configuration: retrieved value (type=string) cannot be used as a Conf\n",
            &[
                "groups/a.yaml: collector refuses the merged config: failed to get config: cannot resolve the configuration: retrieved value (type=string) cannot be used as a Conf",
            ],
        ),
        (
            "lines before the error are not the reason",
            "2026-01-01T00:00:00Z warn some feature gate is deprecated\nError: processors::batch: too big\n",
            &[
                "groups/a.yaml: collector refuses the merged config: processors::batch: too big",
                "configs/main.yaml:11:3: processors::batch: too big (group \"a\")",
            ],
        ),
        (
            "a component the config does not define is not located",
            "Error: processors::nope: odd\n",
            &["groups/a.yaml: collector refuses the merged config: processors::nope: odd"],
        ),
        (
            "no output at all",
            "",
            &["groups/a.yaml: collector refuses the merged config: (the collector gave no reason)"],
        ),
    ];
    let m = merged();
    for (name, output, want) in cases {
        let refusal = m.refusal(output);
        assert!(refusal.lines(None)[0].starts_with(group));
        assert_eq!(refusal.lines(None), *want, "{name}");
    }
}

#[test]
fn refusal_paths_are_relative_to_the_repository_root() {
    let refusal = merged().refusal("Error: processors::batch: too big\n");
    assert_eq!(
        refusal.lines(Some("fleet")),
        [
            "fleet/groups/a.yaml: collector refuses the merged config: processors::batch: too big",
            "fleet/configs/main.yaml:11:3: processors::batch: too big (group \"a\")",
        ]
    );
}

#[test]
fn keys_holding_separators_are_matched_whole() {
    let tree = yaml::parse(
        0,
        "exporters: {otlp: {}, otlp/a:b: {}, 'otlp/a:b::c': {}}\nservice: {pipelines: {traces: {}, traces/2: {}}}\n",
    )
    .unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("exporters::otlp/a:b: bad", "::", &["exporters", "otlp/a:b"]),
        ("exporters::otlp/a:b::c: bad", "::", &["exporters", "otlp/a:b::c"]),
        ("exporters::otlp: bad", "::", &["exporters", "otlp"]),
        ("exporters::otlp::tls: bad", "::", &["exporters", "otlp"]),
        (
            "service::pipelines::traces/2: bad",
            "::",
            &["service", "pipelines", "traces/2"],
        ),
        ("service.pipelines.traces", ".", &["service", "pipelines", "traces"]),
        ("nothing::here: bad", "::", &[]),
    ];
    for (text, sep, want) in cases {
        assert_eq!(walk(&tree, text, sep), *want, "{text:?}");
    }
}
