//! `opamp-gitops validate` as a user runs it: the built binary against the
//! example repository, broken copies of it, and real git repositories.

use crate::common;

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
        "groups/edge-gateways.yaml:12:17: rollout.waves: the last wave must be 100% (the whole group), found 50%",
        "groups/infra-metrics-agents.yaml:12:9: rollout.bake: invalid duration \"soon\": expected number at 0 (examples: 30s, 5m, 1h 30m)",
    ];
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), expected);
    assert_eq!(stderr(&out).trim(), "invalid: 7 problems");
}

#[test]
fn a_core_tag_the_collector_would_refuse_is_reported_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_dir(&example_repo(), &repo);
    edit(
        &repo.join("configs/gateway.yaml"),
        "    endpoint: otlp.observability.example.com:4317",
        "    endpoint: !!int otlp.observability.example.com:4317",
    );
    let out = validate(&["repo"], dir.path());
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "configs/gateway.yaml:21:21: !!int does not fit \"otlp.observability.example.com:4317\", which reads as text (the collector refuses it; remove the tag or fix the value)\n"
    );
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
        (
            &["does-not-exist"],
            "error: does-not-exist: no such folder (validate takes the repository's folder)",
        ),
        (
            &["/etc/passwd"],
            "error: /etc/passwd: not a folder (validate takes the repository's folder)",
        ),
        (&[".", "--rev", "HEAD"], "is not a git repository"),
        (
            &[".", "--path", "nope"],
            "error: ./nope: no such folder (validate takes the folder that holds fleet.yaml and groups/)",
        ),
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

// ------------------------------------------------------ validate --collector

/// The small collector `interop/build.sh` builds (OTELCOL_BIN when set): it
/// has the opamp, health_check and pprof extensions, the otlp and nop
/// receivers, the debug, nop and otlp exporters, and the batch and
/// memory_limiter processors.
fn otelcol() -> PathBuf {
    let bin = std::env::var_os("OTELCOL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/bin/otelcol"));
    assert!(
        bin.is_file(),
        "no collector at {}: run interop/build.sh to build it (or set OTELCOL_BIN to an OpenTelemetry Collector binary)",
        bin.display()
    );
    bin
}

/// `validate` with `BACKEND_TOKEN` (which the gateway config references)
/// set to `token`, or unset.
fn validate_with_token(args: &[&str], cwd: &Path, token: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_opamp-gitops"));
    cmd.arg("validate").args(args).current_dir(cwd);
    match token {
        Some(t) => cmd.env("BACKEND_TOKEN", t),
        None => cmd.env_remove("BACKEND_TOKEN"),
    };
    cmd.output().expect("the binary runs")
}

/// A copy of the example repository whose every component the small
/// collector has: the infra agents scrape no host metrics.
fn covered_example(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    copy_dir(&example_repo(), &repo);
    let infra = repo.join("configs/infra-metrics.yaml");
    edit(
        &infra,
        "  hostmetrics:\n    collection_interval: 30s\n    scrapers:\n      cpu: {}\n      memory: {}\n      \
         disk: {}\n      filesystem: {}\n      load: {}\n      network: {}\n",
        "",
    );
    edit(&infra, "receivers: [hostmetrics, otlp]", "receivers: [otlp]");
    repo
}

