//! The alert rules shipped in `deploy/prometheus/`: they load, each fires and
//! stays quiet as its promtool tests say, and every metric they read is one
//! a controller exports.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::TestServer;
use common::gitops::{GitRepo, collector_config, serve_config, simulate, state_dir};

const RULES: &str = "deploy/prometheus";

/// Runs `promtool` with `args` in the rules' folder; fails clearly without it.
fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool cannot run ({e}): scripts/install-packages installs it (Debian package prometheus)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_shipped_rules_load_and_pass_their_promtool_tests() {
    let checked = promtool(&["check", "rules", "opamp-gitops.rules.yml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "opamp-gitops.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a test that fires it and one that does not.
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(RULES)
            .join("opamp-gitops.rules.yml"),
    )
    .expect("the rules");
    let tests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(RULES)
            .join("opamp-gitops.rules.test.yml"),
    )
    .expect("the tests");
    let tests: serde_yaml_ng::Value = serde_yaml_ng::from_str(&tests).expect("YAML");
    let cases: Vec<(&str, bool)> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().expect("alert tests"))
        .map(|c| {
            let fires = c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            (c["alertname"].as_str().expect("alertname"), fires)
        })
        .collect();
    for name in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(cases.contains(&(name, true)), "{name} has no case that fires");
        assert!(cases.contains(&(name, false)), "{name} has no case that stays quiet");
    }
}

#[tokio::test]
async fn every_metric_the_rules_read_is_exported() {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(RULES)
            .join("opamp-gitops.rules.yml"),
    )
    .expect("the rules");
    let mut names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("opamp_gitops_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");

    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("v1"), "v1");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let (_sim, stop) = simulate(&server, 2, |_| {});
    server
        .wait_group("edge", "v1 complete", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 2
        })
        .await;
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).expect("utf-8");
    for name in names {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])),
            "{name} is not exported:\n{metrics}"
        );
    }
    stop.cancel();
    server.stop().await;
}
