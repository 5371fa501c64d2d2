//! The IO model shared by every userdm layer.
//!
//! A block request, whether it came from ublk, NBD, FUSE or a dm-user daemon, is described by an
//! [`IoOp`], a set of [`IoFlags`], a start sector and a length. Targets state which operations they
//! serve with an [`OpSet`]; the engine fails anything else with [`Errno::EOPNOTSUPP`] before the
//! target sees it. Results are errno values because every export ends in one (ublk's `-errno`
//! result, NBD's error field, a FUSE reply), so carrying anything richer would be thrown away.
//!
//! This crate makes no syscalls and has no dependencies, so every other crate can use it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod errno;
mod flags;
pub mod limits;
mod op;
mod result;

pub use errno::Errno;
pub use flags::IoFlags;
pub use op::{IoOp, OpSet};
pub use result::{IoError, IoResult};

/// The size of a device-mapper sector, the unit of every table and every request.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// Converts bytes to whole sectors, or `None` when `bytes` is not sector aligned.
pub const fn bytes_to_sectors(bytes: u64) -> Option<u64> {
    if bytes % SECTOR_SIZE == 0 {
        Some(bytes >> SECTOR_SHIFT)
    } else {
        None
    }
}

/// Converts sectors to bytes, or `None` on overflow.
pub const fn sectors_to_bytes(sectors: u64) -> Option<u64> {
    sectors.checked_mul(SECTOR_SIZE)
}

/// One block request as a target sees it: where, how much, and what to do.
///
/// `sector` is relative to the start of the target's row (as the kernel's `dm_target_offset`),
/// except where a target documents otherwise (dm-user's `user` target reports device-relative
/// sectors, as dm-user does). Data buffers travel beside this header, not inside it, so the header
/// is `Copy` and costs nothing to pass around.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoHeader {
    /// What to do.
    pub op: IoOp,
    /// Modifiers such as FUA.
    pub flags: IoFlags,
    /// First sector, relative to the row (see above).
    pub sector: u64,
    /// Length in bytes. Zero for FLUSH; sector aligned for everything else.
    pub len_bytes: u64,
}

impl IoHeader {
    /// Byte offset of the first byte, or `None` on overflow.
    pub fn offset_bytes(&self) -> Option<u64> {
        sectors_to_bytes(self.sector)
    }

    /// One past the last sector touched, or `None` on overflow.
    pub fn end_sector(&self) -> Option<u64> {
        self.sector
            .checked_add(self.len_bytes.div_ceil(SECTOR_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_conversions() {
        assert_eq!(bytes_to_sectors(4096), Some(8));
        assert_eq!(bytes_to_sectors(4095), None);
        assert_eq!(sectors_to_bytes(8), Some(4096));
        assert_eq!(sectors_to_bytes(u64::MAX), None);
    }

    #[test]
    fn header_end() {
        let h = IoHeader {
            op: IoOp::Read,
            flags: IoFlags::empty(),
            sector: 10,
            len_bytes: 1024,
        };
        assert_eq!(h.end_sector(), Some(12));
        assert_eq!(h.offset_bytes(), Some(5120));
    }
}
