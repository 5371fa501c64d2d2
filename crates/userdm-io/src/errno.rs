//! Errno results.

use std::fmt;

/// A positive Linux errno value: how a failed request ends at every export.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

impl Errno {
    /// Input/output error: the generic failure of a block request.
    pub const EIO: Errno = Errno(5);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(16);
    /// Invalid argument: a malformed request.
    pub const EINVAL: Errno = Errno(22);
    /// No space left on device.
    pub const ENOSPC: Errno = Errno(28);
    /// Read-only device.
    pub const EROFS: Errno = Errno(30);
    /// Not a block device: dm-user's answer to reads after removal.
    pub const ENOTBLK: Errno = Errno(15);
    /// Request beyond the end of the device.
    pub const EOVERFLOW: Errno = Errno(75);
    /// The operation is not supported by this target.
    pub const EOPNOTSUPP: Errno = Errno(95);
    /// Timed out.
    pub const ETIMEDOUT: Errno = Errno(110);
    /// Try again.
    pub const EAGAIN: Errno = Errno(11);
    /// Operation canceled.
    pub const ECANCELED: Errno = Errno(125);
    /// No such device.
    pub const ENODEV: Errno = Errno(19);

    /// Wraps a positive errno; zero or negative values become EIO, because a failure must never
    /// read as success.
    pub const fn new(errno: i32) -> Errno {
        if errno > 0 {
            Errno(errno)
        } else {
            Errno::EIO
        }
    }

    /// Converts a negative kernel return value (`-errno`), as io_uring's `res`.
    pub const fn from_neg(res: i32) -> Errno {
        Errno::new(res.saturating_neg())
    }

    /// The positive value.
    pub const fn get(self) -> i32 {
        self.0
    }

    /// The symbolic name, for messages.
    pub const fn name(self) -> &'static str {
        match self.0 {
            5 => "EIO",
            11 => "EAGAIN",
            12 => "ENOMEM",
            15 => "ENOTBLK",
            16 => "EBUSY",
            19 => "ENODEV",
            22 => "EINVAL",
            28 => "ENOSPC",
            30 => "EROFS",
            75 => "EOVERFLOW",
            95 => "EOPNOTSUPP",
            110 => "ETIMEDOUT",
            125 => "ECANCELED",
            _ => "errno",
        }
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno::new(e.raw_os_error().unwrap_or(5))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_success() {
        assert_eq!(Errno::new(0), Errno::EIO);
        assert_eq!(Errno::from_neg(-22), Errno::EINVAL);
        assert_eq!(Errno::from_neg(i32::MIN).get(), i32::MAX);
        assert_eq!(Errno::EOPNOTSUPP.name(), "EOPNOTSUPP");
    }
}
