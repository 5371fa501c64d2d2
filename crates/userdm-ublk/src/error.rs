//! Errors of the ublk export. Each says what failed and, for environment failures, the likely
//! cause and the fix.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a ublk operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UblkError {
    /// A control command finished with an error.
    #[error("ublk {cmd} failed for device {dev}", dev = DevName(*.dev_id))]
    Command {
        /// The command, as the kernel names it (`ADD_DEV`, ...).
        cmd: &'static str,
        /// The device it was for, if any.
        dev_id: Option<u32>,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A control command did not finish in time; ADD_DEV hangs on some broken kernels.
    #[error(
        "ublk {cmd} did not complete within {timeout:?}; likely cause: a ublk regression in \
         this kernel (6.17 and 6.18.4-6.18.5 are known to break ADD_DEV), or a queue thread \
         that never fetched"
    )]
    Timeout {
        /// The command.
        cmd: &'static str,
        /// How long it was given.
        timeout: Duration,
    },
    /// The control device is missing.
    #[error("the kernel has no ublk: {} does not exist; try 'modprobe ublk_drv'", .path.display())]
    NoUblk {
        /// The control device path that was tried.
        path: PathBuf,
    },
    /// The control device exists but may not be opened.
    #[error(
        "cannot open {}: permission denied; ublk devices need CAP_SYS_ADMIN (run as root)",
        .path.display()
    )]
    Permission {
        /// The control device path.
        path: PathBuf,
    },
    /// The kernel does not offer a feature that was asked for.
    #[error("this kernel's ublk driver lacks {what} ({flag}, Linux {since} or later)")]
    FeatureMissing {
        /// What the feature does, in words.
        what: &'static str,
        /// The `UBLK_F_*` flag or command.
        flag: &'static str,
        /// The first kernel release that has it.
        since: &'static str,
    },
    /// No ublk device has this id.
    #[error("no ublk device {id}")]
    NoDevice {
        /// The id.
        id: u32,
    },
    /// The device is in use and was not removed.
    #[error(
        "ublk device {id} is busy: {why}; close it (umount, dmsetup remove, stop the \
             process) and retry, or force the removal"
    )]
    Busy {
        /// The id.
        id: u32,
        /// Who holds it, and how that was found out.
        why: String,
    },
    /// The device exists but cannot be recovered.
    #[error("ublk device {id} cannot be recovered: {why}")]
    NotRecoverable {
        /// The id.
        id: u32,
        /// Why.
        why: String,
    },
    /// An option is out of range or inconsistent.
    #[error("invalid ublk option: {0}")]
    InvalidOption(String),
    /// A queue thread could not start or failed while serving.
    #[error("ublk queue {queue} failed: {what}")]
    Queue {
        /// The queue id.
        queue: u16,
        /// What went wrong.
        what: String,
    },
    /// A system call outside the control protocol failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl UblkError {
    /// The errno of the underlying failure, when there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            UblkError::Command { source, .. } | UblkError::Os { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    #[cold]
    pub(crate) fn os(what: impl Into<String>, source: io::Error) -> UblkError {
        UblkError::Os {
            what: what.into(),
            source,
        }
    }
}

struct DevName(Option<u32>);

impl std::fmt::Display for DevName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_give_cause_and_fix() {
        let e = UblkError::NoUblk {
            path: "/dev/ublk-control".into(),
        };
        assert_eq!(
            e.to_string(),
            "the kernel has no ublk: /dev/ublk-control does not exist; try 'modprobe ublk_drv'"
        );
        let e = UblkError::Command {
            cmd: "ADD_DEV",
            dev_id: Some(3),
            source: io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(e.to_string(), "ublk ADD_DEV failed for device 3");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let e = UblkError::FeatureMissing {
            what: "user copy",
            flag: "UBLK_F_USER_COPY",
            since: "6.5",
        };
        assert!(e.to_string().contains("Linux 6.5 or later"));
    }
}
