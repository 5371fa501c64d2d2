//! The control plane's errors.

use std::path::PathBuf;

use crate::proto::{ErrorKind, ErrorReply};

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Reading or writing a socket or file failed.
    #[error("i/o failed")]
    Io(#[source] std::io::Error),
    /// A file or directory of the run directory could not be used.
    #[error("{what} {path}")]
    RunDir {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The device's server could not be reached.
    #[error("cannot reach the server of device {device} at {path}")]
    Connect {
        /// The device name.
        device: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A value could not be encoded (a bug).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: this userdm speaks control protocol {ours}, the device's \
         server speaks {theirs}; use the userdm binary that started the server, or remove and \
         recreate the device"
    )]
    Version {
        /// This build's version.
        ours: u32,
        /// The peer's version, if it sent one.
        theirs: String,
    },
    /// The server refused the command.
    #[error("{}", .0.message)]
    Server(ErrorReply),
    /// A server process could not be started or did not come up.
    #[error("{0}")]
    Launch(String),
}

impl ControlError {
    /// The server's error kind, if the server refused the command.
    pub fn server_kind(&self) -> Option<ErrorKind> {
        match self {
            ControlError::Server(e) => Some(e.kind),
            _ => None,
        }
    }
}
