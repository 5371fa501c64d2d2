//! The FUSE wire protocol: the kernel ABI structs ([`abi`]) and the request parser
//! ([`parse_request`]). Public for the fuzz target and for tools that decode `/dev/fuse`
//! traffic; the parser never panics, whatever the bytes.

pub mod abi;
mod request;

pub use request::{parse_request, Operation, ParseError, Request};
