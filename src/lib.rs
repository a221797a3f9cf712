//! opamp-gitops: a GitOps controller and OpAMP server for fleets of
//! OpenTelemetry Collectors.

pub mod api;
pub mod api_client;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod desired;
pub mod driver;
pub mod durable;
pub mod errors;
pub mod fleet;
pub mod gitsrc;
pub mod listen;
pub mod model;
pub mod notes;
pub mod opamp;
pub mod plan_cmd;
pub mod proto;
pub mod reconcile;
pub mod rfc3339;
pub mod simulate;
pub mod telemetry;
pub mod tls;
