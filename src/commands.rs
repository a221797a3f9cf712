//! The `validate`, `rollout` and `status` commands: small enough to share a
//! file, each maps its outcome to the exit code the CLI documents. `validate
//! --collector` runs the collector here; what its refusals mean is decided in
//! `desired::merged`.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use crate::cli::{RolloutAction, RolloutArgs, StatusArgs, StatusFormat, ValidateArgs};
use crate::gitsrc::notes::{Author, NotesError, NotesStore};
use crate::notes::status;

/// `rollout pause|resume|promote`: prints the group's rollout afterwards;
/// exit 1 when the controller refuses (unknown group, no rollout in
/// progress), 2 when it cannot be reached.
pub fn rollout(args: &RolloutArgs) -> ExitCode {
    let action = match args.action {
        RolloutAction::Pause => "pause",
        RolloutAction::Resume => "resume",
        RolloutAction::Promote => "promote",
    };
    let path = format!("/api/v1/groups/{}/{action}", args.group);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let answer = runtime.block_on(async {
        let uri = crate::api_client::url(&args.server, &path)?;
        crate::api_client::call(http::Method::POST, uri).await
    });
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let why = json["error"].as_str().map_or_else(|| status.to_string(), String::from);
        eprintln!("error: {action} {}: {why}", args.group);
        return ExitCode::from(if status.is_client_error() { 1 } else { 2 });
    }
    let r = &json["rollout"];
    println!(
        "{}: {action} accepted; phase {}, wave {}/{}, {} of {} agents applied",
        args.group,
        r["phase"].as_str().unwrap_or("?"),
        r["wave"],
        r["waves"],
        json["agents"]["applied"],
        json["agents"]["targeted"]
    );
    ExitCode::SUCCESS
}

/// Why `path` cannot be read as a folder, and what to give instead.
fn not_a_folder(path: &std::path::Path, wanted: &str) -> String {
    let problem = if path.exists() {
        "not a folder"
    } else {
        "no such folder"
    };
    format!("{}: {problem} (validate takes {wanted})", path.display())
}

/// `validate`: 0 valid (with a summary), 1 invalid (every problem on
/// stdout, paths relative to the repository root), 2 when the repository
/// cannot be read at all. With `--collector`, a valid repository is also
/// valid only if the collector accepts every group's merged config; 2 when
/// the collector cannot be run.
pub fn validate(args: ValidateArgs) -> ExitCode {
    use crate::desired::{self, DiskSource, FileSource, LoadErrors, MergedConfigs};
    use crate::gitsrc::tree::TreeSource;

    let usage = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    };
    let root = args.path.unwrap_or_else(|| PathBuf::from("."));
    if !root.is_dir() {
        return usage(not_a_folder(&root, "the repository's folder"));
    }
    let subdir = match args.subdir.as_deref().map(|p| p.to_str()) {
        None => None,
        Some(Some(s)) => desired::normalize_subdir(s),
        Some(None) => return usage("--path must be valid UTF-8".to_string()),
    };
    let with_merged = args.collector.is_some();
    let load = |source: &dyn FileSource, commit| {
        if with_merged {
            desired::load_merged(source, commit)
        } else {
            desired::load(source, commit).map(|state| (state, MergedConfigs::new()))
        }
    };
    let loaded = match &args.rev {
        Some(rev) => match TreeSource::open(&root, rev, subdir.as_deref()) {
            Ok(source) => {
                let commit = source.commit().clone();
                load(&source, Some(commit))
            }
            Err(e) => return usage(e.to_string()),
        },
        None => {
            let dir = subdir.as_ref().map_or_else(|| root.clone(), |s| root.join(s));
            if !dir.is_dir() {
                return usage(not_a_folder(&dir, "the folder that holds fleet.yaml and groups/"));
            }
            match DiskSource::new(&dir) {
                Ok(source) => load(&source, None),
                Err(e) => return usage(e.to_string()),
            }
        }
    };
    match loaded {
        Ok((state, merged)) => {
            let accepted_by = match &args.collector {
                None => None,
                Some(bin) => match collector_checks(bin, args.collector_timeout, &merged) {
                    Ok(CollectorChecks { version, refusals }) if refusals.is_empty() => Some(version),
                    Ok(CollectorChecks { refusals, .. }) => {
                        for r in &refusals {
                            for line in r.lines(subdir.as_deref()) {
                                println!("{line}");
                            }
                        }
                        eprintln!(
                            "invalid: the collector refuses {} of {} group{}",
                            refusals.len(),
                            merged.len(),
                            if merged.len() == 1 { "" } else { "s" }
                        );
                        return ExitCode::from(1);
                    }
                    Err(message) => return usage(message),
                },
            };
            if let Some(commit) = &state.commit {
                println!("commit {commit}");
            }
            print!("{}", desired::summary::summary(&state));
            if let Some(version) = accepted_by {
                println!("collector: {version} accepts every group's merged config");
            }
            ExitCode::SUCCESS
        }
        Err(LoadErrors::Invalid(diagnostics)) => {
            for d in &diagnostics {
                println!("{}", d.under(subdir.as_deref()));
            }
            let n = diagnostics.len();
            eprintln!("invalid: {n} problem{}", if n == 1 { "" } else { "s" });
            if args.collector.is_some() {
                eprintln!("(the collector was not run: fix these first)");
            }
            ExitCode::from(1)
        }
        Err(LoadErrors::Source(e)) => usage(e.to_string()),
    }
}

