//! `opamp-gitops demo` end to end: the built binary runs the whole tour with
//! a small fleet and short bakes, and every step says what it should, in order.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use crate::common::process::output_within;

/// The tour must end by itself well before this.
const DEADLINE: Duration = Duration::from_secs(90);

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args`; kills it and fails if it outlives the deadline.
async fn run_demo(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"));
    command.arg("demo").args(args).env_remove("RUST_LOG");
    let out = output_within(&mut command, DEADLINE).await;
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every pattern (all its parts on one line) appears, each on a line after the previous one's.
fn assert_in_order(text: &str, patterns: &[&[&str]]) {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = 0;
    for parts in patterns {
        match lines[at..].iter().position(|l| parts.iter().all(|p| l.contains(p))) {
            Some(i) => at += i + 1,
            None => panic!("expected a line with {parts:?} after line {at}; the output was:\n{text}"),
        }
    }
}

#[tokio::test]
async fn the_tour_runs_every_step_in_order_and_cleans_up() {
    let out = run_demo(&["--agents", "12", "--bake", "300ms"]).await;
    assert_eq!(out.code, Some(0), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.stderr, "", "no logs unless RUST_LOG is set");
    // The live table after the halt and the notes table agree on the halted
    // rollout's counts (applied, failed).
    let row = |pred: &dyn Fn(&[&str]) -> bool| -> Vec<String> {
        let line = out
            .stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| pred(w));
        line.unwrap_or_else(|| panic!("no such row in\n{}", out.stdout))
            .iter()
            .map(|w| w.to_string())
            .collect()
    };
    // GROUP CONFIG APPLIED FAILED PHASE ...
    let live = row(&|w| w.len() > 4 && w[0] == "app-agents" && w[4] == "halted");
    // COMMIT WHEN AUTHOR GROUP PHASE WAVE APPLIED FAILED ...
    let at = |w: &[&str]| w.iter().position(|x| *x == "app-agents");
    let noted = row(&|w| at(w).is_some_and(|i| w.get(i + 1) == Some(&"halted")));
    let i = at(&noted.iter().map(String::as_str).collect::<Vec<_>>()).expect("the group");
    assert_eq!(
        (&live[2], &live[3]),
        (&noted[i + 3], &noted[i + 4]),
        "{live:?}\n{noted:?}"
    );
    assert_eq!(live[3], "1", "the canary that failed stays counted after its rollback");
    assert_in_order(
        &out.stdout,
        &[
            &["[1/7] A config repository in git"],
            &["groups/app-agents.yaml"],
            &["valid: 3 groups"],
            &["[2/7] The controller and a simulated fleet"],
            &["API", "http://127.0.0.1:"],
            &["Web", "http://127.0.0.1:", "/", "live, in a browser"],
            &["12 agents connected"],
            &["every group complete, every agent in sync"],
            &["app-agents", "9/9", "complete 3/3"],
            &["12 agents: 12 in_sync"],
            &["[3/7] A change, rolled out in canary waves"],
            &["+    send_batch_size: 2048"],
            &["wave 1/3 opens: the canary gets the change (1 of 9)"],
            &["wave 1/3: 1 of 1 applied and healthy; baking 300ms"],
            &["wave 1/3 done"],
            &["wave 2/3 opens: 2 more agents get the change (3 of 9)"],
            &["wave 2/3 done"],
            &["wave 3/3 opens: 6 more agents get the change (9 of 9)"],
            &["rollout complete: 9/9 agents run"],
            &["[4/7] A broken change: the canary fails, the rollout halts"],
            &["wave 1/3 opens: the canary gets the change (1 of 9)"],
            &["canary app-", "reported FAILED"],
            &["contains \"num_consumer:\": refusing to start"],
            &["rollout halted at wave 1/3"],
            &["rolled back: it runs"],
            &["still halted at wave 1/3; the other 8 app agents never received"],
            &["app-agents", "halted 1/3"],
            &["[5/7] git revert: back to the last good config"],
            &["revert complete in", "wave 1/1, 9/9 agents run", "0 failed"],
            &["app-agents", "9/9", "complete 1/1"],
            &["[6/7] The audit trail: git notes"],
            &["COMMIT", "GROUP", "PHASE"],
            &["app-agents", "complete", "1/1", "Revert \""],
            &["app-agents", "halted", "1/3"],
            &["app-agents", "complete", "3/3", "app-agents: send larger batches"],
            &["Notes (opamp-gitops):"],
            &["phase: halted"],
            &["refusing to start"],
            &["[7/7] Stopping"],
            &["12 agents disconnected and the controller stopped"],
            &["is removed (run with --keep"],
            &["Run the real thing:"],
            &["opamp-gitops serve --repo"],
        ],
    );
    let removed = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("The temporary directory "))
        .and_then(|l| l.split(' ').next())
        .map(PathBuf::from)
        .expect("the temp dir is named");
    assert!(!removed.exists(), "{} is still there", removed.display());
}

#[tokio::test]
async fn too_few_agents_is_a_usage_error() {
    let out = run_demo(&["--agents", "2"]).await;
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--agents must be at least 6"), "{}", out.stderr);
    assert_eq!(out.stdout, "");
}
