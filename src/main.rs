use std::process::ExitCode;

use clap::Parser;

/// A git server that accepts a connection and then says nothing would hold a
/// fetch (and every sync waiting on it) forever: libgit2 has no network
/// timeouts unless told.
const GIT_CONNECT_TIMEOUT_MS: i32 = 15_000;
const GIT_IO_TIMEOUT_MS: i32 = 60_000;

fn main() -> ExitCode {
    // SAFETY: these set libgit2 globals without synchronization; they run
    // first in main, before any thread is spawned.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(GIT_CONNECT_TIMEOUT_MS);
        let _ = git2::opts::set_server_timeout_in_milliseconds(GIT_IO_TIMEOUT_MS);
    }
    opamp_gitops::cli::run(opamp_gitops::cli::Cli::parse())
}
