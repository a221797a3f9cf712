//! The tour's story: everything it prints, one function per beat. The
//! orchestration (`tour.rs`) decides what happens and hands the facts here;
//! nothing here starts, waits for or checks anything.

use std::path::Path;
use std::time::{Duration, Instant};

use super::files::{APP_CONFIG, APP_GROUP, REFUSED_TEXT};
use super::progress::{agent_line, group_table, short};
use crate::driver::DriverStatus;
use crate::model::{CommitId, ConfigHash, InstanceUid};
use crate::reconcile::GroupStatus;

/// Prints the story; its clock stamps the lines said while the tour runs.
#[derive(Debug, Clone, Copy)]
pub struct Narrator {
    clock: Instant,
}

/// One kind of simulated collector as the story introduces it.
pub struct KindShown<'a> {
    pub count: usize,
    pub name: &'a str,
    pub attrs: &'a [(&'a str, &'a str)],
    pub group: &'a str,
}

impl Narrator {
    /// Starts the clock and says what the tour is.
    pub fn begin() -> Self {
        println!("opamp-gitops demo: a config repository, the controller and a simulated fleet, in one process.");
        println!("Nothing leaves this machine; the tour takes well under a minute and stops by itself.");
        Narrator { clock: Instant::now() }
    }

    pub fn step(&self, n: u32, title: &str) {
        println!("\n[{n}/7] {title}");
        println!("{}", "-".repeat(title.len() + 6));
    }

    /// A line stamped with the time since the tour started.
    pub fn say(&self, line: &str) {
        println!("  [{:>5.1}s] {line}", self.clock.elapsed().as_secs_f64());
    }

    // ---------------------------------------------------------------- step 1

    /// The repository and the files of its first commit.
    pub fn repository(&self, dir: &Path, files: &[(&str, String)]) {
        println!("The source of truth is a git repository, created at");
        println!("  {}", dir.display());
        println!("It holds rollout defaults, three groups of collectors, and their configs:");
        for (path, body) in files {
            let what = match *path {
                "fleet.yaml" => "rollout defaults: waves [1, 25%, 100%], short bakes for the demo",
                "groups/edge-gateways.yaml" => "gateways (service.name otelcol-gateway, production)",
                "groups/app-agents.yaml" => "agents next to the apps (service.name otelcol-agent, agent.role app)",
                "groups/default.yaml" => "catch-all: an empty selector, lowest priority",
                "configs/common/extensions.yaml" => "health_check and pprof, merged into every group's config",
                _ => "a collector config",
            };
            println!("  {path:<32} {:>5} bytes  {what}", body.len());
        }
    }

    /// The first commit and what `validate` says of it.
    pub fn validated(&self, commit: &CommitId, summary: &str) {
        println!(
            "Committed {}. `opamp-gitops validate --rev HEAD` checks the commit the way the",
            commit.short()
        );
        println!("controller will before it rolls anything out; its output:");
        indented(summary, 4);
    }

    // ---------------------------------------------------------------- step 2

    pub fn controller(&self, opamp: &str, api: &str) {
        println!("The controller runs in this process, following the repository's committed tree:");
        println!("  OpAMP  {opamp}   (WebSocket and plain HTTP)");
        println!("  API    {api}   try, while the tour runs:");
        println!("           curl -s {api}/api/v1/groups");
        println!("           curl -s {api}/api/v1/agents");
        println!("  Web    {api}/   the fleet and its rollouts, live, in a browser");
    }

    pub fn fleet(&self, agents: usize, kinds: &[KindShown<'_>]) {
        println!("{agents} simulated collectors connect over WebSocket; each behaves like the OpAMP supervisor:");
        for kind in kinds {
            let shown: Vec<String> = kind.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  {:>3} {:<11} {}  -> {}",
                kind.count,
                kind.name,
                shown.join(" "),
                kind.group
            );
        }
        println!("They refuse any config containing {REFUSED_TEXT:?} (a misspelt setting a real collector rejects).");
        println!("Like the real supervisor, each is unhealthy for a moment after it starts and after every new");
        println!("config, and reports APPLIED only once its collector is healthy. The controller judges that");
        println!("fairly: an agent's apply clock starts when the config reaches it (an HTTP agent only gets it");
        println!("at its next poll), unhealthy spells shorter than `unhealthy_grace` are not failures, and an");
        println!("agent still APPLYING after a restart gets its config once more before it counts as failed.");
    }

    pub fn connected(&self, agents: usize, bake: Duration) {
        self.say(&format!("{agents} agents connected"));
        println!("  The first commit rolls out like any change: each group in its own waves, every");
        println!(
            "  wave baking {} before the next opens.",
            humantime::format_duration(bake)
        );
    }

    pub fn first_rollout_done(&self, status: &DriverStatus) {
        self.say("every group complete, every agent in sync:");
        self.table(status);
    }

    /// The group table and the agents by state.
    pub fn table(&self, status: &DriverStatus) {
        indented(&group_table(status), 4);
        println!("    {}", agent_line(&status.agents_by_state));
    }

    // ---------------------------------------------------------------- step 3

    pub fn change(&self, old: &str, new: &str) {
        println!("An engineer merges a change to the app agents' batching:");
        print_diff(old, new);
    }

    pub fn change_committed(&self, commit: &CommitId, before: &ConfigHash, after: &ConfigHash) {
        println!(
            "Commit {} changes {APP_GROUP} from config {} to {}; the other groups are unchanged.",
            commit.short(),
            short(before),
            short(after)
        );
    }

