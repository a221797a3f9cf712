use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SAFETY: it runs first in main, before any thread is spawned.
    unsafe { opamp_gitops::gitsrc::set_process_limits() };
    opamp_gitops::cli::run(opamp_gitops::cli::Cli::parse())
}
