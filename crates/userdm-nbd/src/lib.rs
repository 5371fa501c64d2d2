//! userdm's NBD export.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod handshake;
pub mod mem;
pub mod proto;
pub mod server;
pub mod stream;
