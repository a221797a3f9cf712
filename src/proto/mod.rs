//! The OpAMP messages, generated from `proto/opamp/v1/*.proto` by `build.rs`:
//! a leaf that every layer may use.

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.v1.rs"));
}
pub mod elements;

pub use elements::Elements;
pub use generated::*;