/// What an unset environment variable a config references is set to while
/// the collector validates it: unset, the collector would read an empty
/// value, and refuse an empty endpoint that a deployment does set.
const ENV_PLACEHOLDER: &str = "placeholder";

struct CollectorChecks {
    /// The collector's `--version` line.
    version: String,
    refusals: Vec<crate::desired::Refusal>,
}

/// Runs `BIN validate --config=FILE` on each group's merged config, one
/// group at a time, with progress on stderr. `Err` when the collector cannot
/// be run (no such file, not executable, stuck, crashed).
fn collector_checks(
    bin: &Path,
    timeout: Duration,
    merged: &crate::desired::MergedConfigs,
) -> Result<CollectorChecks, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let shown = bin.display();

    let version = runtime.block_on(run(bin, &["--version".into()], &[], timeout))?;
    if !version.status.success() {
        return Err(format!(
            "{shown} --version failed ({}): {}; is it an OpenTelemetry Collector?",
            version.status,
            one_line(&version.stderr)
        ));
    }
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let version = if version.is_empty() { shown.to_string() } else { version };

    let dir = TempDir::new().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let mut refusals = Vec::new();
    for (name, config) in merged {
        let file = dir.path.join(format!("{name}.yaml"));
        std::fs::write(&file, config.yaml()).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let placeholders: Vec<(String, String)> = config
            .env_vars()
            .into_iter()
            .filter(|v| std::env::var_os(v).is_none())
            .map(|v| (v, ENV_PLACEHOLDER.to_string()))
            .collect();
        let note = match placeholders.len() {
            0 => String::new(),
            _ => {
                let names: Vec<&str> = placeholders.iter().map(|(v, _)| v.as_str()).collect();
                format!(" ({ENV_PLACEHOLDER:?} for unset {})", names.join(", "))
            }
        };
        eprintln!("checking {name} with {shown}…{note}");
        let args = ["validate".to_string(), format!("--config={}", file.display())];
        let out = runtime
            .block_on(run(bin, &args, &placeholders, timeout))
            .map_err(|e| format!("{e} (checking group {name})"))?;
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                let text = if out.stderr.iter().all(u8::is_ascii_whitespace) {
                    &out.stdout
                } else {
                    &out.stderr
                };
                refusals.push(config.refusal(&String::from_utf8_lossy(text)));
            }
            _ => {
                return Err(format!(
                    "{shown} validate stopped with {} checking group {name}: {}",
                    out.status,
                    one_line(&out.stderr)
                ));
            }
        }
    }
    Ok(CollectorChecks { version, refusals })
}

/// Runs the collector with `args` and extra environment variables; `Err`
/// when it cannot be started or does not finish within `timeout` (then it
/// is killed).
async fn run(
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let shown = bin.display();
    let child = tokio::process::Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, child).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "cannot run the collector {shown}: no such file (give the path of an OpenTelemetry Collector binary with the components the fleet runs)"
            ),
            std::io::ErrorKind::PermissionDenied => {
                format!("cannot run the collector {shown}: permission denied (is it an executable file?)")
            }
            _ => format!("cannot run the collector {shown}: {e}"),
        }),
        Err(_) => Err(format!(
            "the collector {shown} did not finish `{}` within {} and was stopped",
            args.join(" "),
            humantime::format_duration(timeout)
        )),
    }
}

fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        "no message".to_string()
    } else {
        lines.join(" ")
    }
}

/// A private directory for the merged configs, removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let base = std::env::temp_dir();
        let mut attempt = 0u32;
        loop {
            let path = base.join(format!("opamp-gitops-validate-{}-{attempt}", std::process::id()));
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `status`: the rollout history of recent commits, read from the notes.
pub fn status(args: &StatusArgs) -> Result<String, NotesError> {
    let store = NotesStore::new(&args.repo, args.fetch.clone(), Author::default());
    store.fetch()?;
    let rows = status::collect(store.history(&args.rev, args.limit)?);
    Ok(match args.format {
        StatusFormat::Json => status::render_json(&rows) + "\n",
        StatusFormat::Text => status::render_text(&rows),
    })
}
