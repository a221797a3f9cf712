//! The OpAMP protocol: generated messages, the wire codec, and the server
//! transports and sessions.

pub mod codec;
mod context;
pub mod session;
pub mod transport;

pub use context::OpampContext;

/// Messages generated from `proto/opamp/v1/*.proto` by `build.rs`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.v1.rs"));
}
