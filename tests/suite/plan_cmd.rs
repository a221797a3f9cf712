//! `opamp-gitops plan` as a reviewer runs it: the built binary against real
//! git repositories (made with git2 in temp dirs), with the fleet from a file
//! in the `/api/v1/agents` format or from a running in-process server with
//! simulated agents. Expected wave members are computed here from
//! `reconcile::canary_order` and `wave_cuts`.

use crate::common;

use common::{run_cli, stderr, stdout};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::SystemTime;

use git2::{IndexAddOption, Oid, Repository, Signature};
use opamp_gitops::desired::{self, Amount};
use opamp_gitops::gitsrc::notes::{Author, NotesStore};
use opamp_gitops::gitsrc::tree::TreeSource;
use opamp_gitops::model::{CommitId, ConfigHash, GroupName, InstanceUid};
use opamp_gitops::notes::format::{AgentCounts, Note, NoteGroup, Phase};
use opamp_gitops::reconcile::{canary_order, wave_cuts};
use serde_json::{Value, json};

// ---------------------------------------------------------------- repository

struct Fixture {
    dir: tempfile::TempDir,
    repo: Repository,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        Fixture { dir, repo }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Replaces the work tree with `files` and commits it on HEAD.
    fn commit(&self, files: &BTreeMap<String, String>, message: &str) -> Oid {
        let root = self.path();
        for entry in std::fs::read_dir(&root).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != ".git" {
                let p = entry.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(p).unwrap();
                } else {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        for (path, body) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let mut index = self.repo.index().unwrap();
        index.clear().unwrap();
        index.add_all(["*"], IndexAddOption::DEFAULT, None).unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = Signature::now("Test", "test@example.com").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
            .unwrap()
    }

    /// The config hash of `group` at `commit`, as the controller computes it.
    fn hash(&self, commit: Oid, group: &str) -> ConfigHash {
        let source = TreeSource::open(&self.path(), &commit.to_string(), None).unwrap();
        let state = desired::load(&source, None).unwrap();
        state.groups[&GroupName::new(group)].config.hash()
    }

    /// Writes a note saying `group`'s rollout of `commit` reached `phase` with `hash`.
    fn note(&self, commit: Oid, group: &str, phase: Phase, hash: ConfigHash) {
        let note = Note {
            version: "v1".into(),
            commit: CommitId::new(commit.to_string()),
            change: None,
            updated: SystemTime::now(),
            valid: true,
            errors: vec![],
            groups: BTreeMap::from([(
                GroupName::new(group),
                NoteGroup {
                    config_hash: hash,
                    phase,
                    wave: 3,
                    waves: 3,
                    agents: AgentCounts::default(),
                    failures: vec![],
                    started: None,
                    finished: None,
                    also_failed: vec![],
                    history: vec![],
                },
            )]),
        };
        NotesStore::new(self.path(), None, Author::default())
            .write(&BTreeMap::from([(CommitId::new(commit.to_string()), note.render())]))
            .unwrap();
    }

    fn write_fleet(&self, agents: &[Value]) -> PathBuf {
        let p = self.dir.path().join("fleet.json");
        std::fs::write(&p, serde_json::to_vec(&json!({ "agents": agents })).unwrap()).unwrap();
        p
    }
}

/// A valid collector config; `timeout` tells versions apart in diffs.
fn collector(timeout: &str) -> String {
    format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{}}\nprocessors:\n  batch:\n    timeout: {timeout}\n\
         exporters:\n  debug: {{}}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      \
         processors: [batch]\n      exporters: [debug]\n"
    )
}

fn group_file(priority: i64, key: &str, value: &str, config: &str) -> String {
    format!("priority: {priority}\nselector:\n  match_attributes:\n    {key}: {value}\nconfig:\n  \"\": {config}\n")
}

