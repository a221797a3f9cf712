//! Rollout outcomes as git notes, end to end: the controller follows a bare
//! repository over file://, writes notes and pushes them there; a fresh
//! clone reads them with `git log --notes=opamp-gitops`. Also: another writer
//! pushing notes in between, and a controller that lost its state directory
//! rebuilding it from the notes.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::TestServer;
use common::gitops::{GitRepo, collector_config, edge_hash, git, group_yaml, serve_config, simulate};
use opamp_gitops::gitsrc::RepoLocation;
use opamp_gitops::model::CommitId;

/// Another writer's note on `target`, in its clone `dir` of the remote.
fn other_writer_note(dir: &Path, message: &str, target: &str) {
    let identity = ["-c", "user.name=Other", "-c", "user.email=o@example.com"];
    let add = ["notes", "--ref=opamp-gitops", "add", "-f", "-m", message, target];
    git(dir, &[&identity[..], &add[..]].concat());
}

/// A bare "remote" that a developer's work repository pushes to.
struct Remote {
    work: GitRepo,
    bare: PathBuf,
}

impl Remote {
    fn new() -> Self {
        let work = GitRepo::new();
        let bare = work.path().parent().expect("temp parent").join(format!(
            "{}-remote.git",
            work.path().file_name().expect("a name").to_string_lossy()
        ));
        git2::Repository::init_bare(&bare).expect("bare repo");
        Remote { work, bare }
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Commits the edge layout in the work repository and pushes it.
    fn push_edge(&self, policy: &str, config: &str, message: &str) -> CommitId {
        let c = self.work.commit_edge(policy, config, message);
        git(
            self.work.path(),
            &["push", "-q", "--force", &self.url(), "HEAD:refs/heads/master"],
        );
        c
    }

    fn push_files(&self, files: &[(&str, &str)], message: &str) -> CommitId {
        let c = self.work.commit(files, message);
        git(
            self.work.path(),
            &["push", "-q", "--force", &self.url(), "HEAD:refs/heads/master"],
        );
        c
    }

    /// The note on `commit` as a fresh clone sees it in `git log`.
    fn note_in_fresh_clone(&self, commit: &CommitId) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        git(dir.path(), &["clone", "-q", &self.url(), "clone"]);
        let clone = dir.path().join("clone");
        git(&clone, &["fetch", "-q", "origin", "refs/notes/*:refs/notes/*"]);
        git(
            &clone,
            &["log", "-1", "--notes=opamp-gitops", "--format=%N", commit.as_str()],
        )
    }

    /// Waits until the remote's note on `commit` satisfies `pred`; returns
    /// it. Looked at again after each of the controller's plans (notes follow them).
    async fn wait_note(
        &self,
        server: &TestServer,
        commit: &CommitId,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        server
            .until(what, async || {
                let n = self.note_in_fresh_clone(commit);
                pred(&n).then_some(n)
            })
            .await
    }
}

fn controller_config(remote: &Remote, state: &Path) -> opamp_gitops::app::ServeConfig {
    let mut c = serve_config(Path::new("unused"), state);
    if let Some(g) = c.git.as_mut() {
        g.repo = RepoLocation::Remote(remote.url());
    }
    c
}

/// A controller's settings with its OpAMP listener on `port` (agents of a
/// simulation reconnect to a restarted controller there).
fn config_on(remote: &Remote, state: &Path, port: u16) -> opamp_gitops::app::ServeConfig {
    let mut c = controller_config(remote, state);
    c.opamp_listen = ([127, 0, 0, 1], port).into();
    c
}

const FAST: &str = "  waves: [100%]\n  bake: 0s\n";

