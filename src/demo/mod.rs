//! `opamp-gitops demo`: the guided tour. Everything runs in this process on
//! 127.0.0.1: a config repository in a temp dir, the controller reading it,
//! and simulated collectors over WebSocket. It commits a change, a broken
//! change and its revert, narrating what the controller does with each, then
//! shows the git notes. `tour.rs` runs it, waiting on what the controller
//! publishes (`wait.rs`); `narrate.rs` prints the story. Every wait has a
//! deadline; a step not reached in time ends the tour with what was expected
//! and what was seen.

mod files;
mod narrate;
mod progress;
mod repo;
mod tour;
mod wait;

use std::process::ExitCode;
use std::time::Duration;

use self::narrate::Narrator;
use self::repo::{DemoRepo, Workspace};
use self::tour::Tour;
use crate::app::AppError;
use crate::cli::DemoArgs;
use crate::gitsrc::SyncError;
use crate::gitsrc::notes::NotesError;
use crate::model::CommitId;
use crate::simulate::SimulateError;

/// Fewer agents than this cannot show a canary, a second wave and a catch-all.
const MIN_AGENTS: usize = 6;

/// The tour's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    pub keep: bool,
    /// Bake time of every wave.
    pub bake: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--agents must be at least {MIN_AGENTS} (a few gateways, app agents and others)")]
    TooFewAgents,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Git { what: String, source: git2::Error },
    #[error("the demo repository is invalid at {commit}:\n{problems}")]
    Invalid { commit: CommitId, problems: String },
    #[error("the demo's edit does not apply: {0}")]
    Edit(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Simulate(#[from] SimulateError),
    #[error("the controller could not fetch: {0}")]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Notes(#[from] NotesError),
    #[error("expected {expected} within {after:?}; it did not happen.\nLast seen:\n{seen}")]
    Timeout {
        expected: String,
        after: Duration,
        seen: String,
    },
    #[error("expected {expected}, but {found}")]
    Unexpected { expected: String, found: String },
}

/// The `demo` command: 0 when the tour ran to its end, 1 when a step failed, 2 for bad options.
pub fn command(args: &DemoArgs) -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        crate::cli::init_tracing();
    }
    let options = Options {
        agents: args.agents,
        keep: args.keep,
        bake: args.bake,
    };
    if options.agents < MIN_AGENTS {
        eprintln!("error: {}", DemoError::TooFewAgents);
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", DemoError::Runtime(e));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            narrate::gave_up();
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the whole tour.
pub async fn run(options: Options) -> Result<(), DemoError> {
    let workspace = Workspace::create(options.keep)?;
    let story = Narrator::begin();

    story.step(1, "A config repository in git");
    let repo = DemoRepo::init(&workspace.repo_dir())?;
    let c1 = tour::create_repository(&repo, &options, story)?;

    story.step(2, "The controller and a simulated fleet");
    let tour = Tour::start(&workspace, repo, options, story).await?;
    let outcome = tour.steps(&c1).await;
    story.step(7, "Stopping");
    let stopped = tour.stop().await;
    outcome?;
    stopped?;
    story.closing(workspace.root(), &workspace.repo_dir(), workspace.keep());
    Ok(())
}