#[test]
fn the_collector_accepts_a_repository_whose_components_it_has() {
    let bin = otelcol();
    let bin = bin.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    covered_example(dir.path());

    let out = validate_with_token(&["repo", "--collector", bin], dir.path(), None);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("valid: 4 groups"), "{text}");
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("collector: otelcol version ") && last.ends_with(" accepts every group's merged config"),
        "{text}"
    );
    let dots = "\u{2026}";
    assert_eq!(
        stderr(&out),
        format!(
            "checking app-trace-agents with {bin}{dots}\n\
             checking default with {bin}{dots}\n\
             checking edge-gateways with {bin}{dots} (\"placeholder\" for unset BACKEND_TOKEN)\n\
             checking infra-metrics-agents with {bin}{dots}\n"
        ),
        "progress per group, and which variables stood in"
    );

    // A variable set in the environment is passed through as it is.
    let out = validate_with_token(&["repo", "--collector", bin], dir.path(), Some("t0ken"));
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(!stderr(&out).contains("placeholder"), "{}", stderr(&out));

    // The same from a commit, in a subdirectory.
    let git = Repository::init(dir.path()).unwrap();
    let commit = commit_all(&git, "fleet config");
    let out = validate_with_token(
        &["--rev", "HEAD", "--path", "repo", "--collector", bin],
        dir.path(),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).starts_with(&format!("commit {commit}\n")));
}

