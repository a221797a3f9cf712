//! `serve` stops at once, with exit code 2 and the reason, on a repository
//! setting that no retry can heal; and reads a folder inside a repository as
//! that repository with `--path`.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use common::gitops::{GitRepo, collector_config};
use common::process::free_addr;
use common::{DEADLINE, stderr};

/// `serve` with `args`, which must end on its own within the deadline.
fn serve_ends(args: &[&str], cwd: &Path) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
        .arg("serve")
        .args(args)
        .args(["--opamp-listen", &free_addr().to_string()])
        .args(["--api-listen", &free_addr().to_string()])
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().expect("serve is waited for")));
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out,
        Err(_) => {
            let _ = Command::new("kill").args(["-s", "KILL", &pid.to_string()]).status();
            panic!("serve {args:?} did not stop on its own")
        }
    }
}

fn assert_refused(out: &Output, message: &str) {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(out));
    assert!(
        stderr(out).contains(message),
        "expected {message:?} in: {}",
        stderr(out)
    );
}

#[test]
fn a_path_that_does_not_exist_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_ends(&["--repo", "./no-such-repo"], dir.path());
    assert_refused(
        &out,
        "error: ./no-such-repo: no such file or directory (give the path of a git repository, or its URL)",
    );
}

#[test]
fn a_folder_outside_any_repository_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("configs")).unwrap();
    let out = serve_ends(&["--repo", "configs"], dir.path());
    assert_refused(&out, "error: configs: not a git repository, nor a folder inside one");
}

#[test]
fn an_unknown_url_scheme_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_ends(&["--repo", "htp://x/y"], dir.path());
    assert_refused(&out, "error: unsupported URL scheme \"htp\" in htp://x/y");
}

#[test]
fn a_branch_or_path_the_repository_lacks_is_refused() {
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("a"), "first");
    let path = repo.path().to_str().unwrap();
    let out = serve_ends(&["--repo", path, "--branch", "nope"], repo.path());
    assert_refused(&out, "error: branch nope not found in");
    let out = serve_ends(&["--repo", path, "--path", "fleet"], repo.path());
    assert_refused(&out, "error: --path fleet: no such folder at the tip of branch");
}

#[test]
fn a_listen_address_that_is_not_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
        .args(["serve", "--opamp-listen", "localhost"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_refused(&out, "invalid value 'localhost' for '--opamp-listen <OPAMP_LISTEN>'");
}

#[test]
fn a_remote_without_the_branch_stops_serve_at_its_first_answer() {
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("a"), "first");
    let state = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo.path().display());
    let out = serve_ends(
        &[
            "--repo",
            &url,
            "--branch",
            "nope",
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
        state.path(),
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("the git task stopped unexpectedly (it failed: branch nope not found in file://"),
        "{}",
        stderr(&out)
    );
}