/// The repository at one commit: `gw` runs configs/gw.yaml with `gw_timeout`;
/// `extra` groups are added as (name, priority, key, value).
fn files(gw_timeout: &str, extra: &[(&str, i64, &str, &str)]) -> BTreeMap<String, String> {
    let mut f = BTreeMap::from([
        (
            "fleet.yaml".to_string(),
            "rollout:\n  waves: [1, 50%, 100%]\n  bake: 30s\n".to_string(),
        ),
        ("configs/gw.yaml".to_string(), collector(gw_timeout)),
        ("configs/core.yaml".to_string(), collector("2s")),
        (
            "groups/gw.yaml".to_string(),
            group_file(10, "service.name", "gw", "configs/gw.yaml"),
        ),
    ]);
    for (name, priority, key, value) in extra {
        f.insert(
            format!("groups/{name}.yaml"),
            group_file(*priority, key, value, "configs/core.yaml"),
        );
    }
    f
}

const CORE: (&str, i64, &str, &str) = ("core", 0, "role", "core");
const SHADOW: (&str, i64, &str, &str) = ("shadow", 0, "env", "prod");
const NOBODY: (&str, i64, &str, &str) = ("nobody", 0, "service.name", "none");
const OLD: (&str, i64, &str, &str) = ("old", 0, "role", "old");
const FRESH: (&str, i64, &str, &str) = ("fresh", 0, "role", "fresh");

// ---------------------------------------------------------------- fleet

fn uid(n: u8) -> InstanceUid {
    InstanceUid::Uuid([n; 16])
}

fn agent_json(n: u8, connected: bool, accepts: bool, attrs: &[(&str, &str)]) -> Value {
    let mut identifying = serde_json::Map::new();
    let mut other = serde_json::Map::new();
    other.insert("host.name".into(), json!(format!("host-{n}")));
    for (k, v) in attrs {
        if k.starts_with("service.") {
            identifying.insert(k.to_string(), json!(v));
        } else {
            other.insert(k.to_string(), json!(v));
        }
    }
    let mut caps = vec!["ReportsStatus"];
    if accepts {
        caps.extend(["AcceptsRemoteConfig", "ReportsRemoteConfig"]);
    }
    json!({
        "instance_uid": uid(n).to_string(), "connected": connected, "transport": "websocket",
        "last_seen": "2026-11-21T10:00:00Z",
        "identifying_attributes": identifying, "non_identifying_attributes": other,
        "capabilities": caps, "group": null, "desired_config_hash": null,
        "remote_config_status": null, "health": null,
        "state": if connected { "unmanaged" } else { "offline" }
    })
}

/// gw: 1..=6 connected (1 and 2 also env=prod), 7 offline (a member all the same), 8 unsupported;
/// core: 10, 11; fresh: 12; shadow: 14; 13 matches nothing; 15 was in `old`.
fn fleet() -> Vec<Value> {
    let mut agents = Vec::new();
    for n in 1..=6 {
        let mut attrs = vec![("service.name", "gw")];
        if n <= 2 {
            attrs.push(("env", "prod"));
        }
        agents.push(agent_json(n, true, true, &attrs));
    }
    agents.push(agent_json(7, false, true, &[("service.name", "gw")]));
    agents.push(agent_json(8, true, false, &[("service.name", "gw")]));
    agents.push(agent_json(10, true, true, &[("role", "core")]));
    agents.push(agent_json(11, true, true, &[("role", "core")]));
    agents.push(agent_json(12, true, true, &[("role", "fresh")]));
    agents.push(agent_json(13, true, true, &[("role", "nothing")]));
    agents.push(agent_json(14, true, true, &[("env", "prod")]));
    agents.push(agent_json(15, true, true, &[("role", "old")]));
    agents
}

// ---------------------------------------------------------------- running

fn plan(repo: &Path, args: &[&str]) -> Output {
    let repo = repo.to_str().expect("a UTF-8 path");
    run_cli(&[&["plan", "--repo", repo][..], args].concat(), Path::new("."))
}

fn plan_json(repo: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let o = plan(repo, &all);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout).expect("JSON output")
}

fn group<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name} in {report:#}"))
}

fn wave_uids(g: &Value) -> Vec<Vec<InstanceUid>> {
    g["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["agents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| InstanceUid::parse_text(a["uid"].as_str().unwrap()).unwrap())
                .collect()
        })
        .collect()
}

