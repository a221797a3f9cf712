//! `opamp-gitops plan`: what a commit would do to the fleet before it is
//! merged. It loads the commit's desired state, picks each group's stable
//! config (from the notes, the first parent, or `--base`), reads the agents
//! (from a controller's API or a file in its format), and prints which groups
//! change, the file diffs, and which agents each wave would reach in the
//! canary order the controller uses. The rules are in `docs/plan.md`.

pub mod fleet;
pub mod history;
pub mod render;
pub mod report;

use std::process::ExitCode;

use crate::cli::{PlanArgs, PlanFormat};
use crate::desired::{Diagnostic, Validated, normalize_subdir};
use fleet::{FleetAgent, FleetError};
use history::{HISTORY_LIMIT, HistoryError, Repo};
use report::{BaseInfo, BaselineSource, Inputs, Report};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The commit fails validation; every problem, as `validate` prints them.
    #[error("the commit is not valid ({} problems)", .0.len())]
    Invalid(Vec<Diagnostic>),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

/// The agents: from `--fleet FILE` or `--server URL`.
pub enum FleetFrom<'a> {
    File(&'a std::path::Path),
    Server(&'a str),
}

/// Computes the plan (blocking: git, and the HTTP request on a small runtime).
pub fn plan(args: &PlanArgs) -> Result<Report, PlanError> {
    let subdir = subdir(args);
    if !args.repo.is_dir() {
        return Err(PlanError::Usage(format!("no such directory: {}", args.repo.display())));
    }
    let mut repo = Repo::new(&args.repo, subdir.clone());
    let target = match repo.load_rev(&args.rev)? {
        Validated::Valid(state) => state,
        Validated::Invalid(problems) => return Err(PlanError::Invalid(problems)),
    };
    let target_commit = target
        .commit
        .clone()
        .ok_or_else(|| PlanError::Usage("the commit has no id".into()))?;

    let mut warnings = Vec::new();
    let history = repo.first_parents(target_commit.as_str(), HISTORY_LIMIT, &mut warnings)?;
    let ancestors = history.get(1..).unwrap_or_default();
    let (previous, base) = match &args.base {
        Some(rev) => {
            // Resolve through the tree reader so a bad --base says "no such revision".
            let resolved = crate::gitsrc::tree::TreeSource::open(&args.repo, rev, None)
                .map_err(HistoryError::from)?
                .commit()
                .clone();
            let base_history = repo.first_parents(resolved.as_str(), HISTORY_LIMIT, &mut Vec::new())?;
            let previous = repo.newest_valid(&base_history)?;
            note_skipped_invalid(
                &mut warnings,
                "--base",
                base_history.first().map(|h| &h.0),
                previous.as_deref(),
            );
            let base = BaseInfo {
                kind: BaselineSource::Base,
                rev: Some(rev.clone()),
                commit: previous.as_ref().and_then(|p| p.commit.clone()),
            };
            (previous, base)
        }
        None => {
            let previous = repo.newest_valid(ancestors)?;
            note_skipped_invalid(
                &mut warnings,
                "first parent",
                ancestors.first().map(|h| &h.0),
                previous.as_deref(),
            );
            let base = BaseInfo {
                kind: BaselineSource::FirstParent,
                rev: None,
                commit: previous.as_ref().and_then(|p| p.commit.clone()),
            };
            (previous, base)
        }
    };
    let stable = history::stable_configs(
        &mut repo,
        &target,
        previous.as_deref(),
        ancestors,
        args.base.is_some(),
        &mut warnings,
    )?;

    let agents = match (&args.fleet, &args.server) {
        (Some(path), _) => load_agents(FleetFrom::File(path))?,
        (None, Some(server)) => load_agents(FleetFrom::Server(server))?,
        (None, None) => return Err(PlanError::Usage("give --server URL or --fleet FILE".into())),
    };
    let inputs = Inputs {
        target: &target,
        previous: previous.as_deref(),
        stable: &stable,
        agents: &agents,
    };
    Ok(report::build(&inputs, base, warnings))
}

/// `--path`, as the loaders take it; `None` for the repository root.
fn subdir(args: &PlanArgs) -> Option<String> {
    args.subdir.as_deref().and_then(normalize_subdir)
}

/// Says so when the commit compared with is not the one named, because that
/// one (and maybe more) failed validation and was never rolled out.
fn note_skipped_invalid(
    warnings: &mut Vec<String>,
    what: &str,
    named: Option<&crate::model::CommitId>,
    used: Option<&crate::desired::DesiredState>,
) {
    let Some(named) = named else { return };
    let used = used.and_then(|l| l.commit.as_ref());
    if used != Some(named) {
        warnings.push(match used {
            Some(u) => format!(
                "the {what} {} is not valid (never rolled out); compared with {}, the newest valid commit before it",
                named.short(),
                u.short()
            ),
            None => format!(
                "the {what} {} is not valid and no valid commit precedes it within {HISTORY_LIMIT} commits; every group is new",
                named.short()
            ),
        });
    }
}

/// Reads the agent list (a request to a server runs on a small runtime).
pub fn load_agents(from: FleetFrom<'_>) -> Result<Vec<FleetAgent>, PlanError> {
    match from {
        FleetFrom::File(path) => Ok(fleet::read_file(path)?),
        FleetFrom::Server(url) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(PlanError::Runtime)?;
            Ok(runtime.block_on(fleet::fetch(url))?)
        }
    }
}

/// `plan`: 0 with the plan printed (changes or not), 1 when the commit is
/// invalid (every problem printed), 2 on usage and I/O errors.
pub fn command(args: &PlanArgs) -> ExitCode {
    match plan(args) {
        Ok(report) => {
            let out = match args.format {
                PlanFormat::Text => render::text(&report),
                PlanFormat::Markdown => render::markdown(&report),
                PlanFormat::Json => render::json(&report),
            };
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(PlanError::Invalid(diagnostics)) => {
            let subdir = subdir(args);
            for d in &diagnostics {
                println!("{}", d.under(subdir.as_deref()));
            }
            let n = diagnostics.len();
            eprintln!("invalid: {n} problem{} at {}", if n == 1 { "" } else { "s" }, args.rev);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
