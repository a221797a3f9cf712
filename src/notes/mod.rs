//! Rollout status as git notes: the note format and what a run of notes
//! remembers (pure), and the writer task.

pub mod format;
pub mod remembered;
pub mod status;
pub mod writer;