/// The members of each wave, computed independently: canary order cut by `wave_cuts`.
fn expected_waves(group: &str, members: Vec<InstanceUid>, waves: &[Amount]) -> Vec<Vec<InstanceUid>> {
    let order = canary_order(&GroupName::new(group), members);
    let cuts = wave_cuts(waves, order.len());
    let mut prev = 0;
    cuts.iter()
        .map(|&c| {
            let w = order[prev..c as usize].to_vec();
            prev = c as usize;
            w
        })
        .collect()
}

fn policy() -> Vec<Amount> {
    vec![Amount::Count(1), Amount::Percent(50), Amount::Percent(100)]
}

fn diff_of(g: &Value) -> String {
    g["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["diff"].as_str().unwrap().to_string())
        .collect()
}

/// c1: gw at 1s with core, shadow, nobody, old; c2: gw at 5s, fresh added, old removed.
fn two_commits() -> (Fixture, Oid, Oid) {
    let fx = Fixture::new();
    let c1 = fx.commit(&files("1s", &[CORE, SHADOW, NOBODY, OLD]), "c1");
    let c2 = fx.commit(&files("5s", &[CORE, SHADOW, NOBODY, FRESH]), "c2");
    (fx, c1, c2)
}

// ---------------------------------------------------------------- tests

#[test]
fn offline_plan_lists_waves_diffs_and_callouts() {
    let (fx, c1, c2) = two_commits();
    let fleet = fx.write_fleet(&fleet());
    let r = plan_json(&fx.path(), &["--fleet", fleet.to_str().unwrap()]);

    assert_eq!(r["commit"], c2.to_string());
    assert_eq!(r["base"]["kind"], "first_parent");
    assert_eq!(r["base"]["commit"], c1.to_string());

    let gw = group(&r, "gw");
    assert_eq!(gw["change"], "changed");
    assert_eq!(gw["stable"]["commit"], c1.to_string());
    assert_eq!(gw["stable"]["source"], "first_parent");
    assert_eq!(gw["stable_config_hash"], fx.hash(c1, "gw").to_string());
    assert_eq!(gw["config_hash"], fx.hash(c2, "gw").to_string());
    // The offline agent keeps its place in the waves.
    let members: Vec<InstanceUid> = (1..=7).map(uid).collect();
    assert_eq!(wave_uids(gw), expected_waves("gw", members, &policy()));
    assert_eq!(wave_uids(gw).iter().map(Vec::len).collect::<Vec<_>>(), [1, 3, 3]);
    let diff = diff_of(gw);
    assert!(
        diff.contains("--- a/configs/gw.yaml\n+++ b/configs/gw.yaml\n"),
        "{diff}"
    );
    assert!(diff.contains("\n-    timeout: 1s\n+    timeout: 5s\n"), "{diff}");
    assert_eq!(gw["rollout"]["bake"], "30s");
    assert_eq!(gw["rollout"]["on_failure"], "rollback");
    assert_eq!(gw["offline"][0]["uid"], uid(7).to_string());
    assert_eq!(gw["unsupported"][0]["uid"], uid(8).to_string());
    assert_eq!(gw["unsupported"][0]["host"], "host-8");

    assert_eq!(group(&r, "core")["change"], "unchanged");
    assert_eq!(group(&r, "core")["waves"], json!([]));
    let fresh = group(&r, "fresh");
    assert_eq!(fresh["change"], "new");
    assert_eq!(wave_uids(fresh), vec![vec![uid(12)], vec![], vec![]]);
    assert!(diff_of(fresh).starts_with("--- /dev/null\n+++ b/configs/core.yaml\n"));
    assert_eq!(r["removed"][0]["name"], "old");
    assert_eq!(r["removed"][0]["agents"], 1);

    let c = &r["callouts"];
    let multi: Vec<(String, &Value, &Value)> = c["multiple_matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["agent"]["uid"].as_str().unwrap().to_string(),
                &m["winner"],
                &m["losers"],
            )
        })
        .collect();
    assert_eq!(
        multi,
        [
            (uid(1).to_string(), &json!("gw"), &json!(["shadow"])),
            (uid(2).to_string(), &json!("gw"), &json!(["shadow"])),
        ]
    );
    assert_eq!(c["groups_without_agents"], json!([{"group": "nobody", "matched": 0}]));
    let unmanaged: Vec<&str> = c["unmanaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["uid"].as_str().unwrap())
        .collect();
    assert_eq!(unmanaged, [uid(13).to_string(), uid(15).to_string()]);
    assert_eq!(
        c["moved"],
        json!([
            {"agent": {"uid": uid(12).to_string(), "host": "host-12"}, "from": null, "to": "fresh"},
            {"agent": {"uid": uid(15).to_string(), "host": "host-15"}, "from": "old", "to": null},
        ])
    );
    assert_eq!(
        r["fleet"],
        json!({"agents": 14, "connected": 13, "offline": 1, "unmanaged": 2, "unsupported": 1})
    );
}

