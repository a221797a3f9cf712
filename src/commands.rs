//! The `validate`, `rollout` and `status` commands: small enough to share a
//! file, each maps its outcome to the exit code the CLI documents.

use std::path::PathBuf;
use std::process::ExitCode;

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

/// `validate`: 0 valid (with a summary), 1 invalid (every problem on
/// stdout, paths relative to the repository root), 2 when the repository
/// cannot be read at all.
pub fn validate(args: ValidateArgs) -> ExitCode {
    use crate::desired::{self, DiskSource, LoadErrors};
    use crate::gitsrc::tree::TreeSource;

    let usage = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    };
    let root = args.path.unwrap_or_else(|| PathBuf::from("."));
    if !root.is_dir() {
        return usage(format!("no such directory: {}", root.display()));
    }
    let subdir = match args.subdir.as_deref().map(|p| p.to_str()) {
        None => None,
        Some(Some(s)) => desired::normalize_subdir(s),
        Some(None) => return usage("--path must be valid UTF-8".to_string()),
    };
    let loaded = match &args.rev {
        Some(rev) => match TreeSource::open(&root, rev, subdir.as_deref()) {
            Ok(source) => {
                let commit = source.commit().clone();
                desired::load(&source, Some(commit))
            }
            Err(e) => return usage(e.to_string()),
        },
        None => {
            let dir = subdir.as_ref().map_or_else(|| root.clone(), |s| root.join(s));
            if !dir.is_dir() {
                return usage(format!("no such directory: {}", dir.display()));
            }
            match DiskSource::new(&dir) {
                Ok(source) => desired::load(&source, None),
                Err(e) => return usage(e.to_string()),
            }
        }
    };
    match loaded {
        Ok(state) => {
            if let Some(commit) = &state.commit {
                println!("commit {commit}");
            }
            print!("{}", desired::summary::summary(&state));
            ExitCode::SUCCESS
        }
        Err(LoadErrors::Invalid(diagnostics)) => {
            for d in &diagnostics {
                println!("{}", d.under(subdir.as_deref()));
            }
            let n = diagnostics.len();
            eprintln!("invalid: {n} problem{}", if n == 1 { "" } else { "s" });
            ExitCode::from(1)
        }
        Err(LoadErrors::Source(e)) => usage(e.to_string()),
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
