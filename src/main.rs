use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    opamp_gitops::cli::run(opamp_gitops::cli::Cli::parse())
}
