use std::process::ExitCode;

use clap::Parser;

/// jemalloc, with two arenas, and pages that stay unused for a second given
/// back by a background thread: after a rollout's burst of messages the
/// resident set falls back to what the agents hold. See `docs/operations.md`,
/// "Memory".
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its settings from this `const char *`.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: ConfPtr =
    ConfPtr(c"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

#[cfg(feature = "jemalloc")]
#[repr(transparent)]
struct ConfPtr(*const std::ffi::c_char);

// SAFETY: it points to a string literal, which nothing writes.
#[cfg(feature = "jemalloc")]
unsafe impl Sync for ConfPtr {}

fn main() -> ExitCode {
    // SAFETY: it runs first in main, before any thread that may use git is spawned.
    unsafe { opamp_gitops::gitsrc::set_process_limits() };
    opamp_gitops::cli::run(opamp_gitops::cli::Cli::parse())
}