    pub fn rollout_starts(&self, commit: &CommitId) {
        self.say(&format!("the controller loaded {}; the rollout starts", commit.short()));
    }

    // ---------------------------------------------------------------- step 4

    pub fn broken_change(&self, old: &str, new: &str) {
        println!("Next, a change with a typo (num_consumer for num_consumers):");
        print_diff(old, new);
    }

    pub fn broken_committed(&self, commit: &CommitId) {
        println!(
            "Commit {} passes validation (it checks structure and references, not every component's",
            commit.short()
        );
        println!("settings), so the controller rolls it out; the collectors will refuse it.");
    }

    pub fn halted(&self, host: &str, canary: &InstanceUid, error: &str, halted: &GroupStatus) {
        self.say(&format!("canary {host} ({canary}) reported FAILED:"));
        for line in error.lines() {
            println!("             {line}");
        }
        self.say(&format!(
            "rollout halted at wave {}/{}: max_failures is 0, so no further wave opens",
            halted.wave, halted.waves
        ));
    }

    pub fn rolled_back(&self, host: &str, good: &ConfigHash) {
        self.say(&format!(
            "canary {host} rolled back: it runs {} again (on_failure: rollback)",
            short(good)
        ));
    }

    pub fn still_halted(&self, after: Duration, waves: u32, others: usize, bad: &ConfigHash) {
        self.say(&format!(
            "{:.1}s later still halted at wave 1/{waves}; the other {others} app agents never received {}",
            after.as_secs_f64(),
            short(bad)
        ));
    }

    // ---------------------------------------------------------------- step 5

    pub fn revert(&self, revert: &CommitId, broken: &CommitId, hash: &ConfigHash) {
        println!(
            "Commit {} reverts {}: the {APP_GROUP} config is {} again, the last one that completed.",
            revert.short(),
            broken.short(),
            short(hash)
        );
    }

    pub fn revert_is_no_rollout(&self) {
        println!("A commit back to the stable config is a revert: no waves, no bake, every agent at once.");
    }

    pub fn loaded(&self, commit: &CommitId) {
        self.say(&format!("the controller loaded {}", commit.short()));
    }

    pub fn revert_complete(&self, took: Duration, done: &GroupStatus) {
        self.say(&format!(
            "revert complete in {:.1}s: wave {}/{}, {}/{} agents run {}, {} failed",
            took.as_secs_f64(),
            done.wave,
            done.waves,
            done.agents.applied,
            done.agents.targeted,
            short(&done.config_hash),
            done.agents.failed
        ));
        println!("  The canary was rolled back in step 4 and the others never left the good config, so");
        println!("  no push was needed: the halted rollout is over and every agent is in sync. With");
        println!("  on_failure: hold, or a failure in a later wave, every affected agent would get it now.");
    }

    // ---------------------------------------------------------------- step 6

    pub fn notes(&self, status_table: &str) {
        println!("The controller wrote each commit's outcome into the repository as a git note");
        println!("(refs/notes/opamp-gitops). `opamp-gitops status --repo <dir>` reads them back:");
        indented(status_table, 4);
    }

    pub fn broken_note(&self, log: &str) {
        println!("The broken commit, as `git log --notes=opamp-gitops` shows it:");
        indented(log, 4);
    }

    // ---------------------------------------------------------------- step 7

    pub fn stopped(&self, agents: usize, took: Duration) {
        println!(
            "  [{:>5.1}s] {agents} agents disconnected and the controller stopped in {:.1}s",
            self.clock.elapsed().as_secs_f64(),
            took.as_secs_f64()
        );
    }

    /// Where the repository went, and how to run the real thing.
    pub fn closing(&self, root: &Path, repo: &Path, kept: bool) {
        if kept {
            println!("The repository is kept at {}; look around:", repo.display());
            println!("  opamp-gitops status --repo {}", repo.display());
            println!("  git -C {} log --notes=opamp-gitops", repo.display());
        } else {
            println!(
                "The temporary directory {} is removed (run with --keep to keep it).",
                root.display()
            );
        }
        println!("\nRun the real thing:");
        for (cmd, what) in [
            ("opamp-gitops validate PATH", "check a repository before you commit"),
            (
                "opamp-gitops serve --repo URL|PATH",
                "the controller: OpAMP on :4320, API on 127.0.0.1:4321",
            ),
            (
                "opamp-gitops simulate --server ws://127.0.0.1:4320/v1/opamp --agents 100",
                "simulated collectors",
            ),
            (
                "opamp-gitops plan --repo PATH --server http://127.0.0.1:4321",
                "what a commit would do to the fleet",
            ),
            ("opamp-gitops status --repo PATH", "rollout history, from the notes"),
        ] {
            println!("  {cmd}\n      {what}");
        }
        println!("See docs/demo.md for what the tour showed and where to read more.");
    }
}

/// A step did not go as expected (the error goes to stderr).
pub fn gave_up() {
    println!("\nThe tour stopped: a step did not go as expected (details on stderr).");
}

/// Prints each line of `text` indented by `by` spaces.
fn indented(text: &str, by: usize) {
    for line in text.lines() {
        if line.trim().is_empty() {
            println!();
        } else {
            println!("{:by$}{}", "", line.trim_end());
        }
    }
}

/// A unified diff of the app agents' config, indented.
fn print_diff(old: &str, new: &str) {
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff
        .unified_diff()
        .context_radius(1)
        .header(&format!("a/{APP_CONFIG}"), &format!("b/{APP_CONFIG}"))
        .to_string();
    indented(&text, 4);
}
