//! The OpAMP protocol: the wire codec, and the server transports and
//! sessions. The messages themselves are generated into [`crate::proto`].

pub mod codec;
mod context;
pub mod session;
pub mod transport;

pub use context::{FIRST_REPLY_WAIT, OpampContext};
