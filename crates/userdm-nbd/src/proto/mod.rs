//! A sans-IO codec for the whole NBD protocol.
//!
//! Nothing here reads or writes a socket: decoders take byte slices and encoders fill byte
//! slices (or, for the handshake, `Vec`s), so the same code serves the server, scripted test
//! clients and fuzzers. Every decoder returns a [`ProtoError`] for malformed input; none panics.
//!
//! The layout follows the specification (`NetworkBlockDevice/nbd` `doc/proto.md`), including the
//! experimental EXTENDED_HEADERS extension:
//!
//! - [`consts`]: magics, option/reply/info/command/chunk codes, errors and flag fields;
//! - [`options`]: the greeting, option requests and replies and their payloads;
//! - [`transmission`]: compact and extended requests, simple replies, structured and extended
//!   reply chunks and their payloads.

pub mod consts;
pub mod options;
pub mod transmission;
mod wire;

pub use consts::*;
pub use options::*;
pub use transmission::*;

/// Why a message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number is not the one this message must start with.
    #[error("bad magic {found:#x}")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// A protocol string is invalid.
    #[error("invalid string: {reason}")]
    BadString {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A length does not fit the field that must carry it.
    #[error("length {length} does not fit its field")]
    LengthTooLarge {
        /// The length.
        length: u64,
    },
    /// The message breaks one of the specification's rules.
    #[error("malformed message: {reason}")]
    Malformed {
        /// The rule broken.
        reason: &'static str,
    },
    /// The output buffer is too small.
    #[error("output needs {needed} bytes, {available} left")]
    NoRoom {
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// More bytes follow the message than its layout allows.
    #[error("{extra} unexpected trailing bytes")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The message ends early.
    #[error("message truncated: needs {needed} bytes, {available} left")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
}
