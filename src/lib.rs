//! opamp-gitops: a GitOps controller and OpAMP server for fleets of
//! OpenTelemetry Collectors.

pub mod cli;
pub mod desired;
pub mod gitsrc;
pub mod model;
pub mod notes;
pub mod opamp;
pub mod simulate;
