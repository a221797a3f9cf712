//! opamp-gitops: a GitOps controller and OpAMP server for fleets of
//! OpenTelemetry Collectors.

pub mod api;
pub mod api_client;
pub mod app;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod desired;
pub mod driver;
pub mod fleet;
pub mod gitsrc;
pub mod model;
pub mod notes;
pub mod opamp;
pub mod plan_cmd;
/// The OpAMP messages, generated from `proto/opamp/v1/*.proto` by `build.rs`:
/// a leaf that every layer may use.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.v1.rs"));
}
pub mod reconcile;
pub mod rfc3339;
pub mod simulate;
pub mod telemetry;