#[tokio::test]
async fn complete_halted_and_invalid_commits_get_notes_on_the_remote() {
    let remote = Remote::new();
    let c0 = remote.push_edge(FAST, &collector_config("v0"), "the fleet's first config");
    let state = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start_with(controller_config(&remote, state.path())).await;
    let (_sim, stop) = simulate(&server, 5, |c| c.fail_if_contains = Some("BREAK-ME".into()));
    // Every agent runs v0 before the change, so its rollout counts all five.
    let h0 = edge_hash(&collector_config("v0")).to_string();
    server
        .wait_group("edge", "v0 on all 5", |g| {
            g["config_hash"] == h0.as_str() && g["agents"]["applied"] == 5
        })
        .await;

    let v1 = collector_config("v1");
    let c1 = remote.push_edge(FAST, &v1, "v1");
    server.sync().await;
    let note = remote
        .wait_note(&server, &c1, "a complete note on the first commit", |n| {
            n.contains("phase: complete")
        })
        .await;
    assert!(note.contains("opamp-gitops: v1"), "{note}");
    assert!(note.contains(&format!("config_hash: {}", edge_hash(&v1))), "{note}");
    assert!(
        note.contains("agents: {targeted: 5, applied: 5, applying: 0, failed: 0, pending: 0, offline: 0}"),
        "{note}"
    );
    assert!(note.contains("valid: true"), "{note}");

    // A config the agents refuse: the canary fails and the rollout halts.
    let bad = format!("{}# BREAK-ME\n", collector_config("v2"));
    let c2 = remote.push_edge("  waves: [1, 100%]\n  bake: 0s\n", &bad, "a config the agents refuse");
    server.sync().await;
    let note = remote
        .wait_note(&server, &c2, "a halted note", |n| n.contains("phase: halted"))
        .await;
    let canary = server
        .wait_group("edge", "halted", |g| g["rollout"]["phase"] == "halted")
        .await["rollout"]["failures"][0]["agent"]
        .as_str()
        .expect("the failed canary")
        .to_string();
    assert!(note.contains(&canary), "the note names the failed agent: {note}");
    assert!(note.contains("BREAK-ME"), "the note carries the agent's error: {note}");

    // An invalid commit: never rolled out, and its note says why.
    let c3 = remote.push_files(
        &[("groups/edge.yaml", &format!("{}colour: blue\n", group_yaml(FAST)))],
        "typo",
    );
    server.sync().await;
    let note = remote
        .wait_note(&server, &c3, "an invalid note", |n| n.contains("valid: false"))
        .await;
    assert!(note.contains("groups/edge.yaml:"), "{note}");
    assert!(note.contains("colour"), "{note}");
    assert!(note.contains("groups: {}"), "{note}");

    // `status` reads the same history from a clone, with no server.
    let dir = tempfile::tempdir().expect("temp dir");
    git(dir.path(), &["clone", "-q", &remote.url(), "clone"]);
    let clone = dir.path().join("clone");
    let status = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
            .arg("status")
            .args(["--repo", clone.to_str().expect("utf-8 path"), "--fetch", "origin"])
            .args(args)
            .output()
            .expect("status runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let text = status(&[]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("COMMIT"), "{text}");
    assert!(
        lines[1].starts_with(c3.short()) && lines[1].contains("invalid (1 error)"),
        "{text}"
    );
    assert!(
        lines[2].starts_with(c2.short()) && lines[2].contains("halted") && lines[2].contains("0/5"),
        "{text}"
    );
    assert!(
        lines[3].starts_with(c1.short()) && lines[3].contains("complete") && lines[3].contains("5/5"),
        "{text}"
    );
    assert!(
        lines[4].starts_with(c0.short()) && lines[4].contains("complete"),
        "{text}"
    );
    assert!(text.contains(&format!("{} is invalid:", c3.short())), "{text}");
    let json: serde_json::Value = serde_json::from_str(&status(&["--format", "json"])).expect("JSON");
    let commits = json["commits"].as_array().expect("commits");
    assert_eq!(commits[0]["commit"], c3.as_str());
    assert_eq!(commits[0]["author"], "Test <test@example.com>");
    assert!(commits[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{json}");
    assert_eq!(commits[0]["note"]["valid"], false);
    assert_eq!(commits[1]["note"]["groups"]["edge"]["phase"], "halted");
    assert_eq!(commits[2]["note"]["groups"]["edge"]["agents"]["applied"], 5);

    let metrics = String::from_utf8(server.api_get("/metrics").await.body.to_vec()).expect("utf-8");
    let written: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("opamp_gitops_notes_written_total "))
        .and_then(|n| n.parse().ok())
        .expect("the notes counter");
    assert!(written >= 3, "{metrics}");

    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn notes_pushed_by_another_writer_survive_ours() {
    let remote = Remote::new();
    let c1 = remote.push_edge(FAST, &collector_config("v1"), "first config");
    let state = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start_with(controller_config(&remote, state.path())).await;
    let (_sim, stop) = simulate(&server, 3, |_| {});
    remote
        .wait_note(&server, &c1, "the first note", |n| n.contains("phase: complete"))
        .await;

    // Someone else adds a note to the remote's notes ref.
    let other = tempfile::tempdir().expect("temp dir");
    git(other.path(), &["clone", "-q", &remote.url(), "o"]);
    let o = other.path().join("o");
    git(&o, &["fetch", "-q", "origin", "refs/notes/*:refs/notes/*"]);
    other_writer_note(&o, "written by someone else", "HEAD");
    git(&o, &["push", "-q", "origin", "refs/notes/opamp-gitops"]);
    assert!(remote.note_in_fresh_clone(&c1).contains("written by someone else"));

    // Our next note must be merged with theirs to be pushed; ours wins on
    // the commit we manage, and theirs on others stays.
    let other_commit = remote.push_files(&[("README.md", "docs only\n")], "docs");
    git(&o, &["fetch", "-q", "origin"]);
    other_writer_note(&o, "their note", other_commit.as_str());
    git(&o, &["push", "-q", "origin", "refs/notes/opamp-gitops"]);
    let c3 = remote.push_edge(FAST, &collector_config("v3"), "v3");
    server.sync().await;
    remote
        .wait_note(&server, &c3, "our note on v3", |n| n.contains("phase: complete"))
        .await;
    // Our note reached the remote only through a merge (a plain push was
    // refused), and theirs on a commit we never processed is intact.
    let theirs = remote.note_in_fresh_clone(&other_commit);
    assert_eq!(theirs.trim(), "their note");
    let first = remote.note_in_fresh_clone(&c1);
    assert!(
        first.contains("phase: complete"),
        "ours wins on the commit we manage: {first}"
    );

    stop.cancel();
    server.stop().await;
}

/// A port free right now, so a restarted controller can take the address
/// its agents reconnect to.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A controller on its own OpAMP port with `n` simulated agents, once v1
/// runs on all of them: the server, the simulation and its stop, the port,
/// the state directory and v1's hash.
async fn v1_everywhere(
    remote: &Remote,
    n: u64,
    tweak: impl FnOnce(&mut opamp_gitops::simulate::Config),
) -> (
    TestServer,
    opamp_gitops::simulate::Simulation,
    tokio_util::sync::CancellationToken,
    u16,
    tempfile::TempDir,
    String,
) {
    let v1 = collector_config("v1");
    remote.push_edge(FAST, &v1, "first config");
    let port = free_port();
    let state = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start_with(config_on(remote, state.path(), port)).await;
    let (sim, stop) = simulate(&server, n as usize, tweak);
    let h1 = edge_hash(&v1).to_string();
    server
        .wait_group("edge", &format!("v1 complete on all {n}"), |g| {
            g["config_hash"] == h1.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == n
        })
        .await;
    (server, sim, stop, port, state, h1)
}

/// Stops `server`, loses its state directory, and starts a controller with
/// an empty one on the same OpAMP port (with a start-up grace, so the
/// simulated agents reconnect before it plans).
async fn lose_the_state(
    server: TestServer,
    state: tempfile::TempDir,
    remote: &Remote,
    port: u16,
) -> (TestServer, tempfile::TempDir) {
    server.stop().await;
    drop(state);
    let fresh = tempfile::tempdir().expect("temp dir");
    let mut config = config_on(remote, fresh.path(), port);
    config.startup_grace = Duration::from_secs(2);
    (TestServer::start_with(config).await, fresh)
}

/// Promotes the edge group's rollout and waits until wave `wave` is open
/// and `applied` agents run its config.
async fn promote_to(server: &TestServer, wave: u64, applied: u64) {
    let (code, _) = server.api_post("/api/v1/groups/edge/promote").await;
    assert_eq!(code, 200);
    server
        .wait_group("edge", &format!("wave {wave} applied"), |g| {
            g["rollout"]["wave"] == wave && g["agents"]["applied"] == applied
        })
        .await;
}

#[tokio::test]
async fn a_lost_state_directory_is_rebuilt_from_the_notes() {
    let remote = Remote::new();
    let (server, _sim, stop, port, first_state, h1) = v1_everywhere(&remote, 10, |_| {}).await;

    // v2 in waves with a long bake; promote once so wave 2 is open.
    let v2 = collector_config("v2");
    let c2 = remote.push_edge("  waves: [1, 50%, 100%]\n  bake: 1h\n", &v2, "v2");
    server.sync().await;
    let h2 = edge_hash(&v2).to_string();
    server
        .wait_group("edge", "wave 1 applied", |g| {
            g["config_hash"] == h2.as_str() && g["agents"]["applied"] == 1
        })
        .await;
    promote_to(&server, 2, 5).await;
    remote
        .wait_note(&server, &c2, "the wave-2 note", |n| {
            n.contains("phase: progressing") && n.contains("wave: 2")
        })
        .await;
    // A new controller with an empty state directory, on the same address.
    let (server, _second_state) = lose_the_state(server, first_state, &remote, port).await;
    // Controls wait for the grace: planning now would count too few agents.
    let (code, body) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("starting"), "{body}");
    let g = server
        .wait_group("edge", "the rebuilt rollout", |g| {
            g["rollout"]["phase"] == "progressing" && g["agents"]["targeted"] == 10
        })
        .await;
    assert_eq!(g["rollout"]["wave"], 2, "resumes at the wave it had opened: {g}");
    assert_eq!(g["stable_hash"], h1.as_str(), "the completed rollout is stable: {g}");
    assert_eq!(
        g["agents"]["applied"], 5,
        "wave 2's agents keep v2, the rest keep v1: {g}"
    );
    assert_eq!(g["agents"]["pending"], 5, "{g}");
    // Its bake is served again: wave 2 settled, and plans later wave 3 is
    // still closed; promoted, the remaining wave runs to completion.
    server
        .wait_group("edge", "wave 2 settled again", |g| {
            g["agents"]["applied"] == 5 && g["agents"]["applying"] == 0
        })
        .await;
    server.let_pass(Duration::from_millis(300)).await;
    let g = server.wait_group("edge", "the group", |_| true).await;
    assert_eq!(g["rollout"]["wave"], 2, "the bake holds wave 3: {g}");
    promote_to(&server, 3, 10).await;
    let (code, _) = server.api_post("/api/v1/groups/edge/promote").await;
    assert_eq!(code, 200);
    server
        .wait_group("edge", "v2 complete on all 10", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 10
        })
        .await;
    let note = remote
        .wait_note(&server, &c2, "the complete note", |n| n.contains("phase: complete"))
        .await;
    let steps: Vec<&str> = note
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- {step: ")?.split(',').next())
        .collect();
    assert_eq!(
        steps,
        [
            "started",
            "promote",
            "wave",
            "restarted",
            "promote",
            "wave",
            "promote",
            "complete"
        ],
        "{note}"
    );
    stop.cancel();
    server.stop().await;
}

/// `status` names what is wrong and what to give instead.
#[test]
fn status_says_what_to_do_with_a_folder_that_is_no_repository_or_a_remote_that_is_none() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("plain")).unwrap();
    let out = common::run_cli(&["status", "--repo", "plain"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        common::stderr(&out),
        "error: plain: not a git repository (give --repo a clone of the config repository)\n"
    );
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("a"), "first");
    let out = common::run_cli(&["status", "--fetch", "origin"], repo.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        common::stderr(&out),
        "error: no remote named \"origin\" in this repository (`git remote -v` lists them; give a remote's name or URL)\n"
    );
}

