//! The integration tests, linked into one binary: each module was a test
//! file of its own, and `common` is the harness they share (the controller
//! in-process or as a child process, OpAMP clients, git fixtures). Only
//! `tests/limits.rs` runs in a process of its own: it takes nearly every
//! file descriptor its process may open.

mod common;

mod agent_auth;
mod alert_rules;
mod api_wait;
mod cluster_e2e;
mod demo;
mod gitsrc;
mod interop_supervisor;
mod notes_e2e;
mod notify_e2e;
mod opamp_cli;
mod opamp_fleet;
mod opamp_shutdown;
mod opamp_transport;
mod plan_cmd;
mod readme;
mod rollout_e2e;
mod rollout_restart;
mod rollout_supervisor;
mod serve_start;
mod simulate_cli;
mod simulate_e2e;
mod tls;
mod validate;
mod web;