#[test]
fn the_collector_refuses_bad_settings_and_each_points_at_its_file_and_line() {
    let bin = otelcol();
    let bin = bin.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = covered_example(dir.path());
    // Settings our own checks have no opinion on; the collector does.
    let gateway = repo.join("configs/gateway.yaml");
    let default = repo.join("configs/default.yaml");
    edit(&gateway, "check_interval: 1s", "check_interval: 0s");
    edit(&default, "verbosity: basic", "verbosity: loud");
    let own = validate(&["repo"], dir.path());
    assert_eq!(own.status.code(), Some(0), "our own checks pass: {}", stdout(&own));

    let out = validate(&["repo", "--collector", bin], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let expected = [
        (
            "groups/default.yaml: collector refuses the merged config: ",
            "'verbosity' unknown metrics level \"loud\"",
        ),
        (
            "configs/default.yaml:19:3: exporters::debug: ",
            "'verbosity' unknown metrics level \"loud\" (group \"default\")",
        ),
        (
            "groups/edge-gateways.yaml: collector refuses the merged config: ",
            "processors::memory_limiter: 'check_interval' must be greater than zero",
        ),
        (
            "configs/gateway.yaml:10:3: processors::memory_limiter: ",
            "'check_interval' must be greater than zero (group \"edge-gateways\")",
        ),
    ];
    assert_eq!(lines.len(), expected.len(), "{text}");
    for (line, (start, end)) in lines.iter().zip(expected) {
        assert!(line.starts_with(start) && line.ends_with(end), "{line:?} in:\n{text}");
    }
    assert!(
        stderr(&out).ends_with("invalid: the collector refuses 2 of 4 groups\n"),
        "{}",
        stderr(&out)
    );

    // A shared file's problem is reported for every group, at the shared file.
    edit(&gateway, "check_interval: 0s", "check_interval: 1s");
    edit(&default, "verbosity: loud", "verbosity: basic");
    edit(
        &repo.join("configs/common/extensions.yaml"),
        "endpoint: localhost:1777",
        "endpoint: localhost:1777\n    block_profile_fraction: lots",
    );
    let out = validate(&["repo", "--collector", bin], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let groups: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("configs/common/extensions.yaml:7:3: extensions::pprof: "))
        .filter_map(|l| l.rsplit_once(" (group ").map(|(_, g)| g))
        .collect();
    assert_eq!(
        groups,
        [
            "\"app-trace-agents\")",
            "\"default\")",
            "\"edge-gateways\")",
            "\"infra-metrics-agents\")"
        ],
        "{text}"
    );
}

#[test]
fn a_component_the_collector_lacks_is_named_with_its_file_and_line() {
    // The example's infra agents scrape host metrics: the small collector
    // has no hostmetrics receiver.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_repo(), &dir.path().join("repo"));
    let out = validate(&["repo", "--collector", otelcol().to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("groups/infra-metrics-agents.yaml: collector refuses the merged config: ")
            && lines[0].contains("'receivers' unknown type: \"hostmetrics\" for id: \"hostmetrics\""),
        "{text}"
    );
    assert!(
        lines[1].starts_with(
            "configs/infra-metrics.yaml:2:3: receivers::hostmetrics: 'receivers' unknown type: \"hostmetrics\""
        ) && lines[1].ends_with(" (group \"infra-metrics-agents\")"),
        "{text}"
    );
    assert!(stderr(&out).ends_with("invalid: the collector refuses 1 of 4 groups\n"));
}

#[test]
fn an_invalid_repository_is_not_given_to_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let repo = covered_example(dir.path());
    edit(&repo.join("groups/default.yaml"), "priority: -100", "priority: low");
    let out = validate(&["repo", "--collector", "/no/such/otelcol"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "groups/default.yaml:3:11: priority: expected an integer, found \"low\"\n"
    );
    assert_eq!(
        stderr(&out),
        "invalid: 1 problem\n(the collector was not run: fix these first)\n"
    );
}

#[test]
fn a_collector_that_cannot_be_run_is_exit_2_with_a_message() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    covered_example(dir.path());
    let script = |name: &str, body: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let collector = |on_validate: &str| {
        format!("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'otelcol version 0'; exit 0; fi\n{on_validate}\n")
    };
    let not_executable = script("plain-file", &collector("exit 0"), 0o644);
    let not_a_collector = script("not-a-collector", "#!/bin/sh\necho 'unknown flag' >&2\nexit 2\n", 0o755);
    // Stuck until the timeout stops it (exec: the shell becomes the waiting process).
    let stuck = script("stuck", &collector("exec tail -f /dev/null"), 0o755);
    let crashes = script("crashes", &collector("echo 'panic: oops' >&2; exit 2"), 0o755);
    let missing = dir.path().join("no-such-otelcol");
    let missing = missing.to_str().unwrap();
    let cases: &[(&str, &[&str], String)] = &[
        (
            "no such file",
            &[missing],
            format!("error: cannot run the collector {missing}: no such file"),
        ),
        (
            "not executable",
            &[&not_executable],
            format!("error: cannot run the collector {not_executable}: permission denied"),
        ),
        (
            "not a collector",
            &[&not_a_collector],
            format!(
                "error: {not_a_collector} --version failed (exit status: 2): unknown flag; is it an OpenTelemetry Collector?"
            ),
        ),
        (
            "stuck",
            &[&stuck, "--collector-timeout", "1s"],
            format!("error: the collector {stuck} did not finish `validate --config="),
        ),
        (
            "crashes",
            &[&crashes],
            format!(
                "error: {crashes} validate stopped with exit status: 2 checking group app-trace-agents: panic: oops"
            ),
        ),
    ];
    for (name, args, message) in cases {
        let args = [&["repo", "--collector"][..], args].concat();
        let out = validate(&args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(message.as_str()), "{name}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{name}: {}", stdout(&out));
    }
}

/// Our check of core tags agrees with the collector's YAML parser, value by
/// value: `validate` refuses exactly the tagged values the collector's parser
/// refuses (its other complaints, such as the unknown top-level key that
/// holds the value, do not count here).
#[test]
fn core_tags_are_judged_as_the_collector_judges_them() {
    let bin = otelcol();
    let dir = tempfile::tempdir().unwrap();
    let values = [
        "!!int 4317",
        "!!int gateway:4317",
        "!!int 0x1F",
        "!!int 1.5",
        "!!int 1_000",
        "!!float 3",
        "!!float x",
        "!!bool true",
        "!!bool yes",
        "!!null ~",
        "!!null 0",
        "!!str 42",
        "!!binary aGVsbG8=",
        "!!binary not*base64",
        "!!timestamp 2001-12-14",
        "!!timestamp soon",
    ];
    for value in values {
        let repo = dir.path().join("repo");
        let _ = std::fs::remove_dir_all(&repo);
        std::fs::create_dir_all(repo.join("groups")).unwrap();
        std::fs::create_dir_all(repo.join("configs")).unwrap();
        std::fs::write(repo.join("groups/all.yaml"), "config:\n  \"\": configs/all.yaml\n").unwrap();
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc: {{}}\nexporters:\n  debug: {{}}\n\
             service:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n\
             x-unused: {value}\n"
        );
        std::fs::write(repo.join("configs/all.yaml"), &config).unwrap();
        let ours = validate(&["repo"], dir.path());
        let file = repo.join("configs/all.yaml");
        let theirs = std::process::Command::new(&bin)
            .args(["validate", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let refused_by_parser = String::from_utf8_lossy(&theirs.stderr).contains("cannot decode")
            || String::from_utf8_lossy(&theirs.stderr).contains("invalid base64");
        assert_eq!(
            ours.status.code() == Some(1),
            refused_by_parser,
            "{value}: ours {} / collector {}",
            stdout(&ours),
            String::from_utf8_lossy(&theirs.stderr)
        );
    }
}

/// A repository whose one group's config is a mapping of about `mb` MB.
fn large_config_repo(root: &Path, mb: usize) -> PathBuf {
    use std::fmt::Write;
    let repo = root.join(format!("repo-{mb}"));
    std::fs::create_dir_all(repo.join("groups")).unwrap();
    std::fs::create_dir_all(repo.join("configs")).unwrap();
    std::fs::write(repo.join("groups/all.yaml"), "config:\n  \"\": configs/all.yaml\n").unwrap();
    let mut config = String::from(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {}\nexporters:\n  debug: {}\n\
         service:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n\
         processors:\n  attributes/big:\n    settings:\n",
    );
    let mut i = 0;
    while config.len() < mb << 20 {
        let _ = writeln!(config, "      key_{i:09}: value_{i:09}");
        i += 1;
    }
    std::fs::write(repo.join("configs/all.yaml"), config).unwrap();
    repo
}

/// Validation takes time in proportion to the input: ten times the config
/// takes about ten times as long (a step quadratic in the size of one
/// mapping made it a hundred).
#[test]
fn validation_time_grows_linearly_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let timed = |mb: usize| {
        let repo = large_config_repo(dir.path(), mb);
        let start = std::time::Instant::now();
        let out = validate(&[repo.to_str().unwrap()], dir.path());
        let took = start.elapsed();
        if mb > 8 {
            // Too large to send to agents, but read and checked whole.
            assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
            assert!(
                stdout(&out).contains("over the limit of 8 MiB that agents are sent in one message"),
                "{}",
                stdout(&out)
            );
        } else {
            assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        }
        took
    };
    let small = timed(5);
    let large = timed(50);
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 20.0,
        "5 MB took {small:?}, 50 MB {large:?}: {ratio:.1} times as long"
    );
}

/// A symbolic link is refused with its place and what to do, on disk and at
/// a commit alike: git commits the link, so following it on disk would pass
/// a repository the controller then finds a file missing from.
#[test]
fn symbolic_links_are_refused_the_same_on_disk_and_at_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_dir(&example_repo(), root);
    std::fs::rename(
        root.join("configs/gateway.yaml"),
        root.join("configs/gateway-real.yaml"),
    )
    .unwrap();
    std::os::unix::fs::symlink("gateway-real.yaml", root.join("configs/gateway.yaml")).unwrap();
    let expected = "configs/gateway.yaml:1:1: a symbolic link (to gateway-real.yaml): git commits the link, \
                    not the file, and the controller reads no links; put the file itself here\n";
    let on_disk = validate(&["."], root);
    assert_eq!(on_disk.status.code(), Some(1), "{}", stderr(&on_disk));
    assert_eq!(stdout(&on_disk), expected);
    let repo = Repository::init(root).unwrap();
    commit_all(&repo, "with a link");
    let at_commit = validate(&[".", "--rev", "HEAD"], root);
    assert_eq!(at_commit.status.code(), Some(1), "{}", stderr(&at_commit));
    assert_eq!(stdout(&at_commit), expected);
}