/// The pushes of one reason a controller has made, from its metrics.
async fn pushes(server: &TestServer, reason: &str) -> u64 {
    let text = String::from_utf8(server.api_get("/metrics").await.body).expect("utf-8");
    common::metric(&text, &format!("opamp_gitops_pushes_total{{reason=\"{reason}\"}}")).expect("the pushes metric")
}

#[tokio::test]
async fn a_halted_rollout_rebuilt_from_the_notes_gives_its_config_to_nobody() {
    let remote = Remote::new();
    let (server, _sim, stop, port, first_state, h1) =
        v1_everywhere(&remote, 30, |c| c.fail_if_contains = Some("BREAK-ME".into())).await;

    // A bad commit whose first wave (25 agents) all fail it: more failures
    // than a note lists with their errors.
    let bad = collector_config("v2 BREAK-ME");
    let policy = "  waves: [25, 100%]\n  bake: 1h\n  max_failures: 0\n  on_failure: rollback\n";
    let c2 = remote.push_edge(policy, &bad, "a bad change");
    server.sync().await;
    server
        .wait_group("edge", "25 failed and rolled back", |g| {
            g["rollout"]["phase"] == "halted" && g["rollout"]["failed"] == 25 && g["agents"]["applied"] == 25
        })
        .await;
    let note = remote
        .wait_note(&server, &c2, "a note naming all 25", |n| {
            n.contains("phase: halted") && n.matches("      - ").count() >= 25 && n.contains("also_failed:")
        })
        .await;
    assert!(note.contains("step: halted"), "{note}");
    let (server, _second_state) = lose_the_state(server, first_state, &remote, port).await;
    let g = server
        .wait_group("edge", "the rebuilt rollout", |g| {
            g["rollout"]["phase"] == "halted" && g["agents"]["targeted"] == 30
        })
        .await;
    assert_eq!(g["rollout"]["failed"], 25, "every failed agent is known again: {g}");
    assert_eq!(g["stable_hash"], h1.as_str(), "{g}");
    // Plans after the rebuild gave the bad config to nobody: not to the
    // agents that failed it, not to the rest of the group.
    server.let_pass(Duration::from_millis(500)).await;
    assert_eq!(pushes(&server, "wave").await, 0);
    let g = server.wait_group("edge", "the group", |_| true).await;
    assert_eq!(
        (
            g["rollout"]["phase"].as_str(),
            g["agents"]["applied"].as_u64(),
            g["agents"]["pending"].as_u64()
        ),
        (Some("halted"), Some(25), Some(5)),
        "the failed agents run v1 again, the rest never left it: {g}"
    );
    let note = remote.note_in_fresh_clone(&c2);
    assert!(note.contains("step: restarted"), "the note tells the restart: {note}");
    stop.cancel();
    server.stop().await;
}

