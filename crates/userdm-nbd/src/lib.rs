//! userdm's NBD export.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod handshake;
pub mod proto;
