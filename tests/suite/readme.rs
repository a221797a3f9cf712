//! Runs every shell command of the README's "Running it" section as written,
//! in a fresh clone of this checkout (the controller writes its notes into the
//! repository it reads), except that `cargo run --release --` is the built
//! binary, the ports are free ones and the state directory is a temporary
//! one, and checks that each does what the README says.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::{Serve, free_addr};
use common::{wait_agents_at, wait_group_at};

/// How long the controller may take to count the agents (its default
/// start-up grace is 15 s).
const PATIENCE: Duration = Duration::from_secs(60);

/// The commands of the first `sh` block after `## Running it`, with
/// continuation lines joined and comment lines dropped.
fn running_it(readme: &str) -> Vec<String> {
    let section = readme.split("\n## Running it\n").nth(1).expect("a Running it section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("an sh block");
    let mut commands = vec![];
    let mut current = String::new();
    for line in block.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

struct Shell {
    clone: std::path::PathBuf,
    bin: String,
    opamp_port: String,
    api_port: String,
    state: String,
}

impl Shell {
    fn command(&self, line: &str) -> Command {
        let line = line
            .replace("cargo run --release --", &self.bin)
            .replace("4320", &self.opamp_port)
            .replace("4321", &self.api_port)
            .replace("/tmp/opamp-gitops", &self.state);
        let mut c = Command::new("bash");
        c.args(["-c", &format!("exec {line}")])
            .current_dir(&self.clone)
            .env("RUST_LOG", "warn");
        c
    }

    /// Runs `line` to completion; its standard output as JSON, if it printed some.
    fn try_json(&self, line: &str) -> Option<serde_json::Value> {
        let out = self.command(line).output().expect("bash runs");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn json(&self, line: &str) -> serde_json::Value {
        self.try_json(line).unwrap_or_else(|| panic!("{line} printed no JSON"))
    }

    /// Runs `line` until dropped.
    fn spawn(&self, line: &str) -> Running {
        Running(self.command(line).stdout(Stdio::null()).spawn().expect("bash runs"))
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_of_running_it_do_what_the_readme_says() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let commands = running_it(&readme);
    let [serve, simulate, groups, agents] = &commands[..] else {
        panic!("expected serve, simulate and two curl commands, found {commands:?}")
    };
    assert!(serve.starts_with("cargo run --release -- serve "), "{serve}");
    assert!(simulate.starts_with("cargo run --release -- simulate "), "{simulate}");
    assert!(groups.starts_with("curl -s 127.0.0.1:4321/api/v1/groups"), "{groups}");
    assert!(agents.starts_with("curl -s 127.0.0.1:4321/api/v1/agents"), "{agents}");

    let state = tempfile::tempdir().unwrap();
    let clone = state.path().join("clone");
    git2::Repository::clone(env!("CARGO_MANIFEST_DIR"), &clone).expect("a clone of the checkout");
    let (opamp, api) = (free_addr(), free_addr());
    let shell = Shell {
        clone,
        bin: env!("CARGO_BIN_EXE_opamp-gitops").to_string(),
        opamp_port: opamp.port().to_string(),
        api_port: api.port().to_string(),
        state: state.path().join("opamp-gitops").display().to_string(),
    };
    let listen = format!(
        " --opamp-listen 127.0.0.1:{} --api-listen 127.0.0.1:{}",
        opamp.port(),
        api.port()
    );
    let controller = Serve::run(shell.command(&format!("{serve}{listen}")).into()).await;
    let _fleet = shell.spawn(simulate);

    // The controller reads the example repository and rolls its app agents'
    // config out to the 50 simulated agents, in waves.
    let app_group = || {
        let all = shell.try_json(groups)?;
        all["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["name"] == "app-trace-agents").cloned())
    };
    // Waited for on the API's long polls, then read with the README's commands.
    wait_group_at(
        controller.api,
        "app-trace-agents",
        "a rollout counting 50 agents",
        PATIENCE,
        |g| g["agents"]["targeted"] == 50,
    )
    .await;
    let all = shell.json(groups);
    assert!(all["commit"].as_str().is_some_and(|c| c.len() == 40), "{all}");
    let names: Vec<&str> = all["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["app-trace-agents", "default", "edge-gateways", "infra-metrics-agents"]
    );
    let app = app_group().unwrap();
    assert_eq!(app["config_hash"].as_str().map(str::len), Some(64), "{app}");
    assert_eq!(app["rollout"]["phase"], "progressing", "{app}");
    assert_eq!(app["rollout"]["waves"], 4, "{app}");
    assert!(app["rollout"]["wave"].as_u64().is_some_and(|w| w >= 1), "{app}");

    wait_agents_at(controller.api, "the canary to apply the config", PATIENCE, |agents| {
        (agents.len() == 50 && agents.iter().any(|a| a["state"] == "in_sync")).then_some(())
    })
    .await;
    let list = shell.json(agents);
    for agent in list["agents"].as_array().unwrap() {
        assert_eq!(agent["group"], "app-trace-agents", "{agent}");
        match agent["state"].as_str().unwrap() {
            "in_sync" | "applying" => assert_eq!(agent["desired_config_hash"], app["config_hash"], "{agent}"),
            // Waits for its wave and keeps what it runs (nothing yet).
            "pending" => assert!(agent["desired_config_hash"].is_null(), "{agent}"),
            other => panic!("unexpected state {other}: {agent}"),
        }
    }
}