fn steps_of(note: &str) -> Vec<&str> {
    note.lines()
        .filter_map(|l| l.trim().strip_prefix("- {step: ")?.split(',').next())
        .collect()
}

#[tokio::test]
async fn a_commit_rolled_out_again_after_a_rewind_keeps_the_history_of_its_first_rollout() {
    let remote = Remote::new();
    let state = tempfile::tempdir().expect("temp dir");
    let a = remote.push_edge(FAST, &collector_config("a"), "change a");
    let server = TestServer::start_with(controller_config(&remote, state.path())).await;
    let (_sim, stop) = simulate(&server, 3, |_| {});
    let complete = |c: &CommitId| format!("{c} complete");
    for (commit, config) in [(&a, "a")] {
        let h = edge_hash(&collector_config(config)).to_string();
        server
            .wait_group("edge", &complete(commit), |g| {
                g["config_hash"] == h.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 3
            })
            .await;
    }
    let first = remote
        .wait_note(&server, &a, "a's first note", |n| n.contains("phase: complete"))
        .await;
    assert!(first.contains("author: \"Test <test@example.com>\""), "{first}");
    assert!(first.contains("subject: \"change a\""), "{first}");
    let b = remote.push_edge(FAST, &collector_config("b"), "change b");
    server.sync().await;
    let hb = edge_hash(&collector_config("b")).to_string();
    server
        .wait_group("edge", &complete(&b), |g| {
            g["config_hash"] == hb.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 3
        })
        .await;

    // The branch is rewound to a: a's config rolls out a second time.
    git(
        remote.work.path(),
        &[
            "push",
            "-q",
            "--force",
            &remote.url(),
            &format!("{a}:refs/heads/master"),
        ],
    );
    server.sync().await;
    server
        .wait_group("edge", "a again", |g| {
            g["config_hash"] == edge_hash(&collector_config("a")).to_string().as_str()
                && g["rollout"]["phase"] == "complete"
                && g["agents"]["applied"] == 3
        })
        .await;
    server.let_pass(Duration::from_millis(100)).await;
    let note = remote.note_in_fresh_clone(&a);
    assert_eq!(
        steps_of(&note),
        ["started", "complete", "started", "complete"],
        "{note}"
    );
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_controller_pointed_at_a_folder_the_repository_lacks_leaves_every_note_untouched() {
    let remote = Remote::new();
    let state = tempfile::tempdir().expect("temp dir");
    let c = remote.push_edge(FAST, &collector_config("a"), "change a");
    let server = TestServer::start_with(controller_config(&remote, state.path())).await;
    let (_sim, stop) = simulate(&server, 2, |_| {});
    remote
        .wait_note(&server, &c, "the complete note", |n| n.contains("phase: complete"))
        .await;
    stop.cancel();
    server.stop().await;
    // As the first controller left it (it writes once more as it stops).
    let note = remote.note_in_fresh_clone(&c);

    // A second controller, told to look in a folder the repository does not have.
    let state = tempfile::tempdir().expect("temp dir");
    let mut config = controller_config(&remote, state.path());
    if let Some(g) = config.git.as_mut() {
        g.subdir = Some("fleet".into());
    }
    let server = TestServer::start_with(config).await;
    let g = server
        .until("the source error", async || {
            let all = server.api_json("/api/v1/groups").await;
            all["source"]["error"].as_str().map(str::to_owned)
        })
        .await;
    assert!(g.contains("no directory fleet in commit"), "{g}");
    let ready = server.api_get("/readyz").await;
    assert_eq!(ready.status, 503, "not ready with no commit in force");
    let body = String::from_utf8_lossy(&ready.body).into_owned();
    assert!(body.contains("no directory fleet"), "/readyz says why: {body}");
    let (code, body) = server.api_post("/api/v1/sync").await;
    assert_ne!(code, 200, "the fetch cannot load the commit: {body}");
    assert_eq!(remote.note_in_fresh_clone(&c), note, "the note is untouched");
    server.stop().await;
}

#[tokio::test]
async fn a_note_holds_every_step_of_a_rollout_paused_restarted_resumed_and_superseded() {
    let remote = Remote::new();
    remote.push_edge(FAST, &collector_config("v1"), "v1");
    let state = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config = || config_on(&remote, state.path(), port);
    let server = TestServer::start_with(config()).await;
    let (_sim, stop) = simulate(&server, 4, |_| {});
    server
        .wait_group("edge", "v1 on all 4", |g| g["agents"]["applied"] == 4)
        .await;
    let c2 = remote.push_edge("  waves: [1, 100%]\n  bake: 1h\n", &collector_config("v2"), "v2");
    server.sync().await;
    server
        .wait_group("edge", "v2's canary applied", |g| {
            g["rollout"]["commit"] == c2.as_str() && g["agents"]["applied"] == 1 && g["agents"]["applying"] == 0
        })
        .await;
    assert_eq!(server.api_post("/api/v1/groups/edge/pause").await.0, 200);
    remote
        .wait_note(&server, &c2, "the paused note", |n| n.contains("step: pause"))
        .await;
    server.stop().await;

    // The same state directory: the rollout carries on, paused.
    let server = TestServer::start_with(config()).await;
    server
        .wait_group("edge", "the paused rollout", |g| g["rollout"]["phase"] == "paused")
        .await;
    assert_eq!(server.api_post("/api/v1/groups/edge/resume").await.0, 200);
    let c3 = remote.push_edge("  waves: [1, 100%]\n  bake: 1h\n", &collector_config("v3"), "v3");
    server.sync().await;
    let note = remote
        .wait_note(&server, &c2, "the superseded note", |n| n.contains("phase: superseded"))
        .await;
    assert_eq!(
        steps_of(&note),
        ["started", "pause", "restarted", "resume", "superseded"],
        "{note}"
    );
    let newer = remote.note_in_fresh_clone(&c3);
    assert!(steps_of(&newer).starts_with(&["started"]), "{newer}");
    stop.cancel();
    server.stop().await;
}
