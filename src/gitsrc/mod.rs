//! The git source: the only place that touches git2.

pub mod notes;
pub mod tree;
