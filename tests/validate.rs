//! `opamp-gitops validate` as a user runs it: the built binary against the
//! example repository, broken copies of it, and real git repositories.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{run_cli, stderr, stdout};

use git2::{IndexAddOption, Repository, Signature};

fn example_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo")
}

fn validate(args: &[&str], cwd: &Path) -> Output {
    run_cli(&[&["validate"][..], args].concat(), cwd)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Replaces `from` (which must occur) with `to` in a file.
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} holds {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn commit_all(repo: &Repository, message: &str) -> git2::Oid {
    let mut index = repo.index().unwrap();
    index.add_all(["*"], IndexAddOption::DEFAULT, None).unwrap();
    index.update_all(["*"], None).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = Signature::now("Test", "test@example.com").unwrap();
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap()
}

#[test]
fn the_example_repository_is_valid() {
    let out = validate(&["example-repo"], Path::new(env!("CARGO_MANIFEST_DIR")));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    for group in ["edge-gateways", "app-trace-agents", "infra-metrics-agents", "default"] {
        assert!(
            text.contains(&format!("{group} (priority")),
            "{group} listed in:\n{text}"
        );
    }
    assert!(text.contains("every agent (catch-all)"));
    assert!(text.contains("\"extensions.yaml\" (text/yaml"));
    assert!(text.contains("valid: 4 groups"));
    // Hashes are 64 hex digits.
    let hashes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("config hash"))
        .map(str::trim)
        .collect();
    assert_eq!(hashes.len(), 4);
    assert!(
        hashes
            .iter()
            .all(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    );
}

#[test]
fn the_current_directory_is_the_default_path() {
    let out = validate(&[], &example_repo());
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn a_broken_copy_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_dir(&example_repo(), &repo);
    edit(
        &repo.join("configs/app-agent.yaml"),
        "exporters: [otlp/gateway]",
        "exporters: [otlp/gw]",
    );
    edit(&repo.join("configs/common/extensions.yaml"), "  pprof:", "  pprof/:");
    edit(&repo.join("groups/infra-metrics-agents.yaml"), "bake: 2m", "bake: soon");
    edit(
        &repo.join("groups/edge-gateways.yaml"),
        "waves: [1, 2, 50%, 100%]",
        "waves: [1, 2, 50%]",
    );
    edit(
        &repo.join("groups/default.yaml"),
        "priority: -100",
        "priority: -100\nowner: sre",
    );
    edit(
        &repo.join("groups/default.yaml"),
        "configs/default.yaml",
        "configs/defaults.yaml",
    );

    let out = validate(&["repo"], dir.path());
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let expected = [
        "configs/app-agent.yaml:31:19: service.pipelines[\"traces\"].exporters[0]: exporter \"otlp/gw\" is not defined under exporters or connectors (group \"app-trace-agents\")",
        "configs/common/extensions.yaml:7:3: extensions[\"pprof/\"]: invalid component id: the name after '/' must not be empty",
        "configs/common/extensions.yaml:10:30: service.extensions[1]: extension \"pprof\" is not defined under extensions (groups \"app-trace-agents\", \"edge-gateways\", \"infra-metrics-agents\")",
        "groups/default.yaml:4:1: owner: unknown key (expected one of: description, priority, selector, config, rollout)",
        "groups/default.yaml:8:7: config[\"\"]: no such file: configs/defaults.yaml",
        "groups/edge-gateways.yaml:14:17: rollout.waves: the last wave must be 100% (the whole group), found 50%",
        "groups/infra-metrics-agents.yaml:12:9: rollout.bake: invalid duration \"soon\": expected number at 0 (examples: 30s, 5m, 1h 30m)",
    ];
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), expected);
    assert_eq!(stderr(&out).trim(), "invalid: 7 problems");
}

#[test]
fn rev_validates_the_committed_tree_not_the_work_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_dir(&example_repo(), &root.join("fleet-config"));
    std::fs::write(root.join("README.md"), "monorepo\n").unwrap();
    let repo = Repository::init(root).unwrap();
    let good = commit_all(&repo, "valid config");

    // Break the work tree without committing: only the disk is invalid.
    edit(
        &root.join("fleet-config/groups/default.yaml"),
        "priority: -100",
        "priority: low",
    );
    let at_head = validate(&[".", "--rev", "HEAD", "--path", "fleet-config"], root);
    assert_eq!(
        at_head.status.code(),
        Some(0),
        "{}{}",
        stdout(&at_head),
        stderr(&at_head)
    );
    assert!(stdout(&at_head).starts_with(&format!("commit {good}\n")));
    let on_disk = validate(&[".", "--path", "fleet-config"], root);
    assert_eq!(on_disk.status.code(), Some(1));
    assert_eq!(
        stdout(&on_disk),
        "fleet-config/groups/default.yaml:3:11: priority: expected an integer, found \"low\"\n",
        "paths are relative to the repository root"
    );

    // Commit the breakage: HEAD is invalid, the commit before it still valid.
    commit_all(&repo, "break it");
    let broken = validate(&["--rev", "HEAD", "--path", "fleet-config/"], root);
    assert_eq!(broken.status.code(), Some(1));
    assert_eq!(stdout(&broken), stdout(&on_disk));
    let previous = validate(&["--rev", "HEAD~1", "--path", "fleet-config"], root);
    assert_eq!(previous.status.code(), Some(0), "{}", stdout(&previous));
    let by_id = validate(&["--rev", &good.to_string(), "--path", "fleet-config"], root);
    assert_eq!(by_id.status.code(), Some(0));

    // Without --path the repository root holds no groups/.
    let no_groups = validate(&["--rev", "HEAD"], root);
    assert_eq!(no_groups.status.code(), Some(1));
    assert_eq!(
        stdout(&no_groups),
        "groups:0:0: no group files: add at least one groups/<name>.yaml\n"
    );
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["does-not-exist"], "error: no such directory: does-not-exist"),
        (&[".", "--rev", "HEAD"], "is not a git repository"),
        (&[".", "--path", "nope"], "error: no such directory: ./nope"),
        (&["--bogus-flag"], "unexpected argument '--bogus-flag'"),
    ];
    for (args, message) in cases {
        let out = validate(args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }

    let repo = Repository::init(dir.path()).unwrap();
    std::fs::write(dir.path().join("x"), "x").unwrap();
    commit_all(&repo, "one");
    for (args, message) in [
        (
            &["--rev", "no-such-branch"][..],
            "error: no such revision: no-such-branch",
        ),
        (
            &["--rev", "HEAD", "--path", "missing"],
            "error: no directory missing in commit",
        ),
    ] {
        let out = validate(args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
}