#[test]
fn text_and_markdown_outputs() {
    let (fx, _, c2) = two_commits();
    let fleet = fx.write_fleet(&fleet());
    let f = fleet.to_str().unwrap();

    let o = plan(&fx.path(), &["--fleet", f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with(&format!("plan for commit {c2}\n")), "{text}");
    assert!(text.contains("== gw (changed)"), "{text}");
    assert!(text.contains("    -    timeout: 1s\n    +    timeout: 5s\n"), "{text}");
    let first = &expected_waves("gw", (1..=7).map(uid).collect(), &policy())[0][0];
    assert!(
        text.contains(&format!("wave 1 (1, 1 of 7): +1: {first} (host-")),
        "{text}"
    );
    assert!(
        text.contains("matched by several groups: gw wins over shadow"),
        "{text}"
    );
    assert!(text.contains("group nobody matches no agent"), "{text}");
    assert!(
        text.contains("group gw (changed) has 1 agent without AcceptsRemoteConfig"),
        "{text}"
    );
    assert!(text.contains("2 agents are matched by no group"), "{text}");
    assert!(text.contains("removed"), "{text}");

    let o = plan(&fx.path(), &["--fleet", f, "--format", "markdown"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let md = stdout(&o);
    assert!(
        md.starts_with(&format!("### opamp-gitops plan for `{}`\n", &c2.to_string()[..12])),
        "{md}"
    );
    assert!(md.contains("\n2 of 5 groups change, 1 removed. Compared with"), "{md}");
    assert!(md.contains("| group | change | config hash | agents | waves |\n|---|---|---|---|---|\n"));
    assert!(md.contains("| `gw` | **changed** |"), "{md}");
    assert!(md.contains("| `core` | unchanged |"), "{md}");
    assert!(md.contains("| `fresh` | **new** |"), "{md}");
    assert!(md.contains("| `old` | **removed** |"), "{md}");
    assert!(md.contains("<details><summary><b>gw</b>: changed, 7 agents in 3 waves; first wave 1</summary>"));
    assert!(
        md.contains("```diff\n--- a/configs/gw.yaml\n+++ b/configs/gw.yaml\n"),
        "{md}"
    );
    assert!(md.contains("| 1 | 1 | 1 of 7 | `"), "{md}");
    assert!(md.contains("#### Call-outs"), "{md}");
    assert_eq!(md.matches("<details>").count(), md.matches("</details>").count());
}

#[test]
fn a_complete_note_makes_an_older_commit_the_stable_base_and_a_return_to_it_a_revert() {
    let (fx, c1, c2) = two_commits();
    let fleet = fx.write_fleet(&fleet());
    let f = fleet.to_str().unwrap();
    // c3 brings gw back to c1's config.
    let c3 = fx.commit(&files("1s", &[CORE, SHADOW, NOBODY, FRESH]), "c3: revert gw");

    // Without notes the first parent is stable: a change in waves.
    let r = plan_json(&fx.path(), &["--fleet", f]);
    let gw = group(&r, "gw");
    assert_eq!(gw["change"], "changed");
    assert_eq!(gw["stable"]["commit"], c2.to_string());
    assert!(diff_of(gw).contains("\n-    timeout: 5s\n+    timeout: 1s\n"));

    // c1's rollout completed (c2's did not): c1 is stable and c3 is a revert.
    fx.note(c1, "gw", Phase::Complete, fx.hash(c1, "gw"));
    fx.note(c2, "gw", Phase::Halted, fx.hash(c2, "gw"));
    let r = plan_json(&fx.path(), &["--rev", &c3.to_string(), "--fleet", f]);
    let gw = group(&r, "gw");
    assert_eq!(gw["change"], "revert");
    assert_eq!(gw["stable"], json!({"commit": c1.to_string(), "source": "note"}));
    assert_eq!(gw["previous_config_hash"], fx.hash(c2, "gw").to_string());
    let waves = wave_uids(gw);
    assert_eq!(waves.len(), 1, "a revert goes to every agent at once");
    assert_eq!(
        waves[0],
        expected_waves("gw", (1..=7).map(uid).collect(), &[Amount::Percent(100)])[0]
    );
    let text = stdout(&plan(&fx.path(), &["--fleet", f]));
    assert!(
        text.contains("revert to the stable config: pushed to all 7 agents at once"),
        "{text}"
    );

    // A further change is diffed against c1 (stable), not c2.
    let c4 = fx.commit(&files("9s", &[CORE, SHADOW, NOBODY, FRESH]), "c4");
    fx.note(c3, "gw", Phase::Progressing, fx.hash(c3, "gw"));
    let r = plan_json(&fx.path(), &["--rev", &c4.to_string(), "--fleet", f]);
    let gw = group(&r, "gw");
    assert_eq!(gw["change"], "changed");
    assert_eq!(gw["stable"]["source"], "note");
    assert!(
        diff_of(gw).contains("\n-    timeout: 1s\n+    timeout: 9s\n"),
        "{}",
        diff_of(gw)
    );

    // --base overrides the notes.
    let r = plan_json(&fx.path(), &["--base", &c2.to_string(), "--fleet", f]);
    let gw = group(&r, "gw");
    assert_eq!(gw["stable"], json!({"commit": c2.to_string(), "source": "base"}));
    assert_eq!(r["base"]["rev"], c2.to_string());
    assert!(diff_of(gw).contains("\n-    timeout: 5s\n+    timeout: 9s\n"));
}

#[test]
fn a_note_whose_hash_does_not_match_its_commit_is_not_trusted() {
    let (fx, c1, c2) = two_commits();
    let fleet = fx.write_fleet(&fleet());
    let c3 = fx.commit(&files("9s", &[CORE, SHADOW, NOBODY, FRESH]), "c3");
    fx.note(c1, "gw", Phase::Complete, ConfigHash([7; 32]));
    let r = plan_json(
        &fx.path(),
        &["--rev", &c3.to_string(), "--fleet", fleet.to_str().unwrap()],
    );
    let gw = group(&r, "gw");
    assert_eq!(
        gw["stable"],
        json!({"commit": c2.to_string(), "source": "first_parent"})
    );
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains(&format!("the note on {}", &c1.to_string()[..12])),
        "{warnings}"
    );
}

#[test]
fn an_invalid_first_parent_is_skipped() {
    let (fx, _, c2) = two_commits();
    let mut broken = files("5s", &[CORE, SHADOW, NOBODY, FRESH]);
    broken.insert("groups/broken.yaml".into(), "selector: [\n".into());
    fx.commit(&broken, "broken");
    let c4 = fx.commit(&files("9s", &[CORE, SHADOW, NOBODY, FRESH]), "fix");
    let fleet = fx.write_fleet(&fleet());
    let r = plan_json(
        &fx.path(),
        &["--rev", &c4.to_string(), "--fleet", fleet.to_str().unwrap()],
    );
    assert_eq!(r["base"]["commit"], c2.to_string());
    assert!(diff_of(group(&r, "gw")).contains("\n-    timeout: 5s\n+    timeout: 9s\n"));
    assert!(r["warnings"].to_string().contains("is not valid (never rolled out)"));
}

#[test]
fn invalid_rev_and_usage_errors() {
    let (fx, _, _) = two_commits();
    let fleet = fx.write_fleet(&fleet());
    let f = fleet.to_str().unwrap();
    let mut broken = files("5s", &[CORE]);
    broken.insert(
        "groups/broken.yaml".into(),
        "priority: high\nselector: {}\nconfig:\n  \"\": configs/missing.yaml\n".into(),
    );
    fx.commit(&broken, "broken");

    let o = plan(&fx.path(), &["--fleet", f]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("groups/broken.yaml:1:11: "), "{out}");
    assert!(
        out.contains("groups/broken.yaml:4:7: config[\"\"]: no such file: configs/missing.yaml"),
        "{out}"
    );
    assert!(stderr(&o).contains("invalid: "), "{}", stderr(&o));

    let o = plan(&fx.path(), &["--rev", "no-such-branch", "--fleet", f]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no such revision: no-such-branch"),
        "{}",
        stderr(&o)
    );

    let o = plan(&fx.path(), &["--rev", "HEAD~1"]);
    assert_eq!(o.status.code(), Some(2), "--server or --fleet is required");

    let o = plan(&fx.path(), &["--rev", "HEAD~1", "--fleet", "/no/such/fleet.json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("reading /no/such/fleet.json"), "{}", stderr(&o));

    let bad = fx.dir.path().join("bad.json");
    std::fs::write(&bad, "[1, 2]").unwrap();
    let o = plan(&fx.path(), &["--rev", "HEAD~1", "--fleet", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is not an agent list"), "{}", stderr(&o));

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = plan(
        &fx.path(),
        &["--rev", "HEAD~1", "--server", &format!("http://127.0.0.1:{port}")],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("GET http://127.0.0.1:{port}/api/v1/agents: ")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("refused"), "{err}");

    let o = plan(Path::new("/no/such/repo"), &["--fleet", f]);
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_against_a_running_server_with_simulated_agents() {
    use common::TestServer;
    use opamp_gitops::simulate::{self, Config};
    use tokio_util::sync::CancellationToken;

    let (fx, c1, _) = two_commits();
    let server = TestServer::start().await;
    let cancel = CancellationToken::new();
    let mut gw = Config::new(server.opamp_addr().to_string(), 5);
    gw.attrs = vec![("service.name".into(), "gw".into())];
    let mut core = Config::new(server.opamp_addr().to_string(), 2);
    core.attrs = vec![
        ("role".into(), "core".into()),
        ("host.name".into(), "core-{index}".into()),
    ];
    let sims = [
        simulate::start(gw, cancel.clone()).unwrap(),
        simulate::start(core, cancel.clone()).unwrap(),
    ];
    let listed = server
        .wait_agents("7 connected agents", |agents| {
            let described = agents
                .iter()
                .all(|a| a["identifying_attributes"]["service.name"].is_string());
            (agents.len() == 7 && described && agents.iter().all(|a| a["connected"] == true)).then(|| agents.to_vec())
        })
        .await;
    let gw_uids: Vec<InstanceUid> = listed
        .iter()
        .filter(|a| a["identifying_attributes"]["service.name"] == "gw")
        .map(|a| InstanceUid::parse_text(a["instance_uid"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(gw_uids.len(), 5);

    let repo = fx.path();
    let url = format!("http://{}/", server.api_addr());
    let o = tokio::task::spawn_blocking(move || plan(&repo, &["--server", &url, "--format", "json"]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let g = group(&r, "gw");
    assert_eq!(g["change"], "changed");
    assert_eq!(g["stable"]["commit"], c1.to_string());
    assert_eq!(wave_uids(g), expected_waves("gw", gw_uids, &policy()));
    assert!(diff_of(g).contains("\n-    timeout: 1s\n+    timeout: 5s\n"));
    assert_eq!(group(&r, "core")["agents"]["members"], 2);
    assert_eq!(r["fleet"]["agents"], 7);
    assert_eq!(
        r["callouts"]["groups_without_agents"].as_array().unwrap().len(),
        3,
        "nobody, shadow, fresh"
    );

    // Markdown from the same server, URL without a trailing slash.
    let repo = fx.path();
    let url = format!("http://{}", server.api_addr());
    let o = tokio::task::spawn_blocking(move || plan(&repo, &["--server", &url, "--format", "markdown"]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let md = stdout(&o);
    assert!(
        md.contains("<details><summary><b>gw</b>: changed, 5 agents in 3 waves; first wave 1</summary>"),
        "{md}"
    );
    assert!(md.contains("| `core` | unchanged |"), "{md}");

    cancel.cancel();
    for sim in sims {
        let _ = tokio::time::timeout(common::DEADLINE, sim.wait()).await;
    }
    server.stop().await;
}
