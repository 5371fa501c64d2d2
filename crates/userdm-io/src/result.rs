//! How a request ends inside the engine.

use std::fmt;

use crate::Errno;

/// Why a request did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// It failed; the export reports the errno.
    Failed(Errno),
    /// The target gave it back without doing anything (a `--noflush` suspend of a target that
    /// queues IO): the engine holds it and submits it again to the table that is live after
    /// resume. Never reaches an export.
    Requeue,
}

/// The result of one request.
pub type IoResult = Result<(), IoError>;

impl From<Errno> for IoError {
    fn from(e: Errno) -> IoError {
        IoError::Failed(e)
    }
}

impl IoError {
    /// The errno an export reports; a requeue that escaped the engine reads as EIO.
    pub fn errno(self) -> Errno {
        match self {
            IoError::Failed(e) => e,
            IoError::Requeue => Errno::EIO,
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Failed(e) => write!(f, "{e}"),
            IoError::Requeue => f.write_str("requeued"),
        }
    }
}

impl std::error::Error for IoError {}
