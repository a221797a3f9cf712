//! Rollout status as git notes: the note format (pure) and the writer task.

pub mod format;
pub mod status;
pub mod writer;
