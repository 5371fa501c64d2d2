//! Request modifiers.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

/// Modifiers carried with a request. The bit values are dm-user's `DM_USER_REQ_MAP_FLAG_*`, so a
/// `user` target passes them through unchanged; ublk and NBD convert with the `from_*` functions.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct IoFlags(u64);

macro_rules! io_flags {
    ($($(#[$doc:meta])* $name:ident = $value:expr, $text:expr;)*) => {
        impl IoFlags {
            $($(#[$doc])* pub const $name: IoFlags = IoFlags($value);)*
            const NAMES: &'static [(IoFlags, &'static str)] = &[$((IoFlags::$name, $text)),*];
        }
    };
}

io_flags! {
    /// Do not retry on device errors.
    FAILFAST_DEV = 0x1, "failfast-dev";
    /// Do not retry on transport errors.
    FAILFAST_TRANSPORT = 0x2, "failfast-transport";
    /// Do not retry on driver errors.
    FAILFAST_DRIVER = 0x4, "failfast-driver";
    /// Synchronous IO: someone waits for it.
    SYNC = 0x8, "sync";
    /// Filesystem metadata.
    META = 0x10, "meta";
    /// High priority.
    PRIO = 0x20, "prio";
    /// Do not merge with neighbours.
    NOMERGE = 0x40, "nomerge";
    /// Idle-time IO.
    IDLE = 0x80, "idle";
    /// Carries integrity metadata.
    INTEGRITY = 0x100, "integrity";
    /// Forced unit access: the write is durable when it completes.
    FUA = 0x200, "fua";
    /// Flush the cache before this request.
    PREFLUSH = 0x400, "preflush";
    /// Read-ahead; may fail without harm.
    RAHEAD = 0x800, "rahead";
    /// Background IO.
    BACKGROUND = 0x1000, "background";
    /// Do not block.
    NOWAIT = 0x2000, "nowait";
    /// Punted to a cgroup worker.
    CGROUP_PUNT = 0x4000, "cgroup-punt";
    /// WRITE_ZEROES must not deallocate.
    NOUNMAP = 0x8000, "nounmap";
    /// Polled IO.
    HIPRI = 0x10000, "hipri";
    /// Driver-private.
    DRV = 0x20000, "drv";
    /// Swap IO.
    SWAP = 0x40000, "swap";
}

impl IoFlags {
    /// No flags.
    pub const fn empty() -> IoFlags {
        IoFlags(0)
    }

    /// The raw dm-user bit value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Builds flags from dm-user bits, keeping only the bits dm-user defines.
    pub const fn from_dm_user(bits: u64) -> IoFlags {
        IoFlags(bits & 0x7ffff)
    }

    /// Builds flags from ublk's `op_flags` (the bits above the op byte of `ublksrv_io_desc`).
    pub const fn from_ublk(op_flags: u32) -> IoFlags {
        let mut f = 0;
        if op_flags & (1 << 8) != 0 {
            f |= IoFlags::FAILFAST_DEV.0;
        }
        if op_flags & (1 << 9) != 0 {
            f |= IoFlags::FAILFAST_TRANSPORT.0;
        }
        if op_flags & (1 << 10) != 0 {
            f |= IoFlags::FAILFAST_DRIVER.0;
        }
        if op_flags & (1 << 11) != 0 {
            f |= IoFlags::META.0;
        }
        if op_flags & (1 << 13) != 0 {
            f |= IoFlags::FUA.0;
        }
        if op_flags & (1 << 15) != 0 {
            f |= IoFlags::NOUNMAP.0;
        }
        if op_flags & (1 << 16) != 0 {
            f |= IoFlags::SWAP.0;
        }
        IoFlags(f)
    }

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// These flags without those in `other`.
    pub const fn without(self, other: IoFlags) -> IoFlags {
        IoFlags(self.0 & !other.0)
    }
}

impl BitOr for IoFlags {
    type Output = IoFlags;
    fn bitor(self, rhs: IoFlags) -> IoFlags {
        IoFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for IoFlags {
    fn bitor_assign(&mut self, rhs: IoFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for IoFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        f.write_str("IoFlags(")?;
        for (flag, name) in IoFlags::NAMES {
            if self.contains(*flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_fua_maps() {
        let f = IoFlags::from_ublk(1 << 13 | 1 << 15);
        assert!(f.contains(IoFlags::FUA));
        assert!(f.contains(IoFlags::NOUNMAP));
        assert!(!f.contains(IoFlags::META));
    }

    #[test]
    fn dm_user_bits_are_masked() {
        assert_eq!(IoFlags::from_dm_user(u64::MAX).bits(), 0x7ffff);
        assert_eq!(
            format!("{:?}", IoFlags::FUA | IoFlags::SYNC),
            "IoFlags(sync|fua)"
        );
    }
}
