//! The demo's config repository: a fleet.yaml, three groups and realistic
//! collector configs (taken from `example-repo/`), and the two edits the tour
//! commits. Pure text.

use std::time::Duration;

const APP_AGENT: &str = include_str!("../../example-repo/configs/app-agent.yaml");
const GATEWAY: &str = include_str!("../../example-repo/configs/gateway.yaml");
const DEFAULT: &str = include_str!("../../example-repo/configs/default.yaml");
const EXTENSIONS: &str = include_str!("../../example-repo/configs/common/extensions.yaml");

/// The group the tour changes.
pub const APP_GROUP: &str = "app-agents";
/// The main config file of [`APP_GROUP`].
pub const APP_CONFIG: &str = "configs/app-agent.yaml";

/// Text the simulated collectors refuse to start with: a misspelt setting
/// (`num_consumers` is right) that a real collector rejects when it loads the
/// config, and that structural validation cannot see.
pub const REFUSED_TEXT: &str = "num_consumer:";

/// The first commit: every file of the repository.
pub fn initial(bake: Duration) -> Vec<(&'static str, String)> {
    vec![
        ("fleet.yaml", fleet_yaml(bake)),
        ("groups/edge-gateways.yaml", EDGE_GATEWAYS.to_string()),
        ("groups/app-agents.yaml", APP_AGENTS.to_string()),
        ("groups/default.yaml", DEFAULT_GROUP.to_string()),
        ("configs/gateway.yaml", GATEWAY.to_string()),
        (APP_CONFIG, APP_AGENT.to_string()),
        ("configs/default.yaml", DEFAULT.to_string()),
        ("configs/common/extensions.yaml", EXTENSIONS.to_string()),
    ]
}

fn fleet_yaml(bake: Duration) -> String {
    format!(
        "# Defaults for every group. Real fleets bake for minutes; the demo bakes for seconds.\n\
         rollout:\n  \
           waves: [1, 25%, 100%]\n  \
           bake: {}\n  \
           apply_timeout: 10s\n  \
           max_failures: 0\n  \
           on_failure: rollback\n\
         reconcile:\n  \
           interval: 5m\n",
        humantime::format_duration(bake)
    )
}

const EDGE_GATEWAYS: &str = "\
description: Gateways in the edge clusters; every agent exports to them
priority: 30
selector:
  match_attributes:
    service.name: otelcol-gateway
    deployment.environment: production
config:
  \"\": configs/gateway.yaml
  extensions.yaml: configs/common/extensions.yaml
rollout:
  # Few, critical instances: one first, then the rest.
  waves: [1, 100%]
";

const APP_AGENTS: &str = "\
description: Agents next to the applications; they forward traces to the gateways
priority: 20
selector:
  match_attributes:
    service.name: otelcol-agent
  match_expressions:
    - {key: agent.role, operator: In, values: [app]}
config:
  \"\": configs/app-agent.yaml
  extensions.yaml: configs/common/extensions.yaml
# No rollout block: the fleet.yaml defaults apply (waves 1, 25%, 100%).
";

const DEFAULT_GROUP: &str = "\
description: Catch-all for any agent no other group selects
priority: -100
selector: {}
config:
  \"\": configs/default.yaml
  extensions.yaml: configs/common/extensions.yaml
rollout:
  waves: [50%, 100%]
  on_failure: hold
";

/// The app agents' config with larger, more frequent batches.
pub fn app_batch_change() -> Result<String, String> {
    replace(
        APP_AGENT,
        "  batch:\n    timeout: 2s\n",
        "  batch:\n    timeout: 1s\n    send_batch_size: 2048\n",
    )
}

/// [`app_batch_change`] plus a misspelt exporter setting the collectors refuse.
pub fn app_broken_change() -> Result<String, String> {
    replace(
        &app_batch_change()?,
        "      queue_size: 2000\n",
        &format!("      queue_size: 2000\n      {REFUSED_TEXT} 4\n"),
    )
}

/// `text` with its one occurrence of `from` replaced by `to`.
fn replace(text: &str, from: &str, to: &str) -> Result<String, String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(format!("expected {from:?} once in {APP_CONFIG}, found it {n} times")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edits_apply_to_the_example_config() {
        let batch = app_batch_change().unwrap();
        assert!(batch.contains("send_batch_size: 2048") && !batch.contains(REFUSED_TEXT));
        let broken = app_broken_change().unwrap();
        assert!(broken.contains("send_batch_size: 2048") && broken.contains(REFUSED_TEXT));
        // The other configs must not trip the simulated collectors.
        for (path, body) in initial(Duration::from_secs(2)) {
            assert!(!body.contains(REFUSED_TEXT), "{path}");
        }
    }

    #[test]
    fn the_repository_is_valid() {
        let files = initial(Duration::from_millis(300));
        let source = crate::desired::MemSource::new(files.iter().map(|(p, b)| (*p, b.as_str())));
        let state = crate::desired::load(&source, None).unwrap();
        let names: Vec<&str> = state.groups.keys().map(|g| g.as_str()).collect();
        assert_eq!(names, ["app-agents", "default", "edge-gateways"]);
    }
}
